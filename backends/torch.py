"""The PyTorch backend: IR -> one standalone, readable Python module (torch + stdlib only).

Each architecture becomes an `nn.Module` whose constructor takes the architecture's parameters and
whose `forward` has one statement per IR node, in program order, with the .arch file's names.
Loops, routes and scans become Python control flow. Parameters are registered under their .arch
paths (state_dict keys such as `core.attn.q.weight`); a shared layer is one parameter. The kernels
that need more than one torch call come from `torch_runtime` and are copied in by source.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import json
import keyword
import re
from dataclasses import dataclass
from typing import Callable

import sympy
import torch.nn as nn

from archc.backends import torch_runtime
from archc.backends.pyexpr import py_expr
from archc.errors import ArchError
from archc.ir.analysis import selects_every_token
from archc.ir.core import Graph, Node, Param, Region, Value, reads_of
from archc.ir.ops import Op, attend_operands
from archc.ir.shapes import DType, as_expr

_TORCH_DTYPE = {DType.F32: "torch.float32", DType.I64: "torch.long", DType.BOOL: "torch.bool"}
_MODULE_ATTRS = set(dir(nn.Module)) | set(vars(nn.Module()))     # methods, and `training`, `_modules`, ...
# parameters become instance attributes (`self.steps`), so nn.Module's own names are taken too
_RESERVED = (set(keyword.kwlist) | set(dir(builtins)) | _MODULE_ATTRS |
             {"torch", "nn", "F", "math", "self", "dev", "kv", "_param", "_Scope", "_MEMORY_ACTS"} |
             {"reset_parameters", "prefill", "decode", "_step", "generate"} |      # the generated classes' own methods
             set(dir(torch_runtime)))


@dataclass(frozen=True)
class GeneratedCode:
    source: str
    class_names: tuple[str, ...]      # the Python class of each graph, in order (its name unless reserved)


def _legal(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not name or name[0].isdigit():
        name = "v_" + name
    return name


class Namespace:
    """Unique, legal Python names that never shadow keywords, builtins or the module's globals."""

    def __init__(self, taken=()):
        self.used: set[str] = set(_RESERVED) | set(taken)
        self.map: dict[str, str] = {}
        self.symbols: dict[str, str] = {}       # the names claimed for `sym:<symbol>` keys, by symbol

    def claim(self, key: str, hint: str | None = None) -> str:
        if key in self.map:
            return self.map[key]
        base = _legal(hint if hint is not None else key)
        name, i = base, 1
        while name in self.used or (name.startswith("__") and name.endswith("__")):   # dunders mean things to Python
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        self.map[key] = name
        if key.startswith("sym:"):
            self.symbols[key[4:]] = name
        return name


def attr_path(path: str) -> str:
    """`core.attn.q.weight` as an attribute chain; names nn.Module already uses get a trailing `_`."""
    return ".".join(_segment(p) for p in path.split("."))


def _segment(p: str) -> str:
    # one-to-one: names that end in `_` get one more, so `forward` -> `forward_` and a layer named
    # `forward_` -> `forward__` never meet
    return p + "_" if (p in _MODULE_ATTRS or keyword.iskeyword(p) or p.startswith("_") or p.endswith("_")) else p


def state_key(path: str) -> str:
    return attr_path(path)


# ---------------------------------------------------------------------------------------------


class _Emitter:
    """Emits the body of one `forward`."""

    def __init__(self, g: Graph, cached: bool = False, taken=()):
        self.g = g
        self.cached = cached              # emit the K/V-cached incremental step instead of forward
        self.loops: list[tuple[str, str]] = []   # enclosing loops: (IR loop variable, Python name)
        self.instances: dict[str, str] = {}      # attend result -> "#n" when an earlier node has its site key
        self.instance_count: dict[tuple, int] = {}
        self.ns = Namespace(taken)        # `taken`: module globals another backend adds
        self.lines: list[str] = []
        self.span = None                     # of the node being emitted (for diagnostics)
        self.inline: dict[str, str] = {}     # const/param value name -> literal or attribute chain
        self.consts: set[str] = set()        # inlined consts (Python scalars)
        self.uses_kv = any((n.op is Op.ATTEND and n.attr("kv_share")) or n.op is Op.KV_READ for n in g.walk())
        self.defs = {o.name: n for n in g.walk() for o in n.outputs}   # SSA: value -> defining node
        # positions of a compacting route: strictly increasing per sample (route_select sorts them)
        self.sorted_pos = {n.regions[0].args[1].name for n in g.walk()
                           if n.op is Op.ROUTE_TOPK and n.attr("schedule") != "mask"}
        self.kv_owner: dict[tuple[str, str], str] = {}   # cached step: (k, v) -> the cache key that stores them
        self.kv_valid: str | None = None     # cached step inside a masked route: its selection (bool [B, n])
        self.delays: dict | None = None      # cached step: the graph's delay lines (analysis.delay_lines), once
        self.read: set[str] = reads_of(g.body.nodes, g.body.results)   # every value some node or region reads
        self.runtime: set[str] = set()
        self.uses_math = False
        # parameters are stored as attributes next to the layers' scopes (`self.steps`, `self.core`)
        self.ns.used |= {attr_path(p.name).split(".")[0] for p in g.params}
        for s in g.symbols:
            self.ns.claim("sym:" + s.name, s.name)
        for n in g.walk():
            for a in ("var",):
                if n.attr(a):
                    self.ns.claim("sym:" + n.attr(a), n.attr(a))

    # names -------------------------------------------------------------------------------------
    def sym_names(self) -> dict[str, str]:
        return dict(self.ns.symbols)

    def v(self, name: str) -> str:
        if name in self.inline:
            return self.inline[name]
        return self.ns.claim("val:" + name, name.split(".")[0])

    def e(self, expr, integer: bool = False) -> str:
        text = py_expr(expr, self.sym_names(), integer)
        if "math." in text:
            self.uses_math = True
        return text

    def rt(self, fn: str) -> str:
        self.runtime.add(fn)
        return fn

    def out(self, line: str, indent: int):
        # `forward` starts at indent 2; Python compiles at most 20 statically nested blocks
        if indent > 22:
            raise ArchError("regions are nested too deeply for the PyTorch backend (Python allows 20 nested "
                            "blocks; loops with `grad last`, halting and routes take two or three each)",
                            self.span, hint="move the inner part of the nest into fewer regions")
        self.lines.append("    " * indent + line)

    # regions -----------------------------------------------------------------------------------
    def region(self, r: Region, indent: int):
        release = self.releases(r)
        bound: set[str] = set()       # names this region's lines assign (a value some step emits no code for: none)
        seen = len(self.lines)
        for i, n in enumerate(r.nodes):
            self.node(n, indent)
            if i not in release:
                continue
            for line in self.lines[seen:]:
                m = _BINDS.match(line)
                if m:
                    bound.update(t.strip() for t in (m.group(1) or m.group(2)).split(","))
            seen = len(self.lines)
            names = (self.ns.map.get("val:" + x) for x in release[i] if x not in self.inline)
            dead = sorted(x for x in names if x in bound)
            if dead:
                self.out(f"del {', '.join(dead)}", indent)

    def releases(self, r: Region) -> dict[int, list[str]]:
        """Activations (rank >= 2) a node of `r` defines, by the index of the node that reads them last
        (nested regions included), so `region` drops each name right after its last use, as torch.fx's
        code does. A name held to the end of a loop step keeps its memory from the allocator's reuse
        (bench/results/eager_memory_reuse.md measures the difference). Region results are read after the region and are never released; a
        value whose last reader returns a view of it is released with that view (which holds its memory)."""
        keep = set(r.results)
        defined = {o.name for n in r.nodes for o in n.outputs
                   if o.name not in keep and (o.type.rank is None or o.type.rank >= 2)}
        last: dict[str, int] = {}
        for i, n in enumerate(r.nodes):
            for x in reads_of([n]) & defined:
                last[x] = i
        # a base whose last reader makes a view of it is released with that view (the view holds it)
        carried: dict[str, list[str]] = {}
        for x, i in last.items():
            n = r.nodes[i]
            if n.op in _VIEWS and n.inputs and n.inputs[0] == x and n.outputs[0].name in last:
                carried.setdefault(n.outputs[0].name, []).append(x)
        waiting = {x for xs in carried.values() for x in xs}
        out: dict[int, list[str]] = {}
        for x, i in last.items():
            if x in waiting:
                continue
            group, todo = [], [x]
            while todo:
                y = todo.pop()
                group.append(y)
                todo.extend(carried.get(y, ()))
            out.setdefault(i, []).extend(group)
        return out

    def node(self, n: Node, indent: int):
        self.span = n.span
        fn = (_CACHED_EMIT.get(n.op) if self.cached else None) or _REGION_EMIT.get(n.op)
        if fn is not None:
            fn(self, n, indent)
            return
        if n.op is Op.CONST:
            self.inline[n.out.name] = self.const_literal(n)
            self.consts.add(n.out.name)
            return
        if n.op is Op.PARAM:             # parameters read in place: self.core.attn.q.weight
            self.inline[n.out.name] = _param(self, n, [])
            return
        rule = EMIT.get(n.op)
        if rule is None:
            raise ArchError(f"op `{n.op.value}` is not supported by backend `torch`", n.span)
        ins = [self.v(i) if (i not in self.consts or n.op in _SCALAR_OK) else f"torch.as_tensor({self.v(i)})"
               for i in n.inputs]
        expr = rule(self, n, ins)
        if len(n.outputs) == 1:
            self.out(f"{self.v(n.out.name)} = {expr}", indent)
        else:
            targets = [self.v(o.name) if o.name in self.read else "_" for o in n.outputs]   # `_`: nothing reads it
            self.out(f"{', '.join(targets)} = {expr}", indent)

    def const_literal(self, n: Node) -> str:
        v = n.attr("value")
        dtype = DType(n.attr("dtype"))
        if isinstance(v, bool):
            return repr(v)
        if isinstance(v, sympy.Basic):
            text = self.e(v)
            return f"float({text})" if dtype is DType.F32 else f"int({text})"
        if dtype is DType.F32:
            return repr(float(v))
        return repr(int(v))

    # hooks another backend overrides (the Triton backend calls generated kernels here) ---------
    def route_gather(self, n: Node, x: str, pos: str) -> str:
        """The tokens a route_topk node selects: x rows at pos."""
        return f"{self.rt('gather_along')}({x}, {pos}, 1)"

    def route_scatter(self, n: Node, args: list[str]) -> str:
        """route_topk's write-back; args = (x, pos, x_sel, y, weight, among), absent gates as "None"."""
        return f"{self.rt('route_scatter')}({', '.join(args)})"

    def cached_attend(self, n: Node, args: list[str]) -> str:
        """The K/V-cached step's attention; args = (key, site, q, k, v, positions, window, reads)."""
        key, site, q, k, v, positions, window, reads = args
        return f"cache.attend({key}, {site}, {q}, {k}, {v}, {positions}, {window}, reads={reads})"

    def assign(self, targets: list[str], sources: list[str], indent: int):
        pairs = [(t, s) for t, s in zip(targets, sources) if t != s]
        if pairs:
            self.out(f"{', '.join(t for t, _ in pairs)} = {', '.join(s for _, s in pairs)}", indent)

    def assign_results(self, outputs: list[Value], sources: list[str], indent: int):
        """Bind a region op's results, skipping those nothing reads."""
        pairs = [(self.v(o.name), s) for o, s in zip(outputs, sources) if o.name in self.read]
        pairs = [(t, s) for t, s in pairs if t != s]
        if pairs:
            self.out(f"{', '.join(t for t, _ in pairs)} = {', '.join(s for _, s in pairs)}", indent)


