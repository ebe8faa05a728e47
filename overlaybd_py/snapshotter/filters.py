"""containerd's filter syntax, as its ``List`` (``Walk``) calls send it to a snapshotter.

A request carries filter strings; an object matches if *any* string matches, and a string
matches if *all* its comma-separated selectors do::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]      (no operator: the field is present)
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="              (equal, not equal, regular expression)
    value     := quoted | [^\\s,]+
    quoted    := "..." (Go escapes) | /.../ | |...| (regular expressions)

containerd itself asks, after a remote Prepare answered AlreadyExists, for
``labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent>"``. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["Filter", "parse_filters"]

Fields = Callable[[tuple[str, ...]], str | None]  # fieldpath -> value, None when absent

_FIELD = re.compile(r"[A-Za-z0-9_]+")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


@dataclass(frozen=True, slots=True)
class _Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: presence
    value: str = ""
    regex: re.Pattern[str] | None = None

    def matches(self, fields: Fields) -> bool:
        value = fields(self.fieldpath)
        if self.operator is None:
            return value is not None
        if self.operator == "==":
            return value is not None and value == self.value
        if self.operator == "!=":
            return (value or "") != self.value
        assert self.regex is not None
        return self.regex.search(value or "") is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """Any of several conjunctions of selectors; the empty filter matches everything."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def matches(self, fields: Fields) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(fields) for s in conj) for conj in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> UsageError:
        return UsageError(f"filter {self.text!r}: {what} at position {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def quoted(self) -> str:
        quote = self.peek()
        self.pos += 1
        out = []
        while True:
            ch = self.peek()
            if not ch or ch == "\n":
                raise self.fail("unterminated quoted text")
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            esc = self.peek()
            self.pos += 1
            if quote != '"':
                # Regular expression quoting: only the quote itself is unescaped, every other
                # escape belongs to the expression.
                out.append(esc if esc == quote else "\\" + esc)
            elif esc in _SIMPLE_ESCAPES or esc == quote:
                out.append(_SIMPLE_ESCAPES.get(esc, esc))
            elif esc in "xuU01234567":
                digits, base = {"x": (2, 16), "u": (4, 16), "U": (8, 16)}.get(esc, (3, 8))
                start = self.pos if esc in "xuU" else self.pos - 1
                code = self.text[start : start + digits]
                try:
                    out.append(chr(int(code, base)))
                except ValueError:
                    raise self.fail("bad numeric escape") from None
                self.pos = start + digits
            else:
                raise self.fail(f"bad escape \\{esc}")

    def field(self) -> str:
        if self.peek() in ('"', "/", "|"):
            return self.quoted()
        match = _FIELD.match(self.text, self.pos)
        if not match:
            raise self.fail("expected a field name")
        self.pos = match.end()
        return match.group()

    def value(self) -> str:
        self.skip_space()
        if self.peek() in ('"', "/", "|"):
            return self.quoted()
        start = self.pos
        while self.peek() and self.peek() != "," and not self.peek().isspace():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start : self.pos]

    def selector(self) -> _Selector:
        self.skip_space()
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        operator = self.text[self.pos : self.pos + 2]
        if operator not in ("==", "!=", "~="):
            if self.peek() in ("", ","):
                return _Selector(tuple(path), None)
            raise self.fail("expected ==, != or ~=")
        self.pos += 2
        value = self.value()
        regex = None
        if operator == "~=":
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression ({exc})") from None
        return _Selector(tuple(path), operator, value, regex)

    def parse(self) -> tuple[_Selector, ...]:
        selectors = [self.selector()]
        self.skip_space()
        while self.peek() == ",":
            self.pos += 1
            selectors.append(self.selector())
            self.skip_space()
        if self.peek():
            raise self.fail("unexpected text")
        return tuple(selectors)


def parse_filters(texts: Sequence[str]) -> Filter:
    """Parse a request's filter strings; an empty string or list matches everything.
    Raises UsageError naming the string and position."""
    alternatives = []
    for text in texts:
        if not text:
            return Filter(())  # containerd: an empty filter matches everything
        alternatives.append(_Parser(text).parse())
    return Filter(tuple(alternatives))
