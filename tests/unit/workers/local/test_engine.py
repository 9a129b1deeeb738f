"""The transformers engine over the tiny random model, on the CPU."""

from __future__ import annotations

import string
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import httpx
import torch
import transformers

from nilai.workers.local.engine import (
    Finished,
    SamplingParams,
    TransformersEngine,
    optional_module,
)
from nilai.workers.local.server import create_worker_app
from nilai.workers.local.tiny import (
    SPECIAL_TOKENS,
    is_tiny_model,
    vocabulary,
    write_tiny_model,
)

MESSAGES = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-model", seed=0)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TransformersEngine:
    return TransformersEngine(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompt(engine: TransformersEngine) -> list[int]:
    return engine.encode_chat(MESSAGES)


def run(
    engine: TransformersEngine,
    prompt: list[int],
    params: SamplingParams,
    cancelled: threading.Event | None = None,
) -> tuple[str, Finished, list[str]]:
    items = list(engine.generate(prompt, params, cancelled or threading.Event()))
    *pieces, finished = items
    assert isinstance(finished, Finished)
    assert all(isinstance(piece, str) and piece for piece in pieces)
    return "".join(pieces), finished, pieces


def token_count(engine: TransformersEngine, text: str) -> int:
    return len(engine._tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def greedy(engine: TransformersEngine, prompt: list[int]) -> str:
    text, finished, _ = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0))
    assert finished == Finished("length", 40), "the tiny model no longer avoids EOS greedily"
    return text


# --- the tiny model on disk -------------------------------------------------------------------


def test_is_tiny_model(model_dir: Path, tmp_path: Path):
    assert is_tiny_model(model_dir)
    assert not is_tiny_model(tmp_path)
    assert not is_tiny_model(tmp_path / "missing")


def test_vocabulary_is_printable_characters_after_the_specials():
    vocab = vocabulary()
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    chars = vocab[len(SPECIAL_TOKENS) :]
    assert len(set(vocab)) == len(vocab)
    assert all(len(c) == 1 and c in string.printable for c in chars)
    assert all(c.isprintable() or c in " \n" for c in chars)
    assert not set(chars) & set("\r\t\x0b\x0c")
    assert set(string.ascii_letters + string.digits + string.punctuation + " \n") == set(chars)


def test_loads_offline_with_the_auto_classes(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)

    assert len(tokenizer) == len(vocabulary())
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.chat_template
    assert model.config.model_type == "llama"
    ids = tokenizer("Hi!", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Hi!"
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, 3, len(vocabulary()))


def test_same_seed_writes_identical_weights_another_seed_differs(model_dir: Path, tmp_path: Path):
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)

    weights = (model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert is_tiny_model(again)
    assert "seed=1" in (other / "NILAI_TINY_MODEL.txt").read_text()


# --- the engine -------------------------------------------------------------------------------


def test_engine_describes_the_model(engine: TransformersEngine):
    assert engine.model_id == "tiny-model"
    assert engine.max_model_len == 2048
    assert engine.device == "cpu"


def test_model_id_can_be_given(model_dir: Path):
    assert TransformersEngine(str(model_dir), model_id="custom").model_id == "custom"


def test_encode_chat_starts_with_bos_and_ends_with_the_assistant_prompt(
    engine: TransformersEngine, prompt: list[int]
):
    tokenizer = engine._tokenizer
    assistant = tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]

    assert prompt[0] == tokenizer.bos_token_id
    assert prompt[-len(assistant) :] == assistant
    assert tokenizer.decode(prompt) == "<s><|user|>\nHello there.\n<|assistant|>\n"


def test_encode_chat_joins_text_parts(engine: TransformersEngine, prompt: list[int]):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there."}]
    assert engine.encode_chat([{"role": "user", "content": parts}]) == prompt


def test_same_seed_same_text_different_seeds_differ(engine: TransformersEngine, prompt: list[int]):
    texts = {}
    for seed in (1, 2, 3, 4):
        first = run(engine, prompt, SamplingParams(max_tokens=20, seed=seed))
        second = run(engine, prompt, SamplingParams(max_tokens=20, seed=seed))
        assert first[:2] == second[:2]
        texts[seed] = first[0]
    assert len(set(texts.values())) > 1


def test_temperature_zero_is_deterministic_without_a_seed(
    engine: TransformersEngine, prompt: list[int], greedy: str
):
    params = SamplingParams(max_tokens=40, temperature=0)
    assert run(engine, prompt, params)[0] == greedy
    assert run(engine, prompt, params)[0] == greedy


def test_greedy_output_matches_transformers_generate(
    engine: TransformersEngine, prompt: list[int], greedy: str
):
    model = engine._model
    ids = torch.tensor([prompt])
    suppressed = [i for i in engine._tokenizer.all_special_ids if i != model.config.eos_token_id]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=40,
            do_sample=False,
            suppress_tokens=suppressed,
        )
    assert engine._tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True) == greedy


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_respected(
    engine: TransformersEngine, prompt: list[int], greedy: str, max_tokens: int
):
    text, finished, pieces = run(
        engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    assert finished == Finished("length", max_tokens)
    assert text == greedy[:max_tokens]
    assert len(pieces) == max_tokens  # one character per token: every token is released at once


def test_stop_string_cuts_the_output(engine: TransformersEngine, prompt: list[int], greedy: str):
    middle = len(greedy) // 2
    stop = next(
        greedy[i : i + 2]
        for i in range(middle, len(greedy) - 2)
        if greedy.find(greedy[i : i + 2]) > 3
    )
    before = greedy[: greedy.index(stop)]

    text, finished, _ = run(
        engine, prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,))
    )

    assert text == before
    assert finished == Finished("stop", len(before) + len(stop))