# -- op table: each entry renders the right-hand side of one assignment ---------------------------

#: a line that binds names: `a, b = ...` or `for a in ...`
_BINDS = re.compile(r"^\s*(?:([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=(?!=)|for\s+([A-Za-z_]\w*)\s+in\s)")

#: ops whose result is always a view of their first operand (releasing that operand frees nothing)
_VIEWS = {Op.SPLIT_HEADS, Op.UNSQUEEZE, Op.SELECT, Op.SLICE, Op.PERMUTE, Op.BROADCAST, Op.DETACH}

_SCALAR_OK = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.GT, Op.LT, Op.GE, Op.LE, Op.EQ, Op.NE, Op.WHERE,
              Op.MAXIMUM, Op.MINIMUM}   # ops whose Python-scalar operands torch accepts as they are

Rule = Callable[[_Emitter, Node, list], str]
EMIT: dict[Op, Rule] = {}


def rule(*ops):
    def deco(fn):
        for o in ops:
            EMIT[o] = fn
        return fn
    return deco


def _shape(em: _Emitter, dims) -> str:
    items = [em.e(d, integer=True) for d in dims]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


@rule(Op.FULL)
def _full(em, n, ins):
    v, dtype = n.attr("value"), DType(n.attr("dtype"))
    shape = _shape(em, n.attr("shape"))
    if isinstance(v, sympy.Basic):           # an expression of parameters and loop variables
        cast = {DType.F32: "float", DType.I64: "int", DType.BOOL: "bool"}[dtype]
        return f"torch.full({shape}, {cast}({em.e(v)}), dtype={_TORCH_DTYPE[dtype]}, device=dev)"
    if dtype is DType.F32 and float(v) == 0.0:
        return f"torch.zeros({shape}, device=dev)"
    return f"torch.full({shape}, {v!r}, dtype={_TORCH_DTYPE[dtype]}, device=dev)"


EMIT[Op.ARANGE] = lambda em, n, ins: f"torch.arange({em.e(n.attr('n'), True)}, device=dev)"


@rule(Op.PARAM)
def _param(em, n, ins):
    ref = "self." + attr_path(n.attr("ref"))
    if n.attr("index") is not None:
        return f"{ref}[{em.e(n.attr('index'), True)}]"
    return ref


_UNARY = {Op.EXP: "torch.exp({})", Op.LOG: "torch.log({})", Op.SQRT: "torch.sqrt({})", Op.RSQRT: "torch.rsqrt({})",
          Op.ABS: "torch.abs({})", Op.TANH: "torch.tanh({})", Op.SIGMOID: "torch.sigmoid({})", Op.RELU: "torch.relu({})",
          Op.GELU: "F.gelu({})", Op.SILU: "F.silu({})", Op.SOFTPLUS: "F.softplus({})", Op.SIN: "torch.sin({})", Op.COS: "torch.cos({})", Op.NEG: "-{}", Op.NOT: "~{}",
          Op.DETACH: "{}.detach()"}
for _o, _f in _UNARY.items():
    EMIT[_o] = (lambda f: lambda em, n, ins: f.format(ins[0]))(_f)

EMIT[Op.CAST] = lambda em, n, ins: f"{ins[0]}.to({_TORCH_DTYPE[DType(n.attr('dtype'))]})"

_INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**", Op.GT: ">", Op.LT: "<", Op.GE: ">=",
          Op.LE: "<=", Op.EQ: "==", Op.NE: "!=", Op.AND: "&", Op.OR: "|"}
for _o, _s in _INFIX.items():
    EMIT[_o] = (lambda s: lambda em, n, ins: f"{ins[0]} {s} {ins[1]}")(_s)


@rule(Op.MAXIMUM, Op.MINIMUM)
def _minmax(em, n, ins):
    fn = "torch.maximum" if n.op is Op.MAXIMUM else "torch.minimum"
    return f"{fn}(torch.as_tensor({ins[0]}), torch.as_tensor({ins[1]}))"


EMIT[Op.WHERE] = lambda em, n, ins: f"torch.where({ins[0]}, {ins[1]}, {ins[2]})"


@rule(Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.ARGMAX)
def _reduce(em, n, ins):
    name = {Op.SUM: "sum", Op.MEAN: "mean", Op.AMAX: "amax", Op.LOGSUMEXP: "logsumexp", Op.ARGMAX: "argmax"}[n.op]
    x = ins[0]
    if n.op in (Op.SUM, Op.MEAN):
        x = f"{x}.float()" if _input_dtype(em, n, 0) is not DType.F32 else x
    keep = ", keepdim=True" if n.attr("keepdim") else ""
    return f"{x}.{name}(dim={n.attr('axis')}{keep})"


def _input_dtype(em, n, i) -> DType:
    return em.types[n.inputs[i]].dtype


EMIT[Op.SOFTMAX] = lambda em, n, ins: f"torch.softmax({ins[0]}, dim={n.attr('axis')})"
EMIT[Op.CUMSUM] = lambda em, n, ins: f"torch.cumsum({ins[0]}, dim={n.attr('axis')})"
EMIT[Op.TOPK_MASK] = lambda em, n, ins: f"{em.rt('topk_mask')}({ins[0]}, {em.e(n.attr('k'), True)}, {n.attr('axis')})"
EMIT[Op.RMS_NORM] = lambda em, n, ins: f"{em.rt('rms_norm')}({ins[0]}, {ins[1]}, {n.attr('eps')!r})"
EMIT[Op.LAYER_NORM] = lambda em, n, ins: (f"F.layer_norm({ins[0]}, {ins[0]}.shape[-1:], {ins[1]}, {ins[2]}, "
                                          f"{n.attr('eps')!r})")
