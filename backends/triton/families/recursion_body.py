"""Shared-weight recursion bodies in one launch: a `loop` whose every op acts token by token.

A `loop` (SPEC §8.1, §12) runs its region `trips` times with the same weights. When the body holds
only per-token work -- `linear` / `matmul` against loop-invariant weights, elementwise ops, norms
over the feature axis, slices of the feature axis, `fused` regions of those -- every row (token,
sample, collocation point) of the carried state evolves independently of the others. One program
then owns BLOCK_R rows for the *whole* recursion: it loads the weights once, keeps them on chip
(registers) across all trips, keeps the carried state in registers, and writes the state back once
(and, for training, once per trip into a buffer the backward reads). Bodies that mix tokens
(attention, scans, reductions over a token axis, reshapes, memories, nested regions) are not
matched: they keep the per-step path (the body's own kernels, one launch per op per trip).

*Pieces.* The body is compiled into tiles of columns ("pieces"): the piece of value v for columns
[off, off + w) is computed from pieces of its inputs, demand-driven from the yields. A `slice` of the
feature axis therefore costs nothing: it asks its input for the sliced columns, which an elementwise
op passes to its inputs, a `linear` to its weight (the matching rows of W, a tile loaded once per
program), and an operand to its load (an LSTM's four gates are four tiles of one `linear`, never
a [4h]-wide tile cut in registers). Norms need whole rows; the carried state is whole.

*Size bound.* A program keeps every weight piece in registers (fp32 `tl.dot` in ieee precision runs
on the FMA units with both operands in registers): the launcher takes the kernel only when every
feature width is at most MAX_WIDTH and the weight tiles, padded to powers of two (at least 16,
`tl.dot`'s minimum), hold at most MAX_WEIGHT fp32 elements together; otherwise the emitter's
per-step code runs (`guard`). The bound comes from compiling the generated kernels for sm_90 on the
CPU (ptxas -v, SPEC §20): a residual MLP body with d = 64, hidden = 128 (2^14 weight elements)
compiles without spills at 8 warps (106 registers per thread) and spills at 4; its backward, which
also holds the weight-gradient accumulators, spills about 1.3 KB per thread at 8 warps; an LSTM cell
with hidden = 128 (2^16 elements) spills so much that ptxas runs for minutes. It is not a measured
optimum: `bench/gpu_families.py` times the kernel against the per-step path.

*Backward.* The forward saves the carried state at the start of every differentiated trip
([S, R, w] per carry; S = trips, or `grad last` K). The backward kernel walks the trips in
reverse: it reloads the state, recomputes the trip's pieces in registers, then runs reverse mode
over them (the fused generator's derivative rules, `tl.dot` for the contractions), carrying the
state's adjoint to the previous trip. A program owns a row block at a time (a grid of at most
4 x SMs programs looping over row blocks) and accumulates its weight gradients on chip over all
its rows and trips, writing one partial per program (summed by the launcher: deterministic, no
atomics); operand gradients are accumulated over the trips and written once per row. A backward
asked for a graph (`create_graph`, higher derivatives) differentiates the loop's torch form
instead (`runtime.torch_backward`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import sympy

from archc.backends.triton import fused as fused_gen
from archc.backends.triton import torch_text
from archc.backends.triton.families._util import config_space, kernel_name
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node, value_types
from archc.ir.ops import ELEMENTWISE_OPS, NORM_OPS, Op, norm_axis
from archc.ir.shapes import BOOL, F32

FAMILY = "recursion_body"

MAX_WIDTH = 512            # columns of any feature axis in the body
MAX_WEIGHT = 1 << 14       # fp32 elements of all weight tiles together (padded): 64 KiB

CONFIGS = config_space(BLOCK_R=(16, 32, 64), num_warps=(4, 8), num_stages=(1,))
DEFAULT = {"BLOCK_R": 16, "num_warps": 8, "num_stages": 1}

_SOURCES = {Op.PARAM, Op.FULL}                      # in-body atoms the launcher receives as operands
_BODY_OPS = ELEMENTWISE_OPS | NORM_OPS | {Op.LINEAR, Op.MATMUL, Op.SLICE, Op.CONST} | _SOURCES


class Reject(Exception):
    """The loop is not a per-token body this family compiles (the message says why)."""


@dataclass
class Piece:
    """Columns [off, off + width) of one value of the body, as one tile [BLOCK_R, BW] (or a scalar)."""

    kind: str                  # carry | row | scalar | const | weight | elem | norm | dot
    width: sympy.Expr          # the tile's columns (weight: output features); 0 for a scalar
    node: Node | None = None   # elem / norm: the IR node (op, attributes)
    inputs: tuple = ()         # piece ids
    index: int = 0             # carry: argument index; row / scalar / weight: operand index
    off: sympy.Expr = sympy.Integer(0)
    text: str = ""             # const: the literal or size argument
    k: sympy.Expr = sympy.Integer(0)   # weight: contraction width
    transposed: bool = False   # weight: a matmul's [K, N] operand (else a linear's [N, K] weight)
    dtype: object = F32

    @property
    def tile(self) -> bool:
        return self.kind not in ("scalar", "const") and self.width != 0


def _simp(e) -> sympy.Expr:
    return sympy.simplify(sympy.sympify(e))


def _positive(e: sympy.Expr) -> sympy.Expr:
    """e with every symbol assumed a positive integer (sizes), so inequalities between sizes decide."""
    return e.xreplace({s: sympy.Symbol(s.name, positive=True, integer=True) for s in e.free_symbols})


def _nonnegative(e) -> bool:
    return bool(_positive(_simp(e)).is_nonnegative)


class Body:
    """The analysis of one `loop`: its pieces, operands and size arguments (raises Reject)."""

    def __init__(self, node: Node, graph: Graph):
        if node.op is not Op.LOOP:
            raise Reject("not a loop")
        self.node, self.graph = node, graph
        self.types = value_types(graph)
        region = node.regions[0]
        self.var = node.attr("var")
        self.dims = {s.name for s in graph.symbols if s.kind == "dim"}
        self.args = [a.name for a in region.args]
        if not self.args:
            raise Reject("carries nothing")
        self.alias: dict[str, str] = {}
        self.defs: dict[str, Node] = {}
        self.nodes: list[Node] = []
        self.sizes: list[tuple[sympy.Expr, bool]] = []
        self.size(node.attr("trips"))
        if node.attr("grad_last") is not None:
            self.size(node.attr("grad_last"))
        self._flatten(region)
        self._check_ops()
        first = self.types[self.args[0]]
        if first.rank < 1:
            raise Reject("the carried state is a scalar")
        self.rows = tuple(first.shape[:-1])
        self.widths: list[sympy.Expr] = []
        self.operands: list[str] = []
        self.kinds: dict[str, str] = {}
        self._classify(region)
        self.pieces: list[Piece] = []
        self.memo: dict[tuple, int] = {}
        self.carry_piece: dict[int, int] = {}
        if node.attr("grad_last") is not None:
            for y in region.results:
                if self.resolve(y) not in self.defs or self.defs[self.resolve(y)].op in _SOURCES:
                    # a value a no-grad trip passes through unchanged keeps its autograd history (the
                    # interpreter runs no op on it), so the trips before `grad last` would matter
                    raise Reject("under `grad last`, a carry passes a value through unchanged")
        self.results = [self.demand(self.resolve(y), 0, self.width_of(y)) for y in region.results]
        self._check_leaves()
        self._check_budget()

    # -- structure ---------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def _flatten(self, region):
        for n in region.nodes:
            if n.op is Op.FUSED:
                self._flatten(n.regions[0])
                for o, y in zip(n.outputs, n.regions[0].results):
                    self.alias[o.name] = y
            elif n.regions:
                raise Reject(f"the body holds a `{n.op.value}` region")
            else:
                self.nodes.append(n)
                for o in n.outputs:
                    self.defs[o.name] = n

    def _check_ops(self):
        for n in self.nodes:
            if n.op not in _BODY_OPS:
                raise Reject(f"`{n.op.value}` is not a per-token op this kernel compiles")
            used = set()
            for _, v in n.attrs:
                if isinstance(v, sympy.Basic):
                    used |= {s.name for s in v.free_symbols}
            for o in n.outputs:
                for d in o.type.shape:
                    used |= {s.name for s in sympy.sympify(d).free_symbols}
                if o.type.dtype not in (F32, BOOL):
                    raise Reject(f"`{o.name}` is {o.type.dtype.value}")
            if self.var in used:
                raise Reject(f"the body reads the loop variable `{self.var}`")
            if n.op is Op.SLICE and norm_axis(int(n.attr("axis")), self.types[n.inputs[0]].rank) != \
                    self.types[n.inputs[0]].rank - 1:
                raise Reject("a slice of a token axis")
            if n.op in (Op.LINEAR, Op.MATMUL) and self.types[n.inputs[0]].rank < 1:
                raise Reject("a contraction of a scalar")
            if n.op is Op.SLICE:                       # the torch form reads the bounds too
                self.size(n.attr("start"))
                self.size(n.attr("stop"))
            if n.op is Op.CONST and isinstance(n.attr("value"), sympy.Basic):
                self.size(n.attr("value"), integer=False)

    def size(self, e, integer: bool = True) -> str:
        """The kernel text of a size: a literal, or the launcher argument z<k> that carries it."""
        e = _simp(e)
        if e.is_Integer:
            return str(int(e))
        if e.is_number:
            return repr(float(e))
        names = {s.name for s in e.free_symbols}
        if names & self.dims:
            raise Reject(f"the size {e} depends on a token dimension")
        for k, (known, _) in enumerate(self.sizes):
            if known == e:
                return f"z{k}"
        self.sizes.append((e, integer))
        return f"z{len(self.sizes) - 1}"

    def width_of(self, name: str) -> sympy.Expr:
        t = self.types[name]
        return sympy.Integer(0) if t.rank == 0 else _simp(t.shape[-1])

    def width_index(self, w: sympy.Expr) -> int:
        w = _simp(w)
        for j, known in enumerate(self.widths):
            if known == w:
                return j
        if w.is_Integer and int(w) > MAX_WIDTH:
            raise Reject(f"a feature axis of {w} columns (more than {MAX_WIDTH})")
        self.size(w)
        self.widths.append(w)
        return len(self.widths) - 1

    def _rows_ok(self, name: str) -> bool:
        """The value broadcasts to [*rows, width]: every leading dim is the state's or 1."""
        shape = self.types[name].shape
        lead = tuple(shape[:-1])
        if len(lead) > len(self.rows):
            return False
        pad = (sympy.Integer(1),) * (len(self.rows) - len(lead)) + lead
        return all(d == 1 or _simp(d - r) == 0 for d, r in zip(pad, self.rows))

    def _classify(self, region):
        """Operands: values from outside the loop and in-body atoms (weights, fills), each one kind."""
        arg_set = set(self.args)
        for a in self.args:
            t = self.types[a]
            if t.dtype is not F32 or len(t.shape) != len(self.rows) + 1 or \
                    any(_simp(d - r) != 0 for d, r in zip(t.shape[:-1], self.rows)):
                raise Reject(f"the carried value `{a}` is not f32 [{', '.join(map(str, self.rows))}, features]")
        weight_use: dict[str, set] = {}
        for n in self.nodes:
            if n.op in (Op.LINEAR, Op.MATMUL):
                weight_use.setdefault(n.inputs[1], set()).add(n.op)
        seen = []
        for n in self.nodes:
            for i, name in enumerate(n.inputs):
                name = self.resolve(name)
                if name in arg_set or name in seen:
                    continue
                p = self.defs.get(name)
                if p is not None and p.op not in _SOURCES:
                    continue
                seen.append(name)
        for y in region.results:
            y = self.resolve(y)
            if y not in arg_set and y not in self.defs and y not in seen:
                seen.append(y)
        producers = {o.name: m for m in self.graph.walk() for o in m.outputs}
        for name in seen:
            t = self.types[name]
            p = producers.get(name)
            if name in weight_use:
                if len(weight_use[name]) > 1 or t.rank != 2 or t.dtype is not F32:
                    raise Reject(f"`{name}` is not one [out, in] or [in, out] weight")
                kind = "weight"
            elif p is not None and p.op is Op.CONST:
                kind = "scalar"
            else:
                if t.rank == 0 or t.dtype not in (F32, BOOL):
                    raise Reject(f"`{name}` is a {t} tensor operand")
                if not self._rows_ok(name):
                    raise Reject(f"`{name}` does not broadcast to the carried rows {list(self.rows)}")
                kind = "row"
            self.kinds[name] = kind
            self.operands.append(name)
        for n in self.nodes:                          # a weight is read by contractions only
            for i, name in enumerate(n.inputs):
                name = self.resolve(name)
                if self.kinds.get(name) == "weight" and not (n.op in (Op.LINEAR, Op.MATMUL) and i == 1):
                    raise Reject(f"the weight `{name}` is also read as an activation")
        for name in list(self.defs) + self.args:
            if self.types[name].rank and name not in self.kinds and not self._rows_ok(name):
                raise Reject(f"`{name}` {self.types[name]} mixes rows with the carried state")

    # -- pieces --------------------------------------------------------------------------------------
    def add(self, piece: Piece, key) -> int:
        self.pieces.append(piece)
        self.memo[key] = len(self.pieces) - 1
        return len(self.pieces) - 1

    def demand(self, name: str, off, w) -> int:
        """The piece of `name` for columns [off, off + w) (w = 0: a scalar), made on first demand."""
        name = self.resolve(name)
        off, w = _simp(off), _simp(w)
        key = (name, off, w)
        if key in self.memo:
            return self.memo[key]
        full = self.width_of(name)
        if name in self.args:
            if off != 0 or _simp(w - full) != 0:
                raise Reject("a slice of the carried state")
            self.width_index(w)
            i = self.args.index(name)
            pid = self.add(Piece("carry", w, index=i), key)
            self.carry_piece[i] = pid
            return pid
        kind = self.kinds.get(name)
        if kind == "scalar":
            return self.add(Piece("scalar", sympy.Integer(0), index=self.operands.index(name)), key)
        if kind == "row":
            if w != 0:
                self.width_index(w)
                self.size(off)
            return self.add(Piece("row", w, index=self.operands.index(name), off=off,
                                  dtype=self.types[name].dtype), key)
        if kind == "weight":
            raise Reject(f"the weight `{name}` is read as an activation")
        n = self.defs[name]
        if n.op is Op.CONST:
            v = n.attr("value")
            text = self.size(v, integer=False) if isinstance(v, sympy.Basic) else repr(float(v))
            return self.add(Piece("const", sympy.Integer(0), text=text), key)
        if n.op is Op.SLICE:
            return self.demand(n.inputs[0], _simp(n.attr("start")) + off, w)
        if n.op in (Op.LINEAR, Op.MATMUL):
            return self._dot(n, name, off, w, key)
        if n.op in NORM_OPS:
            if off != 0 or _simp(w - full) != 0:
                raise Reject(f"a slice of a `{n.op.value}`")
            ins = tuple(self.demand(i, 0, self.width_of(i)) for i in n.inputs)
            if any(self.pieces[p].width != w for p in ins):
                raise Reject(f"a `{n.op.value}` whose weight does not span its row")
            self.width_index(w)
            return self.add(Piece("norm", w, node=n, inputs=ins), key)
        ins = []
        for i in n.inputs:
            wi = self.width_of(i)
            if wi == 0:
                ins.append(self.demand(i, 0, 0))
            elif wi == 1 and w != 1:
                ins.append(self.demand(i, 0, 1))
            elif _simp(wi - full) == 0:
                ins.append(self.demand(i, off, w))
            else:
                raise Reject(f"`{i}` is {wi} wide where `{name}` is {full}")
        if w != 0:
            self.width_index(w)
        return self.add(Piece("elem", w, node=n, inputs=tuple(ins), dtype=n.out.type.dtype), key)

    def _dot(self, n: Node, name: str, off, w, key) -> int:
        x, wname = n.inputs[0], self.resolve(n.inputs[1])
        k = self.width_of(x)
        xp = self.demand(x, 0, k)
        if k == 1:
            raise Reject("a contraction over one feature")
        transposed = n.op is Op.MATMUL
        wt = self.types[wname]
        if _simp(wt.shape[0 if transposed else 1] - k) != 0:
            raise Reject(f"`{wname}` does not contract {k} features")
        self.width_index(k)
        self.width_index(w)
        self.size(off)
        wkey = (wname, off, w, "weight")
        if wkey in self.memo:
            wp = self.memo[wkey]
        else:
            wp = self.add(Piece("weight", w, index=self.operands.index(wname), off=off, k=k, transposed=transposed),
                          wkey)
        pid = self.add(Piece("dot", w, inputs=(xp, wp)), key if len(n.inputs) == 2 else (name, off, w, "dot"))
        if len(n.inputs) == 3:                      # + bias: its piece of the same columns
            bias = self.demand(n.inputs[2], off, w)
            add = Node.make(Op.ADD, [], [n.out])
            pid = self.add(Piece("elem", w, node=add, inputs=(pid, bias)), key)
        return pid

    def _check_leaves(self):
        """Pieces of one operand are equal or disjoint (their gradients are stored, not added)."""
        by_operand: dict[int, list[Piece]] = {}
        for p in self.pieces:
            if p.kind in ("row", "weight") and p.width != 0:
                by_operand.setdefault(p.index, []).append(p)
        for ps in by_operand.values():
            for a in range(len(ps)):
                for b in range(a + 1, len(ps)):
                    p, q = ps[a], ps[b]
                    if not (_nonnegative(q.off - p.off - p.width) or _nonnegative(p.off - q.off - q.width)):
                        raise Reject("overlapping column ranges of one operand")

    def _check_budget(self):
        total = 0
        for p in self.pieces:
            if p.kind == "weight":
                if not (p.width.is_Integer and p.k.is_Integer):
                    return                         # sized at run time: the launcher checks
                total += _pad(int(p.width)) * _pad(int(p.k))
        if total > MAX_WEIGHT:
            raise Reject(f"weights of {total} elements do not fit on chip (at most {MAX_WEIGHT})")


