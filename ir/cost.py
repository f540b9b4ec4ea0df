"""A symbolic (sympy) cost model: parameters, forward FLOPs, activation bytes and KV-cache bytes.

Every quantity is a formula in the graph's symbols, so one `cost(g)` answers for every size. The
per-op FLOP counts live in `FLOPS` (one entry per non-region op), the region rules in `REGIONS`,
and the caching policies that scale the KV cache in `KV_POLICIES`. Counting conventions:

* a multiply-add is 2 FLOPs; elementwise ops cost a small constant per output element
  (`PER_ELEMENT`), reductions a constant per *input* element (`PER_INPUT_ELEMENT`);
* `attend` costs 2*(dh+dv) per (query, key) pair for the two matmuls plus 5 for the softmax; the
  pair count is Tq*Tk, halved when causal with Tq == Tk (plus P**2/2 for a bidirectional prefix of
  length P); with a window w it is Tq*m - m**2/2 (causal) or Tq*m (not), m = Min(w, Tk);
* loops sum their body over the loop symbol (`sympy.summation`, left as an unevaluated `Sum` when
  there is no closed form); `halt_loop` counts every trip (the worst case); `scan` runs its body
  ceiling(T/size) times; `route_topk` runs its body at the length its region types carry (the
  compacted k, or every token under schedule="mask"), `route_mask` at full length (an upper
  bound); both add top-k (none when a masked route selects every token) and gating work;
* activation bytes count every node output except `param` views, with no reuse (an upper bound);
* the KV cache holds f32 K and V of every `attend` for the whole sequence: once per loop trip, once
  per loop if `kv_share="recursion"`, nothing if `kv_share="from:<site>"` or `"stochastic:..."`
  (decoding reads another site's cache), nothing for K/V that come from `kv_read` or that an
  earlier `attend` already read (one slot per distinct (k, v) pair), scaled by the graph's
  policies that target the node's `site`.
"""
from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable

import sympy

from archc.ir.core import Graph, Node, Policy, Region, value_types
from archc.ir.ops import OPS, Group, Op
from archc.ir.shapes import BOOL, F32, I64, DType, TensorType, as_expr, dims_equal, expr_str, sym

DTYPE_BYTES: dict[DType, int] = {F32: 4, I64: 8, BOOL: 1}
KV_BYTES = 4                     # the cache stores f32 keys and values
SOFTMAX_PER_SCORE = 5            # max, subtract, exp, sum, divide per attention score
ZERO = sympy.Integer(0)

QUANTITIES = ("params", "flops", "activation_bytes", "kv_cache_bytes")


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    params: sympy.Expr
    flops: sympy.Expr
    activation_bytes: sympy.Expr
    kv_cache_bytes: sympy.Expr
    defaults: tuple[tuple[str, Any], ...] = ()   # the graph's symbol defaults, under `bindings`

    def evaluate(self, bindings: dict[str, float | int] | None = None) -> dict[str, float]:
        """Numbers for every quantity; raises ValueError naming any symbol left unbound."""
        subs = _bindings(self.defaults, bindings)
        out = {}
        for q in QUANTITIES:
            v = _substitute(getattr(self, q), subs)
            if not v.is_number:
                names = ", ".join(sorted(s.name for s in v.free_symbols))
                raise ValueError(f"cannot evaluate {q}: no value for {names}")
            out[q] = float(v)
        return out

    def table(self, bindings: dict[str, float | int] | None = None,
              extra: dict[str, sympy.Expr] | None = None) -> str:
        """One row per quantity (and per `extra` formula, e.g. decode_state_bytes): its formula and,
        when `bindings` is given, its value."""
        exprs = {q: getattr(self, q) for q in QUANTITIES} | dict(extra or {})
        rows = [(q, expr_str(e)) for q, e in exprs.items()]
        width = max(len(q) for q, _ in rows)
        if bindings is None:
            return "\n".join(f"{q:<{width}}  {f}" for q, f in rows) + "\n"
        subs = _bindings(self.defaults, bindings)
        values = [_value_str(q if q in QUANTITIES else "kv_cache_bytes", _substitute(e, subs)) for q, e in exprs.items()]
        vwidth = max(len(v) for v in values)
        return "\n".join(f"{q:<{width}}  {v:>{vwidth}}  = {f}" for (q, f), v in zip(rows, values)) + "\n"

    def __str__(self) -> str:
        return self.table()