EMIT[Op.L2_NORMALIZE] = lambda em, n, ins: f"F.normalize({ins[0]}, dim=-1, eps={n.attr('eps')!r})"
EMIT[Op.LINEAR] = lambda em, n, ins: f"F.linear({', '.join(ins)})"
EMIT[Op.MATMUL] = lambda em, n, ins: f"{ins[0]} @ {ins[1]}"
EMIT[Op.EINSUM] = lambda em, n, ins: f"torch.einsum({json.dumps(n.attr('equation'))}, {', '.join(ins)})"
EMIT[Op.EMBEDDING] = lambda em, n, ins: f"{ins[1]}[{ins[0]}]"
EMIT[Op.CONV1D] = lambda em, n, ins: (f"{em.rt('conv1d')}({ins[0]}, {ins[1]}, {ins[2] if len(ins) > 2 else 'None'}, "
                                      f"{bool(n.attr('causal'))})")
EMIT[Op.RESHAPE] = lambda em, n, ins: f"{ins[0]}.reshape{_shape(em, n.attr('shape'))}"
EMIT[Op.PERMUTE] = lambda em, n, ins: f"{ins[0]}.permute{tuple(n.attr('perm'))}"
EMIT[Op.CONCAT] = lambda em, n, ins: f"torch.cat([{', '.join(ins)}], dim={n.attr('axis')})"
EMIT[Op.UNSQUEEZE] = lambda em, n, ins: f"{ins[0]}.unsqueeze({n.attr('axis')})"
EMIT[Op.BROADCAST] = lambda em, n, ins: f"{ins[0]}.expand{_shape(em, n.attr('shape'))}"
EMIT[Op.SPLIT_HEADS] = lambda em, n, ins: f"{ins[0]}.unflatten(-1, ({em.e(n.attr('heads'), True)}, -1))"
EMIT[Op.MERGE_HEADS] = lambda em, n, ins: f"{ins[0]}.flatten(-2)"
EMIT[Op.GATHER] = lambda em, n, ins: f"{em.rt('gather_along')}({ins[0]}, {ins[1]}, {n.attr('axis')})"


@rule(Op.SLICE)
def _slice(em, n, ins):
    ax = n.attr("axis")
    start, stop = em.e(n.attr("start"), True), em.e(n.attr("stop"), True)
    return f"{ins[0]}[{':, ' * ax}{'' if start == '0' else start}:{stop}]"


@rule(Op.SELECT)
def _select(em, n, ins):
    ax = n.attr("axis")
    idx = f"int({ins[1]})" if len(ins) > 1 else em.e(n.attr("index"), True)
    return f"{ins[0]}[{':, ' * ax}{idx}]"


@rule(Op.ROPE)
def _rope(em, n, ins):
    pos = f", {ins[1]}" if len(ins) > 1 else ""
    return f"{em.rt('rope')}({ins[0]}, {float(n.attr('base'))!r}{pos})"


EMIT[Op.LINEAR_SCAN] = lambda em, n, ins: f"{em.rt('linear_scan')}({', '.join(ins)}, {n.attr('axis')})"
EMIT[Op.LINEAR_ATTN] = lambda em, n, ins: f"{em.rt('linear_attn')}({', '.join(ins)})"
@rule(Op.MEM_READ)
def _mem_read(em, n, ins):
    ws = f"[{', '.join(ins[1:])}]"
    if n.attr("retention") == "lq":
        ws = f"{em.rt('lq_normalize')}({ws}, {float(n.attr('q'))!r})"
    return f"{em.rt('mlp_memory')}({ins[0]}, {ws}, {json.dumps(n.attr('act'))}, {bool(n.attr('residual'))})"
EMIT[Op.BANK_PUSH] = lambda em, n, ins: f"{em.rt('bank_push')}({', '.join(ins)})"
EMIT[Op.BANK_VALID] = lambda em, n, ins: f"{em.rt('bank_valid')}({', '.join(ins)})"


@rule(Op.MEM_WRITE)
def _mem_write(em, n, ins):
    L = int(n.attr("layers"))
    ws, ms = ", ".join(ins[5:5 + L]), ", ".join(ins[5 + L:5 + 2 * L])
    extra = "".join(f", {k}={json.dumps(n.attr(k)) if k == 'retention' else repr(float(n.attr(k)))}"
                    for k in ("retention", "q", "p") if n.attr(k) is not None)
    if n.attr("has_delta"):
        extra += f", delta={ins[5 + 2 * L]}"
    return (f"{em.rt('memory_write')}({', '.join(ins[:5])}, [{ws}], [{ms}], {json.dumps(n.attr('act'))}, "
            f"{bool(n.attr('residual'))}, {json.dumps(n.attr('loss'))}{extra})")


def _mem_write_node(em: _Emitter, n: Node, indent: int):
    L = int(n.attr("layers"))
    ws = ", ".join(em.v(o.name) for o in n.outputs[:L])
    ms = ", ".join(em.v(o.name) for o in n.outputs[L:])
    expr = _mem_write(em, n, [em.v(i) for i in n.inputs])
    em.out(f"[{ws}], [{ms}] = {expr}", indent)


@rule(Op.ATTEND)
def _attend(em, n, ins):
    q, k, v, mask, qpos, kpos = attend_operands(n, ins)
    args = [q, k, v]
    if n.attr("causal"):
        args.append("causal=True")
    if n.attr("window"):
        args.append(f"window={em.e(n.attr('window'), True)}")
    if n.attr("prefix"):
        args.append(f"prefix={em.e(n.attr('prefix'), True)}")
    if mask:
        args.append(f"mask={mask}")
    if qpos:
        args += [f"qpos={qpos}", f"kpos={kpos}"]
        names = attend_operands(n, list(n.inputs))
        if names[4] == names[5] and names[4] in getattr(em, "sorted_pos", ()):
            args.append("sorted_pos=True")
    return f"{em.rt('attention')}({', '.join(args)})"


def _attend_node(em: _Emitter, n: Node, indent: int):
    """Attention that reads or publishes shared K/V goes through the `kv` store of this forward."""
    read = em.defs.get(n.inputs[1])
    if not em.uses_kv or not n.attr("site") or (read is not None and read.op is Op.KV_READ):
        em.out(f"{em.v(n.out.name)} = {_attend(em, n, [em.v(i) for i in n.inputs])}", indent)
        return
    ins = [em.v(i) for i in n.inputs]
    site = _store_key(em, n.attr("site"), n.attr("copy"))
    k, v = ins[1], ins[2]
    kpos = ins[-1] if n.attr("has_pos") else "None"
    kp_name = em.ns.claim(f"kpos:{n.out.name}", "kpos") if n.attr("has_pos") else None
    if n.attr("kv_share"):
        targets = f"{k}, {v}, {kp_name or '_'}"
        em.out(f"{targets} = {em.rt('kv_lookup')}(kv, {json.dumps(n.attr('kv_share'))}, {site}, {k}, {v}, {kpos}, "
               f"self.training)", indent)
    em.out(f"kv[{site}] = ({k}, {v}, {kp_name if (kp_name and n.attr('kv_share')) else kpos})", indent)
    if kp_name and n.attr("kv_share"):
        ins[-1] = kp_name
    em.out(f"{em.v(n.out.name)} = {_attend(em, n, ins)}", indent)


def _store_key(em: _Emitter, site: str, copy) -> str:
    """The `kv` store's key for a site (and copy): what `attend` records and `kv_read` reads."""
    if copy is None:
        return json.dumps(site)
    return f'f"{site}[{{{em.e(copy, True)}}}]"'


def _kv_read(em: _Emitter, n: Node, indent: int):
    outs = [em.v(o.name) for o in n.outputs] + ["_"] * (3 - len(n.outputs))
    em.out(f"{', '.join(outs)} = kv[{_store_key(em, n.attr('site'), n.attr('copy'))}]", indent)


# -- region ops --------------------------------------------------------------------------------------


def _loop(em: _Emitter, n: Node, indent: int):
    r = n.regions[0]
    args = [em.v(a.name) for a in r.args]
    em.assign(args, [em.v(i) for i in n.inputs], indent)
    var = em.sym_names()[n.attr("var")]
    trips = em.e(n.attr("trips"), True)
    _kv_reset(em, n, indent)
    flag = None
    if n.attr("grad_last") is not None:
        # the state at this loop's entry: inside an outer step that runs without gradients, every
        # step of this loop runs without them too
        flag = em.ns.claim(f"grad:{n.outputs[0].name if n.outputs else len(em.lines)}", "grad")
        em.out(f"{flag} = torch.is_grad_enabled()", indent)
    em.out(f"for {var} in range({trips}):", indent)
    em.loops.append((n.attr("var"), var))
    body = indent + 1
    if flag is not None:
        first = sympy.sympify(n.attr("trips")) - sympy.sympify(n.attr("grad_last"))   # the first step with gradients
        em.out(f"with torch.set_grad_enabled({flag} and {var} >= {em.e(first, True)}):", body)
        body += 1
    em.region(r, body)
    em.assign(args, [em.v(x) for x in r.results], body)
    em.loops.pop()
    if len(em.lines[-1].strip()) == 0 or em.lines[-1].rstrip().endswith(":"):
        em.out("pass", body)
    em.assign_results(list(n.outputs), args, indent)


