"""Write a tiny random-weight Llama model: offline quickstart and tests, output is noise.

The tokenizer is character-level over printable ASCII, so whatever the random weights pick is
readable text. The same seed gives the same weights.
"""

from __future__ import annotations

import string
from pathlib import Path

from nilai.workers.local.engine import optional_module

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# transformers renders templates with trim_blocks, so newlines are written as expressions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)
NOISE_NOTICE = (
    "The tiny model has random weights: it answers with readable noise, not language. "
    "For real answers run a real model, e.g. `nilai serve --model Qwen/Qwen2.5-0.5B-Instruct` "
    "(downloaded from the Hugging Face hub) or a local directory with a Hugging Face model."
)
TINY_MARKER = "nilai-tiny"


def vocabulary() -> list[str]:
    """Special tokens, then every printable ASCII character except vertical whitespace."""
    printable = [c for c in string.printable if c not in "\r\x0b\x0c\t"]
    return SPECIAL_TOKENS + printable


def write_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Write model, tokenizer and chat template to ``directory`` and return it."""
    torch = optional_module("torch")
    tokenizers = optional_module("tokenizers")
    transformers = optional_module("transformers")

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(vocabulary())}
    # Keyword names are the tokenizer's roles (not secrets), hence passed as a mapping.
    roles = dict(
        zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS, strict=True)
    )
    bpe = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token=roles["unk_token"])
    backend = tokenizers.Tokenizer(bpe)
    backend.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=2048,
        **roles,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(directory)
    (directory / "NILAI_TINY_MODEL.txt").write_text(f"{TINY_MARKER} seed={seed}\n{NOISE_NOTICE}\n")
    return directory


def is_tiny_model(directory: Path) -> bool:
    """Whether ``directory`` holds a model written by ``write_tiny_model``."""
    return (directory / "NILAI_TINY_MODEL.txt").is_file()
