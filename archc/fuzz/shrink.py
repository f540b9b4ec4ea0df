"""Shrink a failing input to a small one that fails the same way (delta debugging).

`ddmin(items, keeps)` is Zeller's minimizing delta debugging: it removes ever smaller chunks of
`items` while `keeps(candidate)` holds. `shrink_text` applies it to lines, then to the tokens
of the .arch lexer, then tries structural edits that ddmin cannot express: unwrapping a `{ ... }`
region (its header and closing brace go, the body stays), replacing numbers by small ones, and
dropping single arguments. Every step keeps only candidates for which `keeps` is true, so the
result still fails with the same signature. A `Budget` bounds the number of tests and the time.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Budget:
    max_tests: int = 2000
    seconds: float = 600.0
    tests: int = 0
    start: float = field(default_factory=time.monotonic)

    def spent(self) -> bool:
        return self.tests >= self.max_tests or time.monotonic() - self.start > self.seconds


class _Cached:
    """`keeps` memoised on the candidate (ddmin proposes the same candidate more than once)."""

    def __init__(self, keeps: Callable[[str], bool], budget: Budget):
        self.keeps = keeps
        self.budget = budget
        self.seen: dict[str, bool] = {}

    def __call__(self, text: str) -> bool:
        if text not in self.seen:
            if self.budget.spent():
                return False
            self.budget.tests += 1
            self.seen[text] = bool(self.keeps(text))
        return self.seen[text]


def ddmin(items: Sequence[T], keeps: Callable[[list[T]], bool], budget: Budget | None = None) -> list[T]:
    """A 1-minimal sublist of `items` (up to the budget) for which `keeps` still holds."""
    budget = budget or Budget()
    items = list(items)
    n = 2
    while len(items) >= 2 and not budget.spent():
        size = max(1, len(items) // n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        reduced = False
        for i in range(len(chunks)):
            rest = [x for j, c in enumerate(chunks) if j != i for x in c]
            if keeps(rest):
                items, n, reduced = rest, max(n - 1, 2), True
                break
        if not reduced:
            if size == 1:
                break
            n = min(len(items), 2 * n)
    if len(items) == 1 and keeps([]):
        return []
    return items


_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z_][A-Za-z_0-9]*|\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+|\d+'
                    r'|\*\*|//|==|!=|<=|>=|\s+|.', re.S)


def _pieces(text: str) -> list[str]:
    return _TOKEN.findall(text)


def shrink_text(text: str, keeps: Callable[[str], bool], budget: Budget | None = None) -> str:
    """The smallest text found that still satisfies `keeps` (which must hold for `text`)."""
    budget = budget or Budget()
    test = _Cached(keeps, budget)
    while not budget.spent():
        before = text
        lines = text.split("\n")
        text = "\n".join(ddmin(lines, lambda ls: test("\n".join(ls)), budget))
        text = _unwrap_regions(text, test, budget)
        text = _simplify_numbers(text, test, budget)
        pieces = _pieces(text)
        keep_ws = [i for i, p in enumerate(pieces) if p.isspace()]
        movable = [i for i, p in enumerate(pieces) if not p.isspace()]
        chosen = ddmin(movable, lambda idx: test("".join(pieces[i] for i in sorted(set(idx) | set(keep_ws)))), budget)
        text = "".join(pieces[i] for i in sorted(set(chosen) | set(keep_ws)))
        text = _tidy(text, test)
        if text == before:
            break
    return text


def shrink_bytes(data: bytes, keeps: Callable[[bytes], bool], budget: Budget | None = None) -> bytes:
    """Bytes that are not UTF-8 text: ddmin over lines, then over single bytes."""
    budget = budget or Budget()
    lines = data.split(b"\n")
    data = b"\n".join(ddmin(lines, lambda ls: keeps(b"\n".join(ls)), budget))
    return bytes(ddmin(list(data), lambda bs: keeps(bytes(bs)), budget))


def _unwrap_regions(text: str, test: Callable[[str], bool], budget: Budget) -> str:
    """Drop a region's header and closing brace, keeping its body (`repeat ... {` ... `}`)."""
    i = 0
    while not budget.spent():
        lines = text.split("\n")
        opens = [j for j, ln in enumerate(lines) if ln.rstrip().endswith("{")]
        if i >= len(opens):
            break
        start = opens[i]
        end = _closing(lines, start)
        if end is None:
            i += 1
            continue
        body = [ln[2:] if ln.startswith("  ") else ln for ln in lines[start + 1:end]]
        candidate = "\n".join(lines[:start] + body + lines[end + 1:])
        if test(candidate):
            text = candidate
        else:
            i += 1
    return text


def _closing(lines: list[str], start: int) -> int | None:
    depth = 0
    for j in range(start, len(lines)):
        depth += lines[j].count("{") - lines[j].count("}")
        if depth == 0:
            return j
    return None


_NUM = re.compile(r"(?<![\w.])(\d+\.\d*|\d+)(?![\w.])")


def _simplify_numbers(text: str, test: Callable[[str], bool], budget: Budget) -> str:
    """Each number replaced by the smallest of 0, 1, 2, half of it that keeps the failure."""
    pos = 0
    while not budget.spent():
        m = _NUM.search(text, pos)
        if m is None:
            break
        old = m.group()
        value = int(old) if "." not in old else float(old)     # integers exactly: they may have 400 digits
        options = ["0", "1", "2", str(value // 2)] if "." not in old else ["0.0", "1.0", "0.5"]
        for new in options:
            smaller = int(new) < value if "." not in old else new != old
            if new != old and smaller and test(text[:m.start()] + new + text[m.end():]):
                text = text[:m.start()] + new + text[m.end():]
                break
        pos = m.start() + 1
    return text


def _tidy(text: str, test: Callable[[str], bool]) -> str:
    """Blank lines and trailing spaces removed, when that changes nothing."""
    tidy = "\n".join(ln.rstrip() for ln in text.split("\n") if ln.strip()) + "\n"
    return tidy if tidy != text and test(tidy) else text