def _kv_reset(em: _Emitter, n: Node, indent: int) -> None:
    """Each run of a loop (`loop` or `halt_loop`) starts with an empty store for the K/V its sites share
    across its recursions (as the interpreter; a loop inside a scan runs once per step)."""
    if em.uses_kv and any(m.op is Op.ATTEND and m.attr("kv_share") == f"recursion:{n.attr('var')}"
                          for m in n.regions[0].walk()):
        em.out(f"{em.rt('kv_reset')}(kv, {json.dumps(n.attr('var'))})", indent)


def _halt_loop(em: _Emitter, n: Node, indent: int):
    r = n.regions[0]
    args = [em.v(a.name) for a in r.args]
    em.assign(args, [em.v(i) for i in n.inputs], indent)
    _kv_reset(em, n, indent)
    var = em.sym_names()[n.attr("var")]
    halted = em.ns.claim(f"halted:{n.outputs[-1].name}", "halted")
    steps = em.v(n.outputs[-1].name)
    batch = args[0] if args else "None"
    em.out(f"{halted} = torch.zeros({batch}.shape[0], dtype=torch.bool, device=dev)", indent)
    em.out(f"{steps} = torch.zeros({batch}.shape[0], dtype=torch.long, device=dev)", indent)
    em.out(f"for {var} in range({em.e(n.attr('trips'), True)}):", indent)
    em.region(r, indent + 1)
    halt, new = r.results[0], [em.v(x) for x in r.results[1:]]
    for a, x, t in zip(args, new, r.args):
        keep = f"{halted}.reshape(-1{', 1' * (t.type.rank - 1)})" if t.type.rank > 1 else halted
        em.out(f"{a} = torch.where({keep}, {a}, {x})  # halted samples keep their state", indent + 1)
    em.out(f"{steps} = torch.where({halted}, {steps}, torch.full_like({steps}, {var} + 1))", indent + 1)
    em.out(f"{halted} = {halted} | {em.v(halt)}", indent + 1)
    em.out(f"if bool({halted}.all()):", indent + 1)
    em.out("break", indent + 2)
    em.assign_results(list(n.outputs[:-1]), args, indent)


def _route_operands(em: _Emitter, n: Node) -> tuple[str, str, str, str]:
    """x, score, among, weight of a route_topk (absent ones as "None")."""
    ins = [em.v(i) for i in n.inputs]
    rest = ins[2:]
    among = rest.pop(0) if n.attr("has_among") else "None"
    weight = rest.pop(0) if n.attr("has_weight") else "None"
    return ins[0], ins[1], among, weight


def _route_masked(em: _Emitter, n: Node, indent: int):
    """schedule="mask": the body runs on every token (original positions); the selection blends."""
    r = n.regions[0]
    x, score, among, weight = _route_operands(em, n)
    xs, pos, keep = (em.v(a.name) for a in r.args)
    if selects_every_token(n):
        em.out(f"{keep} = torch.ones_like({score}, dtype=torch.bool)  # capacity 1: every token", indent)
    else:
        k = _route_k(em, n, x, indent)
        em.out(f"{keep} = {em.rt('route_keep')}({score}, {k}{'' if among == 'None' else ', ' + among})", indent)
    if em.cached:       # the cached step's attention and rope read `positions` themselves
        if any(r.args[1].name in m.inputs for m in r.walk() if m.op not in _CACHED_EMIT):
            em.assign([pos], ["positions"], indent)
    else:
        em.out(f"{pos} = torch.arange({x}.shape[1], device=dev)[None].expand({x}.shape[0], -1)", indent)
    em.assign([xs], [x], indent)
    em.region(r, indent)
    y = em.v(r.results[0])
    em.out(f"{_route_results(em, n)} = {em.rt('route_blend')}({x}, {y}, {keep}, {weight}, {among})", indent)


def _route_k(em: _Emitter, n: Node, x: str, indent: int) -> str:
    """Emit `k = max(1, floor(capacity * T))`, the number of tokens a route_topk selects; returns `k`."""
    k = em.ns.claim(f"k:{n.out.name}", "k")
    capacity = sympy.sympify(n.attr("capacity"))
    cap = em.e(capacity)
    if capacity.is_Add:                  # `1 - r / 2` times the length needs its parentheses
        cap = f"({cap})"
    em.out(f"{k} = max(1, math.floor({cap} * {x}.shape[1] + 1e-9))", indent)
    em.uses_math = True
    return k


def _route_results(em: _Emitter, n: Node) -> str:
    """`x_out, sel` (`_` for a selection nothing reads)."""
    out, sel = n.outputs
    return f"{em.v(out.name)}, {em.v(sel.name) if sel.name in em.read else '_'}"


def _infer_mask(em: _Emitter, n: Node) -> str:
    """A route_topk's inference selection: its `infer` mask (and `among`)."""
    _, _, among, _ = _route_operands(em, n)
    infer = em.v(n.inputs[-1])
    return infer if among == "None" else f"{infer} & {among}"


def _route_topk(em: _Emitter, n: Node, indent: int):
    if n.attr("has_infer"):
        sel = em.v(n.outputs[1].name) if n.outputs[1].name in em.read else None
        if em.cached:                 # generation uses the inference rule (SPEC §9.1, §17)
            _cached_route_mask(em, n, indent, _infer_mask(em, n), sel)
            return
        em.out("if self.training:", indent)
        _route_topk_training(em, n, indent + 1)
        em.out("else:  # the inference rule: each token by its own `infer` mask", indent)
        keep = em.ns.claim(f"keep:{n.out.name}", "keep")
        em.out(f"{keep} = {_infer_mask(em, n)}", indent + 1)
        _route_mask(em, n, indent + 1, mask=keep)
        if sel is not None:
            em.out(f"{sel} = {keep}", indent + 1)
        return
    _route_topk_training(em, n, indent)


def _route_topk_training(em: _Emitter, n: Node, indent: int):
    if n.attr("schedule") == "mask":
        _route_masked(em, n, indent)
        return
    r = n.regions[0]
    x, score, among, weight = _route_operands(em, n)
    xs, pos = (em.v(a.name) for a in r.args)
    k = _route_k(em, n, x, indent)
    em.out(f"{pos} = {em.rt('route_select')}({score}, {k}{'' if among == 'None' else ', ' + among})", indent)
    em.out(f"{xs} = {em.route_gather(n, x, pos)}", indent)
    em.region(r, indent)
    y = em.v(r.results[0])
    em.out(f"{_route_results(em, n)} = {em.route_scatter(n, [x, pos, xs, y, weight, among])}", indent)


def _cached_route_mask(em: _Emitter, n: Node, indent: int, mask: str | None = None, sel: str | None = None):
    """The cached step's token-choice route (or a top-k route's inference rule, `mask`): the body
    runs on every new token at its own position, the mask decides which results are kept and which
    K/V the body's attention may read (each sample's selected tokens, as the forward's per-sample
    compaction)."""
    r = n.regions[0]
    ins = [em.v(i) for i in n.inputs]
    if n.op is Op.ROUTE_TOPK:
        x, _, _, weight = _route_operands(em, n)
    else:
        x, mask = ins[0], ins[1]
        weight = ins[2] if n.attr("has_weight") else "None"
    xs, pos = (em.v(a.name) for a in r.args)
    if any(r.args[1].name in m.inputs for m in r.walk() if m.op not in _CACHED_EMIT):
        em.assign([pos], ["positions"], indent)
    em.assign([xs], [x], indent)
    outer = em.kv_valid
    keep = em.ns.claim(f"keep:{n.out.name}", "keep")
    em.out(f"{keep} = {mask}" + (f" & {outer}" if outer else ""), indent)
    em.kv_valid = keep
    em.region(r, indent)
    em.kv_valid = outer
    y = em.v(r.results[0])
    em.out(f"{em.v(n.out.name)}, {sel or '_'} = {em.rt('route_blend')}({x}, {y}, {keep}, {weight})", indent)


