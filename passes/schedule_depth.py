"""schedule-depth: run each routed recursion compacted or masked, whichever the cost model prefers.

`route_topk` has two exact lowerings (SPEC §22):

* compact (`schedule="compact"`, the default): gather the k selected tokens, run the body on
  [B, k, ...] with their original positions, scatter back. Work scales with k, plus a top-k, a
  sort, a gather and a scatter.
* mask (`schedule="mask"`): run the body on every token ([B, T, ...], positions 0..T-1); attention
  inside takes only the selected tokens as keys (a key mask built from the region's `keep`
  argument); the result is blended back where selected. Work scales with T, with no gather or
  scatter, and at capacity 1 no top-k either: such a route acts token by token, so K/V-cached
  decoding applies to it.

Masking is only equivalent when the body treats tokens independently except through its own
self-attention (`mask_blocker` says why not otherwise); at capacity 1 the two are the same program.
The choice compares the cost model's FLOPs of the route both ways at B = `batch`, T = `seq` (other
symbols at their defaults, summed over the enclosing loops' trips): masking wins when it costs at
most `overhead` FLOP-equivalents more per execution, the price of compaction's extra kernels.
"""
from __future__ import annotations

import itertools

import sympy

from archc.errors import ArchError
from archc.ir.core import Graph, Node, Region, Value, value_types
from archc.ir.cost import node_flops
from archc.ir.interpret import resolve_bindings
from archc.ir.ops import Op, attend_operands
from archc.ir.shapes import BOOL, TensorType, as_expr, replaced, sym
from archc.passes.regions import FreshNames, ancestors, defined_names, splice
from archc.passes.rewrite import map_node_exprs, map_region_exprs

STRATEGIES = ("auto", "compact", "mask")
OVERHEAD = 2.0 ** 21        # FLOP-equivalents of compaction's top-k, sort, gather and scatter (CPU)

# ops that mix or index tokens, or whose meaning depends on how many tokens run
_NOT_TOKENWISE = {Op.ARANGE, Op.LINEAR_SCAN, Op.LINEAR_ATTN, Op.CONV1D, Op.MEM_READ, Op.MEM_WRITE, Op.BANK_PUSH,
                  Op.BANK_VALID, Op.HALT_LOOP, Op.ROUTE_TOPK, Op.ROUTE_MASK, Op.SCAN}
_ALONG_AXIS = {Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.ARGMAX, Op.SOFTMAX, Op.CUMSUM, Op.TOPK_MASK,
               Op.CONCAT, Op.SLICE, Op.SELECT, Op.GATHER}
_SHAPE_ATTR_OPS = {Op.FULL, Op.BROADCAST, Op.RESHAPE}


