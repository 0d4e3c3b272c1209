"""The streaming GC body parser accepts and refuses what the whole-body model does, however
the body is cut into pieces, and refuses hostile bodies with a BodyError, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from masqd.api.gcbody import MAX_PENDING, BodyError, GcBodyParser
from masqd.models import GcRequest, ValidAttachment


def parse(body: bytes, cuts: list[int] = []) -> list[ValidAttachment]:  # noqa: B006
    parser = GcBodyParser()
    entries: list[ValidAttachment] = []
    start = 0
    for cut in sorted(c % (len(body) + 1) for c in cuts):
        entries += parser.feed(body[start:cut])
        start = max(start, cut)
    entries += parser.feed(body[start:])
    entries += parser.feed(b"", eof=True)
    return entries


def whole(body: bytes) -> tuple[ValidAttachment, ...] | None:
    """What GcRequest makes of the body parsed whole; None when it is refused."""
    try:
        return GcRequest.model_validate(json.loads(body)).valid_attachments
    except (ValueError, ValidationError):
        return None


names = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,6}", fullmatch=True)
entry = st.fixed_dictionaries({"container_id": names, "ifname": names})
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.builds(lambda v: {"valid_attachments": v}, st.lists(entry, max_size=20)),
    st.builds(lambda v: {"valid_attachments": v}, st.lists(entry | json_values, max_size=5)),
    st.dictionaries(st.sampled_from(["valid_attachments", "x"]), json_values, max_size=2),
    json_values,
)


@given(
    body=bodies,
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    indent=st.sampled_from([None, 2]),
)
def test_same_answer_as_the_whole_body_model_however_cut(
    body: Any, cuts: list[int], indent: int | None
) -> None:
    raw = json.dumps(body, indent=indent).encode()
    expected = whole(raw)
    if expected is None:
        with pytest.raises(BodyError):
            parse(raw, cuts)
    else:
        assert tuple(parse(raw, cuts)) == expected


@given(raw=st.binary(max_size=60), cuts=st.lists(st.integers(0, 100), max_size=3))
def test_arbitrary_bytes_are_parsed_or_refused_with_a_body_error(
    raw: bytes, cuts: list[int]
) -> None:
    try:
        parse(b'{"valid_attachments": [' + raw, cuts)
    except BodyError as exc:
        assert exc.message


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"valid_attachments": [' + b"[" * 3000 + b"]" * 3000 + b"]}", "nested too deeply"),
        (b'{"valid_attachments": [' + b"1" * 5000 + b"]}", "number is too long"),
        (b'{"valid_attachments": [{"container_id": "' + b"a" * (MAX_PENDING + 10), "Unterminated"),
        (b'{"valid_attachments": [0.' + b"0" * (MAX_PENDING + 10), "longer than"),
        (b'{"valid_attachments": [], "valid_attachments": []}', "once and nothing else"),
        (b'{"valid_attachments": []} {}', "extra data"),
        (b'{"valid_attachments": [{"container_id": "a"}]}', "invalid body"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"valid_attachments": [', "ends too early"),
    ],
)
def test_hostile_bodies_get_a_clear_error(body: bytes, says: str) -> None:
    with pytest.raises(BodyError, match=says):
        parse(body, [len(body) // 3, len(body) // 2])


def test_an_invalid_entry_is_named_by_its_index() -> None:
    good = {"container_id": "a", "ifname": "eth0"}
    body = json.dumps({"valid_attachments": [good, good, {"container_id": "b", "ifname": 5}]})
    with pytest.raises(BodyError) as caught:
        parse(body.encode(), [10, 40])
    assert caught.value.details == (
        {"loc": "valid_attachments.2.ifname", "msg": "Input should be a valid string"},
    )


def test_a_big_body_is_parsed_piece_by_piece_with_little_pending() -> None:
    entries = [{"container_id": f"c{i:063d}", "ifname": "eth0"} for i in range(20_000)]
    raw = json.dumps({"valid_attachments": entries}).encode()
    parser = GcBodyParser()
    seen = 0
    for start in range(0, len(raw), 8192):
        seen += len(parser.feed(raw[start : start + 8192]))
        assert len(parser._buf) - parser._pos < 8192 + 200  # one piece and one entry at most
    seen += len(parser.feed(b"", eof=True))
    assert seen == 20_000