def _bindings(defaults, bindings) -> dict[sympy.Symbol, sympy.Expr]:
    merged = {k: v for k, v in defaults if isinstance(v, (int, float, sympy.Basic))}
    merged.update(bindings or {})
    return {sym(k): as_expr(v) for k, v in merged.items()}


def _substitute(e: sympy.Expr, subs) -> sympy.Expr:
    v = e.xreplace(subs)
    for _ in range(8):                      # defaults may refer to other parameters (ffn = 4*d)
        if not (v.free_symbols & set(subs)):
            break
        v = v.xreplace(subs)
    return v.doit() if v.has(sympy.Sum) else v


_UNITS = {
    "params": ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")),
    "flops": ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP")),
    "bytes": ((2.0 ** 40, "TiB"), (2.0 ** 30, "GiB"), (2.0 ** 20, "MiB"), (2.0 ** 10, "KiB")),
}


def _value_str(quantity: str, v: sympy.Expr) -> str:
    if not v.is_number:
        return "needs " + ", ".join(sorted(s.name for s in v.free_symbols))
    x = float(v)
    units = _UNITS["bytes" if quantity.endswith("bytes") else quantity]
    base = {"params": "", "flops": "FLOP"}.get(quantity, "B")
    for scale, unit in units:
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:g} {base}".rstrip()


# --- per-op FLOPs --------------------------------------------------------------------------------


def numel(t: TensorType) -> sympy.Expr:
    return sympy.prod(t.shape) if t.shape else sympy.Integer(1)


FlopRule = Callable[[Node, list[TensorType], list[TensorType]], sympy.Expr]

PER_ELEMENT: dict[Op, int] = {
    # one arithmetic op per output element; transcendental functions count as one
    **{o: 1 for o in (Op.NEG, Op.ABS, Op.NOT, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.TANH, Op.RELU, Op.SIN, Op.COS)},
    **{o: 1 for o, d in OPS.items() if d.group in (Group.BINARY, Group.COMPARE)},
    # composite activations: sigmoid = 1/(1+exp(-x)), silu = x*sigmoid(x), gelu (tanh form)
    Op.SIGMOID: 4, Op.SOFTPLUS: 3, Op.SILU: 5, Op.GELU: 8,
    Op.DETACH: 0, Op.CAST: 0,
    Op.SOFTMAX: 5, Op.RMS_NORM: 5, Op.LAYER_NORM: 5, Op.L2_NORMALIZE: 4,
    Op.ROPE: 3,                 # x*cos + rotate(x)*sin
    Op.LINEAR_SCAN: 2,          # a*h + b
    Op.BANK_VALID: 1,
}
PER_INPUT_ELEMENT: dict[Op, int] = {
    Op.SUM: 1, Op.MEAN: 1, Op.AMAX: 1, Op.ARGMAX: 1, Op.CUMSUM: 1,
    Op.LOGSUMEXP: 4,            # max, subtract, exp, add
    Op.TOPK_MASK: 2,            # selection counted as two compares per element
}
FREE_OPS = frozenset(o for o, d in OPS.items() if d.group in (Group.SOURCE, Group.MOVEMENT)) | {
    Op.EMBEDDING, Op.BANK_PUSH}
MEM_UPDATE_PER_WEIGHT = 4       # momentum m = eta*m - g and decayed step w = (1-alpha)*w + m
MEM_LOSS_PER_ELEMENT = 3        # residual, square/abs, per-token lr weighting


def _per_element(n, ins, outs):
    return PER_ELEMENT[n.op] * sum((numel(t) for t in outs), ZERO)


def _per_input_element(n, ins, outs):
    return PER_INPUT_ELEMENT[n.op] * numel(ins[0])


def _free(n, ins, outs):
    return ZERO


def _linear(n, ins, outs):
    x, w = ins[0], ins[1]
    rows = numel(x) / x.shape[-1]
    bias = rows * w.shape[0] if len(ins) == 3 else ZERO
    return 2 * rows * w.shape[1] * w.shape[0] + bias


def _matmul(n, ins, outs):
    return 2 * numel(outs[0]) * ins[0].shape[-1]


def _einsum(n, ins, outs):
    """2 per point of the full index space (one multiply-add); 1 for a single-operand reduction."""
    sizes: dict[str, sympy.Expr] = {}
    for spec, t in zip(n.attr("equation").split("->")[0].split(","), ins):
        for ch, d in zip(spec, t.shape):
            if ch not in sizes or sizes[ch] == 1:
                sizes[ch] = d
    space = sympy.prod(sizes.values()) if sizes else sympy.Integer(1)
    return (2 if len(ins) > 1 else 1) * space


