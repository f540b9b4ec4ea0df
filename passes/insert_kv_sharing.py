"""insert-kv-sharing: K/V-sharing policies become data flow that every later stage can see.

Lowering records `share_kv` as a `kv_share` attribute on the consumer `attend`s, honoured through a
run-time K/V store (SPEC §11): the consumers still compute (and the interpreter still runs) their own
K/V projections, only to throw them away. This pass rewrites the sharing into the IR (SPEC §22):

* recursion-wise (`kv_share="recursion:r"`): the first trip of the loop over `r` is peeled off. In
  the copy (`r = 0`) the sites record their K/V as usual; in the loop of the remaining `trips - 1`
  trips (`r -> r + 1`) each consumer reads them: as SSA values when the producing `attend` sits
  directly in the loop body, else through `kv_read` of the site and copy that recorded them;
* cross-layer (`kv_share="from:S"`): the consumer reads the producer's K/V values when they are
  visible where it runs, else `kv_read(site=S)`.

The consumers' own K/V projections are then dead: DCE removes them, and parameters that only they
read are dropped. `stochastic:` sharing draws a coin per execution in training, so it keeps the
attribute and the run-time store, unless `deploy=1` says the model is for inference (eval mode
always reads the source: it becomes cross-layer sharing). Layouts whose equivalence the pass
cannot prove keep the store too; `remarks` says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from archc.ir.core import Graph, Node, Region, Value, value_types
from archc.ir.ops import Op
from archc.ir.shapes import as_expr, sym
from archc.passes.dce import dce
from archc.passes.regions import FreshNames, Renamer, ancestors, splice


def insert_kv_sharing(g: Graph, *, deploy: int = 0) -> Graph:
    """Make K/V sharing explicit: consumers read the producer's K/V; their own K/V projections and weights are removed (option deploy=1: stochastic sharing too, as at inference)."""
    h, blocked = g, set()
    while True:
        loop = next((n for n in _sharing_loops(h) if n.outputs[0].name not in blocked), None)
        if loop is None:
            break
        if recursion_blocker(loop) is not None:
            blocked.add(loop.outputs[0].name)
            continue
        h = _peel(h, loop)
    h = _cross_layer(h, bool(deploy))
    if h is g:
        return g
    return _drop_dead_params(g, dce(h))


# -- recursion-wise sharing: peel the first trip -------------------------------------------------------


def _share_var(n: Node) -> str | None:
    share = n.attr("kv_share")
    return share.split(":", 1)[1] if isinstance(share, str) and share.startswith("recursion:") else None


def _sharing_loops(g: Graph) -> list[Node]:
    """Loops whose variable some `attend` shares K/V across, outermost first."""
    return [n for n in g.walk() if n.op in (Op.LOOP, Op.HALT_LOOP) and n.attr("var")
            and any(_share_var(m) == n.attr("var") for m in n.regions[0].walk())]


def recursion_blocker(loop: Node) -> str | None:
    """Why the first trip of `loop` cannot be peeled to make its K/V sharing explicit (None: it can)."""
    var = loop.attr("var")
    if loop.op is not Op.LOOP:
        return "a halting loop runs a data-dependent number of trips"
    if loop.attr("grad_last") is not None:
        return "`grad last` runs the first trip without gradients; peeling it would change that"
    body = loop.regions[0]
    shared = [n for n in body.walk() if _share_var(n) == var]
    for a in shared:
        site = a.attr("site")
        copy = a.attr("copy")
        copy_syms = {s.name for s in as_expr(copy).free_symbols} if copy is not None else set()
        if var in copy_syms:
            return f"the copy of `{site}` changes with `{var}`, so its first use is not in the first trip"
        if sum(1 for m in body.walk() if m.op is Op.ATTEND and m.attr("site") == site) != 1:
            return f"`{site}` runs at more than one place in the loop"
        for c in ancestors(body, a):
            # a loop runs each copy once only if the copy is its variable plus an offset: `i % k`
            # wraps around when the loop has more than k trips (fuzz seed 400325)
            once = c.op is Op.ROUTE_TOPK or (c.op is Op.LOOP and c.attr("var") in copy_syms
                                              and sym(c.attr("var")) not in (as_expr(copy) - sym(c.attr("var"))).free_symbols)
            if not once:
                return f"`{site}` runs more than once per trip (inside `{c.op.value}`)"
    return None


