import json

from nilai.crypto.canonical import canonical_json


def test_keys_are_sorted_at_every_level():
    obj = {"b": 1, "a": {"z": 0, "y": [{"d": 1, "c": 2}]}}
    assert canonical_json(obj) == b'{"a":{"y":[{"c":2,"d":1}],"z":0},"b":1}'


def test_no_spaces_between_tokens():
    out = canonical_json({"k": [1, 2, {"x": None, "t": True}], "s": "a b"})
    assert out == b'{"k":[1,2,{"t":true,"x":null}],"s":"a b"}'
    # The only space left is the one inside the string value.
    assert out.count(b" ") == 1


def test_non_ascii_is_kept_as_raw_utf8():
    out = canonical_json({"text": "héllo ✓ 日本"})
    assert out == '{"text":"héllo ✓ 日本"}'.encode()
    assert b"\\u" not in out
    assert "é".encode() in out


def test_key_order_of_input_does_not_matter():
    first = {"x": 1, "y": 2, "z": 3}
    second = {"z": 3, "y": 2, "x": 1}
    assert canonical_json(first) == canonical_json(second)


def test_returns_bytes_that_round_trip():
    obj = {"n": 1.5, "list": ["ü", 2], "nested": {"b": False}}
    out = canonical_json(obj)
    assert isinstance(out, bytes)
    assert json.loads(out) == obj


def test_control_characters_are_escaped():
    assert canonical_json({"s": 'a"\n\\'}) == b'{"s":"a\\"\\n\\\\"}'