def _pad(n: int) -> int:
    return 1 if n == 1 else max(16, 1 << max(0, n - 1).bit_length())


# -- the family's hooks ---------------------------------------------------------------------------------


def analyse(node: Node, graph: Graph) -> Body | None:
    try:
        return Body(node, graph)
    except Reject:
        return None


def matches(node: Node, graph: Graph) -> bool:
    return node.op is Op.LOOP and analyse(node, graph) is not None


def operands(node: Node, graph: Graph) -> list[str]:
    """Value names the launcher takes after the initial carries (the loop's inputs)."""
    return list(node.inputs) + Body(node, graph).operands


def sizes(node: Node, graph: Graph) -> list[tuple[sympy.Expr, bool]]:
    """Expressions the launcher takes last: trip count, `grad last`, widths, offsets (z0, z1, ...)."""
    return list(Body(node, graph).sizes)


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    return f"{ks.name}({', '.join(args)})"


def guard(node: Node, ks: KernelSource, args: list[str]) -> str:
    """The condition under which the call replaces the loop (the weights fit on chip)."""
    return f"{ks.name}_fits({', '.join(args[ks.meta['tensors']:])})"


def generate(node: Node, graph: Graph) -> KernelSource:
    body = Body(node, graph)
    w = _Writer(body)
    spec = w.spec()
    name = kernel_name(FAMILY, (spec,))
    w.name = name
    src = w.source()
    doc = (f"{len(body.args)} carried value(s), {sum(p.kind == 'dot' for p in body.pieces)} contraction(s), "
           f"{len(body.nodes)} ops, every trip in one launch")
    return KernelSource(name=name, family=FAMILY, source=src, configs=CONFIGS, default=DEFAULT,
                        key=("R",), needs_grad=True, doc=f"recursion body: {doc}",
                        meta={"tensors": len(node.inputs) + len(body.operands), "sizes": len(body.sizes)})


