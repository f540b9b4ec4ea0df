"""Checks the IR invariants every pass must keep, so a bad rewrite fails at its cause, not downstream."""
from __future__ import annotations

from typing import Any, Callable

import sympy

from archc.errors import ArchError, Span
from archc.ir.core import Graph, Node, Region
from archc.ir.ops import FUSIBLE_OPS, OPS, Op, ShapeError
from archc.ir.printer import node_lines
from archc.ir.shapes import BOOL, F32, I64, TensorType, dims_equal, sym


def verify(g: Graph, bindings: dict | None = None) -> None:
    """Raise ArchError at the first broken invariant; `bindings` also compares dims at those symbol values."""
    _Verifier(g, bindings).run()


def _free_symbols(v: Any) -> set[str]:
    if isinstance(v, sympy.Basic):
        return {s.name for s in v.free_symbols}
    if isinstance(v, TensorType):
        return _free_symbols(v.shape)
    if isinstance(v, (tuple, list)):
        return set().union(*(_free_symbols(x) for x in v))
    return set()


class _Verifier:
    def __init__(self, g: Graph, bindings: dict | None):
        self.g = g
        bindings = {sym(k) if isinstance(k, str) else k: v for k, v in (bindings or {}).items() if v is not None}
        self.bindings = bindings or None
        self.params = {p.name: p for p in g.params}
        self.symbols = {s.name for s in g.symbols}
        self.types: dict[str, TensorType] = {}

    def fail(self, message: str, node: Node | None = None, span: Span | None = None) -> ArchError:
        if node is not None:
            return ArchError(f"{message}\n  in: {node_lines(node, '')[0]}", node.span)
        return ArchError(message, span)

    def run(self) -> None:
        for p in self.g.params:
            unknown = _free_symbols((p.type, p.copies)) - self.symbols
            if unknown:
                raise self.fail(f"parameter @{p.name} uses unknown symbol {sorted(unknown)[0]!r}", span=p.span)
        self.schedules()
        self.region(self.g.body, [], (), None)
        for p in self.g.policies:
            self.policy(p)

    def schedules(self) -> None:
        """A schedule reads the architecture's parameters and its own variable; dims are run-time only."""
        params = {s.name for s in self.g.symbols if s.kind != "dim"}
        names: set[str] = set()
        for s in self.g.schedules:
            if s.name in names:
                raise self.fail(f"schedule {s.name!r} is defined twice", span=s.span)
            names.add(s.name)
            if s.var in self.symbols:
                raise self.fail(f"schedule {s.name!r}: its variable {s.var!r} is also a graph symbol", span=s.span)
            keys = [k for k, _ in s.values]
            if not keys or len(set(keys)) != len(keys):
                raise self.fail(f"schedule {s.name!r} must set distinct names, at least one", span=s.span)
            for k, v in s.values:
                unknown = _free_symbols(v) - params - {s.var}
                if unknown:
                    raise self.fail(f"schedule {s.name!r}: `{k}` uses {sorted(unknown)[0]!r}, which is neither a "
                                    f"parameter nor the variable {s.var!r}", span=s.span)

    def policy(self, p) -> None:
        """A policy region (rewrite_kv's processor) sees no body value: its arguments are the gathered
        entries `k, v: f32[1, N, Hk, Dh]` and their positions `i64[1, N]`, and it yields the new k, v.
        `N` is its own dimension (any symbol of its argument types that is not a graph symbol)."""
        if (p.kind == "rewrite_kv") != (p.region is not None):
            raise self.fail(f"policy {p.kind} " + ("needs its processor region" if p.region is None
                                                   else "takes no region"), span=p.span)
        if p.region is None:
            return
        r = p.region
        types = [a.type for a in r.args]
        kv_ok = len(types) == 3 and all(t.dtype == F32 and t.rank == 4 for t in types[:2]) and \
            types[2].dtype == I64 and types[2].rank == 2 and self.same_type(types[0], types[1]) and \
            dims_equal(types[0].shape[0], 1) is not False and \
            all(dims_equal(a, b, self.bindings) is not False for a, b in zip(types[0].shape[:2], types[2].shape))
        if not kv_ok:
            raise self.fail(f"policy {p.kind}'s region takes (k, v: f32[1, N, Hk, Dh], pos: i64[1, N]), got "
                            + ", ".join(str(t) for t in types), span=p.span)
        local = tuple(sorted(_free_symbols(types) - self.symbols))
        self.region(r, [], local, None, where=f"policy {p.kind}")
        got = [self.types[x] for x in r.results]
        if len(got) != 2 or not all(self.same_type(g, w) for g, w in zip(got, types[:2])):
            raise self.fail(f"policy {p.kind}'s region must yield the rewritten (k, v) as {types[0]}, got "
                            + ", ".join(str(t) for t in got), span=p.span)

    # -- scopes ------------------------------------------------------------------------------

    def region(self, r: Region, scopes: list[set[str]], loop_vars: tuple[str, ...], owner: Node | None,
               where: str | None = None) -> None:
        scopes = scopes + [set()]
        arg = f"{where} region argument" if where else "graph input" if owner is None else "region argument"
        for a in r.args:
            self.check_symbols(a.type, loop_vars, owner, f"{arg} %{a.name}")
            self.define(a.name, a.type, scopes, owner)
        for n in r.nodes:
            self.node(n, scopes, loop_vars)
        what = f"{where} region yield" if where else "graph output" if owner is None else "region yield"
        for name in r.results:
            if not any(name in s for s in scopes):
                raise self.fail(f"{what} %{name} is not defined", owner)

    def define(self, name: str, type_: TensorType, scopes: list[set[str]], node: Node | None) -> None:
        if name in self.types:
            raise self.fail(f"value %{name} is defined more than once (SSA)", node)
        self.types[name] = type_
        scopes[-1].add(name)

    def check_symbols(self, v: Any, loop_vars: tuple[str, ...], node: Node | None, what: str) -> None:
        unknown = _free_symbols(v) - self.symbols - set(loop_vars)
        if unknown:
            raise self.fail(f"{what} uses unknown symbol {sorted(unknown)[0]!r}", node)

    # -- nodes -------------------------------------------------------------------------------

    def node(self, n: Node, scopes: list[set[str]], loop_vars: tuple[str, ...]) -> None:
        d = OPS[n.op]
        for name in n.inputs:
            if not any(name in s for s in scopes):
                raise self.fail(f"operand %{name} is not defined before use", n)
        lo, hi = d.arity
        if len(n.inputs) < lo or (hi != -1 and len(n.inputs) > hi):
            most = "any number" if hi == -1 else str(hi)
            raise self.fail(f"{n.op.value} takes {lo} to {most} operands, got {len(n.inputs)}", n)
        for key, value in n.attrs:
            if key not in d.attrs:
                raise self.fail(f"{n.op.value} has no attribute {key!r} (allowed: {', '.join(d.attrs) or 'none'})", n)
            self.check_symbols(value, loop_vars, n, f"attribute {key}")
        for key in d.required:
            if key not in n.attr_dict:
                raise self.fail(f"{n.op.value} needs attribute {key!r}", n)
        for o in n.outputs:
            self.check_symbols(o.type, loop_vars, n, f"the type of %{o.name}")
        if len(n.regions) != d.regions:
            raise self.fail(f"{n.op.value} has {d.regions} region(s), got {len(n.regions)}", n)
        if n.op in _ENTRY:
            _ENTRY[n.op](self, n)
        inner_vars = loop_vars + ((n.attr("var"),) if n.op in (Op.LOOP, Op.HALT_LOOP) and n.attr("var") else ())
        for r in n.regions:
            self.region(r, scopes, inner_vars, n)
        for o in n.outputs:
            self.define(o.name, o.type, scopes, n)
        if n.op in _EXIT:
            _EXIT[n.op](self, n)
        elif d.rule is not None:
            self.rule(n)

    def rule(self, n: Node) -> None:
        ins = [self.types[i] for i in n.inputs]
        try:
            want = OPS[n.op].rule(ins, n.attr_dict)
        except ShapeError as err:
            raise self.fail(f"{n.op.value}: {err}", n) from None
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise self.fail(f"{n.op.value}: malformed attributes or operands ({type(err).__name__}: {err})", n) from None
        self.expect_types(n, "results", [o.type for o in n.outputs], want)

    # -- types -------------------------------------------------------------------------------

    def same_type(self, a: TensorType, b: TensorType) -> bool:
        return a.dtype == b.dtype and a.rank == b.rank and all(
            dims_equal(x, y, self.bindings) is not False for x, y in zip(a.shape, b.shape))

    def expect_types(self, n: Node, what: str, got: list[TensorType], want: list[TensorType]) -> None:
        if len(got) != len(want):
            raise self.fail(f"{n.op.value} {what}: expected {len(want)} value(s), got {len(got)}", n)
        for i, (g, w) in enumerate(zip(got, want)):
            if not self.same_type(g, w):
                raise self.fail(f"{n.op.value} {what} #{i}: type {g} does not match {w}", n)

    def expect_flag(self, n: Node, what: str, t: TensorType, dtype, batch: tuple) -> None:
        """A per-sample flag or counter: dtype[B], with B the first dim of the first carry when known."""
        if t.dtype != dtype or t.rank != 1 or (batch and dims_equal(t.shape[0], batch[0], self.bindings) is False):
            want = f"{dtype.value}[{batch[0] if batch else 'B'}]"
            raise self.fail(f"{n.op.value} {what} must be {want}, got {t}", n)

    def yields(self, n: Node) -> list[TensorType]:
        return [self.types[x] for x in n.regions[0].results]


