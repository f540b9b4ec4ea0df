"""recur-blocks: re-express a stack of L distinct layers as k blocks applied recurrently (Raptor,
CoLa). Unlike the other passes this one changes the model, by the user's explicit request
(`archc compile --recur-blocks k`): it keeps k/L of the stack's weights.

Stacks it finds (all of them; k must divide each one's L at the default sizes):

* a layer array applied in sequence: `layer blocks[L] = Block(...)` read as `blocks[i]` in
  `repeat i in L` (parameters with `copies` = the loop's trip count, read with `index=<i>`);
* straight-line applications of L layers of one block kind chained through a value
  (`x = l0(x); x = l1(x); ...`: the same computation up to renaming, each copy reading the
  previous copy's result, with its own parameters of the same types and initializers).

Layer i then uses block `floor(i * k / L)` ("sequence", the default: each block serves a
contiguous run of L/k layers, as Raptor's block recurrence and `share ... as sequence`) or
`i mod k` ("cycle": the k blocks repeat in order, as `share ... as cycle`). For an array, its
parameters shrink to k copies and every read's index e becomes floor(e * k / L) or Mod(e, k)
(so the trip count may still be overridden at run time; with k = 1 they become plain parameters); for straight-line layers, layer i reads
the first layer of its block's weights and the other layers' parameters are dropped. Attention
sites keep their names (each layer still caches its own K/V). With k = L it is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from archc.errors import ArchError, Span
from archc.ir.core import Graph, Node, Param, Region, reads_of, value_types
from archc.ir.ops import Op
from archc.ir.shapes import as_expr, sym
from archc.passes.regions import Match, Periods, atom_key, best_run, defined_names, is_atom

ORDERS = ("sequence", "cycle")
_HINT = ("write the layers as `layer blocks[L] = Block(...)` applied by `repeat i in L { x = blocks[i](x) }`, "
         "or as straight-line applications `x = l0(x); x = l1(x); ...` of layers of one block kind")


def recur_blocks(g: Graph, *, k: int | None = None, order: str = "sequence") -> Graph:
    """Re-express each stack of L distinct layers as k blocks applied recurrently L/k times (changes the model: k/L of the weights)."""
    if k is None:
        raise ArchError("pass `recur-blocks` needs a block count", hint="use --recur-blocks K or recur-blocks{k=K}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArchError(f"recur-blocks: the block count must be a positive integer, got {k!r}")
    if order not in ORDERS:
        raise ArchError(f"recur-blocks: unknown order `{order}`", hint="orders: " + ", ".join(ORDERS))
    from archc.ir.interpret import resolve_bindings
    defaults = {sym(n): as_expr(v) for n, v in resolve_bindings(g).items() if isinstance(v, (int, float))}
    arrays = _array_stacks(g)
    chains = _chains(g)
    if not arrays and not chains:
        raise ArchError(f"--recur-blocks {k}: `{g.name}` has no stack of distinct layers applied in sequence",
                        hint=_HINT)
    for stack in [*arrays.values(), *chains]:
        _check_divides(stack, k, defaults)
    reindex = {name: s for s in arrays.values() if s.length(defaults) != k for name in s.params}
    alias: dict[str, str] = {}
    for chain in chains:
        if chain.length(defaults) != k:
            _alias(chain, k, order, alias)
    if not reindex and not alias:
        return g
    params = tuple(_shrink(p, k) if p.name in reindex else p for p in g.params if p.name not in alias)
    body = _rewrite_reads(g.body, reindex, alias, k, order)
    return g.replace(params=params, body=body)


# -- finding stacks -----------------------------------------------------------------------------------


@dataclass
class _Stack:
    what: str                   # how the diagnostics name it
    size: sympy.Expr            # L, possibly symbolic
    span: Span | None
    params: tuple[str, ...] = ()                      # an array: its stacked parameters
    layers: tuple[tuple[str, ...], ...] = ()          # a chain: each layer's parameters, by position

    def length(self, defaults) -> int:
        v = as_expr(self.size).xreplace(defaults)
        return int(v) if v.is_Integer else -1


def _array_stacks(g: Graph) -> dict[tuple, _Stack]:
    """Layer arrays read as `array[i]` in a loop over i whose trip count is the array's size."""
    copies = {p.name: as_expr(p.copies) for p in g.params if as_expr(p.copies) != 1}
    stacks: dict[tuple, _Stack] = {}
    for n in g.walk():
        if n.op is not Op.LOOP or not n.attr("var"):
            continue
        var, trips = sym(n.attr("var")), as_expr(n.attr("trips"))
        found = sorted({m.attr("ref") for m in n.regions[0].walk()
                        if m.op is Op.PARAM and m.attr("ref") in copies and m.attr("index") is not None
                        and as_expr(m.attr("index")) == var and copies[m.attr("ref")] == trips})
        if found:
            key = (trips, tuple(found))
            stacks.setdefault(key, _Stack(f"layer array `{_prefix(found)}` ({len(found)} parameters)", trips, n.span,
                                          params=tuple(found)))
    return stacks