def _route_mask(em: _Emitter, n: Node, indent: int, mask: str | None = None):
    """Each sample runs the body on its own selected tokens (a route_topk's inference rule: `mask`)."""
    if em.cached and mask is None:
        _cached_route_mask(em, n, indent)
        return
    r = n.regions[0]
    ins = [em.v(i) for i in n.inputs]
    if mask is None:
        x, mask = ins[0], ins[1]
        weight = ins[2] if n.attr("has_weight") else None
    else:
        x, _, _, weight = _route_operands(em, n)
        weight = None if weight == "None" else weight
    xs, pos = (em.v(a.name) for a in r.args)
    out = em.v(n.out.name)
    rows = em.ns.claim(f"rows:{n.out.name}", "rows")
    b = em.ns.claim(f"b:{n.out.name}", "b")
    names = em.sym_names()
    dims = [names[s] for s in ("B", "T") if s in names]
    saved = [em.ns.claim(f"saved:{d}:{n.out.name}", d + "_outer") for d in dims]
    em.assign(saved, dims, indent)
    em.out(f"{rows} = []", indent)
    em.out(f"for {b} in range({x}.shape[0]):  # each sample runs the body on its own selected tokens", indent)
    em.out(f"{pos} = {mask}[{b}].nonzero().flatten()", indent + 1)
    em.out(f"if {pos}.numel() == 0:", indent + 1)
    em.out(f"{rows}.append({x}[{b}])", indent + 2)
    em.out("continue", indent + 2)
    em.out(f"{xs} = {x}[{b}:{b} + 1, {pos}]", indent + 1)
    if dims:
        em.assign(dims, ["1", f"{pos}.numel()"][:len(dims)] if dims == [names.get("B"), names.get("T")]
                  else [("1" if d == names.get("B") else f"{pos}.numel()") for d in dims], indent + 1)
    em.out(f"{pos} = {pos}[None]", indent + 1)
    em.region(r, indent + 1)
    y = em.v(r.results[0])
    new = f"{y}[0]"
    if weight:
        em.out(f"{y} = {xs} + {weight}[{b}, {pos}[0]].reshape(1, -1{', 1' * (r.args[0].type.rank - 2)}) * ({y} - {xs})",
               indent + 1)
    em.out(f"{rows}.append({x}[{b}].index_copy(0, {pos}[0], {new}))", indent + 1)
    em.assign(dims, saved, indent)
    em.out(f"{out} = torch.stack({rows})", indent)


def _scan(em: _Emitter, n: Node, indent: int):
    """A loop over `x.split(size)`: the last segment may be short (SPEC §8.5). In the cached step
    (§17) the scan keeps its carries at the last complete segment and the open segment's inputs
    in the cache, and runs only the segments the new tokens touch."""
    from archc.ir.analysis import partial_segment_blocker
    r = n.regions[0]
    ins = [em.v(i) for i in n.inputs]
    x, init = ins[0], ins[1:]
    seg, args = em.v(r.args[0].name), [em.v(a.name) for a in r.args[1:]]
    size_expr = as_expr(n.attr("size"))
    size = em.e(size_expr, True)
    stacked = list(n.attr("stacked", ()))
    nc = len(args)
    outs = [em.v(o.name) for o in n.outputs]
    parts = [em.ns.claim(f"parts:{o}", o + "_parts") for o in outs[nc:]]
    short = size_expr != 1
    why = partial_segment_blocker(em.g, n) if short else None
    if why is not None:
        em.out(f"if {x}.shape[1] % {size}:", indent)
        msg = f"sequence length {{{x}.shape[1]}} is not a multiple of the segment length {{{size}}}: "
        em.out(f"raise ValueError({_fstring(msg)} + {json.dumps(why)})", indent + 1)
    cached = em.cached
    if cached:
        key = _site_key(em, n, site="scan:" + n.outputs[-1].name)
        state = em.ns.claim(f"state:{n.outputs[-1].name}", "state")
        new = em.ns.claim(f"new:{n.outputs[-1].name}", "n_new")
        xs = em.ns.claim(f"segments:{n.outputs[-1].name}", "xs")
        rest = em.ns.claim(f"rest:{n.outputs[-1].name}", "rest")
        em.out(f"{state} = cache.scan_state({key})", indent)
        em.out(f"{new} = {x}.shape[1]", indent)
        em.out(f"if {state} is None:", indent)
        em.out(f"{xs} = {x}", indent + 1)
        em.assign(args, init, indent + 1)
        em.out("else:", indent)
        carried = f"({', '.join(args)}{',' if len(args) == 1 else ''})" if args else "_"
        em.out(f"{carried}, {rest} = {state}", indent + 1)
        em.out(f"{xs} = torch.cat([{rest}, {x}], dim=1)", indent + 1)
        x = xs
    else:
        em.assign(args, init, indent)
    for p in parts:
        em.out(f"{p} = []", indent)
    em.out(f"for {seg} in {x}.split({size}, dim=1):", indent)
    if cached:
        kept = em.ns.claim(f"kept:{n.outputs[-1].name}", "kept")
        em.out(f"{kept} = ({', '.join(args)}{',' if len(args) == 1 else ''})  # the carries before this segment",
               indent + 1)
    saved = dict(em.ns.symbols)
    length = None
    if short and why is None:
        # the body measures the segment: its size parameter is this segment's length (short at the end)
        length = em.ns.claim(f"seglen:{n.outputs[-1].name}", size_expr.name + "_len")
        em.out(f"{length} = {seg}.shape[1]", indent + 1)
        em.ns.symbols[size_expr.name] = length
    at = len(em.lines)
    em.cached = False                         # the body runs whole segments, as in the forward
    em.region(r, indent + 1)
    em.cached = cached
    if length is not None and not any(_mentions(line, length) for line in em.lines[at:]):
        del em.lines[at - 1]                  # the body never measures its segment
    em.ns.symbols.clear()
    em.ns.symbols.update(saved)
    em.assign(args, [em.v(y) for y in r.results[:nc]], indent + 1)
    for p, y in zip(parts, r.results[nc:]):
        em.out(f"{p}.append({em.v(y)})", indent + 1)
    if cached:
        done = f"{x}.shape[1] - {x}.shape[1] % {size}"
        full = f"({', '.join(args)}{',' if len(args) == 1 else ''})"
        em.out(f"cache.keep_scan_state({key}, {full} if {x}.shape[1] % {size} == 0 else {kept}, "
               f"{x}[:, {done}:])", indent)
    em.assign_results(list(n.outputs[:nc]), args, indent)
    for o, p, st in zip(outs[nc:], parts, stacked):
        tail = f"[:, -{new}:]" if cached else ""
        em.out(f"{o} = torch.{'stack' if st else 'cat'}({p}, dim=1){tail}", indent)


def _fstring(text: str) -> str:
    """`text` (with {expressions}) as an f-string literal."""
    return "f" + json.dumps(text)


def _fused(em: _Emitter, n: Node, indent: int):
    """A fusion region runs inline under this backend: its yields take the names of its results."""
    r = n.regions[0]
    for y, o in zip(r.results, n.outputs):
        if "val:" + y not in em.ns.map and y not in em.inline:
            em.ns.map["val:" + y] = em.v(o.name)
    em.region(r, indent)
    em.assign_results(list(n.outputs), [em.v(y) for y in r.results], indent)


# -- the K/V-cached incremental step (prefill and decode) --------------------------------------------


def _offset(em: _Emitter, name: str):
    """P for a value whose axis 1 is the sequence behind a sequence-free prefix of P positions."""
    from archc.ir.analysis import lm_token_input, seq_offset
    t = em.types.get(name)
    p = seq_offset(t, lm_token_input(em.g).type.shape[1]) if t is not None else None
    return p if p not in (None, 0) else None


def _positions(em: _Emitter, name: str, indent: int) -> str:
    """The positions of `name`'s sequence axis: `positions`, or, behind a prefix of P, the prefix's
    0..P-1 and the tokens' from P on (the prefix runs on the first call only)."""
    p = _offset(em, name)
    if p is None:
        return "positions"
    pos = em.ns.claim(f"ppos:{name}", "positions_p")
    x = em.v(name)
    em.out(f"{pos} = positions + {em.e(p, True)} if cache.length else "
           f"torch.arange({x}.shape[1], device={x}.device)[None].expand({x}.shape[0], -1)", indent)
    return pos


def _cached_rope(em: _Emitter, n: Node, indent: int):
    pos = _positions(em, n.inputs[0], indent)
    em.out(f"{em.v(n.out.name)} = {em.rt('rope')}({em.v(n.inputs[0])}, {float(n.attr('base'))!r}, {pos})", indent)


def _cached_concat(em: _Emitter, n: Node, indent: int):
    """A sequence-free prefix before the sequence: on the first call only (its K/V stay cached). A
    delay line (`concat([A, x[:, :T-P]])`): the step keeps x's last P positions (A before any)."""
    if em.delays is None:
        from archc.ir.analysis import delay_lines
        em.delays = delay_lines(em.g)
    line = em.delays.get(n.out.name)
    if line is not None:
        a, _, x = (em.v(v) for v in line)
        key = _site_key(em, n, site=f"delay:{n.out.name}")
        full = em.ns.claim(f"delayed:{n.out.name}", "delayed")
        em.out(f"{full} = torch.cat([cache.recurrent_state({key}, {a}), {x}], dim=1)", indent)
        em.out(f"cache.keep_recurrent_state({key}, {full}[:, {x}.shape[1]:])", indent)
        em.out(f"{em.v(n.out.name)} = {full}[:, :{x}.shape[1]]", indent)
        return
    if _offset(em, n.out.name) is None:
        _uncached(em, n, indent)
        return
    a, b = (em.v(i) for i in n.inputs)
    em.out(f"{em.v(n.out.name)} = torch.cat([{a}, {b}], dim=1) if cache.length == 0 else {b}", indent)