# -- region op contracts: `entry` checks operands against region arguments before the region is
# walked (so a mismatch is reported at its cause), `exit` checks yields and results after it.


def _carries(v: _Verifier, n: Node, skip: int = 0) -> list[TensorType]:
    return [v.types[i] for i in n.inputs[skip:]]


def _args(n: Node) -> list[TensorType]:
    return [a.type for a in n.regions[0].args]


def _outs(n: Node) -> list[TensorType]:
    return [o.type for o in n.outputs]


def _loop_entry(v: _Verifier, n: Node) -> None:
    v.expect_types(n, "region arguments", _args(n), _carries(v, n))


def _loop_exit(v: _Verifier, n: Node) -> None:
    v.expect_types(n, "region yields", v.yields(n), _carries(v, n))
    v.expect_types(n, "results", _outs(n), _carries(v, n))


def _halt_loop_exit(v: _Verifier, n: Node) -> None:
    carries, ys, outs = _carries(v, n), v.yields(n), _outs(n)
    batch = carries[0].shape[:1] if carries else ()
    if not ys:
        raise v.fail("halt_loop's region must yield the halt flag first", n)
    v.expect_flag(n, "halt flag (first yield)", ys[0], BOOL, batch)
    v.expect_types(n, "yielded carries", ys[1:], carries)
    if not outs:
        raise v.fail("halt_loop must return its carries and the step counts", n)
    v.expect_types(n, "carried results", outs[:-1], carries)
    v.expect_flag(n, "step counts (last result)", outs[-1], I64, batch)


