"""Reads the printer's text form back into Graphs, so golden IR files round-trip and can be hand-written.

A hand-written line-based parser: every construct of `archc.ir.printer` sits on its own line(s).
Expressions go through the eval-free `parse_expr`; strings through `json.loads` on the exact token.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from archc.errors import ArchError, Span
from archc.ir.core import Graph, Node, Param, Policy, Region, Schedule, Symbol, Value
from archc.ir.ops import Op
from archc.ir.shapes import DType, TensorType, parse_expr

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[\w.$-]+")                     # %x, %x.1, @core.attn.q.weight
_NUMBER = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"-?[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_WORDS = {"none": None, "true": True, "false": False, "inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_SYMBOL_KINDS = ("int", "float", "bool")


def parse_ir(text: str, file: str = "<ir>") -> list[Graph]:
    """Parse one or more `graph ... { ... }` blocks as printed by `print_module`."""
    return _Parser(text, file).module()


class _Cursor:
    """One line of IR text and a position in it; errors point at a column of this line."""

    def __init__(self, text: str, line: int, file: str, source: str):
        self.text, self.line, self.file, self.source = text, line, file, source
        self.pos = 0
        self.ws()

    def error(self, message: str, start: int | None = None, end: int | None = None) -> ArchError:
        start = self.pos if start is None else start
        end = max(start + 1, end if end is not None else start + 1)
        return ArchError(message, Span(self.file, self.line, start + 1, self.line, end + 1), source=self.source)

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def found(self) -> str:
        self.ws()
        if self.pos >= len(self.text):
            return "end of line"
        m = _NAME.match(self.text, self.pos)
        return repr(m.group() if m else self.text[self.pos])

    def at(self, lit: str) -> bool:
        self.ws()
        return self.text.startswith(lit, self.pos)

    def accept(self, lit: str) -> bool:
        if self.at(lit):
            self.pos += len(lit)
            return True
        return False

    def expect(self, lit: str, context: str = "") -> None:
        if not self.accept(lit):
            where = f" {context}" if context else ""
            raise self.error(f"expected '{lit}'{where}, found {self.found()}")

    def match(self, pattern: re.Pattern, what: str) -> tuple[str, int]:
        self.ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}, found {self.found()}")
        self.pos = m.end()
        return m.group(), m.start()

    def peek_word(self) -> str | None:
        self.ws()
        m = _IDENT.match(self.text, self.pos)
        return m.group() if m else None

    def keyword(self, word: str) -> None:
        if self.peek_word() != word:
            raise self.error(f"expected '{word}', found {self.found()}")
        self.pos += len(word)

    def sigil_name(self, sigil: str) -> tuple[str, int]:
        self.ws()
        start = self.pos
        self.expect(sigil)
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a name after '{sigil}'", start)
        self.pos = m.end()
        return m.group(), start

    def end(self) -> None:
        self.ws()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {self.found()} at the end of the line", self.pos, len(self.text))

    def scan_expression(self) -> tuple[str, int]:
        """The text of a `<expression>` up to its closing `>`: the first `>` outside parentheses that
        is not a comparison, i.e. is followed by the end of the line or by `,` `}` `]` `)` `:` (a
        comparison's `>` or `>=` is followed by an operand: `<T > 0.0>`, the fuzzer's case)."""
        self.ws()
        start, depth = self.pos, 0
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if depth == 0 and ch == ">":
                rest = self.text[self.pos + 1:].lstrip(" ")
                if not rest or rest[0] in ",}]):\n":
                    break
            depth += (ch == "(") - (ch == ")")
            self.pos += 1
        return self.text[start:self.pos].rstrip(), start

    def scan_until(self, stops: str) -> tuple[str, int]:
        """Raw text up to the first of `stops` outside parentheses (an expression's extent)."""
        self.ws()
        start, depth = self.pos, 0
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if depth == 0 and ch in stops:
                break
            depth += (ch == "(") - (ch == ")")
            self.pos += 1
        return self.text[start:self.pos].rstrip(), start


class _Parser:
    def __init__(self, text: str, file: str):
        self.text, self.file = text, file
        self.lines = text.split("\n")
        self.i = 0
        self.scopes: list[set[str]] = []
        self.defined: set[str] = set()

    # -- lines -------------------------------------------------------------------------------

    def more(self) -> bool:
        while self.i < len(self.lines) and not self.lines[self.i].strip():
            self.i += 1
        return self.i < len(self.lines)

    def next_line(self, what: str) -> _Cursor:
        if not self.more():
            last = max((i + 1 for i, text in enumerate(self.lines) if text.strip()), default=1)
            col = len(self.lines[last - 1].rstrip()) + 1
            raise ArchError(f"unexpected end of input, expected {what}", Span(self.file, last, col, last, col + 1),
                            source=self.text)
        self.i += 1
        return _Cursor(self.lines[self.i - 1], self.i, self.file, self.text)

    # -- graphs ------------------------------------------------------------------------------

    def module(self) -> list[Graph]:
        graphs = []
        while self.more():
            graphs.append(self.graph())
        return graphs

    def graph(self) -> Graph:
        c = self.next_line("'graph'")
        c.keyword("graph")
        name, _ = c.match(_IDENT, "a graph name")
        symbols = self.comma_list(c, "(", ")", lambda: self.symbol(c))
        if c.peek_word() == "dims":
            c.keyword("dims")
            symbols += self.comma_list(c, "(", ")", lambda: Symbol(c.match(_IDENT, "a dimension name")[0], "dim"))
        c.expect("{", "to open the graph body")
        c.end()
        self.scopes, self.defined = [set()], set()
        params: list[Param] = []
        policies: list[Policy] = []
        schedules: list[Schedule] = []
        inputs: list[Value] = []
        nodes: list[Node] = []
        noncausal: list[str] = []
        line_kinds: dict[str, Callable[[_Cursor], None]] = {
            "noncausal": lambda c: noncausal.append(self.noncausal_line(c, noncausal)),
            "param": lambda c: params.append(self.param(c, params)),
            "policy": lambda c: policies.append(self.policy(c)),
            "schedule": lambda c: schedules.append(self.schedule(c, schedules)),
            "input": lambda c: inputs.append(self.input(c)),
        }
        while True:
            c = self.next_line("'output'")
            word = c.peek_word()
            if word == "output":
                c.keyword("output")
                results = self.uses(c)
                break
            if word in line_kinds:
                line_kinds[word](c)
            else:
                nodes.append(self.node(c))
        c = self.next_line("'}' closing the graph")
        c.expect("}", "closing the graph")
        c.end()
        body = Region(tuple(inputs), tuple(nodes), tuple(results))
        return Graph(name, tuple(symbols), tuple(params), body, tuple(policies), schedules=tuple(schedules),
                     noncausal=noncausal[0] if noncausal else None)

    def noncausal_line(self, c: _Cursor, seen: list[str]) -> str:
        """`noncausal "why"` (or bare `noncausal`): the graph's declared reason, "" without one."""
        c.keyword("noncausal")
        if seen:
            raise c.error("`noncausal` is declared twice", 0, c.pos)
        reason = json.loads(c.match(_STRING, "a string")[0]) if c.at('"') else ""
        c.end()
        return reason

    def symbol(self, c: _Cursor) -> Symbol:
        name, _ = c.match(_IDENT, "a symbol name")
        c.expect(":", "after a symbol name")
        kind, start = c.match(_IDENT, "a symbol kind")
        if kind not in _SYMBOL_KINDS:
            raise c.error(f"unknown symbol kind {kind!r} (expected int, float or bool; dims go in dims(...))",
                          start, c.pos)
        default = self.value(c) if c.accept("=") else None
        return Symbol(name, kind, default)

    def param(self, c: _Cursor, seen: list[Param]) -> Param:
        c.keyword("param")
        name, start = c.sigil_name("@")
        if any(p.name == name for p in seen):
            raise c.error(f"duplicate parameter @{name}", start, c.pos)
        c.expect(":", "after the parameter name")
        type_ = self.type(c)
        c.keyword("init")
        c.expect("=", "after 'init'")
        scheme, _ = c.match(_IDENT, "an init scheme")
        init_args = self.pairs(c, "(", ")")
        copies: Any = 1
        if c.peek_word() == "copies":
            c.keyword("copies")
            c.expect("=", "after 'copies'")
            copies = self.value(c)
        c.end()
        return Param(name, type_, scheme, tuple(init_args), copies, self.line_span(c, start))

    def policy(self, c: _Cursor) -> Policy:
        c.keyword("policy")
        kind, start = c.match(_IDENT, "a policy kind")
        args = self.pairs(c, "(", ")")
        opens_region = c.accept("{")
        c.end()
        if not args or args[0][0] != "targets":
            raise c.error(f"policy {kind} must start with targets=[...]", start, c.pos)
        targets = args[0][1]
        if not isinstance(targets, tuple) or not all(isinstance(t, str) for t in targets):
            raise c.error("policy targets must be a list of strings", start, c.pos)
        span = self.line_span(c, start)
        region = None
        if opens_region:                    # rewrite_kv's processor: one region, like a region op's
            regions = self.regions()
            if len(regions) != 1:
                raise c.error(f"policy {kind} has one region, got {len(regions)}", start, c.pos)
            region = regions[0]
        return Policy(kind, targets, tuple(args[1:]), span, region)

    def schedule(self, c: _Cursor, seen: list[Schedule]) -> Schedule:
        c.keyword("schedule")
        name, start = c.match(_IDENT, "a schedule name")
        if any(s.name == name for s in seen):
            raise c.error(f"duplicate schedule {name!r}", start, c.pos)
        c.expect("(", "after the schedule name")
        var, _ = c.match(_IDENT, "the schedule's variable")
        c.expect(":", "after the schedule's variable")
        kind, kstart = c.match(_IDENT, "int or float")
        if kind not in ("int", "float"):
            raise c.error(f"a schedule's variable is int or float, got {kind!r}", kstart, c.pos)
        c.expect(")", "closing the schedule's variable")
        values = self.pairs(c, "{", "}")
        c.end()
        return Schedule(name, var, kind, tuple(values), self.line_span(c, start))

    def input(self, c: _Cursor) -> Value:
        c.keyword("input")
        name, start = c.sigil_name("%")
        c.expect(":", "after the input name")
        value = Value(name, self.type(c))
        c.end()
        self.define(c, name, start)
        return value

    # -- nodes and regions -------------------------------------------------------------------

    def node(self, c: _Cursor) -> Node:
        start = c.pos
        if c.peek_word() is not None:
            raise c.error(f"expected a node line '%x = op(...) : type', found {c.found()}", start, c.pos + 1)
        outs: list[tuple[str, int]] = []
        if not c.at("="):
            outs.append(c.sigil_name("%"))
            while c.accept(","):
                outs.append(c.sigil_name("%"))
        c.expect("=", "after the result names")
        opname, op_start = c.match(_IDENT, "an op name")
        try:
            op = Op(opname)
        except ValueError:
            raise c.error(f"unknown op {opname!r}", op_start, c.pos) from None
        inputs = self.comma_list(c, "(", ")", lambda: self.use(c))
        attrs = dict(self.pairs(c, "{", "}")) if c.at("{") else {}
        c.expect(":", "before the result types")
        types = [self.type(c)] if outs else []
        while types and c.accept(","):
            types.append(self.type(c))
        if len(types) != len(outs):
            raise c.error(f"{len(outs)} results but {len(types)} types", start, c.pos)
        opens_regions = c.accept("{")
        c.end()
        regions = self.regions() if opens_regions else []
        for name, col in outs:
            self.define(c, name, col)
        outputs = [Value(name, t) for (name, _), t in zip(outs, types)]
        return Node.make(op, inputs, outputs, attrs, regions, self.line_span(c, start))

    def regions(self) -> list[Region]:
        regions = [self.region()]
        while True:
            c = self.next_line("'}' closing the region")
            c.expect("}", "closing the region")
            if not c.accept("{"):
                c.end()
                return regions
            c.end()
            regions.append(self.region())

    def region(self) -> Region:
        c = self.next_line("region arguments '^(...):'")
        c.expect("^", "to start the region arguments")
        self.scopes.append(set())
        args = self.comma_list(c, "(", ")", lambda: self.region_arg(c))
        c.expect(":", "after the region arguments")
        c.end()
        nodes = []
        while True:
            c = self.next_line("'yield'")
            if c.peek_word() == "yield":
                c.keyword("yield")
                results = self.uses(c)
                break
            nodes.append(self.node(c))
        self.scopes.pop()
        return Region(tuple(args), tuple(nodes), tuple(results))

    def region_arg(self, c: _Cursor) -> Value:
        name, start = c.sigil_name("%")
        c.expect(":", "after the region argument name")
        value = Value(name, self.type(c))
        self.define(c, name, start)
        return value

    def uses(self, c: _Cursor) -> list[str]:
        """A comma-separated list of %values running to the end of the line (output, yield)."""
        names = []
        if c.at("%"):
            names.append(self.use(c))
            while c.accept(","):
                names.append(self.use(c))
        c.end()
        return names

    def use(self, c: _Cursor) -> str:
        name, start = c.sigil_name("%")
        if not any(name in s for s in self.scopes):
            raise c.error(f"undefined value %{name}", start, c.pos)
        return name

    def define(self, c: _Cursor, name: str, start: int) -> None:
        if name in self.defined:
            raise c.error(f"duplicate definition of %{name}", start, start + 1 + len(name))
        self.defined.add(name)
        self.scopes[-1].add(name)

    # -- types and attribute values ----------------------------------------------------------

    def type(self, c: _Cursor) -> TensorType:
        name, start = c.match(_IDENT, "a type such as f32[B, T]")
        try:
            dtype = DType(name)
        except ValueError:
            raise c.error(f"unknown dtype {name!r} (expected f32, i64 or bool)", start, c.pos) from None
        if not c.at("["):
            raise c.error(f"expected '[' after dtype {name}, found {c.found()}")
        return TensorType(dtype, tuple(self.comma_list(c, "[", "]", lambda: self.dim(c))))

    def dim(self, c: _Cursor):
        text, start = c.scan_until(",]")
        return self.expr(c, text, start)

    def expr(self, c: _Cursor, text: str, start: int):
        if not text:
            raise c.error("expected an expression", start)
        try:
            return parse_expr(text)
        except (ValueError, TypeError) as err:
            raise c.error(f"bad expression: {err}", start, start + len(text)) from None

    def pairs(self, c: _Cursor, open_: str, close: str) -> list[tuple[str, Any]]:
        """`(k=v, ...)` or `{k=v, ...}` in printed order; keys must be distinct."""
        out: list[tuple[str, Any]] = []

        def pair():
            key, start = c.match(_IDENT, "an attribute name")
            if any(k == key for k, _ in out):
                raise c.error(f"duplicate attribute {key!r}", start, c.pos)
            c.expect("=", f"after attribute {key!r}")
            out.append((key, self.value(c)))

        self.comma_list(c, open_, close, pair)
        return out

    def value(self, c: _Cursor) -> Any:
        c.ws()
        start = c.pos
        ch = c.text[start] if start < len(c.text) else ""
        if ch == '"':
            if not _STRING.match(c.text, start):
                raise c.error("unterminated string", start, len(c.text))
            token, _ = c.match(_STRING, "a string")
            try:
                return json.loads(token)
            except json.JSONDecodeError as err:
                raise c.error(f"malformed string: {err.msg}", start, c.pos) from None
        if ch == "[":
            return tuple(self.comma_list(c, "[", "]", lambda: self.value(c)))
        if ch == "<":
            c.pos += 1
            text, expr_start = c.scan_expression()
            if not c.accept(">"):
                raise c.error("unterminated <expression>", start, c.pos)
            return self.expr(c, text, expr_start)
        m = _NUMBER.match(c.text, start)
        if m:
            c.pos = m.end()
            token = m.group()
            return float(token) if any(ch in token for ch in ".eE") else int(token)
        m = _WORD.match(c.text, start)
        if m and m.group() in _WORDS:
            c.pos = m.end()
            return _WORDS[m.group()]
        end = m.end() if m else start + 1
        raise c.error(f"malformed attribute value {c.text[start:end] or 'at end of line'!r}", start, end)

    def comma_list(self, c: _Cursor, open_: str, close: str, item: Callable[[], Any]) -> list:
        c.expect(open_)
        out = []
        if c.accept(close):
            return out
        while True:
            out.append(item())
            if c.accept(close):
                return out
            if not c.accept(","):
                raise c.error(f"expected ',' or '{close}', found {c.found()}")

    def line_span(self, c: _Cursor, start: int) -> Span:
        return Span(self.file, c.line, start + 1, c.line, len(c.text.rstrip()) + 1)
