"""Streaming text helpers: whole characters out of tokens, stop strings cut exactly."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from nilai.workers.local.text import IncrementalDetokenizer, StopMatcher

REPLACEMENT = "\ufffd"


class ByteDecoder:
    """Every token id is one byte of UTF-8."""

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        assert skip_special_tokens is True
        return bytes(token_ids).decode("utf-8", errors="replace")


class PieceDecoder:
    """Sentencepiece-like: ``▁`` marks a space, and a leading space of the output is dropped.

    Decoding a token alone therefore differs from decoding it after others: the text of
    earlier tokens changes once later tokens arrive.
    """

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(piece) for piece in pieces]

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        text = "".join(self.pieces[i] for i in token_ids).replace("▁", " ")
        return text.removeprefix(" ")


class WordDecoder:
    """WordPiece-like: words joined by spaces, and no space before punctuation."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        text = " ".join(self.words[i] for i in token_ids)
        for mark in ".,!?":
            text = text.replace(f" {mark}", mark)
        return text


def stream(detokenizer: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detokenizer.add(token) for token in ids]


# --- IncrementalDetokenizer -------------------------------------------------------------------

TEXTS = [
    "hello",
    "héllo wörld — 你好 🎉",
    "🎉🎉🎉",
    "ü",
    "a你b好c",
    "emoji at the end 👩‍👩‍👧",
    "ça va? ñ ø å ß € ∑ 𝄞",
]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_one_at_a_time_never_split_a_character(text: str):
    detokenizer = IncrementalDetokenizer(ByteDecoder())

    pieces = stream(detokenizer, list(text.encode()))
    rest = detokenizer.flush()

    assert all(REPLACEMENT not in piece for piece in pieces)
    assert REPLACEMENT not in rest
    assert "".join(pieces) + rest == text


@pytest.mark.parametrize("text", TEXTS)
def test_whole_characters_are_released_as_soon_as_complete(text: str):
    detokenizer = IncrementalDetokenizer(ByteDecoder())
    released = ""
    for char in text:
        encoded = char.encode()
        for byte in encoded[:-1]:
            assert detokenizer.add(byte) == ""
        released += detokenizer.add(encoded[-1])
        assert released == text[: len(released)]
    assert released == text
    assert detokenizer.flush() == ""


def test_ascii_is_released_token_by_token():
    detokenizer = IncrementalDetokenizer(ByteDecoder())
    assert stream(detokenizer, list(b"abc")) == ["a", "b", "c"]


def test_sentencepiece_like_decoder_gives_the_full_text():
    decoder = PieceDecoder(["▁hello", "▁world", ",", "▁", "▁é", "x", "▁你好"])
    ids = decoder.ids("▁hello", "▁world", ",", "▁", "▁", "x", "▁é", "▁你好", "▁world")
    detokenizer = IncrementalDetokenizer(decoder)

    pieces = stream(detokenizer, ids)
    total = "".join(pieces) + detokenizer.flush()

    assert total == decoder.decode(ids, skip_special_tokens=True)
    assert total == "hello world,  x é 你好 world"


def test_sentencepiece_like_decoder_starting_with_a_bare_space():
    decoder = PieceDecoder(["▁", "▁x", "y"])
    ids = decoder.ids("▁", "▁x", "y", "▁", "y")
    detokenizer = IncrementalDetokenizer(decoder)

    total = "".join(stream(detokenizer, ids)) + detokenizer.flush()

    assert total == decoder.decode(ids, skip_special_tokens=True) == " xy y"


def test_decoder_that_rewrites_spacing_gives_the_full_text():
    decoder = WordDecoder(["hello", "world", ".", "again", "!"])
    ids = [0, 2, 1, 3, 4, 2, 0]
    detokenizer = IncrementalDetokenizer(decoder)

    total = "".join(stream(detokenizer, ids)) + detokenizer.flush()

    assert total == decoder.decode(ids, skip_special_tokens=True) == "hello. world again!. hello"


def test_random_byte_streams_of_mixed_text_round_trip():
    rng = random.Random(1234)
    alphabet = "aé—你🎉 ñ\n𝄞"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        detokenizer = IncrementalDetokenizer(ByteDecoder())
        pieces = stream(detokenizer, list(text.encode()))
        assert all(REPLACEMENT not in piece for piece in pieces)
        assert "".join(pieces) + detokenizer.flush() == text