def _route_entry(v: _Verifier, n: Node) -> None:
    optional = ("has_among", "has_weight", "has_infer") if n.op is Op.ROUTE_TOPK else ("has_weight",)
    want = 2 + sum(bool(n.attr(k)) for k in optional)
    if len(n.inputs) != want:
        flags = ", ".join(f"{k}={bool(n.attr(k))}" for k in optional if k != "has_infer" or n.attr(k))
        raise v.fail(f"{n.op.value} with {flags} takes {want} operands, got {len(n.inputs)}", n)
    x, args = v.types[n.inputs[0]], _args(n)
    schedule = n.attr("schedule", "compact") if n.op is Op.ROUTE_TOPK else "compact"
    if schedule not in ("compact", "mask"):
        raise v.fail(f"route_topk schedule must be \"compact\" or \"mask\", got {schedule!r}", n)
    if schedule == "mask":
        if len(args) != 3:
            raise v.fail(f"route_topk with schedule=\"mask\" takes (x, pos, keep), got {len(args)} argument(s)", n)
        batch_len = x.shape[:2]
        want = [TensorType(x.dtype, x.shape), TensorType(I64, batch_len), TensorType(BOOL, batch_len)]
        v.expect_types(n, "region arguments (every token, its position, the selection)", args, want)
        return
    if len(args) != 2:
        raise v.fail(f"{n.op.value} region takes (x_sel, pos), got {len(args)} argument(s)", n)
    if args[0].dtype != x.dtype or args[0].rank != x.rank:
        raise v.fail(f"{n.op.value} selected tokens {args[0]} do not match the routed input {x}", n)