def _peel(g: Graph, loop: Node) -> Graph:
    names = FreshNames(g)
    var = loop.attr("var")
    body = loop.regions[0]
    rename = {a.name: x for a, x in zip(body.args, loop.inputs)}      # the first trip reads the loop's operands
    first = Renamer(rename, {sym(var): sympy.Integer(0)}, names.value).region(body)
    later = Renamer(subs={sym(var): sym(var) + 1}).region(body)
    types = value_types(g) | value_types(first)
    pairs = [(p, c) for p, c in zip(first.walk(), later.walk()) if _share_var(c) == var]
    top = {id(n) for n in first.nodes}
    for producer, consumer in pairs:
        first = splice(first, producer.outputs[0].name, lambda n: [_without_share(n)])
        if id(producer) in top:
            later = splice(later, consumer.outputs[0].name, lambda n, p=producer: [_read_values(n, p)])
        else:
            later = splice(later, consumer.outputs[0].name,
                           lambda n, p=producer: _read_store(n, p, names, var, types))
    trips = as_expr(loop.attr("trips")) - 1
    rest = loop.replace(inputs=first.results, regions=(later,),
                        attrs={**loop.attr_dict, "trips": trips if not trips.is_Integer else int(trips)})
    return g.replace(body=splice(g.body, loop.outputs[0].name, lambda n: list(first.nodes) + [rest]))


def _without_share(n: Node) -> Node:
    attrs = n.attr_dict
    attrs.pop("kv_share", None)
    return n.replace(attrs=attrs)


def _kv_operands(n: Node) -> list[tuple[int, str]]:
    """(operand index, value) of an attend's k, v and, with positions, its key positions."""
    slots = [(1, n.inputs[1]), (2, n.inputs[2])]
    if n.attr("has_pos"):
        slots.append((len(n.inputs) - 1, n.inputs[-1]))
    return slots


def _read_values(consumer: Node, producer: Node) -> Node:
    """The consumer attends to the producer's K/V values (SSA)."""
    inputs = list(consumer.inputs)
    for (i, _), (_, value) in zip(_kv_operands(consumer), _kv_operands(producer)):
        inputs[i] = value
    return _without_share(consumer).replace(inputs=tuple(inputs))


def _read_store(consumer: Node, producer: Node, names: FreshNames, var: str | None, types: dict) -> list[Node]:
    """A `kv_read` of what the producer recorded, then the consumer attending to it."""
    outs = tuple(Value(names.value(v), types[v]) for _, v in _kv_operands(producer))
    attrs = {"site": producer.attr("site")}
    if producer.attr("copy") is not None:
        attrs["copy"] = producer.attr("copy")
    if var is not None:
        attrs["var"] = var
    read = Node.make(Op.KV_READ, (), outs, attrs, span=consumer.span)
    inputs = list(consumer.inputs)
    for (i, _), o in zip(_kv_operands(consumer), outs):
        inputs[i] = o.name
    return [read, _without_share(consumer).replace(inputs=tuple(inputs))]


# -- cross-layer sharing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    """Where a value is defined or a node runs: the chain of (node index, region index) from the top."""

    path: tuple[tuple[int, int], ...]
    index: int                       # position in its region; -1 for a region argument

    def sees(self, value: "_Place") -> bool:
        """A value defined at `value` is readable here."""
        depth = len(value.path)
        if self.path[:depth] != value.path:
            return False
        here = self.index if depth == len(self.path) else self.path[depth][0]
        return value.index < here


def _places(g: Graph) -> tuple[dict[str, _Place], dict[int, _Place]]:
    """Definition places of every value and run places of every node (by id)."""
    defs: dict[str, _Place] = {}
    runs: dict[int, _Place] = {}

    def walk(r: Region, path):
        defs.update((a.name, _Place(path, -1)) for a in r.args)
        for i, n in enumerate(r.nodes):
            runs[id(n)] = _Place(path, i)
            for j, sub in enumerate(n.regions):
                walk(sub, path + ((i, j),))
            defs.update((o.name, _Place(path, i)) for o in n.outputs)
    walk(g.body, ())
    return defs, runs


def cross_layer_blocker(g: Graph, consumer: Node) -> str | None:
    """Why a `from:` consumer keeps the run-time store (None: it can read the producer directly)."""
    source = _source(consumer)
    producers = [n for n in g.walk() if n.op is Op.ATTEND and n.attr("site") == source]
    if len(producers) != 1:
        return f"`{source}` runs at {len(producers)} places"
    producer = producers[0]
    order = {id(n): i for i, n in enumerate(g.walk())}
    if order[id(producer)] > order[id(consumer)]:
        return f"`{source}` runs after `{consumer.attr('site')}`"
    if bool(producer.attr("has_pos")) != bool(consumer.attr("has_pos")):
        return f"`{source}` and `{consumer.attr('site')}` disagree on explicit positions"
    if producer.attr("copy") is not None:
        return f"`{source}` is one copy of a layer array"
    return None