# -- the kernel text --------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, body: Body):
        self.b = body
        self.name = "recursion_body"
        self.var: dict[int, str] = {}
        for pid, p in enumerate(body.pieces):
            self.var[pid] = f"c{p.index}" if p.kind == "carry" else p.text if p.kind == "const" else \
                f"s{p.index}" if p.kind == "scalar" else f"p{pid}"
        self.extra: dict[int, dict] = {}

    # -- names ----------------------------------------------------------------------------------------
    def j(self, w) -> int:
        return self.b.widths.index(_simp(w))

    def wtext(self, w) -> str:
        return self.b.size(w)

    def col(self, w) -> str:
        return f"cols{self.j(w)}"

    def cm(self, w) -> str:
        return f"cm{self.j(w)}"

    def off(self, p: Piece) -> str:
        t = self.b.size(p.off)
        return "" if t == "0" else f"{t} + "

    def spec(self) -> str:
        """What the kernel text depends on: the pieces, the operand kinds and the yields."""
        lines = [f"carries {len(self.b.args)} operands " + ",".join(self.b.kinds[o] for o in self.b.operands),
                 f"grad_last {self.b.node.attr('grad_last') is not None}",
                 "sizes " + ",".join(str(e) for e, _ in self.b.sizes)]
        for pid, p in enumerate(self.b.pieces):
            node = "" if p.node is None else f"{p.node.op.value} {sorted((a, str(v)) for a, v in p.node.attrs)}"
            lines.append(f"{pid} {p.kind} w={p.width} off={p.off} k={p.k} i={p.index} t={p.transposed} "
                         f"{p.dtype.value} {p.text} {node} {p.inputs}")
        lines.append(f"yield {self.b.results}")
        lines.append("ops " + "; ".join(f"{n.op.value}({','.join(n.inputs)})" for n in self.b.nodes))
        return "\n".join(lines)

    # -- forward ----------------------------------------------------------------------------------------
    def setup(self) -> list[str]:
        lines = []
        for j, w in enumerate(self.b.widths):
            lines += [f"cols{j} = tl.arange(0, BW{j})[None, :]", f"cm{j} = cols{j} < {self.wtext(w)}"]
        ks = sorted({self.j(p.k) for p in self.b.pieces if p.kind == "weight"})
        for j in ks:
            lines += [f"kr{j} = tl.arange(0, BW{j})[:, None]", f"km{j} = kr{j} < {self.wtext(self.b.widths[j])}"]
        return lines

    def weight_loads(self) -> list[str]:
        lines = []
        for pid, p in enumerate(self.b.pieces):
            if p.kind != "weight":
                continue
            i, jk, n = p.index, self.j(p.k), f"({self.off(p)}{self.col(p.width)})"
            addr = (f"kr{jk} * w{i}_s0 + {n} * w{i}_s1" if p.transposed else f"{n} * w{i}_s0 + kr{jk} * w{i}_s1")
            lines.append(f"p{pid} = tl.load(w{i}_ptr + {addr}, mask=km{jk} & {self.cm(p.width)}, other=0.0)")
        return lines

    def row_loads(self) -> list[str]:
        lines = []
        for pid, p in enumerate(self.b.pieces):
            if p.kind != "row":
                continue
            i = p.index
            if p.width == 0:
                lines.append(f"p{pid} = tl.load(x{i}_ptr)" + ("" if p.dtype is BOOL else ".to(tl.float32)"))
                continue
            cast = "" if p.dtype is BOOL else ".to(tl.float32)"
            other = "0" if p.dtype is BOOL else "0.0"
            lines.append(f"p{pid} = tl.load(x{i}_ptr + rows * x{i}_rs + ({self.off(p)}{self.col(p.width)}) * x{i}_cs, "
                         f"mask=rm & {self.cm(p.width)}, other={other}){cast}")
        return lines

    def carry_at(self, i: int) -> str:
        return self.wtext(self.b.width_of(self.b.args[i]))

    def row_sum(self, w):
        cm = self.cm(w)
        return lambda e: f"tl.sum(tl.where({cm}, {e}, 0.0), axis=1)[:, None]"

    def forward_lines(self) -> list[str]:
        lines = []
        for pid, p in enumerate(self.b.pieces):
            t = self.var[pid]
            ins = [self.var[q] for q in p.inputs]
            if p.kind == "dot":
                xp = self.b.pieces[p.inputs[0]]
                lines.append(f"{t} = tl.dot(tl.where({self.cm(xp.width)}, {ins[0]}, 0.0), {ins[1]}, "
                             f'input_precision="ieee")')
            elif p.kind == "norm":
                w = self.wtext(p.width)
                more, self.extra[pid] = fused_gen.norm_forward(p.node, t, ins, self.row_sum(p.width), w,
                                                               lambda e, cm=self.cm(p.width): f"tl.where({cm}, {e}, 0.0)")
                lines += more
            elif p.kind == "elem":
                lines.append(f"{t} = {self.elem(p, ins)}")
        return lines

    def elem(self, p: Piece, ins: list[str]) -> str:
        n = p.node
        if n.op is Op.CAST:
            src = self.b.pieces[p.inputs[0]].dtype
            to = n.out.type.dtype
            if to is BOOL:
                return f"{ins[0]} != 0"
            return f"({ins[0]}).to(tl.float32)" if src is BOOL else ins[0]
        if n.op is Op.POW:
            return f"{self.name}_pow({ins[0]}, {ins[1]})"
        if n.op is Op.TANH:
            return f"{self.name}_tanh({ins[0]})"
        return fused_gen._FWD[n.op](*ins)

    def tile(self, pid: int, w) -> str:
        v = self.var[pid]
        return v if self.b.pieces[pid].tile else f"({v} + tl.zeros((BLOCK_R, BW{self.j(w)}), tl.float32))"

    # -- backward ------------------------------------------------------------------------------------------
    def differentiable(self, pid: int) -> bool:
        p = self.b.pieces[pid]
        return p.tile and p.dtype is F32 and p.kind in ("carry", "row", "elem", "norm", "dot")

    def reverse_lines(self) -> tuple[list[str], dict[int, list[str]], list[str]]:
        """Reverse mode over one trip: lines, the adjoint terms left on leaves, weight-gradient updates."""
        adj: dict[int, list[str]] = {}
        for k, y in enumerate(self.b.results):
            if self.differentiable(y):
                adj.setdefault(y, []).append(f"g{k}")
        lines: list[str] = []
        wgrads: list[str] = []
        for pid in reversed(range(len(self.b.pieces))):
            p = self.b.pieces[pid]
            if p.kind not in ("elem", "norm", "dot"):
                continue
            terms = adj.pop(pid, None)
            if not terms:
                continue
            a = f"a{pid}"
            lines.append(f"{a} = {' + '.join(terms)}")
            for q, term in self.rule(pid, p, a, wgrads):
                if self.differentiable(q):
                    qp = self.b.pieces[q]
                    if qp.width == 1 and p.width != 1:              # broadcast over columns: sum back
                        term = f"tl.sum(tl.where({self.cm(p.width)}, {term}, 0.0), axis=1)[:, None]"
                    adj.setdefault(q, []).append(term)
        return lines, adj, wgrads

    def rule(self, pid: int, p: Piece, a: str, wgrads: list[str]) -> list[tuple[int, str]]:
        ins = [self.var[q] for q in p.inputs]
        if p.kind == "dot":
            xp, wp = p.inputs
            x = self.b.pieces[xp]
            cm_n, cm_k = self.cm(p.width), self.cm(x.width)
            wgrads.append(f"acc{wp} += tl.dot(tl.trans(tl.where(rm & {cm_k}, {ins[0]}, 0.0)), "
                          f'tl.where(rm & {cm_n}, {a}, 0.0), input_precision="ieee")')
            return [(xp, f'tl.dot(tl.where({cm_n}, {a}, 0.0), tl.trans({ins[1]}), input_precision="ieee")')]
        if p.kind == "norm":
            rules = fused_gen.norm_rule(p.node, a, ins, self.extra[pid], self.row_sum(p.width), self.wtext(p.width))
            return [(p.inputs[i], term) for i, term in rules]
        n = p.node
        y = self.var[pid]
        if n.op is Op.WHERE:
            return [(p.inputs[1], f"tl.where({ins[0]}, {a}, 0.0)"), (p.inputs[2], f"tl.where({ins[0]}, 0.0, {a})")]
        if n.op is Op.DETACH:
            return []
        if len(ins) == 1:
            term = fused_gen._adj_unary(n.op, a, ins[0], y)
            return [] if term is None else [(p.inputs[0], term)]
        ga, gb = fused_gen._adj_binary(n.op, a, ins[0], ins[1], y)
        out = []
        if ga is not None:
            out.append((p.inputs[0], ga.replace("POW(", f"{self.name}_pow(")))
        if gb is not None:
            out.append((p.inputs[1], gb))
        return out

    # -- kernels ---------------------------------------------------------------------------------------------
    def operand_params(self) -> list[str]:
        out = []
        for i, name in enumerate(self.b.operands):
            kind = self.b.kinds[name]
            out += ([f"s{i}"] if kind == "scalar" else [f"w{i}_ptr", f"w{i}_s0", f"w{i}_s1"] if kind == "weight"
                    else [f"x{i}_ptr", f"x{i}_rs", f"x{i}_cs"])
        return out

    def constexprs(self) -> list[str]:
        return [f"BW{j}: tl.constexpr" for j in range(len(self.b.widths))] + ["BLOCK_R: tl.constexpr"]

    def zs(self) -> list[str]:
        return [f"z{k}" for k in range(len(self.b.sizes))]

    def forward_kernel(self) -> list[str]:
        n_c = len(self.b.args)
        params = ([f"c{i}_ptr" for i in range(n_c)] + self.operand_params() + [f"y{i}_ptr" for i in range(n_c)]
                  + [f"st{i}_ptr" for i in range(n_c)] + ["R", "TRIPS", "FIRST"] + self.zs() + self.constexprs()
                  + ["SAVE: tl.constexpr"])
        body = ["rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64)",
                "rm = rows < R"] + self.setup() + self.weight_loads() + self.row_loads()
        loop = []
        for i in range(n_c):
            w, cols, cm = self.carry_at(i), self.col(self.b.width_of(self.b.args[i])), \
                self.cm(self.b.width_of(self.b.args[i]))
            body.append(f"c{i} = tl.load(c{i}_ptr + rows * {w} + {cols}, mask=rm & {cm}, other=0.0)")
            loop += ["if SAVE:",
                     f"    tl.store(st{i}_ptr + tl.maximum(t - FIRST, 0).to(tl.int64) * R * {w} + rows * {w} + {cols}, "
                     f"c{i}, mask=rm & {cm} & ((rows * 0 + t) >= FIRST))"]
        loop += self.forward_lines()
        for i, y in enumerate(self.b.results):
            loop.append(f"n{i} = {self.tile(y, self.b.width_of(self.b.args[i]))}")
        loop += [f"c{i} = n{i}" for i in range(n_c)]
        body += ["for t in range(TRIPS):"] + ["    " + line for line in loop]
        for i in range(n_c):
            w, cols, cm = self.carry_at(i), self.col(self.b.width_of(self.b.args[i])), \
                self.cm(self.b.width_of(self.b.args[i]))
            body.append(f"tl.store(y{i}_ptr + rows * {w} + {cols}, c{i}, mask=rm & {cm})")
        return (["@triton.jit", f"def {self.name}_fwd({', '.join(params)}):",
                 '    """Every trip of the loop for BLOCK_R rows; the weights stay in registers."""']
                + ["    " + line for line in body])

    def backward_kernel(self) -> list[str]:
        n_c = len(self.b.args)
        rows_grads = [pid for pid, p in enumerate(self.b.pieces) if p.kind == "row" and self.differentiable(pid)]
        weights = [pid for pid, p in enumerate(self.b.pieces) if p.kind == "weight"]
        grad_ops = sorted({self.b.pieces[pid].index for pid in rows_grads})
        grad_ws = sorted({self.b.pieces[pid].index for pid in weights})
        params = ([f"st{i}_ptr" for i in range(n_c)] + self.operand_params() + [f"g{i}_ptr" for i in range(n_c)]
                  + [f"dc{i}_ptr" for i in range(n_c)] + [f"dx{i}_ptr" for i in grad_ops]
                  + [p for i in grad_ws for p in (f"dw{i}_ptr", f"dw{i}_sp", f"dw{i}_s0", f"dw{i}_s1")]
                  + ["R", "S", "NPROG"] + self.zs() + self.constexprs())
        fwd = self.forward_lines()
        rev, adj, wgrads = self.reverse_lines()
        trip = []
        for i in range(n_c):
            w = self.b.width_of(self.b.args[i])
            trip.append(f"c{i} = tl.load(st{i}_ptr + t.to(tl.int64) * R * {self.carry_at(i)} + rows * "
                        f"{self.carry_at(i)} + {self.col(w)}, mask=rm & {self.cm(w)}, other=0.0)")
        trip += fwd + rev + wgrads
        for pid in rows_grads:
            if adj.get(pid):
                trip.append(f"acc{pid} += tl.where(rm & {self.cm(self.b.pieces[pid].width)}, "
                            f"{' + '.join(adj[pid])}, 0.0)")
        for i in range(n_c):
            pid = self.b.carry_piece.get(i)
            terms = adj.get(pid) if pid is not None else None
            w = self.b.width_of(self.b.args[i])
            trip.append(f"ng{i} = {' + '.join(terms)}" if terms else
                        f"ng{i} = tl.zeros((BLOCK_R, BW{self.j(w)}), tl.float32)")
        trip += [f"g{i} = ng{i}" for i in range(n_c)]
        keep = [f"g{i}" for i in range(n_c)] + [f"acc{pid}" for pid in rows_grads + weights]
        trip = fused_gen._drop_unused(trip + [f"KEEP({', '.join(keep)})"])[:-1]
        trip = ["t = S - 1 - tt"] + trip
        block = ["rows = (rb * BLOCK_R + tl.arange(0, BLOCK_R))[:, None].to(tl.int64)", "rm = rows < R"]
        block += self.row_loads()
        block += [f"acc{pid} = tl.zeros((BLOCK_R, BW{self.j(self.b.pieces[pid].width)}), tl.float32)"
                  for pid in rows_grads]
        for i in range(n_c):
            w = self.b.width_of(self.b.args[i])
            block.append(f"g{i} = tl.load(g{i}_ptr + rows * {self.carry_at(i)} + {self.col(w)}, "
                         f"mask=rm & {self.cm(w)}, other=0.0)")
        block += ["for tt in range(S):"] + ["    " + line for line in trip]
        for i in range(n_c):
            w = self.b.width_of(self.b.args[i])
            block.append(f"tl.store(dc{i}_ptr + rows * {self.carry_at(i)} + {self.col(w)}, g{i}, "
                         f"mask=rm & {self.cm(w)})")
        for pid in rows_grads:
            p = self.b.pieces[pid]
            wfull = self.wtext(self.b.width_of(self.b.operands[p.index]))
            block.append(f"tl.store(dx{p.index}_ptr + rows * {wfull} + {self.off(p)}{self.col(p.width)}, acc{pid}, "
                         f"mask=rm & {self.cm(p.width)})")
        body = ["pid = tl.program_id(0)"] + self.setup() + self.weight_loads()
        for pid in weights:
            p = self.b.pieces[pid]
            body.append(f"acc{pid} = tl.zeros((BW{self.j(p.k)}, BW{self.j(p.width)}), tl.float32)")
        body += ["for rb in range(pid, tl.cdiv(R, BLOCK_R), NPROG):"] + ["    " + line for line in block]
        for pid in weights:
            p = self.b.pieces[pid]
            i, jk, n = p.index, self.j(p.k), f"({self.off(p)}{self.col(p.width)})"
            addr = (f"kr{jk} * dw{i}_s0 + {n} * dw{i}_s1" if p.transposed else f"{n} * dw{i}_s0 + kr{jk} * dw{i}_s1")
            body.append(f"tl.store(dw{i}_ptr + pid * dw{i}_sp + {addr}, acc{pid}, mask=km{jk} & {self.cm(p.width)})")
        return (["@triton.jit", f"def {self.name}_bwd({', '.join(params)}):",
                 '    """The trips in reverse for row blocks pid, pid + NPROG, ...: recompute, then reverse mode."""']
                + ["    " + line for line in body])

    # -- launcher -------------------------------------------------------------------------------------------
    def torch_step(self, sig: list[str]) -> list[str]:
        """One trip in torch (the differentiable backward's forward)."""
        b = self.b
        var = {a: f"c{i}" for i, a in enumerate(b.args)}
        for i, name in enumerate(b.operands):
            var[name] = f"s{i}" if b.kinds[name] == "scalar" else f"w{i}" if b.kinds[name] == "weight" else f"x{i}"
        exprs = {e: f"z{k}" for k, (e, _) in enumerate(b.sizes)}
        nodes = [n for n in b.nodes if n.out.name not in var]
        scalars = {f"s{i}" for i, name in enumerate(b.operands) if b.kinds[name] == "scalar"}
        names = _AliasVars(var, b)
        lines = torch_text.statements(nodes, names, scalars, b.types, exprs)
        outs = ", ".join(names[y] for y in b.node.regions[0].results)
        return ([f"def {self.name}_step({', '.join(sig)}):",
                 '    """One trip of the loop body as torch ops."""']
                + ["    " + line for line in lines] + [f"    return {outs}" + ("," if len(b.args) == 1 else "")])

    def source(self) -> str:
        b = self.b
        name, const = self.name, self.name.upper()
        n_c = len(b.args)
        inits = [f"c{i}" for i in range(n_c)]
        ops = [f"s{i}" if b.kinds[o] == "scalar" else f"w{i}" if b.kinds[o] == "weight" else f"x{i}"
               for i, o in enumerate(b.operands)]
        zs = self.zs()
        sig = inits + ops + zs
        uses = {p.node.op for p in b.pieces if p.node is not None}
        out = fused_gen.helper_source(name, Op.POW in uses, Op.TANH in uses)
        out += self.forward_kernel() + ["", ""] + self.backward_kernel() + ["", ""]
        # sizes the launcher derives from the z arguments
        trips = b.size(b.node.attr("trips"))
        first = f"max(0, {trips} - {b.size(b.node.attr('grad_last'))})" if b.node.attr("grad_last") is not None else "0"
        out += [f"{const}_CONFIGS = {list(CONFIGS)!r}",
                f"{const}_DEFAULT = {DEFAULT!r}",
                f"{const}_MAX_WIDTH = {MAX_WIDTH}",
                f"{const}_MAX_WEIGHT = {MAX_WEIGHT}", "", ""]
        out += [f"def {name}_widths({', '.join(zs)}):",
                '    """The feature widths of the body, in the kernels\' BW order."""',
                f"    return ({', '.join(self.wtext(w) for w in b.widths)},)", "", ""]
        weights = [p for p in b.pieces if p.kind == "weight"]
        tiles = Counter((self.wtext(p.width), self.wtext(p.k)) for p in weights)
        pad = "max(16, triton.next_power_of_2({}))"
        wsum = " + ".join(f"{'' if c == 1 else f'{c} * '}{pad.format(n)} * {pad.format(k)}"
                          for (n, k), c in sorted(tiles.items())) or "0"
        out += [f"def {name}_fits({', '.join(zs)}):",
                f'    """True when every feature width is at most {MAX_WIDTH} and the weight tiles hold at most '
                f'{MAX_WEIGHT} elements."""',
                f"    if max({name}_widths({', '.join(zs)})) > {const}_MAX_WIDTH:",
                "        return False",
                f"    return {wsum} <= {const}_MAX_WEIGHT", "", ""]
        out += self.torch_step(sig) + ["", ""]
        grad = "grad = torch.is_grad_enabled()"
        loop_body = [f"{', '.join(inits)}, = {name}_step({', '.join(sig)})"]
        if b.node.attr("grad_last") is not None:
            loop_body = [f"with torch.set_grad_enabled(grad and t >= {first}):"] + ["    " + x for x in loop_body]
        out += [f"def {name}_torch({', '.join(sig)}):",
                '    """The whole loop as torch ops, as the PyTorch backend runs it (the differentiable backward)."""']
        if b.node.attr("grad_last") is not None:
            out.append(f"    {grad}")
        out += [f"    for t in range({trips}):"] + ["        " + x for x in loop_body]
        out += [f"    return {', '.join(inits)}" + ("," if n_c == 1 else ""), "", ""]
        # forward run
        out += [f"def {name}_views({', '.join(sig)}):",
                '    """Kernel arguments: rows R, the carries as [R, w], each operand addressed as rows x columns."""',
                "    lead = c0.shape[:-1]",
                "    R = lead.numel()"]
        for i in range(n_c):
            out.append(f"    i{i} = c{i}.reshape(R, {self.carry_at(i)}).float().contiguous()")
        args = []
        for i, o in enumerate(b.operands):
            kind = b.kinds[o]
            if kind == "scalar":
                args.append(f"s{i}")
            elif kind == "weight":
                out.append(f"    v{i} = w{i}.float()")
                args += [f"v{i}", f"v{i}.stride(0)", f"v{i}.stride(1)"]
            else:
                out.append(f"    v{i} = rows_view(x{i}, lead + ({self.wtext(b.width_of(o))},))")
                args += [f"v{i}[0]", f"v{i}[1]", f"v{i}[2]"]
        out += [f"    return lead, R, {_tuple([f'i{i}' for i in range(n_c)])}, {_tuple(args)}", "", ""]
        out += [f"def {name}_meta(cfg, widths):",
                '    """Launch meta-parameters: a block size per width, the row block, warps and stages."""',
                '    meta = {f"BW{j}": 1 if w == 1 else max(16, triton.next_power_of_2(w)) for j, w in enumerate(widths)}',
                '    return {**meta, "BLOCK_R": cfg["BLOCK_R"], "num_warps": cfg["num_warps"], '
                '"num_stages": cfg["num_stages"]}', "", ""]
        out += [f"def {name}_config(kernel, sizes, config, run):",
                "    if config is not None:",
                "        return dict(config)",
                f"    return _tune.config(kernel, sizes, {const}_DEFAULT, {const}_CONFIGS, run)", "", ""]
        widths_call = f"{name}_widths({', '.join(zs)})"
        fwd_args = ", ".join(["*inits", "*args", "*ys", "*sts", "R", "trips", "first"] + zs)
        out += [f"def {name}_run({', '.join(sig)}, save=False, config=None):",
                '    """The forward kernel: every trip in one launch. Returns the results (and the saved states)."""',
                f"    lead, R, inits, args = {name}_views({', '.join(sig)})",
                f"    widths = {widths_call}",
                f"    trips, first = {trips}, {first}",
                "    ys = tuple(torch.empty_like(i) for i in inits)",
                "    sts = tuple(torch.empty((max(0, trips - first),) + i.shape, device=i.device) if save else i "
                "for i in inits)",
                "    if R:",
                "        def run(cfg):",
                "            grid = (triton.cdiv(R, cfg[\"BLOCK_R\"]),)",
                f"            {name}_fwd[grid]({fwd_args}, SAVE=save, **{name}_meta(cfg, widths))",
                "",
                f"        run({name}_config({name!r}, (R,) + widths, config, run))",
                "    return tuple(y.reshape(lead + y.shape[-1:]) for y in ys), sts", "", ""]
        # backward run
        grad_ops = sorted({p.index for pid, p in enumerate(b.pieces) if p.kind == "row" and self.differentiable(pid)})
        grad_ws = sorted({p.index for p in weights})
        out += [f"def {name}_grads({', '.join(sig)}, sts, gs, config=None):",
                '    """The backward kernel: gradients of the carries\' initial values and of every operand."""',
                f"    lead, R, inits, args = {name}_views({', '.join(sig)})",
                f"    widths = {widths_call}",
                f"    trips, first = {trips}, {first}",
                "    dev = c0.device",
                "    gys = tuple(g.reshape(i.shape).float().contiguous() for g, i in zip(gs, inits))",
                "    dcs = tuple(torch.empty_like(i) for i in inits)"]
        for i in grad_ops:
            out.append(f"    dx{i} = torch.zeros((R, {self.wtext(b.width_of(b.operands[i]))}), device=dev)")
        out += ['    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1',
                "",
                "    def run(cfg):",
                '        nprog = max(1, min(triton.cdiv(R, cfg["BLOCK_R"]), 4 * sms))']
        for i in grad_ws:
            out.append(f"        dw{i} = torch.zeros((nprog,) + tuple(w{i}.shape), device=dev)")
        dxs = [f"dx{i}" for i in grad_ops]
        dws = [a for i in grad_ws for a in (f"dw{i}", f"dw{i}.stride(0)", f"dw{i}.stride(1)", f"dw{i}.stride(2)")]
        bwd_args = ", ".join(["*sts", "*args", "*gys", "*dcs"] + dxs + dws + ["R", "trips - first", "nprog"] + zs)
        out += [f"        {name}_bwd[(nprog,)]({bwd_args}, **{name}_meta(cfg, widths))",
                f"        return {_tuple([f'dw{i}' for i in grad_ws])}",
                "",
                f"    dws = run({name}_config({name + '_bwd'!r}, (R,) + widths, config, run)) if R else "
                f"{_tuple([f'torch.zeros((1,) + tuple(w{i}.shape), device=dev)' for i in grad_ws])}"]
        rets = [f"dcs[{i}].reshape(c{i}.shape).to(c{i}.dtype) if first == 0 else None" for i in range(n_c)]
        for i, o in enumerate(b.operands):
            if i in grad_ops:
                rets.append(f"dx{i}.reshape(lead + ({self.wtext(b.width_of(o))},)).sum_to_size(x{i}.shape).to(x{i}.dtype)")
            elif i in grad_ws:
                rets.append(f"dws[{grad_ws.index(i)}].sum(0).to(w{i}.dtype)")
            else:
                rets.append("None")
        rets += ["None"] * len(zs)
        out += [f"    return {_tuple(rets)}", "", ""]
        # autograd
        out += [f"class {name}_fn(torch.autograd.Function):",
                '    """Forward and backward kernels of the whole recursion."""', "",
                "    @staticmethod",
                "    def forward(ctx, config, *args):",
                f"        outs, sts = {name}_run(*args, save=True, config=config)",
                "        ctx.config, ctx.n_args = config, len(args)",
                "        ctx.scalars = tuple(None if torch.is_tensor(a) else a for a in args)",
                "        ctx.save_for_backward(*[a for a in args if torch.is_tensor(a)], *sts)",
                "        return outs", "",
                "    @staticmethod",
                "    def backward(ctx, *gs):",
                "        saved = iter(ctx.saved_tensors)",
                "        args = tuple(next(saved) if s is None else s for s in ctx.scalars)",
                "        sts = tuple(saved)",
                "        if torch.is_grad_enabled():      # create_graph: autograd through the loop's torch form",
                f"            return (None,) + torch_backward({name}_torch, args, gs)",
                f"        grads = {name}_grads(*args, sts, gs, config=ctx.config)",
                "        return (None,) + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:]))",
                "", ""]
        doc = (f"loop of {len(b.nodes)} per-token ops over {n_c} carried value(s), all trips in one launch "
               f"(z0 = trips)")
        tensors = " or ".join(f"{a}.requires_grad" for a in inits + ops if not a.startswith("s"))
        one = "[0]" if n_c == 1 else ""
        out += [f"def {name}({', '.join(sig)}, config=None):",
                f'    """{doc}."""',
                f"    if torch.is_grad_enabled() and ({tensors}):",
                f"        outs = {name}_fn.apply(config, {', '.join(sig)})",
                "    else:",
                f"        outs = {name}_run({', '.join(sig)}, config=config)[0]",
                f"    return outs{one}"]
        return "\n".join(out) + "\n"


def _tuple(items: list[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


class _AliasVars(dict):
    """Python names of body values for the torch step: fused results read through their yields."""

    def __init__(self, var: dict, body: Body):
        super().__init__(var)
        self.body = body

    def __missing__(self, key):
        target = self.body.resolve(key)
        if target != key and target in self:
            return self[target]
        raise KeyError(key)