@pytest.mark.parametrize("seed", [0, 3])
def test_stop_strings_cut_sampled_output(engine: TransformersEngine, prompt: list[int], seed: int):
    full, _, _ = run(engine, prompt, SamplingParams(max_tokens=40, seed=seed))
    stops = (full[20:22], full[30:33])
    cut = min(full.index(s) for s in stops)

    text, finished, _ = run(engine, prompt, SamplingParams(max_tokens=40, seed=seed, stop=stops))

    assert text == full[:cut]
    assert finished.finish_reason == "stop"


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 11])
def test_completion_tokens_match_the_tokenizer(
    engine: TransformersEngine, prompt: list[int], seed: int
):
    text, finished, _ = run(engine, prompt, SamplingParams(max_tokens=30, seed=seed))
    assert finished.completion_tokens == token_count(engine, text)
    if finished.finish_reason == "length":
        assert finished.completion_tokens == 30
    else:
        assert finished.finish_reason == "stop"  # EOS before the limit


def test_cancelled_before_start_generates_nothing(engine: TransformersEngine, prompt: list[int]):
    cancelled = threading.Event()
    cancelled.set()
    items = list(engine.generate(prompt, SamplingParams(max_tokens=10, seed=0), cancelled))
    assert items == [Finished("cancelled", 0)]


def test_cancel_mid_generation_stops_at_once(engine: TransformersEngine, prompt: list[int]):
    cancelled = threading.Event()
    pieces: list[str] = []
    finished = None
    for item in engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0), cancelled):
        if isinstance(item, Finished):
            finished = item
            break
        pieces.append(item)
        if len(pieces) == 3:
            cancelled.set()
    assert finished == Finished("cancelled", 3)
    assert len(pieces) == 3


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_special_tokens_other_than_eos_are_never_generated(
    engine: TransformersEngine, prompt: list[int], temperature: float
):
    for seed in range(6):
        params = SamplingParams(max_tokens=40, temperature=temperature, seed=seed)
        text, finished, _ = run(engine, prompt, params)
        for special in ("<s>", "<pad>", "<unk>"):
            assert special not in text
        # a hidden special token would count without showing up in the text
        assert finished.completion_tokens == token_count(engine, text)


def test_sampling_never_picks_a_suppressed_token(engine: TransformersEngine):
    tokenizer = engine._tokenizer
    size = len(vocabulary())
    specials = {tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    generator = torch.Generator().manual_seed(0)

    def logits_favouring(*ids: int) -> Any:
        logits = torch.zeros(size)
        logits[list(ids)] = 30.0
        return logits

    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert engine._sample(logits_favouring(*specials), greedy, generator) not in specials
    eos = tokenizer.eos_token_id
    assert engine._sample(logits_favouring(eos), greedy, generator) == eos
    sampled = SamplingParams(max_tokens=1, temperature=5.0)
    picks = {engine._sample(logits_favouring(*specials), sampled, generator) for _ in range(200)}
    assert not picks & specials


def test_tiny_top_p_behaves_like_greedy(engine: TransformersEngine, prompt: list[int], greedy: str):
    for seed in (0, 1):
        params = SamplingParams(max_tokens=40, temperature=1.0, top_p=1e-6, seed=seed)
        assert run(engine, prompt, params)[0] == greedy


def test_top_p_changes_sampling(engine: TransformersEngine, prompt: list[int]):
    wide = run(engine, prompt, SamplingParams(max_tokens=40, seed=4))[0]
    narrow = run(engine, prompt, SamplingParams(max_tokens=40, seed=4, top_p=0.3))[0]
    assert wide != narrow


def test_optional_module_names_the_local_extra():
    with pytest.raises(RuntimeError, match="'local' extra") as info:
        optional_module("nilai_no_such_module_for_tests")
    assert "nilai_no_such_module_for_tests" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_optional_module_imports_what_is_there():
    assert optional_module("torch") is torch


# --- the worker over the real engine ----------------------------------------------------------


@pytest.fixture
def worker(engine: TransformersEngine) -> Iterator[Any]:
    app = create_worker_app(engine)
    yield app
    app.state.generations.close()


async def test_worker_answers_with_tokenizer_counts(engine: TransformersEngine, worker: Any):
    transport = httpx.ASGITransport(app=worker)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny-model", "messages": MESSAGES, "temperature": 0, "max_tokens": 12},
        )
    assert response.status_code == 200, response.text
    data = response.json()
    content = data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == len(engine.encode_chat(MESSAGES))
    assert data["usage"]["completion_tokens"] == token_count(engine, content) == 12


async def test_out_of_range_seed_is_not_a_server_error(worker: Any):
    transport = httpx.ASGITransport(app=worker, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "tiny-model", "messages": MESSAGES, "max_tokens": 4, "seed": 2**64},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "seed"