def _cached_slice(em: _Emitter, n: Node, indent: int):
    """Dropping the prefix again: only the first call's value has it."""
    if _offset(em, n.inputs[0]) is None or n.attr("axis") != 1:
        _uncached(em, n, indent)
        return
    expr = EMIT[Op.SLICE](em, n, [em.v(i) for i in n.inputs])
    em.out(f"{em.v(n.out.name)} = {expr} if cache.length == 0 else {em.v(n.inputs[0])}", indent)


def _uncached(em: _Emitter, n: Node, indent: int):
    """`n` as the forward emits it."""
    em.cached = False
    em.node(n, indent)
    em.cached = True


def _site_key(em: _Emitter, n: Node, skip_var: str | None = None, site: str | None = None, loops: bool = True) -> str:
    """An f-string naming this attention instance: site, copy and every enclosing loop step."""
    if site is not None:                       # the entry another instance recorded (kv_read)
        text = site
    else:
        site = n.attr("site") or n.out.name
        if n.out.name not in em.instances:     # one site applied by several nodes (x = blk(blk(x))): one entry each
            scope = (site, n.attr("copy"), tuple(ir for ir, _ in em.loops))
            count = em.instance_count.get(scope, 0)
            em.instance_count[scope] = count + 1
            em.instances[n.out.name] = f"#{count}" if count else ""
        text = site + em.instances[n.out.name]
    if n.attr("copy") is not None:
        text += f"[{{{em.e(n.attr('copy'), True)}}}]"
    steps = [f"{ir}={{{py}}}" for ir, py in em.loops if ir != skip_var] if loops else []
    if steps:
        text += "@" + ",".join(steps)
    return 'f"' + text + '"' if "{" in text else json.dumps(text)


def _cached_attend(em: _Emitter, n: Node, indent: int):
    q, k, v = (em.v(i) for i in n.inputs[:3])
    share = n.attr("kv_share") or ""
    window = em.e(n.attr("window"), True) if n.attr("window") else "0"
    site = json.dumps(n.attr("site") or n.out.name)
    reads = "None"
    key = _site_key(em, n)
    read = em.defs.get(n.inputs[1])
    if read is not None and read.op is Op.KV_READ:
        # the first recursion's (or the source layer's) entry: this site's key without that loop
        key = _site_key(em, read, skip_var=read.attr("var"), site=read.attr("site"), loops=bool(read.attr("var")))
        reads, k, v = key, "None", "None"
    elif (n.inputs[1], n.inputs[2]) in em.kv_owner:
        reads = em.kv_owner[(n.inputs[1], n.inputs[2])]          # the same K/V values: one entry
    elif not share:
        em.kv_owner[(n.inputs[1], n.inputs[2])] = key
    if share.startswith("recursion:"):
        var = share.split(":", 1)[1]
        py = dict(em.loops)[var]
        key = _site_key(em, n, skip_var=var)
        reads = f"None if {py} == 0 else {key}"          # the first recursion's K/V serve the others
    elif share:
        src = share.split(":")[-1]
        reads = json.dumps(src)                            # cross-layer: read the producer's entry
    if n.attr("prefix") or em.kv_valid:
        # keys behind a sequence-free prefix (persistent tokens), or inside a masked route (only the
        # tokens it selected are keys)
        pos = _positions(em, n.inputs[0], indent)
        extra = f", prefix={em.e(n.attr('prefix'), True)}" if n.attr("prefix") else ""
        extra += f", valid={em.kv_valid}" if em.kv_valid else ""
        em.out(f"{em.v(n.out.name)} = cache.attend({key}, {site}, {q}, {k}, {v}, {pos}, {window}, reads={reads}"
               f"{extra})", indent)
        return
    em.out(f"{em.v(n.out.name)} = {em.cached_attend(n, [key, site, q, k, v, 'positions', window, reads])}", indent)


def _cached_recurrence(em: _Emitter, n: Node, indent: int):
    """`linear_scan` / `linear_attn` in the cached step: the state after the cached tokens replaces
    the initial state, and the state after the new ones is kept (O(1) per token)."""
    ins = [em.v(i) for i in n.inputs]
    key = _site_key(em, n, site=f"{n.op.value}:{n.outputs[0].name}")
    init = em.ns.claim(f"state:{n.outputs[0].name}", "state")
    em.out(f"{init} = cache.recurrent_state({key}, {ins[-1]})", indent)
    if n.op is Op.LINEAR_SCAN:
        out = em.v(n.out.name)
        em.out(f"{out} = {em.rt('linear_scan')}({ins[0]}, {ins[1]}, {init}, 1)", indent)
        em.out(f"cache.keep_recurrent_state({key}, {out}[:, -1])", indent)
        return
    y, new = em.v(n.outputs[0].name), em.v(n.outputs[1].name)
    em.out(f"{y}, {new} = {em.rt('linear_attn')}({ins[0]}, {ins[1]}, {ins[2]}, {init})", indent)
    em.out(f"cache.keep_recurrent_state({key}, {new})", indent)


def _cached_cumsum(em: _Emitter, n: Node, indent: int):
    """`cumsum` along the sequence in the cached step: the running sum after the cached tokens is
    added to the new tokens' own cumulative sum, and the last one is kept."""
    if n.attr("axis") != 1:
        _uncached(em, n, indent)
        return
    x, out = em.v(n.inputs[0]), em.v(n.out.name)
    key = _site_key(em, n, site=f"cumsum:{n.out.name}")
    prev = em.ns.claim(f"state:{n.out.name}", "state")
    em.out(f"{prev} = cache.recurrent_state({key}, None)", indent)
    em.out(f"{out} = torch.cumsum({x}, dim=1)", indent)
    em.out(f"if {prev} is not None:", indent)
    em.out(f"{out} = {out} + {prev}.unsqueeze(1)", indent + 1)
    em.out(f"cache.keep_recurrent_state({key}, {out}[:, -1])", indent)


_CACHED_EMIT = {Op.ROPE: _cached_rope, Op.ATTEND: _cached_attend, Op.KV_READ: lambda em, n, indent: None,
                Op.LINEAR_SCAN: _cached_recurrence, Op.LINEAR_ATTN: _cached_recurrence,
                Op.CONCAT: _cached_concat, Op.SLICE: _cached_slice, Op.CUMSUM: _cached_cumsum}

_REGION_EMIT = {Op.LOOP: _loop, Op.HALT_LOOP: _halt_loop, Op.ROUTE_TOPK: _route_topk, Op.ROUTE_MASK: _route_mask,
                Op.SCAN: _scan, Op.FUSED: _fused, Op.ATTEND: _attend_node, Op.MEM_WRITE: _mem_write_node,
                Op.KV_READ: _kv_read}


# -- the module ----------------------------------------------------------------------------------------

_INIT = {
    "normal": lambda a: f"nn.init.normal_({{p}}, std={a['std']})",
    "trunc_normal": lambda a: f"nn.init.trunc_normal_({{p}}, std={a['std']}, a=-2 * {a['std']}, b=2 * {a['std']})",
    "zeros": lambda a: "nn.init.zeros_({p})",
    "ones": lambda a: "nn.init.ones_({p})",
    "const": lambda a: f"nn.init.constant_({{p}}, {a['value']})",
    "uniform": lambda a: f"nn.init.uniform_({{p}}, -{a['bound']}, {a['bound']})",
    "xavier": lambda a: "nn.init.xavier_uniform_({p})",
}

_HELPERS = '''

class _Scope(nn.Module):
    """A namespace of parameters: mirrors one layer path of the .arch file."""


def _param(root, path, shape):
    """Register an uninitialised parameter at a dotted path such as `core.attn.q.weight`."""
    *scopes, leaf = path.split(".")
    for name in scopes:
        if name not in root._modules:
            root.add_module(name, _Scope())
        root = root._modules[name]
    root.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
'''