def _conv1d(n, ins, outs):
    w = ins[1]
    bias = numel(outs[0]) if len(ins) == 3 else ZERO
    return 2 * numel(outs[0]) * w.shape[1] * w.shape[2] + bias


def _length_attr(v) -> sympy.Expr | None:
    """A window/prefix length, or None when the attr is absent, off (false, 0, negative) or a name."""
    if v is None or isinstance(v, (bool, str)):
        return None
    e = as_expr(v)
    return None if e.is_number and e <= 0 else e


def attention_pairs(n: Node, q: TensorType, k: TensorType) -> sympy.Expr:
    """(query, key) pairs one head scores; see the module docstring for the conventions."""
    tq, tk = q.shape[1], k.shape[1]
    causal = bool(n.attr("causal")) and dims_equal(tq, tk) is True
    window, prefix = _length_attr(n.attr("window")), _length_attr(n.attr("prefix"))
    if window is not None:
        m = sympy.Min(window, tk)
        return tq * m - m ** 2 / 2 if causal else tq * m
    if not causal:
        return tq * tk
    return tq * tk / 2 + (prefix ** 2 / 2 if prefix is not None else ZERO)


def _attend(n, ins, outs):
    q, k, v = ins[:3]
    per_pair = 2 * (q.shape[3] + v.shape[3]) + SOFTMAX_PER_SCORE
    return q.shape[0] * q.shape[2] * attention_pairs(n, q, k) * per_pair


def _linear_attn(n, ins, outs):
    q, k, v = ins[:3]
    return 4 * (numel(q) / q.shape[-1]) * q.shape[-1] * v.shape[-1]


def _mlp(rows: sympy.Expr, weights: list[TensorType]) -> tuple[sympy.Expr, sympy.Expr]:
    """(matmul FLOPs, hidden elements) of an MLP whose weights are [..., out, in]."""
    matmul = sum((2 * rows * w.shape[-1] * w.shape[-2] for w in weights), ZERO)
    hidden = sum((rows * w.shape[-2] for w in weights), ZERO)
    return matmul, hidden


def _mem_read(n, ins, outs):
    q = ins[0]
    layers = int(n.attr("layers"))
    matmul, hidden = _mlp(numel(q) / q.shape[-1], ins[1:1 + layers])
    return matmul + hidden            # one activation (or residual add) per layer output element


def _mem_write(n, ins, outs):
    """Forward + backward (about 3x the forward matmuls), the loss, and the weight update."""
    k = ins[0]
    layers = int(n.attr("layers"))
    weights = ins[5:5 + layers]
    rows = numel(k) / k.shape[-1]
    matmul, hidden = _mlp(rows, weights)
    loss = MEM_LOSS_PER_ELEMENT * rows * weights[-1].shape[-2]
    update = MEM_UPDATE_PER_WEIGHT * sum((numel(w) for w in weights), ZERO)
    return 3 * matmul + 3 * hidden + loss + update


FLOPS: dict[Op, FlopRule] = {
    **{o: _free for o in FREE_OPS},
    **{o: _per_element for o in PER_ELEMENT},
    **{o: _per_input_element for o in PER_INPUT_ELEMENT},
    Op.LINEAR: _linear, Op.MATMUL: _matmul, Op.EINSUM: _einsum, Op.CONV1D: _conv1d,
    Op.ATTEND: _attend, Op.LINEAR_ATTN: _linear_attn,
    Op.MEM_READ: _mem_read, Op.MEM_WRITE: _mem_write,
}


# --- KV cache ------------------------------------------------------------------------------------


def _prune_key_channels(args: dict) -> tuple[sympy.Expr, sympy.Expr]:
    return 1 - _exact(args["ratio"]), sympy.Integer(1)


# policy kind -> (K factor, V factor) from its args; kinds not listed do not scale the cache
KV_POLICIES: dict[str, Callable[[dict], tuple[sympy.Expr, sympy.Expr]]] = {
    "prune_key_channels": _prune_key_channels,
}


def _exact(v) -> sympy.Expr:
    """Floats from source text become exact rationals, so 0.3 prints as 3/10."""
    if isinstance(v, float):
        return sympy.Rational(repr(v))
    return as_expr(v)


def site_matches(site: str, target: str) -> bool:
    return site == target or site.startswith(target + ".")


