"""A GC request body, parsed as it arrives: `{"valid_attachments": [{...}, ...]}`.

A GC body may be 32 MiB (about 500,000 entries). Parsed whole, with `json.loads` and then
pydantic, it held the event loop for 1.7 s and took about 90 MiB per request (the bytes, the
decoded objects, the models), and a thread does not help: both parsers hold the GIL. This
parser takes the body piece by piece, so the API can yield to the loop between pieces and
keep only what it needs from each entry. Its memory is the piece being parsed plus one
unfinished entry, at most `MAX_PENDING` characters.

It accepts exactly what `models.GcRequest` accepts, in JSON: one object whose only key is
`valid_attachments`, an array of `ValidAttachment` objects (at most `MAX_GC_ENTRIES`). The
only difference is what it refuses earlier: an entry (or whitespace inside one) longer than
64 KiB, and a duplicated key. Pure: no I/O, no clock.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from masqd.models import MAX_GC_ENTRIES, GcRequest, ValidAttachment, validation_details

MAX_PENDING = 64 * 1024  # characters of one unfinished entry
KEY = "valid_attachments"
_WHITESPACE = " \t\n\r"

# Where the parser is in the body.
_START, _KEY, _COLON, _VALUE, _FIRST, _ENTRY, _SEPARATOR, _CLOSE, _DONE = range(9)
_INCOMPLETE = object()


class BodyError(Exception):
    """The body is not a valid GC request: the message and pydantic-style details."""

    def __init__(self, message: str, details: tuple[dict[str, Any], ...] = ()) -> None:
        super().__init__(message)
        self.message, self.details = message, details


class GcBodyParser:
    """Feed the body's bytes in order; each `feed` returns the entries it completed."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._state = _START
        self._entries = 0
        self._eof = False

    def feed(self, data: bytes, *, eof: bool = False) -> list[ValidAttachment]:
        """Parse `data`, the next bytes of the body (`eof`: the last). Raises BodyError."""
        try:
            text = self._utf8.decode(data, final=eof)
        except UnicodeDecodeError as exc:
            raise BodyError(f"request body is not valid JSON: {exc}") from None
        self._buf = self._buf[self._pos :] + text
        self._pos = 0
        self._eof = eof
        entries = list(self._run())
        if eof and self._state != _DONE:
            raise BodyError("request body is not valid JSON: it ends too early")
        return entries

    def _run(self) -> Iterator[ValidAttachment]:
        buf = self._buf
        while True:
            while self._pos < len(buf) and buf[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos >= len(buf):
                return
            char = buf[self._pos]
            state = self._state
            if state == _START:
                self._expect(char, "{", _KEY)
            elif state == _KEY:
                if char == "}":
                    raise _invalid([{"type": "missing", "loc": (KEY,), "msg": "Field required"}])
                if char != '"':
                    raise BodyError("request body is not valid JSON: expected a key")
                key = self._value()
                if key is _INCOMPLETE:
                    return
                if key != KEY:
                    msg = "Extra inputs are not permitted"
                    raise _invalid([{"type": "extra_forbidden", "loc": (key,), "msg": msg}])
                self._state = _COLON
            elif state == _COLON:
                self._expect(char, ":", _VALUE)
            elif state == _VALUE:
                if char == "[":
                    self._pos += 1
                    self._state = _FIRST
                    continue
                value = self._value()
                if value is _INCOMPLETE:
                    return
                # Not an array: pydantic says what is wrong with it, as it would whole.
                try:
                    GcRequest.model_validate({KEY: value})
                except ValidationError as exc:
                    raise _invalid(exc.errors()) from None
                raise BodyError(f"request body: {KEY} must be an array")  # pragma: no cover
            elif state == _FIRST and char == "]":
                self._pos += 1
                self._state = _CLOSE
            elif state in (_FIRST, _ENTRY):
                value = self._value()
                if value is _INCOMPLETE:
                    return
                yield self._entry(value)
                self._state = _SEPARATOR
            elif state == _SEPARATOR:
                if char == "]":
                    self._pos += 1
                    self._state = _CLOSE
                else:
                    self._expect(char, ",", _ENTRY)
            elif state == _CLOSE:
                if char == ",":
                    raise BodyError(f"request body must hold {KEY} once and nothing else")
                self._expect(char, "}", _DONE)
            else:
                raise BodyError("request body is not valid JSON: extra data after the object")

    def _expect(self, char: str, wanted: str, then: int) -> None:
        if char != wanted:
            raise BodyError(f"request body is not valid JSON: expected {wanted!r}, got {char!r}")
        self._pos += 1
        self._state = then

    def _value(self) -> Any:
        """The JSON value at the current position, or _INCOMPLETE until more data arrives."""
        pending = len(self._buf) - self._pos
        try:
            value, end = self._decoder.raw_decode(self._buf, self._pos)
        except json.JSONDecodeError as exc:
            if self._eof or pending > MAX_PENDING:
                raise BodyError(f"request body is not valid JSON: {exc.msg}") from None
            return _INCOMPLETE  # most likely cut by the end of this piece
        except RecursionError:
            raise BodyError("request body is not valid JSON: nested too deeply") from None
        except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
            raise BodyError("request body is not valid JSON: a number is too long") from None
        if end == len(self._buf) and not self._eof:
            # A number at the end of a piece may go on in the next one.
            if pending > MAX_PENDING:
                raise BodyError(f"request body: an entry is longer than {MAX_PENDING} characters")
            return _INCOMPLETE
        self._pos = end
        return value

    def _entry(self, value: Any) -> ValidAttachment:
        index = self._entries
        if index >= MAX_GC_ENTRIES:
            msg = f"at most {MAX_GC_ENTRIES} entries"
            raise _invalid([{"type": "too_long", "loc": (KEY,), "msg": msg}])
        self._entries += 1
        try:
            return ValidAttachment.model_validate(value)
        except ValidationError as exc:
            errors = [{**e, "loc": (KEY, index, *e["loc"])} for e in exc.errors()]
            raise _invalid(errors) from None


def _invalid(errors: list[Any]) -> BodyError:
    return BodyError("invalid body", validation_details(errors))