def _prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common) or names[0]


def _relaxed_attrs(a: Node, b: Node) -> bool:
    """Layers of one kind differ in their attention sites' names and nothing else."""
    return tuple(kv for kv in a.attrs if kv[0] != "site") == tuple(kv for kv in b.attrs if kv[0] != "site")


def _relaxed_signature(n: Node) -> tuple:
    return n.op, tuple(kv for kv in n.attrs if kv[0] != "site"), tuple(o.type for o in n.outputs), len(n.inputs)


def _chains(g: Graph) -> list[_Stack]:
    types = value_types(g)
    params = {p.name: p for p in g.params}
    out: list[_Stack] = []

    def visit(r: Region) -> None:
        out.extend(_region_chains(list(r.nodes), types, params))
        for n in r.nodes:
            for sub in n.regions:
                visit(sub)

    visit(g.body)
    return out


def _region_chains(nodes: list[Node], types, params) -> list[_Stack]:
    compute = [i for i, n in enumerate(nodes) if not is_atom(n)]
    atoms = {n.out.name: n for n in nodes if is_atom(n)}
    ids: dict[tuple, int] = {}
    periods = Periods([ids.setdefault(_relaxed_signature(nodes[i]), len(ids)) for i in compute])
    def plan(s: int, p: int, k: int) -> _Stack | None:
        copies = [[nodes[compute[s + c * p + t]] for t in range(p)] for c in range(k)]
        layers = _layer_params(copies, atoms, types, params)
        if layers is None:
            return None
        return _Stack(f"{k} straight-line layers", sympy.Integer(k), copies[0][0].span, layers=layers)

    chains: list[_Stack] = []
    s = 0
    while s < len(compute):
        found = best_run(periods, s, lambda p, k: plan(s, p, k))
        if found is not None:
            chains.append(found[0])
        s += found[1] if found is not None else 1
    return chains


def _layer_params(copies, atoms, types, params) -> tuple[tuple[str, ...], ...] | None:
    """Each copy's parameters by position when the copies are distinct layers of one kind in a chain."""
    if any(m.op is Op.ATTEND and m.attr("kv_share") for copy in copies for n in copy for m in _walk(n)):
        return None
    matches = []
    for copy in copies[1:]:
        m = Match(set(defined_names(Region((), tuple(copy), ()))), _relaxed_attrs)
        if not m.nodes(copies[0], copy):
            return None
        matches.append(m)
    outputs0 = {o.name for n in copies[0] for o in n.outputs}
    carried, layers = set(), []
    for a in matches[0].free:
        reads = [m.free[a] for m in matches]
        if all(b == a for b in reads) or (a in atoms and all(b in atoms and atom_key(atoms[b]) == atom_key(atoms[a])
                                                             for b in reads)):
            continue
        if reads[0] in outputs0 and all(reads[c] == matches[c - 1].defined[reads[0]] for c in range(1, len(reads))):
            if types[a] == types[reads[0]]:
                carried.add(a)
            continue
        refs = [_param_ref(x, atoms, params) for x in [a, *reads]]
        if None in refs or len(set(refs)) != len(refs) or len({_kind(params[r]) for r in refs}) != 1:
            return None
        if len({atoms[x].attr("index") for x in [a, *reads]}) != 1:
            return None
        layers.append(refs)
    if not layers or not _all_depend(copies[0], carried):
        return None
    return tuple(zip(*layers))


