"""The reference interpreter: executes IR with torch eager. Its behaviour *is* archc's semantics.

Every backend and pass is tested against `run`. Autograd works through it, so a model can be
trained in it (`GraphModule`). Symbols (architecture parameters, dims B/T, loop variables) live
in an environment; attribute expressions are evaluated in it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import sympy
import torch
import torch.nn.functional as F

from archc.backends import torch_runtime as rt
from archc.errors import ArchError
from archc.ir.core import Graph, Node, Param, Region
from archc.ir.ops import Op, attend_operands
from archc.ir.shapes import DType, as_expr, sym

TORCH_DTYPES = {DType.F32: torch.float32, DType.I64: torch.int64, DType.BOOL: torch.bool}


# -- symbols ----------------------------------------------------------------------------------------


def resolve_bindings(g: Graph, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture parameter values: defaults evaluated in order, then `overrides` applied."""
    overrides = dict(overrides or {})
    known = {s.name for s in g.symbols}
    for k in overrides:
        if k not in known:
            raise ArchError(f"`{g.name}` has no parameter `{k}`; parameters: "
                            + ", ".join(s.name for s in g.symbols if s.kind != "dim"))
    env: dict[str, Any] = {}
    for s in g.symbols:
        if s.kind == "dim":
            if s.name in overrides:
                env[s.name] = int(overrides[s.name])
            continue
        if s.name in overrides:
            v = overrides[s.name]
        else:
            d = s.default
            v = d if not isinstance(d, sympy.Basic) else d.xreplace({sym(k): x for k, x in env.items()})
        env[s.name] = _py(v, s.kind)
    return env


def _py(v, kind: str):
    if isinstance(v, sympy.Basic):
        if v in (sympy.true, sympy.false):
            return bool(v)
        if not v.is_number:
            raise ArchError(f"cannot evaluate {v}")
        v = float(v) if not v.is_Integer else int(v)
    if kind == "int":
        if isinstance(v, float) and not v.is_integer():
            raise ArchError(f"expected an integer, got {v}")
        return int(v)
    if kind == "float":
        return float(v)
    if kind == "bool":
        return bool(v)
    return v


class Env:
    """Symbol values with a cache for evaluated expressions (keyed by the values they read)."""

    def __init__(self, values: dict[str, Any]):
        self.values = dict(values)
        self._free: dict[sympy.Basic, tuple] = {}
        self._cache: dict[tuple, Any] = {}

    def eval(self, e):
        if not isinstance(e, sympy.Basic):
            return e
        fs = self._free.get(e)
        if fs is None:
            fs = tuple(sorted(s.name for s in e.free_symbols))
            self._free[e] = fs
        try:
            key = (e, tuple(self.values[n] for n in fs))
        except KeyError as err:
            raise ArchError(f"no value for symbol `{err.args[0]}` in {e}") from None
        hit = self._cache.get(key)
        if hit is None:
            v = sympy.sympify(e.xreplace({sym(n): sympy.sympify(self.values[n]) for n in fs}))
            if v in (sympy.true, sympy.false):
                hit = bool(v)
            else:
                hit = int(v) if v.is_Integer else float(v)
            self._cache[key] = hit
        return hit

    def eval_int(self, e) -> int:
        v = self.eval(e)
        if isinstance(v, float):
            if not v.is_integer():
                raise ArchError(f"{e} = {v} is not an integer for these parameter values")
            v = int(v)
        return v


# -- schedules -------------------------------------------------------------------------------------