def schedule_depth(g: Graph, *, seq: int = 1024, batch: int = 1, overhead: float = OVERHEAD,
                   strategy: str = "auto") -> Graph:
    """Pick masking or compaction for every routed recursion (route_topk) by the cost model at T=seq; options seq, batch, overhead, strategy."""
    if strategy not in STRATEGIES:
        raise ArchError(f"schedule-depth: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if seq < 1 or batch < 1:
        raise ArchError(f"schedule-depth: seq and batch must be at least 1, got seq={seq}, batch={batch}")
    h = g
    for name in [n.outputs[0].name for n in g.walk() if n.op is Op.ROUTE_TOPK and n.attr("schedule") is None]:
        route = next(n for n in h.walk() if n.op is Op.ROUTE_TOPK and n.outputs[0].name == name)
        choice = decide(h, route, seq, batch, overhead, strategy)[0]
        h = h.replace(body=splice(h.body, name, lambda n, c=choice, hh=h: [masked(hh, n) if c == "mask"
                                                                           else _with_schedule(n, "compact")]))
    return h


def decide(g: Graph, route: Node, seq: int, batch: int, overhead: float, strategy: str) -> tuple[str, str]:
    """("mask" | "compact", why)."""
    blocker = mask_blocker(g, route)
    if blocker is not None:
        return "compact", f"masking would change the result: {blocker}"
    if strategy != "auto":
        return strategy, "forced by strategy"
    compact, mask, runs = route_costs(g, route, seq, batch)
    saved = compact - mask + overhead * runs
    verdict = "mask" if saved >= 0 else "compact"
    return verdict, (f"FLOPs compacted {compact:.4g} vs masked {mask:.4g} over {runs} execution(s) at B={batch}, "
                     f"T={seq}; compaction overhead {overhead:.4g} per execution")


def _with_schedule(n: Node, schedule: str) -> Node:
    return n.replace(attrs={**n.attr_dict, "schedule": schedule})


# -- legality --------------------------------------------------------------------------------------------


def _shared_sources(g: Graph) -> set[str]:
    """Sites whose recorded K/V some other attention reads (they must record the same tensors)."""
    out = set()
    for n in g.walk():
        share = n.attr("kv_share") if n.op is Op.ATTEND else None
        if isinstance(share, str) and not share.startswith("recursion:"):
            out.add(share.split(":")[-1])
        if n.op is Op.KV_READ:
            out.add(n.attr("site"))
    return out


def mask_blocker(g: Graph, route: Node) -> str | None:
    """Why running this route's body on every token would differ from running it on the selected ones."""
    if route.attr("has_infer"):
        return "outside training its tokens are chosen by the `infer` rule, one by one"
    if as_expr(route.attr("capacity")) == 1:
        return None                 # every token is selected: both schedules run the same program
    r = route.regions[0]
    seq, pos = r.args[0].type.shape[1], r.args[1].name
    inside = set(defined_names(r))
    reads = {o.name for n in r.walk() if n.op is Op.KV_READ for o in n.outputs}
    sources = _shared_sources(g)
    types = value_types(g)
    for n in r.walk():
        what = f"`{n.op.value}`" + (f" at line {n.span.line}" if n.span else "")
        if n.op in _NOT_TOKENWISE:
            return f"{what} depends on how many tokens run or mixes them"
        if n.op is Op.ATTEND:
            why = _attend_blocker(n, inside - reads, pos, sources)
            if why:
                return f"{what} {why}"
            continue
        why = _tokenwise_blocker(n, seq, types)
        if why:
            return f"{what} {why}"
    return None


def _attend_blocker(n: Node, tokens: set[str], pos: str, sources: set[str]) -> str | None:
    q, k, v, mask, qpos, kpos = attend_operands(n, list(n.inputs))
    if q not in tokens:
        return "queries come from outside the route"
    if mask is not None:
        return "has a mask of its own"
    if n.attr("kv_share"):
        return "shares K/V through the run-time store"
    if n.attr("site") in sources and k in tokens:
        return "records K/V that another attention reads"
    positioned = qpos == pos and (kpos == pos or k not in tokens)
    if qpos is not None and not positioned:
        return "uses positions other than the route's"
    if qpos is None and (n.attr("window") or n.attr("prefix") or (n.attr("causal") and k not in tokens)):
        return "relies on default positions, which count the running tokens"
    if (k in tokens) != (v in tokens):
        return "mixes the route's tokens with outside keys"
    return None


def _tokenwise_blocker(n: Node, seq: sympy.Expr, types: dict[str, TensorType]) -> str | None:
    """A node acts on each token independently: the token axis stays axis 1 and is never reduced."""
    for key, val in n.attrs:
        if isinstance(val, (sympy.Basic, tuple)) and _mentions(val, seq):
            if not (n.op in _SHAPE_ATTR_OPS and key == "shape" and _axes(val, seq) == [1]):
                return f"uses the number of running tokens in `{key}`"
    ins = [types[i] for i in n.inputs if i in types]
    tokened = any(_axes(t.shape, seq) == [1] for t in ins)
    for o in n.outputs:
        axes = _axes(o.type.shape, seq)
        if axes not in ([], [1]) or any(d != seq and _mentions(d, seq) for d in o.type.shape):
            return "moves or merges the token axis"
        if tokened and not axes and not n.regions:
            return "reduces over the tokens"
    if n.op in _ALONG_AXIS and ins and _axes(ins[0].shape, seq) == [1]:
        if int(n.attr("axis")) % ins[0].rank == 1:
            return "works along the token axis"
    return None


def _axes(shape, seq) -> list[int]:
    return [i for i, d in enumerate(shape) if d == seq]


def _mentions(v, seq) -> bool:
    if isinstance(v, tuple):
        return any(_mentions(x, seq) for x in v)
    return isinstance(v, sympy.Basic) and v.has(seq)


# -- the masked form ---------------------------------------------------------------------------------------


def masked(g: Graph, route: Node) -> Node:
    """The route with schedule="mask": region typed at full length, `keep` argument, key masks."""
    r = route.regions[0]
    x = value_types(g)[route.inputs[0]]
    seq = r.args[0].type.shape[1]
    batch, length = x.shape[0], x.shape[1]
    full = map_region_exprs(r, lambda e: e.xreplace({seq: length}) if e.has(seq) else e)
    names = FreshNames(g)
    keep = Value(names.value("keep"), TensorType(BOOL, (batch, length)))
    body = Region(full.args + (keep,), full.nodes, full.results)
    if as_expr(route.attr("capacity")) != 1:
        body = _key_masked(body, keep, names)
    return _with_schedule(route.replace(regions=(body,)), "mask")


def _key_masked(r: Region, keep: Value, names: FreshNames) -> Region:
    """Self-attention inside the route takes only the selected tokens as keys."""
    batch, length = keep.type.shape
    row = Value(names.value("keep_row"), TensorType(BOOL, (batch, sympy.Integer(1), length)))
    grid = Value(names.value("keys"), TensorType(BOOL, (batch, length, length)))
    prologue = [Node.make(Op.UNSQUEEZE, (keep.name,), (row,), {"axis": 1}),
                Node.make(Op.BROADCAST, (row.name,), (grid,), {"shape": [batch, length, length]})]
    tokens = set(defined_names(r)) - _kv_read_outputs(r)
    body = _add_key_mask(r, grid.name, tokens)
    return Region(body.args, tuple(prologue) + body.nodes, body.results)


def _kv_read_outputs(r: Region) -> set[str]:
    return {o.name for n in r.walk() if n.op is Op.KV_READ for o in n.outputs}


def _add_key_mask(r: Region, grid: str, tokens: set[str]) -> Region:
    nodes = []
    for n in r.nodes:
        if n.op is Op.ATTEND and n.inputs[1] in tokens:
            inputs = n.inputs[:3] + (grid,) + n.inputs[3:]
            n = n.replace(inputs=inputs, attrs={**n.attr_dict, "has_mask": True})
        elif n.regions:
            n = n.replace(regions=tuple(_add_key_mask(sub, grid, tokens) for sub in n.regions))
        nodes.append(n)
    return Region(r.args, tuple(nodes), r.results)


# -- costs ---------------------------------------------------------------------------------------------------


def route_costs(g: Graph, route: Node, seq: int, batch: int) -> tuple[float, float, int]:
    """FLOPs of the route compacted and masked, summed over every execution, and the execution count."""
    values = {**resolve_bindings(g), "B": batch, "T": seq}
    types = value_types(g)            # what the route reads from outside; node_flops types its regions
    mask_route = masked(g, route)
    compact = mask = 0.0
    runs = 0
    for env in _loop_envs(g, route, values):
        number = _numeric(env)
        compact += float(node_flops(g, map_node_exprs(route, number), _typed(types, number)))
        mask += float(node_flops(g, map_node_exprs(mask_route, number), _typed(types, number)))
        runs += 1
    return compact, mask, runs


def _numeric(env: dict):
    subs = {sym(k): sympy.sympify(v) for k, v in env.items() if isinstance(v, (int, float, bool))}
    return lambda e: replaced(e, subs)


def _typed(types: dict, number) -> dict:
    return {k: TensorType(t.dtype, tuple(number(d) for d in t.shape)) for k, t in types.items()}


def _loop_envs(g: Graph, route: Node, values: dict, limit: int = 4096):
    """Symbol values for every execution of `route`: one per combination of enclosing loop steps."""
    loops = [n for n in (ancestors(g.body, route) or ()) if n.op in (Op.LOOP, Op.HALT_LOOP) and n.attr("var")]
    ranges = []
    for n in loops:
        trips = as_expr(n.attr("trips")).xreplace({sym(k): sympy.sympify(v) for k, v in values.items()
                                                   if isinstance(v, (int, float))})
        ranges.append(range(int(trips) if trips.is_number else 1))
    combos = itertools.islice(itertools.product(*ranges), limit)
    for steps in combos:
        yield {**values, **{n.attr("var"): i for n, i in zip(loops, steps)}}


def remarks(before: Graph, after: Graph, *, seq: int = 1024, batch: int = 1, overhead: float = OVERHEAD,
            strategy: str = "auto") -> list[str]:
    """One line per routed recursion: the schedule chosen and why."""
    lines = []
    for route in (n for n in before.walk() if n.op is Op.ROUTE_TOPK):
        chosen = next((n.attr("schedule") for n in after.walk()
                       if n.op is Op.ROUTE_TOPK and n.outputs[0].name == route.outputs[0].name), None)
        if route.attr("schedule") is not None:
            lines.append(f"route %{route.outputs[0].name}: already {route.attr('schedule')}")
            continue
        _, why = decide(before, route, seq, batch, overhead, strategy)
        where = f" (line {route.span.line})" if route.span else ""
        lines.append(f"route %{route.outputs[0].name}{where}: {chosen}; {why}")
    return lines