def _class(g: Graph, em: _Emitter, class_name: str) -> list[str]:
    syms = [s for s in g.symbols if s.kind != "dim"]
    names = em.sym_names()
    sig, derived = [], []
    for s in syms:
        d = s.default
        if isinstance(d, sympy.Basic) and not d.is_number:
            sig.append(f"{names[s.name]}=None")
            derived.append(f"        if {names[s.name]} is None:")
            derived.append(f"            {names[s.name]} = {em.e(d, integer=s.kind == 'int')}")
        else:
            sig.append(f"{names[s.name]}={_py_default(d, s.kind)}")
    title = (g.doc.splitlines() or [g.name])[0]
    lines = [f"class {class_name}(nn.Module):",
             f'    """{_docstr(title)}',
             "",
             f"    Generated by archc from {_docstr(g.source_file or '<string>')} (architecture {g.name}).",
             '    """',
             "",
             f"    def __init__(self, {', '.join(sig)}):",
             "        super().__init__()"]
    lines += derived
    for s in syms:
        lines.append(f"        self.{names[s.name]} = {names[s.name]}")
    for p in g.params:
        lines.append(f"        _param(self, {json.dumps(state_key(p.name))}, {_shape(em, p.type.shape)})")
    lines.append("        self.reset_parameters()")
    lines.append("")
    lines.append("    def reset_parameters(self):")
    used = _used_syms([p for p in g.params], em)
    lines += _unpack(used, names, 8)
    lines.append("        with torch.no_grad():")
    if not g.params:
        lines.append("            pass  # no parameters")
    for p in g.params:
        args = {k: em.e(v) for k, v in p.init_args}
        init = _INIT[p.init](args)
        lines.append("            " + init.format(p="self." + attr_path(p.name)))
    return lines


def _used_syms(params: list[Param], em: _Emitter) -> list[str]:
    free = set()
    for p in params:
        for _, v in p.init_args:
            if isinstance(v, sympy.Basic):
                free |= {s.name for s in v.free_symbols}
    return sorted(free)


def _unpack(syms: list[str], names: dict[str, str], indent: int) -> list[str]:
    if not syms:
        return []
    pad = " " * indent
    local = [names[s] for s in syms]
    return [f"{pad}{', '.join(local)} = {', '.join('self.' + x for x in local)}"]


def _py_default(d, kind):
    if isinstance(d, sympy.Basic):
        d = float(d) if kind == "float" else int(d)
    if kind == "bool":
        return repr(bool(d))
    if kind == "float":
        return repr(float(d))
    return repr(int(d))


def _docstr(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _forward(g: Graph, em: _Emitter, region: Region | None = None, method: str = "forward",
             doc: str | None = None) -> list[str]:
    """`forward` (the graph body), or another method that runs `region` (a policy's processor):
    its arguments are the parameters, its yields the result (a dict of the outputs for the body)."""
    region = region or g.body
    em.types = {}
    for a in region.args:
        em.types[a.name] = a.type
    for n in region.walk():
        for o in n.outputs:
            em.types[o.name] = o.type
        for r in n.regions:
            for a in r.args:
                em.types[a.name] = a.type
    inputs = [em.v(a.name) for a in region.args]
    em.grad_flag = False
    body_start = len(em.lines)
    em.region(region, 2)
    body = em.lines[body_start:]
    del em.lines[body_start:]
    while body and body[-1].startswith("        del "):      # the method returns next: nothing to release
        body.pop()
    names = em.sym_names()
    head = [f"    def {method}(self, {', '.join(inputs)}):"]
    if doc:
        head.append(f'        """{_docstr(doc)}"""')
    text = "\n".join(body)
    params = [s.name for s in g.symbols if s.kind != "dim" and _mentions(text, names[s.name])]
    head += _unpack(params, names, 8)
    # a policy region binds only its own dimensions (N) from its arguments
    bound: set[str] = set() if region is g.body else {s.name for s in g.symbols}
    for a in region.args:
        for i, d in enumerate(a.type.shape):
            if isinstance(d, sympy.Symbol) and d.name not in bound and d.name in names and _mentions(text, names[d.name]):
                head.append(f"        {names[d.name]} = {em.v(a.name)}.shape[{i}]")
                bound.add(d.name)
    if inputs and _mentions(text, "dev"):
        head.append(f"        dev = {inputs[0]}.device")
    if em.uses_kv:
        head.append("        kv = {}  # K/V published by attention sites, read by the layers that share them")
    if em.grad_flag:
        head.append("        grad = torch.is_grad_enabled()")
    outs = [em.v(r) if r not in em.consts else f"torch.as_tensor({em.v(r)})" for r in region.results]
    if len(outs) == 1:
        tail = [f"        return {outs[0]}"]
    elif region is not g.body:
        tail = [f"        return {', '.join(outs)}"]
    else:
        items = ", ".join(f"{json.dumps(name)}: {v}" for name, v in zip(g.output_names, outs))
        tail = [f"        return {{{items}}}"]
    return head + body + tail


def _schedule_methods(g: Graph, em: _Emitter) -> list[str]:
    """One `schedule_<name>(x)` method per schedule: sets the parameters it overrides, returns every value."""
    names = em.sym_names()
    params = {s.name: s.kind for s in g.symbols if s.kind != "dim"}
    out: list[str] = []
    for s in g.schedules:
        var = em.ns.claim(f"schedule:{s.name}", s.var)
        env = {**{p: "self." + names[p] for p in params}, s.var: var}
        overrides = [k for k, _ in s.values if k in params]
        method = em.ns.claim(f"schedule-method:{s.name}", f"schedule_{s.name}")
        doc = f"Schedule `{s.name}` of {var}: " + (
            f"sets {', '.join(overrides)} on this module" if overrides else "sets no parameter") + "; returns every value."
        out += ["", f"    def {method}(self, {var}):", f'        """{_docstr(doc)}"""', "        values = {"]
        for k, v in s.values:
            text = py_expr(v, env)
            if "math." in text:
                em.uses_math = True
            cast = {"int": "int", "float": "float", "bool": "bool"}.get(params.get(k, ""))
            if cast == "int" and _integer_valued(v):
                cast = None                     # int(...) of an integer expression is noise (ruff RUF046)
            if not cast:
                text = _unwrap(text)
            out.append(f"            {json.dumps(k)}: {f'{cast}({_unwrap(text)})' if cast else text},")
        out.append("        }")
        for k in overrides:
            out.append(f"        self.{names[k]} = values[{json.dumps(k)}]")
        out.append("        return values")
    return out


def _integer_valued(v) -> bool:
    """An expression whose every value is an integer (a literal, or a Piecewise of such)."""
    if isinstance(v, sympy.Piecewise):
        return all(_integer_valued(e) for e, _ in v.args)
    return isinstance(v, (int, sympy.Integer)) and not isinstance(v, bool)


def _unwrap(text: str) -> str:
    """Drop one pair of parentheses around the whole expression."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(text) - 1:
            return text
    return text[1:-1]


def _mentions(text: str, name: str) -> bool:
    """`name` occurs in `text` as a name of its own (not part of a longer name or an attribute)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


def _decode_methods(g: Graph, runtime: set[str], make_emitter=_Emitter) -> list[str]:
    """prefill/decode for language-model-shaped graphs: a cached step (K/V and scan state) when
    exact, else recompute."""
    from archc.ir.analysis import decode_blocker, lm_token_input
    tok = lm_token_input(g)
    if tok is None:
        return []
    blocker = decode_blocker(g, torch_step=True)
    if blocker is not None:
        runtime.add("TokenCache")
        T = tok.type.shape[1]
        outs = [(name, r) for name, r in zip(g.output_names, g.body.results)]
        types = {o.name: o.type for n in g.walk() for o in n.outputs}
        sliced = [types[r].rank >= 2 and types[r].shape[1] == T for _, r in outs]
        if len(outs) == 1:
            ret = "out[:, -n:]" if sliced[0] else "out"
        else:
            ret = "{" + ", ".join(f"{json.dumps(name)}: out[{json.dumps(name)}]" + ("[:, -n:]" if s else "")
                                  for (name, _), s in zip(outs, sliced)) + "}"
        return [
            "",
            "    def prefill(self, tokens):",
            '        """Run a prompt; returns (outputs, cache). This model recomputes on decode: ' + _docstr(blocker) + '."""',
            "        cache = TokenCache()",
            "        return self(cache.extend(tokens)), cache",
            "",
            "    def decode(self, tokens, cache):",
            '        """Outputs for the next tokens [B, n] after `prefill` (exact: the history is recomputed)."""',
            "        n = tokens.shape[1]",
            "        out = self(cache.extend(tokens))",
            f"        return {ret}, cache",
        ]
    runtime |= {"KVCache", "attention"}
    em = make_emitter(g, cached=True)
    em.uses_kv = False
    step = _forward(g, em)
    runtime |= em.runtime
    step[0] = step[0].replace("def forward(self, ", "def _step(self, ").replace("):", ", cache):")
    tok_name = step[0].split("(self, ")[1].split(",")[0]
    pre = [f"        positions = cache.length + torch.arange({tok_name}.shape[1], device={tok_name}.device)"
           f"[None].expand({tok_name}.shape[0], -1)"]
    if not any(re.search(r"\bpositions\b", line) for line in step[1:]):
        pre = []                    # no rope or attention reads the positions (Node2Vec)
    body_end = max(i for i, line in enumerate(step) if line.startswith("        return "))
    step = step[:1] + pre + step[1:body_end] + [f"        cache.length += {tok_name}.shape[1]"] + step[body_end:]
    self_names = {s.name: "self." + em.sym_names()[s.name] for s in g.symbols if s.kind != "dim"}

    def literal(v):
        return _PyExpr(py_expr(v, self_names)) if isinstance(v, sympy.Basic) else v

    policies = {t: (p.kind, {k: literal(v) for k, v in p.args})
                for p in g.policies if p.kind in ("prune_key_channels", "topk_decode") for t in p.targets}
    rewrites, processors = {}, []
    for i, (p, region) in enumerate(g.policy_regions()):
        method = em.ns.claim(f"method:processor{i}", "_processor")
        args = p.arg_dict
        pem = _region_emitter(g, region, make_emitter)
        processors += [""] + _forward(g, pem, region, method, f"rewrite_kv's processor (`{args['processor']}`): "
                                      "the gathered entries (k, v) and their positions -> the rewritten (k, v).")
        runtime |= pem.runtime
        rewrites.update({t: (literal(args["delimiter"]), literal(args["top"]), _PyExpr("self." + method))
                         for t in p.targets})
    if not rewrites:
        return [
            "",
            "    def prefill(self, tokens):",
            '        """Run a prompt; returns (outputs, cache). The cache holds per-site K/V shaped by the policies."""',
            f"        cache = KVCache({_py_literal(policies)})",
            "        out = self._step(tokens, cache)",
            "        cache.compress()",
            "        return out, cache",
            "",
            "    def decode(self, tokens, cache):",
            '        """Outputs for the next tokens [B, n] after `prefill`, reading and extending the cache."""',
            "        return self._step(tokens, cache), cache",
            "",
        ] + step
    feed = em.ns.claim("method:feed", "_feed")
    T = tok.type.shape[1]
    types = {o.name: o.type for n in g.walk() for o in n.outputs} | {a.name: a.type for a in g.inputs}
    seq = [types[r].rank >= 2 and types[r].shape[1] == T for r in g.body.results]

    def joined(get: str, is_seq: bool) -> str:
        return f"torch.cat([{get.format('o')} for o in outs], 1)" if is_seq else get.format("outs[-1]")
    if len(seq) == 1:
        ret = "torch.cat(outs, 1)" if seq[0] else "outs[-1]"
    else:
        ret = "{" + ", ".join(f"{json.dumps(name)}: " + joined("{}[" + json.dumps(name) + "]", s)
                              for name, s in zip(g.output_names, seq)) + "}"
    return [
        "",
        "    def prefill(self, tokens):",
        '        """Run a prompt; returns (outputs, cache). The cache holds per-site K/V shaped by the policies',
        '        and is rewritten after every delimiter token (rewrite_kv)."""',
        f"        cache = KVCache({_py_literal(policies)}, rewrites={_py_literal(rewrites)})",
        f"        out = self.{feed}(tokens, cache)",
        "        cache.compress()",
        "        return out, cache",
        "",
        "    def decode(self, tokens, cache):",
        '        """Outputs for the next tokens [B, n] after `prefill`, reading, extending and rewriting the cache."""',
        f"        return self.{feed}(tokens, cache), cache",
        "",
        f"    def {feed}(self, tokens, cache):",
        '        """Run tokens in pieces that end at a delimiter; after each, the samples that read one get their',
        '        cache rewritten by the processor (rewrite_kv), so what follows reads the rewritten K/V."""',
        "        outs = []",
        "        for piece in cache.pieces(tokens):",
        "            outs.append(self._step(piece, cache))",
        "            cache.rewrite(piece)",
        f"        return {ret}",
    ] + processors + [""] + step


def _region_emitter(g: Graph, region: Region, make_emitter) -> _Emitter:
    """An emitter for a policy region: plain attention (no K/V store), its own dimensions named."""
    em = make_emitter(g)
    em.uses_kv = False
    graph_syms = {s.name for s in g.symbols}
    for a in region.args:
        for d in a.type.shape:
            for s in sorted(sympy.sympify(d).free_symbols, key=str):
                if s.name not in graph_syms:
                    em.ns.claim("sym:" + s.name, s.name)
    return em


class _PyExpr(str):
    """Source text to write as is (an expression of the module's parameters)."""


def _py_literal(v) -> str:
    if isinstance(v, _PyExpr):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_py_literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (bool, int, float)):
        return repr(v)
    raise TypeError(f"cannot write {v!r} into generated code")