def kv_factors(site: str | None, policies: tuple[Policy, ...]) -> tuple[sympy.Expr, sympy.Expr]:
    kf, vf = sympy.Integer(1), sympy.Integer(1)
    if not site:
        return kf, vf
    for p in policies:
        rule = KV_POLICIES.get(p.kind)
        if rule and any(site_matches(site, t) for t in p.targets):
            pk, pv = rule(p.arg_dict)
            kf, vf = kf * pk, vf * pv
    return kf, vf


# --- walking the graph ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tally:
    flops: sympy.Expr = ZERO
    act: sympy.Expr = ZERO
    kv: sympy.Expr = ZERO          # repeats with every trip of the enclosing loop
    # kv_share="recursion:<var>": counted once for the loop over <var>, keyed by that variable
    kv_once: tuple[tuple[str, sympy.Expr], ...] = ()

    def __add__(self, o: "_Tally") -> "_Tally":
        return _Tally(self.flops + o.flops, self.act + o.act, self.kv + o.kv, _merge(self.kv_once + o.kv_once))

    def scale(self, k: sympy.Expr) -> "_Tally":
        return _Tally(self.flops * k, self.act * k, self.kv * k, tuple((v, e * k) for v, e in self.kv_once))


def _merge(pairs) -> tuple[tuple[str, sympy.Expr], ...]:
    out: dict[str, sympy.Expr] = {}
    for v, e in pairs:
        out[v] = out.get(v, ZERO) + e
    return tuple(out.items())


class _Ctx:
    def __init__(self, g: Graph, kv_sites: Callable[[str], bool] | None = None):
        self.policies = g.policies
        self.kv_sites = kv_sites                       # count only these sites' K/V (None: all)
        self.producers: dict[str, Node] = {}          # SSA: value name -> defining node
        self.kv_seen: set[tuple[str, str]] = set()     # (k, v) pairs whose cache slot is already counted


Types = ChainMap


def _region(r: Region, types: Types, ctx: _Ctx) -> _Tally:
    scope = types.new_child({a.name: a.type for a in r.args})
    total = _Tally()
    for n in r.nodes:
        total = total + _node(n, scope, ctx)
        scope.update({o.name: o.type for o in n.outputs})
    return total


def _node(n: Node, types: Types, ctx: _Ctx) -> _Tally:
    ins = [types[i] for i in n.inputs]
    outs = [o.type for o in n.outputs]
    ctx.producers.update({o.name: n for o in n.outputs})
    # parameters and kv_read view stored tensors; a fused region's results are counted where its body
    # defines them
    act = ZERO if n.op in (Op.PARAM, Op.KV_READ, Op.FUSED) else sum((numel(t) * DTYPE_BYTES[t.dtype] for t in outs), ZERO)
    if n.op in REGIONS:
        return REGIONS[n.op](n, ins, outs, types, ctx) + _Tally(act=act)
    here = _Tally(FLOPS[n.op](n, ins, outs), act)
    if n.op is Op.ATTEND:
        here = here + _attend_kv(n, ins, ctx)
    return here


def _attend_kv(n: Node, ins: list[TensorType], ctx: _Ctx) -> _Tally:
    share = n.attr("kv_share")
    if isinstance(share, str) and share.startswith(("from:", "stochastic:")):
        return _Tally()                       # decoding reads the source's slot
    k, v = n.inputs[1], n.inputs[2]
    source = ctx.producers.get(k)
    if (source is not None and source.op is Op.KV_READ) or (k, v) in ctx.kv_seen:
        return _Tally()                       # another attention's slot, counted where it was first used
    ctx.kv_seen.add((k, v))
    if ctx.kv_sites is not None and not ctx.kv_sites(n.attr("site") or ""):
        return _Tally()
    kf, vf = kv_factors(n.attr("site"), ctx.policies)
    kv = KV_BYTES * (kf * numel(ins[1]) + vf * numel(ins[2]))
    if isinstance(share, str) and share.startswith("recursion:"):
        return _Tally(kv_once=((share.split(":", 1)[1], kv),))
    return _Tally(kv=kv)


def sum_over(e: sympy.Expr, var: sympy.Symbol | None, trips: sympy.Expr) -> sympy.Expr:
    """Sum e for var = 0..trips-1; an unevaluated Sum where sympy finds no closed form."""
    if var is None or not e.has(var):
        return trips * e
    fixed, varying = sympy.expand(e).as_independent(var, as_Add=True)
    return trips * fixed + sum((_sum_term(t, var, trips) for t in sympy.Add.make_args(varying)), ZERO)