def _cross_layer(g: Graph, deploy: bool) -> Graph:
    done: set[str] = set()
    while True:
        consumer = next((n for n in g.walk() if _is_from(n, deploy) and n.outputs[0].name not in done), None)
        if consumer is None:
            return g
        done.add(consumer.outputs[0].name)
        if cross_layer_blocker(g, consumer) is not None:
            continue
        source = _source(consumer)
        producer = next(n for n in g.walk() if n.op is Op.ATTEND and n.attr("site") == source)
        defs, runs = _places(g)
        types = value_types(g)
        here = runs[id(consumer)]
        if all(here.sees(defs[v]) for _, v in _kv_operands(producer)):
            g = g.replace(body=splice(g.body, consumer.outputs[0].name, lambda n: [_read_values(n, producer)]))
        elif not _mentions_loop_vars(g, [types[v] for _, v in _kv_operands(producer)]):
            names = FreshNames(g)
            g = g.replace(body=splice(g.body, consumer.outputs[0].name,
                                      lambda n: _read_store(n, producer, names, None, types)))


def _mentions_loop_vars(g: Graph, types: list) -> bool:
    """Types that name a loop variable are only meaningful inside that loop."""
    known = {s.name for s in g.symbols}
    return any(s.name not in known for t in types for d in t.shape for s in as_expr(d).free_symbols)


def _is_from(n: Node, deploy: bool = False) -> bool:
    """A consumer of another site's K/V (`from:`; with `deploy`, `stochastic:` too)."""
    share = n.attr("kv_share")
    kinds = ("from:", "stochastic:") if deploy else ("from:",)
    return n.op is Op.ATTEND and isinstance(share, str) and share.startswith(kinds)


def _source(consumer: Node) -> str:
    return consumer.attr("kv_share").split(":")[-1]


# -- parameters only the removed projections read ----------------------------------------------------------


def _read_params(g: Graph) -> set[str]:
    return {n.attr("ref") for n in g.walk() if n.op is Op.PARAM}


def _drop_dead_params(before: Graph, after: Graph) -> Graph:
    """Drop parameters that `before` read (after its own dead code is gone) and `after` no longer reads."""
    gone = _read_params(dce(before)) - _read_params(after)
    if not gone:
        return after
    return after.replace(params=tuple(p for p in after.params if p.name not in gone))


# -- what the pass did, for `--remarks` ---------------------------------------------------------------------


def _unshared(g: Graph) -> Graph:
    """`g` as if it had no K/V-sharing policy: every attention reads its own K/V."""
    def strip(r: Region) -> Region:
        nodes = []
        for n in r.nodes:
            n = _without_share(n) if n.op is Op.ATTEND else n
            nodes.append(n.replace(regions=tuple(strip(sub) for sub in n.regions)) if n.regions else n)
        return Region(r.args, tuple(nodes), r.results)
    return g.replace(body=strip(g.body))


def remarks(before: Graph, after: Graph, *, deploy: int = 0) -> list[str]:
    """What became explicit, what stays with the run-time store and why, and the K/V-cache bytes saved."""
    from archc.ir.cost import cost, tidy
    from archc.ir.shapes import expr_str
    lines = []
    for loop in _sharing_loops(before):
        var = loop.attr("var")
        sites = ", ".join(sorted({n.attr("site") for n in loop.regions[0].walk() if _share_var(n) == var}))
        why = recursion_blocker(loop)
        lines.append(f"{sites}: sharing across `{var}` stays with the run-time store: {why}" if why else
                     f"{sites}: first trip of `{var}` peeled; the other trips read its K/V")
    for n in before.walk():
        share = n.attr("kv_share") if n.op is Op.ATTEND else None
        if not isinstance(share, str) or share.startswith("recursion:"):
            continue
        site = n.attr("site")
        why = ("stochastic sharing draws a coin per execution in training (deploy=1 shares it as at inference)"
               if share.startswith("stochastic:") and not deploy else cross_layer_blocker(before, n))
        lines.append(f"{site}: reading `{share.split(':')[-1]}` stays with the run-time store: {why}" if why else
                     f"{site}: reads the K/V of `{share.split(':')[-1]}`")
    dropped = sorted({p.name for p in before.params} - {p.name for p in after.params})
    if dropped:
        lines.append("parameters no longer read, dropped: " + ", ".join(dropped))
    lines.append(f"nodes: {sum(1 for _ in before.walk())} -> {sum(1 for _ in after.walk())}")
    unshared, shared = cost(_unshared(before)).kv_cache_bytes, cost(after).kv_cache_bytes
    lines.append(f"kv_cache_bytes without sharing: {expr_str(unshared)}")
    lines.append(f"kv_cache_bytes with sharing:    {expr_str(shared)}")
    lines.append(f"saved:                          {expr_str(tidy(unshared - shared))}")
    return lines