def _route_exit(v: _Verifier, n: Node) -> None:
    outs = _outs(n)
    v.expect_types(n, "region yields", v.yields(n), _args(n)[:1])
    v.expect_types(n, "routed result", outs[:1], [v.types[n.inputs[0]]])
    if n.op is Op.ROUTE_TOPK and (len(outs) != 2 or outs[1].dtype != BOOL):
        raise v.fail("route_topk returns (x_out, sel: bool)", n)
    if n.op is Op.ROUTE_MASK and len(outs) != 1:
        raise v.fail(f"route_mask returns one value, got {len(outs)}", n)


def _scan_entry(v: _Verifier, n: Node) -> None:
    x, args = v.types[n.inputs[0]], _args(n)
    if not args:
        raise v.fail("scan region takes (segment, carries...), got no arguments", n)
    seg, size = args[0], n.attr("size")
    bad_axis = any(dims_equal(s, d, v.bindings) is False and dims_equal(s, size, v.bindings) is False
                   for s, d in zip(seg.shape, x.shape))
    if seg.dtype != x.dtype or seg.rank != x.rank or bad_axis:
        raise v.fail(f"scan segment {seg} is not a size-{size} segment of {x}", n)
    v.expect_types(n, "region arguments after the segment", args[1:], _carries(v, n, 1))


def _scan_exit(v: _Verifier, n: Node) -> None:
    carries, ys, outs = _carries(v, n, 1), v.yields(n), _outs(n)
    k = len(carries)
    v.expect_types(n, "yielded carries", ys[:k], carries)
    v.expect_types(n, "carried results", outs[:k], carries)
    if len(outs) != len(ys):
        raise v.fail(f"scan returns the carries and one value per extra yield: {len(ys)} value(s), got {len(outs)}", n)
    stacked = list(n.attr("stacked", ()))
    if len(stacked) != len(ys) - k:
        raise v.fail(f"scan attribute stacked has {len(stacked)} entries for {len(ys) - k} per-segment yield(s)", n)
    for i, (out, y, st) in enumerate(zip(outs[k:], ys[k:], stacked), start=k):
        extra = 1 if st else 0
        if out.dtype != y.dtype or out.rank != y.rank + extra:
            raise v.fail(f"scan result #{i} {out} is not the {'stacked' if extra else 'concatenated'} yield {y}", n)


def _fused_entry(v: _Verifier, n: Node) -> None:
    r = n.regions[0]
    if r.args:
        raise v.fail(f"fused region takes no arguments, got {len(r.args)}", n)
    for m in r.nodes:
        if m.op not in FUSIBLE_OPS:
            raise v.fail(f"fused region may hold only elementwise and normalisation ops, not `{m.op.value}`", n)


def _fused_exit(v: _Verifier, n: Node) -> None:
    v.expect_types(n, "results", _outs(n), v.yields(n))


def _param(v: _Verifier, n: Node) -> None:
    p = v.params.get(n.attr("ref"))
    if p is None:
        raise v.fail(f"param node refers to unknown parameter @{n.attr('ref')}", n)
    t = p.type
    if p.copies != 1 and n.attr("index") is not None:
        t = TensorType(t.dtype, t.shape[1:])
    v.expect_types(n, "result", _outs(n), [t])


def _kv_read(v: _Verifier, n: Node) -> None:
    outs = _outs(n)
    shapes_ok = len(outs) in (2, 3) and all(t.dtype == F32 and t.rank == 4 for t in outs[:2]) and (
        len(outs) == 2 or (outs[2].dtype == I64 and outs[2].rank == 2))
    if not shapes_ok:
        raise v.fail("kv_read returns (k, v) as f32[B, T, H, Dh], and the key positions as i64[B, T] when the "
                     "recording site has positions", n)


Check = Callable[[_Verifier, Node], None]
_ENTRY: dict[Op, Check] = {
    Op.LOOP: _loop_entry, Op.HALT_LOOP: _loop_entry, Op.ROUTE_TOPK: _route_entry, Op.ROUTE_MASK: _route_entry,
    Op.SCAN: _scan_entry, Op.FUSED: _fused_entry,
}
_EXIT: dict[Op, Check] = {
    Op.LOOP: _loop_exit, Op.HALT_LOOP: _halt_loop_exit, Op.ROUTE_TOPK: _route_exit, Op.ROUTE_MASK: _route_exit,
    Op.SCAN: _scan_exit, Op.PARAM: _param, Op.FUSED: _fused_exit, Op.KV_READ: _kv_read,
}
