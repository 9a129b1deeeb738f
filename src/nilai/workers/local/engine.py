"""Generation over Hugging Face transformers: one token loop with sampling, stops and cancel.

The loop is written out (rather than ``model.generate``) so each step can check cancellation,
apply stop strings and release text as it becomes complete. It runs in a worker thread; the
server runs one generation at a time, so requests never share state.
"""

from __future__ import annotations

import importlib
import inspect
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nilai.workers.local.text import IncrementalDetokenizer, StopMatcher


def optional_module(name: str) -> Any:
    """Import a module of the ``local`` extra, saying how to get it if it is missing.

    Any: torch and transformers are only partly typed; this code treats them as dynamic.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(
            f"the local engine needs {name}: install nilai with the 'local' extra "
            "(pip install 'nilai[local]', or make setup)"
        ) from exc


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a generation."""

    finish_reason: FinishReason
    completion_tokens: int


async def collect(output: AsyncIterator[str | Finished]) -> tuple[str, Finished]:
    """A whole generation: its text, and how it finished."""
    pieces: list[str] = []
    finished = Finished("stop", 0)
    async for item in output:
        if isinstance(item, Finished):
            finished = item
        else:
            pieces.append(item)
    return "".join(pieces), finished


class ModelNotFoundError(Exception):
    """The model is neither a local directory nor loadable as a hub id; the message says why."""


def looks_like_path(model: str) -> bool:
    """Whether ``model`` is written as a filesystem path rather than a hub id.

    Hub ids are ``name`` or ``org/name``; a leading ``/``, ``.`` or ``~``, a second ``/`` or a
    backslash can only be a path.
    """
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def check_model_source(model: str) -> None:
    """Raise ``ModelNotFoundError`` for a model path that does not exist, before loading.

    Without this check transformers treats the missing directory as a hub id and fails many
    lines later with an error about repository names.
    """
    path = Path(model).expanduser()
    if looks_like_path(model) and not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        raise ModelNotFoundError(
            f"model directory {model} {problem}; --model takes a local model directory "
            "or a Hugging Face hub id (e.g. org/name, which needs network access "
            "unless it is already cached)"
        )


def default_model_id(model: str) -> str:
    """The id a model is served under: a directory's name, or the hub id as given."""
    path = Path(model)
    return path.name if path.exists() else model


class TransformersEngine:
    """A causal language model and its tokenizer, loaded once."""

    def __init__(self, model: str, *, device: str = "cpu", model_id: str | None = None) -> None:
        torch = optional_module("torch")
        transformers = optional_module("transformers")
        self._torch = torch
        self.device = device
        self.model_id = model_id or default_model_id(model)
        dtype = torch.float32 if device == "cpu" else "auto"
        check_model_source(model)
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        # OSError: transformers' "not a local folder and not a valid model id"; ValueError: a
        # directory without tokenizer files ("convert a slow tokenizer")
        except (OSError, ValueError) as exc:
            if Path(model).expanduser().is_dir():
                why = f"the directory holds no usable model or tokenizer: {_first_line(exc)}"
            else:
                why = (
                    "there is no such local directory, and loading it as a Hugging Face hub id "
                    "failed (hub ids need network access unless already cached): "
                    f"{_first_line(exc)}"
                )
            raise ModelNotFoundError(f"cannot load model {model!r}: {why}") from exc
        self._model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        self._model = self._model.to(device)
        self._model.eval()
        config = self._model.config
        self.max_model_len: int = int(
            getattr(config, "max_position_embeddings", None) or self._tokenizer.model_max_length
        )
        self._eos_ids = _eos_ids(self._model.generation_config.eos_token_id, self._tokenizer)
        # transformers renamed the KV-cache argument from past_key_values to cache.
        self._cache_arg = (
            "cache"
            if "cache" in inspect.signature(self._model.forward).parameters
            else "past_key_values"
        )
        never: set[int] = set(self._tokenizer.all_special_ids) - self._eos_ids
        self._suppressed = torch.tensor(sorted(never), dtype=torch.long, device=device)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Apply the model's chat template and tokenize the prompt."""
        text: str = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[str | Finished]:
        """Yield pieces of text, then one ``Finished``; stops early when ``cancelled`` is set."""
        torch = self._torch
        with torch.inference_mode():
            yield from self._loop(prompt, params, cancelled)

    def _loop(
        self, prompt: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[str | Finished]:
        torch = self._torch
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        stops = StopMatcher(params.stop)
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        cache: Any = None
        generated = 0
        reason: FinishReason = "length"
        while generated < params.max_tokens:
            if cancelled.is_set():
                reason = "cancelled"
                break
            out = self._model(input_ids=tokens, use_cache=True, **{self._cache_arg: cache})
            cache = getattr(out, self._cache_arg)
            token = self._sample(out.logits[0, -1], params, generator)
            if token in self._eos_ids:
                reason = "stop"
                break
            generated += 1
            if text := stops.feed(detokenizer.add(token)):
                yield text
            if stops.stopped:
                reason = "stop"
                break
            tokens = torch.tensor([[token]], dtype=torch.long, device=self.device)
        if not stops.stopped and (rest := stops.feed(detokenizer.flush()) + stops.flush()):
            yield rest
        yield Finished(reason, generated)

    def _sample(self, logits: Any, params: SamplingParams, generator: Any) -> int:
        torch = self._torch
        logits = logits.float()
        if self._suppressed.numel():
            logits[self._suppressed] = float("-inf")
        if params.temperature <= 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs[before >= params.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator).item())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _eos_ids(configured: object, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(i for i in configured if isinstance(i, int))  # pyright: ignore[reportUnknownVariableType]
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return ids
