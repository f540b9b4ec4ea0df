"""One diagnostic type for every user-facing failure: file:line:col, the source line, a caret, a hint."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A source range; lines and columns are 1-based, end is exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class ArchError(Exception):
    """A user error in a .arch file (or IR text); rendered by `render`, never as a traceback."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 source: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.source = source

    def with_source(self, source: str) -> "ArchError":
        if self.source is None:
            self.source = source
        return self

    def render(self) -> str:
        if self.span is None:
            out = f"error: {self.message}"
        else:
            out = f"{self.span}: error: {self.message}"
            line_text = _source_line(self.source, self.span.line)
            if line_text is not None:
                line_text = line_text.expandtabs(1)
                start = max(self.span.column - 1, 0)
                if self.span.end_line == self.span.line:
                    width = max(self.span.end_column - self.span.column, 1)
                else:
                    width = max(len(line_text) - start, 1)
                width = min(width, max(len(line_text) - start, 1))
                shown, indent = line_text, start
                if len(line_text) > 200:
                    # show a 200-character window around the column; the carets stay under it
                    lo = max(0, min(start - 60, len(line_text) - 200))
                    shown = ("... " if lo else "") + line_text[lo:lo + 200] + (" ..." if lo + 200 < len(line_text) else "")
                    indent = start - lo + (4 if lo else 0)
                    width = max(min(width, lo + 200 - start), 1)
                out += f"\n  {shown}\n  {' ' * indent}{'^' * width}"
        if self.hint:
            out += f"\n  hint: {self.hint}"
        return out

    def __str__(self) -> str:
        return self.render()


def _source_line(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    lines = source.splitlines()
    if 1 <= line <= len(lines):
        return lines[line - 1]
    return None