_NO_CLOSED_FORM = (sympy.floor, sympy.ceiling, sympy.Max, sympy.Min)


def _sum_term(t: sympy.Expr, var: sympy.Symbol, trips: sympy.Expr) -> sympy.Expr:
    """One term's sum over var; floor/ceiling/Max/Min of var have no closed form, and sympy can spend
    minutes proving that, so those stay an unevaluated Sum (constant factors pulled out) at once."""
    if not any(f.has(var) for f in t.atoms(*_NO_CLOSED_FORM)):
        return sympy.summation(t, (var, 0, trips - 1))
    coeff, rest = t.as_independent(var, as_Add=False)
    return coeff * sympy.Sum(rest, (var, 0, trips - 1))


def _loop(n, ins, outs, types, ctx) -> _Tally:
    """loop and halt_loop: every trip runs (the worst case for halt_loop)."""
    body = _region(n.regions[0], types, ctx)
    trips = as_expr(n.attr("trips"))
    var = sym(n.attr("var")) if n.attr("var") else None
    kv = sum_over(body.kv, var, trips)
    once = []
    for v, e in body.kv_once:
        if var is not None and v == var.name:
            kv = kv + e.subs(var, 0)          # the first recursion's K/V serve every recursion
        else:
            once.append((v, sum_over(e, var, trips)))
    return _Tally(sum_over(body.flops, var, trips), sum_over(body.act, var, trips), kv, tuple(once))


def _route_topk(n, ins, outs, types, ctx) -> _Tally:
    """Body at the compacted length, plus top-k selection over the scores and gated scatter-back."""
    body = _region(n.regions[0], types, ctx)
    select = PER_INPUT_ELEMENT[Op.TOPK_MASK] * numel(ins[1])
    if n.attr("schedule") == "mask" and as_expr(n.attr("capacity")) == 1:
        select = ZERO                         # every token is selected: no top-k runs
    return body + _Tally(flops=select + _gated_scatter(outs))


def _route_mask(n, ins, outs, types, ctx) -> _Tally:
    """Body at full length (an upper bound), plus gated scatter-back."""
    return _region(n.regions[0], types, ctx) + _Tally(flops=_gated_scatter(outs))


def _gated_scatter(outs: list[TensorType]) -> sympy.Expr:
    return 2 * sum((numel(t) for t in outs), ZERO)       # gate multiply and add, per element


def _scan(n, ins, outs, types, ctx) -> _Tally:
    body = _region(n.regions[0], types, ctx)
    segments = sympy.ceiling(ins[0].shape[1] / as_expr(n.attr("size")))
    return body.scale(segments)


def _fused(n, ins, outs, types, ctx) -> _Tally:
    """A fusion region costs what its body costs: the model counts FLOPs and values, not memory traffic."""
    return _region(n.regions[0], types, ctx)


RegionRule = Callable[[Node, list, list, Types, _Ctx], _Tally]
REGIONS: dict[Op, RegionRule] = {
    Op.LOOP: _loop, Op.HALT_LOOP: _loop, Op.ROUTE_TOPK: _route_topk, Op.ROUTE_MASK: _route_mask, Op.SCAN: _scan,
    Op.FUSED: _fused,
}


# --- entry points --------------------------------------------------------------------------------


def tidy(e: sympy.Expr) -> sympy.Expr:
    """Cheap canonical form: expand, then pull out common factors."""
    return sympy.factor_terms(sympy.expand(e))


def param_count(g: Graph) -> sympy.Expr:
    return sum((numel(p.type) for p in g.params), ZERO)


def cost(g: Graph, kv_sites: Callable[[str], bool] | None = None) -> Cost:
    """The graph's cost; with `kv_sites`, kv_cache_bytes counts only the sites it accepts."""
    t = _region(g.body, ChainMap(), _Ctx(g, kv_sites))
    defaults = tuple(sorted(g.symbol_defaults().items()))
    leftover = sum((e for _, e in t.kv_once), ZERO)
    return Cost(*(_with_assumptions(g, e) for e in (param_count(g), t.flops, t.act, t.kv + leftover)), defaults)


def _with_assumptions(g: Graph, e: sympy.Expr) -> sympy.Expr:
    """Simplify knowing that dims and int parameters are positive integers (floor(T) = T, Max(1, T) = T)."""
    ints = {sym(s.name): sympy.Symbol(s.name, integer=True, positive=True) for s in g.symbols if s.kind in ("int", "dim")}
    back = {v: k for k, v in ints.items()}
    return tidy(tidy(e.xreplace(ints)).xreplace(back))