def _all_depend(copy: list[Node], carried: set[str]) -> bool:
    """Every node of the layer computes from the value it receives (a layer, not parallel branches)."""
    live = set(carried)
    for n in copy:
        if not reads_of([n]) & live:
            return False
        live.update(o.name for o in n.outputs)
    return True


def _param_ref(name: str, atoms, params) -> str | None:
    n = atoms.get(name)
    if n is None or n.op is not Op.PARAM or n.attr("ref") not in params:
        return None
    return n.attr("ref")


def _kind(p: Param) -> tuple:
    return p.type, p.init, p.init_args, as_expr(p.copies)


def _walk(n: Node):
    yield n
    for r in n.regions:
        yield from r.walk()


# -- rewriting ----------------------------------------------------------------------------------------


def _check_divides(stack: _Stack, k: int, defaults) -> None:
    L = stack.length(defaults)
    if L < 1:
        raise ArchError(f"--recur-blocks {k}: the {stack.what} has no fixed size at the defaults", stack.span)
    if k > L or L % k:
        raise ArchError(f"--recur-blocks {k}: the {stack.what} has L = {L} layers, which {k} blocks cannot share evenly",
                        stack.span, hint=f"k must divide {L}: " + ", ".join(str(d) for d in range(1, L + 1) if L % d == 0))


def _block(i: sympy.Expr, k: int, L: sympy.Expr, order: str) -> sympy.Expr:
    """The block that layer i uses."""
    return sympy.Mod(i, k) if order == "cycle" else sympy.floor(i * k / L)


def _alias(chain: _Stack, k: int, order: str, alias: dict[str, str]) -> None:
    L = len(chain.layers)
    for i, refs in enumerate(chain.layers):
        j = int(_block(sympy.Integer(i), k, sympy.Integer(L), order))
        first = chain.layers[j * (L // k) if order == "sequence" else j]
        for ref, keep in zip(refs, first):
            if ref == keep:
                continue
            if alias.get(ref, keep) != keep:
                raise ArchError(f"--recur-blocks {k}: parameter @{ref} belongs to two stacks that disagree", chain.span)
            alias[ref] = keep


def _shrink(p: Param, k: int) -> Param:
    if k == 1:                  # one block for every layer: a plain parameter, no copies axis
        return replace(p, type=p.type.with_shape(p.type.shape[1:]), copies=1)
    return replace(p, type=p.type.with_shape((k,) + p.type.shape[1:]), copies=k)


def _rewrite_reads(r: Region, reindex: dict[str, _Stack], alias: dict[str, str], k: int, order: str) -> Region:
    nodes = []
    for n in r.nodes:
        if n.regions:
            n = n.replace(regions=tuple(_rewrite_reads(sub, reindex, alias, k, order) for sub in n.regions))
        if n.op is Op.PARAM and n.attr("ref") in alias:
            n = n.replace(attrs={**n.attr_dict, "ref": alias[n.attr("ref")]})
        elif n.op is Op.PARAM and n.attr("ref") in reindex and n.attr("index") is not None:
            attrs = {key: v for key, v in n.attrs if key != "index"}
            if k > 1:
                index = _block(as_expr(n.attr("index")), k, reindex[n.attr("ref")].size, order)
                attrs["index"] = int(index) if index.is_Integer else index
            n = n.replace(attrs=attrs)
        nodes.append(n)
    return Region(r.args, tuple(nodes), r.results)