def schedule_values(g: Graph, name: str, x, bindings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every value of schedule `name` at variable value `x` (parameters at `bindings`), in order.

    Names that are architecture parameters are overrides: pass them back as bindings (or call
    `GraphModule.apply_schedule`) to run the model under the schedule.
    """
    sched = next((s for s in g.schedules if s.name == name), None)
    if sched is None:
        raise ArchError(f"`{g.name}` has no schedule `{name}`; schedules: "
                        + (", ".join(s.name for s in g.schedules) or "none"))
    env = Env({**resolve_bindings(g, bindings), sched.var: int(x) if sched.kind == "int" else float(x)})
    kinds = {s.name: s.kind for s in g.symbols}
    return {k: _py(env.eval(v), kinds.get(k, "value")) for k, v in sched.values}


# -- parameters ----------------------------------------------------------------------------------


def init_params(g: Graph, bindings: dict[str, Any] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh parameters by each Param's init scheme, deterministic for a seed."""
    env = Env(resolve_bindings(g, bindings))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in g.params:
        shape = tuple(env.eval_int(d) for d in p.type.shape)
        args = {k: env.eval(v) for k, v in p.init_args}
        out[p.name] = _init(p.init, shape, args, gen)
    return out


def _init(scheme: str, shape, args, gen) -> torch.Tensor:
    if scheme == "normal":
        return torch.randn(shape, generator=gen) * float(args.get("std", 0.02))
    if scheme == "trunc_normal":
        t = torch.empty(shape)
        torch.nn.init.trunc_normal_(t, std=float(args.get("std", 0.02)), a=-2 * float(args.get("std", 0.02)),
                                    b=2 * float(args.get("std", 0.02)), generator=gen)
        return t
    if scheme == "zeros":
        return torch.zeros(shape)
    if scheme == "ones":
        return torch.ones(shape)
    if scheme == "const":
        return torch.full(shape, float(args.get("value", 0.0)))
    if scheme == "uniform":
        b = float(args.get("bound", 0.02))
        return (torch.rand(shape, generator=gen) * 2 - 1) * b
    if scheme == "xavier":
        t = torch.empty(shape)
        torch.nn.init.xavier_uniform_(t, generator=gen)
        return t
    raise ArchError(f"unknown init scheme `{scheme}`")


# -- the interpreter -------------------------------------------------------------------------------


class Interpreter:
    def __init__(self, g: Graph, params: dict[str, torch.Tensor], env: Env, training: bool = False,
                 generator: torch.Generator | None = None):
        self.g = g
        self.params = params
        self.env = env
        self.training = training
        self.gen = generator
        self.kv_store: dict[str, tuple] = {}
        self.param_meta: dict[str, Param] = {p.name: p for p in g.params}

    def run_region(self, r: Region, args: list[torch.Tensor], vals: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        vals = dict(vals)
        for a, t in zip(r.args, args):
            vals[a.name] = t
        for n in r.nodes:
            ins = [vals[i] for i in n.inputs]
            fn = IMPL.get(n.op)
            if fn is None:
                raise ArchError(f"the interpreter has no implementation of `{n.op.value}`", n.span)
            try:
                outs = fn(self, n, ins, vals)
            except ArchError:
                raise
            except (RuntimeError, ValueError, IndexError) as err:
                from archc.ir.printer import node_lines
                raise ArchError(f"runtime error in `{node_lines(n, '')[0].strip()}`: {err}", n.span) from None
            for o, t in zip(n.outputs, outs):
                vals[o.name] = t
        return [vals[x] for x in r.results]

    def attr(self, n: Node, key: str, default=None):
        return self.env.eval(n.attr(key, default))


def run(g: Graph, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
        bindings: dict[str, Any] | None = None, training: bool = False, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Execute `g` on named inputs; returns named outputs."""
    values = resolve_bindings(g, bindings)
    for a in g.inputs:
        if a.name not in inputs:
            raise ArchError(f"missing input `{a.name}` of `{g.name}` ({a.type})")
        t = inputs[a.name]
        if t.dim() != a.type.rank:
            raise ArchError(f"input `{a.name}` should be {a.type}, got a tensor of shape {list(t.shape)}")
        for d, size in zip(a.type.shape, t.shape):
            if isinstance(d, sympy.Symbol) and d.name not in values:
                values[d.name] = int(size)
            else:
                want = Env(values).eval_int(d)
                if want != size:
                    raise ArchError(f"input `{a.name}` should be {a.type} (= {want} here), got shape {list(t.shape)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    it = Interpreter(g, params, Env(values), training, gen)
    cast = [inputs[a.name].to(TORCH_DTYPES[a.type.dtype]) for a in g.inputs]
    outs = it.run_region(g.body, cast, {})
    return dict(zip(g.output_names, outs))


def run_policy_region(g: Graph, policy, params: dict[str, torch.Tensor], args: list[torch.Tensor],
                      bindings: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """Execute a policy's region (rewrite_kv's processor, SPEC §11.1) on its arguments (k, v, pos).

    The region's own dimensions (symbols of its argument types that are not graph symbols, `N`)
    are bound from the argument shapes; the graph's parameters from `bindings` and the defaults.
    """
    if policy.region is None:
        raise ArchError(f"policy {policy.kind} has no region", policy.span)
    values = resolve_bindings(g, bindings)
    for a, t in zip(policy.region.args, args):
        for d, size in zip(a.type.shape, t.shape):
            if isinstance(d, sympy.Symbol) and d.name not in values:
                values[d.name] = int(size)
    it = Interpreter(g, params, Env(values))
    return it.run_region(policy.region, list(args), {})


# -- op implementations ---------------------------------------------------------------------------

Impl = Callable[[Interpreter, Node, list, dict], list]
IMPL: dict[Op, Impl] = {}


def impl(*ops: Op):
    def deco(fn):
        for o in ops:
            IMPL[o] = fn
        return fn
    return deco


@impl(Op.CONST)
def _const(it, n, ins, vals):
    return [torch.tensor(it.attr(n, "value"), dtype=TORCH_DTYPES[DType(n.attr("dtype"))])]


@impl(Op.FULL)
def _full(it, n, ins, vals):
    shape = [it.env.eval_int(d) for d in n.attr("shape")]
    return [torch.full(shape, it.attr(n, "value"), dtype=TORCH_DTYPES[DType(n.attr("dtype"))])]


@impl(Op.ARANGE)
def _arange(it, n, ins, vals):
    return [torch.arange(it.env.eval_int(n.attr("n")))]


@impl(Op.PARAM)
def _param(it, n, ins, vals):
    ref = n.attr("ref")
    if ref not in it.params:
        raise ArchError(f"no value for parameter `{ref}`")
    w = it.params[ref]
    if n.attr("index") is not None:
        w = w[it.env.eval_int(n.attr("index"))]
    return [w]


_UNARY = {Op.NEG: torch.neg, Op.EXP: torch.exp, Op.LOG: torch.log, Op.SQRT: torch.sqrt, Op.RSQRT: torch.rsqrt,
          Op.ABS: torch.abs, Op.TANH: torch.tanh, Op.SIGMOID: torch.sigmoid, Op.RELU: F.relu, Op.GELU: F.gelu,
          Op.SILU: F.silu, Op.SOFTPLUS: F.softplus, Op.SIN: torch.sin, Op.COS: torch.cos, Op.NOT: torch.logical_not, Op.DETACH: torch.Tensor.detach}
for _op, _fn in _UNARY.items():
    IMPL[_op] = (lambda f: lambda it, n, ins, vals: [f(ins[0])])(_fn)

IMPL[Op.CAST] = lambda it, n, ins, vals: [ins[0].to(TORCH_DTYPES[DType(n.attr("dtype"))])]

_BINARY = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div, Op.POW: torch.pow,
           Op.MAXIMUM: torch.maximum, Op.MINIMUM: torch.minimum, Op.GT: torch.gt, Op.LT: torch.lt, Op.GE: torch.ge,
           Op.LE: torch.le, Op.EQ: torch.eq, Op.NE: torch.ne, Op.AND: torch.logical_and, Op.OR: torch.logical_or}
for _op, _fn in _BINARY.items():
    IMPL[_op] = (lambda f: lambda it, n, ins, vals: [f(*_promote(ins[0], ins[1]))])(_fn)


def _promote(a, b):
    if a.dtype == b.dtype:
        return a, b
    if a.is_floating_point() or b.is_floating_point():
        return a.float(), b.float()
    return a.long(), b.long()


@impl(Op.WHERE)
def _where(it, n, ins, vals):
    c, a, b = ins
    a, b = _promote(a, b)
    return [torch.where(c, a, b)]


def _axis(it, n):
    return int(it.attr(n, "axis"))


@impl(Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.ARGMAX)
def _reduce(it, n, ins, vals):
    fn = {Op.SUM: torch.sum, Op.MEAN: torch.mean, Op.AMAX: torch.amax, Op.LOGSUMEXP: torch.logsumexp,
          Op.ARGMAX: torch.argmax}[n.op]
    x = ins[0]
    if n.op in (Op.SUM, Op.MEAN) and not x.is_floating_point():
        x = x.float()
    return [fn(x, dim=_axis(it, n), keepdim=bool(n.attr("keepdim", False)))]


IMPL[Op.SOFTMAX] = lambda it, n, ins, vals: [torch.softmax(ins[0], dim=_axis(it, n))]
IMPL[Op.CUMSUM] = lambda it, n, ins, vals: [torch.cumsum(ins[0], dim=_axis(it, n))]


@impl(Op.TOPK_MASK)
def _topk_mask(it, n, ins, vals):
    return [rt.topk_mask(ins[0], it.env.eval_int(n.attr("k")), _axis(it, n))]


IMPL[Op.RMS_NORM] = lambda it, n, ins, vals: [rt.rms_norm(ins[0], ins[1], it.attr(n, "eps"))]
IMPL[Op.LAYER_NORM] = lambda it, n, ins, vals: [F.layer_norm(ins[0], ins[0].shape[-1:], ins[1], ins[2], it.attr(n, "eps"))]
IMPL[Op.L2_NORMALIZE] = lambda it, n, ins, vals: [F.normalize(ins[0], dim=-1, eps=it.attr(n, "eps"))]
IMPL[Op.LINEAR] = lambda it, n, ins, vals: [F.linear(*ins)]
IMPL[Op.MATMUL] = lambda it, n, ins, vals: [torch.matmul(*ins)]
IMPL[Op.EINSUM] = lambda it, n, ins, vals: [torch.einsum(n.attr("equation"), *ins)]
IMPL[Op.EMBEDDING] = lambda it, n, ins, vals: [ins[1][ins[0]]]


IMPL[Op.CONV1D] = lambda it, n, ins, vals: [rt.conv1d(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                                                       bool(n.attr("causal")))]
IMPL[Op.RESHAPE] = lambda it, n, ins, vals: [ins[0].reshape([it.env.eval_int(d) for d in n.attr("shape")])]
IMPL[Op.PERMUTE] = lambda it, n, ins, vals: [ins[0].permute(*n.attr("perm"))]
IMPL[Op.CONCAT] = lambda it, n, ins, vals: [torch.cat(ins, dim=_axis(it, n))]
IMPL[Op.UNSQUEEZE] = lambda it, n, ins, vals: [ins[0].unsqueeze(_axis(it, n))]
IMPL[Op.BROADCAST] = lambda it, n, ins, vals: [ins[0].expand([it.env.eval_int(d) for d in n.attr("shape")])]
IMPL[Op.MERGE_HEADS] = lambda it, n, ins, vals: [ins[0].flatten(-2)]


@impl(Op.SLICE)
def _slice(it, n, ins, vals):
    x, ax = ins[0], _axis(it, n)
    start, stop = it.env.eval_int(n.attr("start")), it.env.eval_int(n.attr("stop"))
    return [x.narrow(ax, start, max(min(stop, x.shape[ax]) - start, 0))]


@impl(Op.SELECT)
def _select(it, n, ins, vals):
    x, ax = ins[0], _axis(it, n)
    i = int(ins[1]) if len(ins) > 1 else it.env.eval_int(n.attr("index"))
    return [x.select(ax, i)]


@impl(Op.SPLIT_HEADS)
def _split_heads(it, n, ins, vals):
    x, h = ins[0], it.env.eval_int(n.attr("heads"))
    return [x.unflatten(-1, (h, x.shape[-1] // h))]


IMPL[Op.GATHER] = lambda it, n, ins, vals: [rt.gather_along(ins[0], ins[1], _axis(it, n))]
IMPL[Op.ROPE] = lambda it, n, ins, vals: [rt.rope(ins[0], float(it.attr(n, "base")), ins[1] if len(ins) > 1 else None)]


@impl(Op.ATTEND)
def _attend(it, n, ins, vals):
    q, k, v, mask, qpos, kpos = attend_operands(n, ins)
    site, share = n.attr("site"), n.attr("kv_share")
    if site and n.attr("copy") is not None:
        site = f"{site}[{it.env.eval_int(n.attr('copy'))}]"
    if share:
        try:
            k, v, kpos = rt.kv_lookup(it.kv_store, share, site, k, v, kpos, it.training, it.gen)
        except RuntimeError as err:
            raise ArchError(str(err), n.span) from None
    if site:
        it.kv_store[site] = (k, v, kpos)
    return [rt.attention(q, k, v, causal=bool(n.attr("causal")), window=it.env.eval_int(n.attr("window", 0)),
                         prefix=it.env.eval_int(n.attr("prefix", 0)), mask=mask, qpos=qpos, kpos=kpos)]


@impl(Op.KV_READ)
def _kv_read(it, n, ins, vals):
    site = n.attr("site")
    if n.attr("copy") is not None:
        site = f"{site}[{it.env.eval_int(n.attr('copy'))}]"
    if site not in it.kv_store:
        raise ArchError(f"kv_read of `{site}`, which has not run before it", n.span)
    k, v, kpos = it.kv_store[site]
    return [k, v, kpos][:len(n.outputs)]


IMPL[Op.LINEAR_SCAN] = lambda it, n, ins, vals: [rt.linear_scan(*ins, _axis(it, n))]
IMPL[Op.LINEAR_ATTN] = lambda it, n, ins, vals: list(rt.linear_attn(*ins))
@impl(Op.MEM_READ)
def _mem_read(it, n, ins, vals):
    ws = ins[1:]
    if n.attr("retention") == "lq":
        ws = rt.lq_normalize(ws, float(n.attr("q")))
    return [rt.mlp_memory(ins[0], ws, n.attr("act"), bool(n.attr("residual")))]


@impl(Op.MEM_WRITE)
def _mem_write(it, n, ins, vals):
    L = int(n.attr("layers"))
    extra = {k: n.attr(k) for k in ("retention", "q", "p") if n.attr(k) is not None}
    if n.attr("has_delta"):
        extra["delta"] = ins[5 + 2 * L]
    ws, ms = rt.memory_write(*ins[:5], ins[5:5 + L], ins[5 + L:5 + 2 * L], n.attr("act"), bool(n.attr("residual")),
                             n.attr("loss"), **extra)
    return ws + ms


IMPL[Op.BANK_PUSH] = lambda it, n, ins, vals: list(rt.bank_push(*ins))


IMPL[Op.BANK_VALID] = lambda it, n, ins, vals: [rt.bank_valid(*ins)]


# -- regions ------------------------------------------------------------------------------------


@impl(Op.LOOP)
def _loop(it, n, ins, vals):
    trips = it.env.eval_int(n.attr("trips"))
    var = n.attr("var")
    gl = n.attr("grad_last")
    no_grad_until = trips - it.env.eval_int(gl) if gl is not None else 0
    rt.kv_reset(it.kv_store, var)
    carries = list(ins)
    saved = it.env.values.get(var)
    for i in range(trips):
        it.env.values[var] = i
        if i < no_grad_until:
            with torch.no_grad():
                carries = it.run_region(n.regions[0], carries, vals)
        else:
            carries = it.run_region(n.regions[0], carries, vals)
    _restore(it, var, saved)
    return carries


def _restore(it, var, saved):
    if saved is None:
        it.env.values.pop(var, None)
    else:
        it.env.values[var] = saved


@impl(Op.HALT_LOOP)
def _halt_loop(it, n, ins, vals):
    trips = it.env.eval_int(n.attr("trips"))
    var = n.attr("var")
    carries = list(ins)
    B = carries[0].shape[0] if carries else 1
    rt.kv_reset(it.kv_store, var)
    halted = torch.zeros(B, dtype=torch.bool)
    steps = torch.zeros(B, dtype=torch.long)
    saved = it.env.values.get(var)
    for i in range(trips):
        it.env.values[var] = i
        out = it.run_region(n.regions[0], carries, vals)
        halt, new = out[0], out[1:]
        carries = [torch.where(_bcast(halted, c), c, nc) if c.dim() and c.shape[0] == B else nc
                   for c, nc in zip(carries, new)]
        steps = torch.where(halted, steps, torch.full_like(steps, i + 1))
        halted = halted | halt
        if bool(halted.all()):
            break
    _restore(it, var, saved)
    return carries + [steps]


def _bcast(mask, like):
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


@impl(Op.ROUTE_TOPK)
def _route_topk(it, n, ins, vals):
    x, score = ins[0], ins[1]
    rest = list(ins[2:])
    among = rest.pop(0) if n.attr("has_among") else None
    weight = rest.pop(0) if n.attr("has_weight") else None
    infer = rest.pop(0) if n.attr("has_infer") else None
    if infer is not None and not it.training:
        # the inference rule (SPEC §9.1): each token by its own mask, each sample's tokens compacted
        sel = infer if among is None else infer & among
        (out,) = _route_mask(it, n, [x, sel] + ([weight] if weight is not None else []), vals)
        return [out, sel]
    k = max(1, math.floor(it.attr(n, "capacity") * x.shape[1] + 1e-9))
    if n.attr("schedule") == "mask":          # every token runs the body; the selection blends
        keep = rt.route_keep(score, k, among)
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        (y,) = it.run_region(n.regions[0], [x, pos, keep], vals)
        return list(rt.route_blend(x, y, keep, weight, among))
    idx = rt.route_select(score, k, among)
    x_sel = rt.gather_along(x, idx, 1)
    (y,) = it.run_region(n.regions[0], [x_sel, idx], vals)
    return list(rt.route_scatter(x, idx, x_sel, y, weight, among))


@impl(Op.ROUTE_MASK)
def _route_mask(it, n, ins, vals):
    x, mask = ins[0], ins[1]
    weight = ins[2] if n.attr("has_weight") else None
    rows = []
    saved = dict(it.env.values)
    for b in range(x.shape[0]):
        idx = mask[b].nonzero().flatten()
        if idx.numel() == 0:
            rows.append(x[b])
            continue
        xb = x[b:b + 1, idx]
        batch_dim, length_dim = n.attr("dims", ("B", "T"))
        it.env.values.update({k: v for k, v in ((batch_dim, 1), (length_dim, int(idx.numel()))) if k})
        (y,) = it.run_region(n.regions[0], [xb, idx[None]], vals)
        new = y[0]
        if weight is not None:
            w = weight[b, idx].reshape(-1, *([1] * (x.dim() - 2)))
            new = xb[0] + w * (new - xb[0])
        rows.append(x[b].index_copy(0, idx, new))
        it.env.values.clear()
        it.env.values.update(saved)
    return [torch.stack(rows)]


@impl(Op.SCAN)
def _scan(it, n, ins, vals):
    """Segments of `size` in order; a length q*size + r runs a last segment of r with the size
    parameter bound to r inside the body (SPEC §8.5)."""
    x, carries = ins[0], list(ins[1:])
    size = it.env.eval_int(n.attr("size"))
    stacked = list(n.attr("stacked", ()))
    nc = len(carries)
    ys: list[list] = [[] for _ in stacked]
    rest = x.shape[1] % size
    if rest:
        from archc.ir.analysis import partial_segment_blocker
        why = partial_segment_blocker(it.g, n)
        if why is not None:
            raise ArchError(f"scan over segments of {size}: the sequence length {x.shape[1]} is not a multiple of "
                            f"it, and this scan cannot run a short last segment: {why}", n.span,
                            hint=f"pad the input to a multiple of {size}")
    for seg in x.split(size, dim=1):
        if seg.shape[1] == size:
            out = it.run_region(n.regions[0], [seg] + carries, vals)
        else:
            out = _short_segment(it, n, seg, carries, vals)
        carries = out[:nc]
        for j, y in enumerate(out[nc:]):
            ys[j].append(y)
    results = [torch.stack(y, dim=1) if st else torch.cat(y, dim=1) for y, st in zip(ys, stacked)]
    return carries + results


def _short_segment(it, n, seg, carries, vals):
    """The body on a last segment shorter than the size: the size parameter is its length there."""
    name = as_expr(n.attr("size")).name
    saved = it.env.values[name]
    it.env.values[name] = int(seg.shape[1])
    try:
        return it.run_region(n.regions[0], [seg] + carries, vals)
    finally:
        it.env.values[name] = saved


@impl(Op.FUSED)
def _fused(it, n, ins, vals):
    """A fusion region means exactly its body (the Triton backend runs it as one kernel)."""
    return it.run_region(n.regions[0], [], vals)


# -- a trainable wrapper ---------------------------------------------------------------------------


class GraphModule(torch.nn.Module):
    """The interpreter as an nn.Module: parameters are registered, forward runs the IR."""

    def __init__(self, g: Graph, bindings: dict[str, Any] | None = None, seed: int = 0):
        super().__init__()
        self.graph = g
        self.bindings = resolve_bindings(g, bindings)
        self.names = [p.name for p in g.params]
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(t) for t in init_params(g, self.bindings, seed).values()])

    def param_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights))

    def forward(self, seed: int | None = None, **inputs) -> dict[str, torch.Tensor]:
        return run(self.graph, self.param_dict(), inputs, self.bindings, training=self.training, seed=seed)

    def apply_schedule(self, name: str, x) -> dict[str, Any]:
        """Evaluate schedule `name` at `x`, set the parameters it overrides, return all its values."""
        values = schedule_values(self.graph, name, x, self.bindings)
        params = {s.name for s in self.graph.symbols if s.kind != "dim"}
        self.bindings.update({k: v for k, v in values.items() if k in params})
        return values