def node_flops(g: Graph, n: Node, types: dict[str, TensorType]) -> sympy.Expr:
    """FLOPs of one node (a region op with everything inside it); `types` holds every value it reads."""
    return _node(n, ChainMap(dict(types)), _Ctx(g)).flops


def flops_per_token(g: Graph) -> sympy.Expr:
    dims = {s.name for s in g.symbols if s.kind == "dim"}
    if not {"B", "T"} <= dims:
        raise ValueError(f"graph {g.name} has no dims B and T, so FLOPs per token are undefined")
    return tidy(cost(g).flops / (sym("B") * sym("T")))


# --- the decode cache ------------------------------------------------------------------------------

_DTYPE_BYTES = {"f32": 4, "i64": 8, "bool": 1}


def _bytes(t: TensorType) -> sympy.Expr:
    return numel(t) * _DTYPE_BYTES[t.dtype.value]


def decode_state_bytes(g: Graph) -> sympy.Expr | None:
    """Bytes the generated module's decode cache holds after T tokens (`cache.nbytes()`, SPEC §17);
    None for a graph that is not a language model.

    Recompute path: the token history (8*B*T). Cached step: the K/V of the attention sites outside
    segment scans (kv_cache_bytes restricted to them; a site inside a token-choice route or a top-k
    route's inference rule caches every position and one bool per token: was it selected), each
    scan's carries plus its open segment's
    inputs (Mod(T, C) positions), each per-step recurrence's state; times the trips of enclosing
    `repeat`s.
    """
    from archc.ir.analysis import decode_blocker, lm_token_input
    tok = lm_token_input(g)
    if tok is None:
        return None
    B, T = tok.type.shape
    if decode_blocker(g, torch_step=True) is not None:          # the PyTorch step's choice (SPEC §17)
        return _with_assumptions(g, 8 * B * T)
    inside = {n.attr("site") or "" for s in g.walk() if s.op is Op.SCAN     # their K/V are not cached
              for n in s.regions[0].walk() if n.op is Op.ATTEND}
    # a top-k route's inference rule runs every token: its sites cache all T positions (counted below)
    inferred = {n.attr("site") or "" for s in g.walk() if s.op is Op.ROUTE_TOPK and s.attr("has_infer")
                for n in s.regions[0].walk() if n.op is Op.ATTEND}
    total = cost(g, kv_sites=lambda site: site not in inside | inferred).kv_cache_bytes
    types = value_types(g)

    from archc.ir.analysis import delay_lines
    lines = delay_lines(g)

    def walk(r: Region, mult: sympy.Expr, routed: bool = False, compacted=None) -> sympy.Expr:
        out = ZERO
        for n in r.nodes:
            if n.op is Op.CONCAT and n.out.name in lines:      # a delay line keeps its last P positions
                out += mult * _bytes(types[lines[n.out.name][0]])
            if n.op is Op.ATTEND and routed:
                out += mult * B * T                  # which positions the route selected (bool per token)
            if n.op is Op.ATTEND and compacted is not None:
                kv = KV_BYTES * (numel(types[n.inputs[1]]) + numel(types[n.inputs[2]]))
                out += mult * kv.xreplace({compacted: T})
            if n.op is Op.SCAN:
                nc = len(n.inputs) - 1
                x = types[n.inputs[0]]
                per_pos = _bytes(x) / x.shape[1]
                out += mult * (sum((_bytes(o.type) for o in n.outputs[:nc]), ZERO)
                               + per_pos * sympy.Mod(T, as_expr(n.attr("size"))))
                continue
            if n.op in (Op.LINEAR_SCAN, Op.LINEAR_ATTN):
                out += mult * _bytes(types[n.inputs[-1]])
            if n.op is Op.CUMSUM and n.attr("axis") == 1:   # the running sum: one position
                x = types[n.inputs[0]]
                out += mult * _bytes(x) / x.shape[1]
            infer = n.op is Op.ROUTE_TOPK and n.attr("has_infer")
            for sub in n.regions:
                k = as_expr(n.attr("trips")) if n.op is Op.LOOP else sympy.Integer(1)
                out += walk(sub, mult * k, routed or n.op is Op.ROUTE_MASK or infer,
                            sub.args[0].type.shape[1] if infer else compacted)
        return out

    return _with_assumptions(g, total + walk(g.body, sympy.Integer(1)))