class ChunkDecoder:
    """Byte-level BPE-like: every token is a run of bytes that may cut a character anywhere."""

    def __init__(self) -> None:
        self.table: list[bytes] = []

    def tokenize(self, data: bytes, rng: random.Random) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(data):
            end = start + rng.randint(1, 4)
            self.table.append(data[start:end])
            ids.append(len(self.table) - 1)
            start = end
        return ids

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        return b"".join(self.table[i] for i in token_ids).decode("utf-8", errors="replace")


def test_multi_byte_tokens_that_cut_characters_round_trip():
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice("aé—你🎉 ñ\n𝄞") for _ in range(rng.randint(0, 12)))
        decoder = ChunkDecoder()
        detokenizer = IncrementalDetokenizer(decoder)
        pieces = stream(detokenizer, decoder.tokenize(text.encode(), rng))
        assert all(REPLACEMENT not in piece for piece in pieces)
        assert "".join(pieces) + detokenizer.flush() == text


def test_flush_returns_a_truncated_character_held_at_the_end():
    detokenizer = IncrementalDetokenizer(ByteDecoder())
    ids = list(b"ab") + list("你".encode())[:2]

    pieces = stream(detokenizer, ids)

    assert "".join(pieces) == "ab"
    held = detokenizer.flush()
    assert held
    assert held == REPLACEMENT
    assert detokenizer.flush() == ""


def test_flush_without_tokens_is_empty():
    assert IncrementalDetokenizer(ByteDecoder()).flush() == ""


def test_text_after_a_flush_continues():
    detokenizer = IncrementalDetokenizer(ByteDecoder())
    first = "".join(stream(detokenizer, list("hé".encode()))) + detokenizer.flush()
    second = "".join(stream(detokenizer, list(" 你".encode()))) + detokenizer.flush()
    assert (first, second) == ("hé", " 你")


# --- StopMatcher ------------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, chunks: Sequence[str]) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        out.append(matcher.feed(chunk))
        if matcher.stopped:
            break
    return out


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("hello") == "hello"
    assert matcher.feed(" wor") == " wor"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_empty_stop_strings_are_ignored():
    matcher = StopMatcher(["", ""])
    assert matcher.feed("hello") == "hello"
    assert not matcher.stopped

    matcher = StopMatcher(["", "lo"])
    assert "".join(feed_all(matcher, ["hel", "lo there"])) == "hel"
    assert matcher.stopped


def test_stop_split_across_feeds_is_cut_exactly():
    matcher = StopMatcher(["STOP"])

    assert matcher.feed("before S") == "before "
    assert matcher.feed("T") == ""
    assert matcher.feed("O") == ""
    assert not matcher.stopped
    assert matcher.feed("P and after") == ""
    assert matcher.stopped
    assert matcher.flush() == ""


def test_text_before_a_stop_in_the_same_feed_is_released():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("one\n\ntwo") == "one"
    assert matcher.stopped


def test_stop_at_the_very_start_releases_nothing():
    matcher = StopMatcher(["ab"])
    assert feed_all(matcher, ["a", "b", "c"]) == ["", ""]
    assert matcher.stopped


def test_partial_match_that_is_no_stop_is_released_later():
    matcher = StopMatcher(["STOP"])

    assert matcher.feed("go ST") == "go "
    assert matcher.feed("O") == ""
    assert matcher.feed("RM") == "STORM"
    assert not matcher.stopped
    assert matcher.feed("!") == "!"


def test_overlapping_prefixes_are_held_correctly():
    matcher = StopMatcher(["aab"])
    out = feed_all(matcher, ["a", "a", "a", "b", "zzz"])
    assert "".join(out) == "a"
    assert matcher.stopped


def test_earliest_stop_wins():
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.stopped

    matcher = StopMatcher(["END", "X"])
    assert "".join(feed_all(matcher, ["a E", "N", "D X"])) == "a "


def test_flush_releases_held_text():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("the end ST") == "the end "
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""
    assert not matcher.stopped


@pytest.mark.parametrize("seed", range(5))
def test_any_chunking_gives_the_text_before_the_first_stop(seed: int):
    rng = random.Random(seed)
    stops = ["<END>", "\n\n", "zz"]
    for _ in range(100):
        text = "".join(rng.choice("ab<END>\nz ") for _ in range(rng.randint(0, 30)))
        found = [i for stop in stops if (i := text.find(stop)) >= 0]
        expected = text[: min(found)] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

        matcher = StopMatcher(stops)
        out = "".join(feed_all(matcher, chunks))
        if not matcher.stopped:
            out += matcher.flush()

        assert out == expected, (text, chunks)
        assert matcher.stopped == bool(found)