_GENERATE_METHOD = '''
    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None):
        """Sample up to `max_new_tokens` after `prompt` [B, n] through prefill/decode, one token at a time;
        returns [B, n + n_new]. temperature 0 is greedy; `attention_mask` (1 real, 0 left padding) groups
        the samples by prompt length and never feeds pads to the model. Call .eval() first. See lm_generate."""
        return lm_generate(self, prompt, max_new_tokens, temperature, top_k, top_p, eos_token_id, attention_mask,
                           generator)
'''


def _with_generate(decode: list[str], runtime: set[str]) -> list[str]:
    """A class with prefill/decode also gets `generate` (its logic: the runtime's `lm_generate`)."""
    if decode:
        runtime |= {"lm_generate", "lm_sample", "lm_logits", "sample_next", "next_token_probs"}
        decode = decode + _GENERATE_METHOD.rstrip().splitlines()
    return decode


def generate(graphs: list[Graph], source_file: str = "", doc: str = "", make_emitter=_Emitter,
             imports: tuple[str, ...] = (), prelude: tuple[str, ...] = ()) -> GeneratedCode:
    """One standalone module for every architecture in `graphs` (deterministic text).

    Another backend reuses this with its own emitter (`make_emitter(g, cached=...)`), extra import
    lines and module-level source (`prelude`, placed after the runtime functions).
    """
    classes: list[list[str]] = []
    runtime: set[str] = set()
    uses_math = False
    # class names are module globals: an arch called `torch`, `class` or `_param` must not shadow
    # an import, be a keyword or replace a helper, so it gets a legal name of its own
    module_ns = Namespace()
    class_names = tuple(module_ns.claim("arch:" + g.name, g.name) for g in graphs)
    for g, class_name in zip(graphs, class_names):
        em = make_emitter(g)
        fwd = _forward(g, em)
        cls = (_class(g, em, class_name) + [""] + fwd + _schedule_methods(g, em)
               + _with_generate(_decode_methods(g, runtime, make_emitter), runtime))
        runtime |= em.runtime
        uses_math |= em.uses_math or any("math." in line for line in cls)
        classes.append(cls)
    doc = doc or (graphs[0].doc if graphs else "")
    src = source_file or (graphs[0].source_file if graphs else "")
    out = ['"""' + _docstr(f"Generated by archc from {src or '<string>'}. Do not edit: edit the .arch file."),
           ""]
    out += [_docstr(line) for line in doc.splitlines()]
    out += ['"""']
    if uses_math or runtime & {"attention"}:
        out += ["import math", ""]
    body: list[str] = []
    if "memory_write" in runtime:              # the l_q retention, and the written-out backward
        runtime |= {"lq_normalize", "_act_grad", "_loss_grad", "memory_update"}
    if runtime & {"mlp_memory", "memory_write"}:
        body += ["", "_MEMORY_ACTS = {\"gelu\": F.gelu, \"relu\": F.relu, \"silu\": F.silu, \"tanh\": torch.tanh}"]
    if "KVCache" in runtime:
        runtime |= {"topk_attention", "causal_scores"}
    if "route_keep" in runtime:
        runtime.add("route_select")
    if runtime & {"attention", "topk_attention"}:
        runtime.add("repeat_kv")
    for fn in sorted(runtime, key=_runtime_order):
        body += ["", "", _runtime_source(fn)]
    for text in prelude:
        body += ["", "", text.rstrip()]
    body += ["", ""] + _HELPERS.strip().splitlines()   # two blank lines before a function or a class
    for cls in classes:
        body += ["", ""] + cls
    # the imports the module uses (F only when something calls it); after them, one blank line
    # before a statement and two before a definition (ruff's isort, I001)
    uses_f = any(re.search(r"\bF\.", line) for line in body)
    out += ["import torch", *(["import torch.nn.functional as F"] if uses_f else []), *imports, "from torch import nn"]
    first = next(i for i, line in enumerate(body) if line)
    if not body[first].startswith(("def ", "class ", "@")):
        body = body[first - 1:]
    text = "\n".join(out + body) + "\n"
    return GeneratedCode(text, class_names)


def _runtime_order(fn: str) -> int:
    return list(torch_runtime.__dict__).index(fn)


@functools.cache
def _runtime_source(fn: str) -> str:
    """The source of a runtime helper, pasted into generated modules (read once per process: inspect
    parses the whole runtime module to find a class)."""
    return inspect.getsource(getattr(torch_runtime, fn)).rstrip()
