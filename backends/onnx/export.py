"""Assembling ONNX models from IR graphs: the forward graph and the decode-step graph.

Graph inputs are the IR inputs (named, with dims `B`, `T`, ... as symbolic axes), plus one int64
scalar per *runtime* architecture parameter (a loop trip count such as `steps` or `n_r` that no
weight shape depends on): its default is an initializer of the same name, so a session may feed a
different recursion count without re-exporting. Weights are initializers named by their IR
parameter names (`core.attn.q.weight`). Outputs carry the architecture's output names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import sympy
from archc.backends.onnx.builder import ELEM, F32, I64, Exporter, Scope, value_info
from archc.backends.onnx.lower import Lowerer
from archc.ir.core import Graph, Node, Region
from archc.ir.interpret import resolve_bindings
from archc.ir.ops import Op
from archc.ir.shapes import TensorType, as_expr, expr_str
from onnx import helper

from archc.errors import ArchError

OPSET = 18
IR_VERSION = 9


@dataclass(frozen=True)
class Exported:
    """One exported ONNX model and what a caller needs to feed it."""

    model: onnx.ModelProto
    kind: str                          # "forward" | "kv_decode" | "recompute_decode"
    runtime_symbols: tuple[str, ...]   # int64 scalar inputs with defaults (recursion counts)
    notes: tuple[str, ...] = ()        # what a user should know about this graph (printed by the CLI)


def runtime_symbols(g: Graph) -> list[str]:
    """Integer parameters that only count loop trips: they can be graph inputs (no weight depends on them)."""
    counts = set()
    for n in g.walk():
        if n.op in (Op.LOOP, Op.HALT_LOOP):
            t = as_expr(n.attr("trips"))          # `n_r`, or `n_r - 1` once a pass peeled a trip
            if isinstance(t, sympy.Basic):
                counts |= {s.name for s in t.free_symbols}
    fixed: set[str] = set()
    for p in g.params:
        for e in (*p.type.shape, as_expr(p.copies), *(v for _, v in p.init_args)):
            if isinstance(e, sympy.Basic):
                fixed |= {s.name for s in e.free_symbols}
    for s in g.symbols:
        if isinstance(s.default, sympy.Basic):
            fixed |= {x.name for x in s.default.free_symbols}
    return [s.name for s in g.symbols if s.kind == "int" and s.name in counts and s.name not in fixed]


def _dims(t: TensorType, static: dict[str, Any]) -> list:
    out = []
    for d in t.shape:
        v = d.xreplace({sympy.Symbol(k): sympy.sympify(x) for k, x in static.items()}) if isinstance(d, sympy.Basic) else d
        out.append(int(v) if (isinstance(v, sympy.Basic) and v.is_Integer) else expr_str(v))
    return out


class _Model:
    """The main graph of one export: inputs, weights, runtime parameters, outputs."""

    def __init__(self, g: Graph, weights: dict[str, np.ndarray], bindings: dict[str, Any], runtime: list[str], mode: str):
        self.g = g
        self.values = resolve_bindings(g, bindings)
        self.static = {k: v for k, v in self.values.items() if k not in runtime}
        self.runtime = runtime
        self.ex = Exporter(self.static)
        self.lw = Lowerer(g, self.ex, mode)
        self.top: Scope = self.ex.top
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        for name in g.output_names:
            self.ex.names.reserve(name)
        for p in g.params:
            if p.name not in weights:
                raise ArchError(f"no weights for parameter `{p.name}`")
            self.ex.initializer(p.name, np.ascontiguousarray(weights[p.name], dtype=np.float32))

    def add_input(self, hint: str, t: TensorType, dims=None) -> str:
        name = self.ex.names.fresh(hint)
        self.inputs.append(value_info(name, ELEM[t.dtype], t.rank, dims=dims if dims is not None else _dims(t, self.static)))
        self.top.produced.add(name)
        return name

    def bind_dims(self, value: str, t: TensorType) -> None:
        """Dimension symbols of an input read, when needed, from its shape."""
        for i, d in enumerate(t.shape):
            if isinstance(d, sympy.Symbol) and d.name not in self.static and d.name not in self.ex.lazy:
                self.ex.lazy[d.name] = (lambda v=value, axis=i: self.top.dim(v, axis))

    def add_runtime_symbols(self) -> None:
        for s in self.runtime:
            name = self.ex.names.fresh(s)
            self.inputs.append(helper.make_tensor_value_info(name, I64, []))
            self.ex.initializers.append(onnx.numpy_helper.from_array(np.array(int(self.values[s]), np.int64), name))
            self.top.syms[s] = name

    def add_output(self, name: str, value: str, t: TensorType | None = None, elem: int = F32, dims=None) -> None:
        self.top.nodes.append(helper.make_node("Identity", [value], [name], name=name))
        self.top.computed.add(name)
        if t is not None:
            elem, dims = ELEM[t.dtype], _dims(t, self.static)
        self.outputs.append(value_info(name, elem, None, dims=dims))

    def model(self, kind: str, doc: str, notes: tuple[str, ...] = ()) -> Exported:
        graph = helper.make_graph(self.top.nodes, self.g.name, self.inputs, self.outputs,
                                  initializer=self.ex.initializers, doc_string=doc)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="archc",
                              ir_version=IR_VERSION, doc_string=self.g.doc)
        meta = {"archc.arch": self.g.name, "archc.kind": kind, "archc.runtime_parameters": ",".join(self.runtime),
                "archc.parameters": ", ".join(f"{k}={v}" for k, v in self.values.items())}
        helper.set_model_props(m, meta)
        notes = tuple(notes) + tuple(dict.fromkeys(self.lw.notes))      # what the lowering had to say, once each
        return Exported(m, kind, tuple(self.runtime), notes)


def export_forward(g: Graph, weights: dict[str, np.ndarray], bindings: dict[str, Any] | None = None,
                   runtime: list[str] | None = None) -> Exported:
    """The full forward pass of `g` as one ONNX model."""
    runtime = runtime_symbols(g) if runtime is None else runtime
    mm = _Model(g, weights, bindings or {}, runtime, "forward")
    args = []
    for a in g.inputs:
        name = mm.add_input(a.name, a.type)
        mm.bind_dims(name, a.type)
        args.append(name)
    mm.add_runtime_symbols()
    results = mm.lw.region(mm.top, g.body, args)
    for name, value, ir in zip(g.output_names, results, g.body.results):
        mm.add_output(name, value, mm.lw.types[ir])
    notes = (f"no decode-step graph: {_REWRITE_REFUSAL}",) if cache_rewrite(g) is not None else ()
    return mm.model("forward", f"archc forward graph of {g.name}", notes)


# -- decoding ---------------------------------------------------------------------------------------

_REWRITE_REFUSAL = ("the `rewrite_kv` policy rewrites the decode cache with a processor network after every "
                    "delimiter token (data-dependent, per sample), which a decode-step graph does not express; "
                    "decode with the PyTorch module's prefill/decode (the forward graph is the backbone)")


def cache_rewrite(g: Graph):
    """The graph's `rewrite_kv` policy, if any: its decode runs in the PyTorch runtime only (SPEC §21.4)."""
    return next((p for p in g.policies if p.kind == "rewrite_kv"), None)


def _attention_instances(g: Graph) -> list[tuple[Node, list[Node]]]:
    """Every attend node with its enclosing region ops (outermost first)."""
    out = []

    def walk(r: Region, stack: list[Node]):
        for n in r.nodes:
            if n.op is Op.ATTEND:
                out.append((n, list(stack)))
            for sub in n.regions:
                walk(sub, stack + [n])
    walk(g.body, [])
    return out


def decode_kind(g: Graph) -> str | None:
    """Which decode-step graph `g` gets: "kv_decode", "recompute_decode", or None (not a language model)."""
    from archc.ir.analysis import kv_decode_blocker, lm_token_input
    if lm_token_input(g) is None:
        return None
    sites = _attention_instances(g)
    shares = any(n.attr("kv_share") for n, _ in sites) or any(n.op is Op.KV_READ for n in g.walk())
    if kv_decode_blocker(g) is None and sites and not shares:
        return "kv_decode"
    return "recompute_decode"


def export_decode(g: Graph, weights: dict[str, np.ndarray], bindings: dict[str, Any] | None = None,
                  runtime: list[str] | None = None) -> Exported | None:
    """The decode-step graph of a language model (None for other graphs); see SPEC.md §21."""
    rewrite = cache_rewrite(g)
    if rewrite is not None:
        raise ArchError(f"cannot export a decode-step graph of `{g.name}`: {_REWRITE_REFUSAL}", rewrite.span,
                        hint="export the forward graph only (archc.api.export_onnx does this for such models)")
    kind = decode_kind(g)
    if kind is None:
        return None
    if kind == "kv_decode":
        return _kv_decode(g, weights, bindings or {})
    return _recompute_decode(g, weights, bindings or {}, runtime_symbols(g) if runtime is None else runtime)


def _recompute_decode(g: Graph, weights, bindings, runtime) -> Exported:
    """tokens [B, T] + past_tokens [B, P] -> outputs at the new positions + present_tokens [B, P + T]."""
    mm = _Model(g, weights, bindings, runtime, "forward")
    (tok,) = g.inputs
    B, T = tok.type.shape
    new = mm.add_input(tok.name, tok.type)
    past = mm.add_input("past_tokens", tok.type, dims=[str(B), "P"])
    mm.add_runtime_symbols()
    full = mm.top.op("Concat", past, new, name="all_tokens", axis=1)
    mm.bind_dims(full, tok.type)
    start = mm.top.op("Unsqueeze", mm.top.dim(past, 1), mm.ex.i64([0]), name="past_length")
    results = mm.lw.region(mm.top, g.body, [full])
    for name, value, ir in zip(g.output_names, results, g.body.results):
        t = mm.lw.types[ir]
        if t.rank >= 2 and t.shape[1] == T:         # per-position outputs: only the new positions
            value = mm.top.op("Slice", value, start, mm.ex.i64([np.iinfo(np.int64).max]), mm.ex.i64([1]), name=name)
        mm.add_output(name, value, t)
    mm.add_output("present_tokens", full, elem=I64, dims=[str(B), "P + T"])
    return mm.model("recompute_decode", f"archc decode step of {g.name}: recomputes over the token history")


def _kv_decode(g: Graph, weights, bindings) -> Exported:
    """tokens [B, T] + per-attention past K/V -> outputs for the new tokens + present K/V."""
    mm = _Model(g, weights, bindings, [], "kv_decode")
    (tok,) = g.inputs
    B = tok.type.shape[0]
    new = mm.add_input(tok.name, tok.type)
    mm.bind_dims(new, tok.type)
    seen: dict[str, int] = {}
    for n, stack in _attention_instances(g):
        if any(s.op is not Op.LOOP for s in stack):
            raise ArchError("the K/V decode graph caches attention inside `repeat` loops only", n.span)
        trips = [mm.ex.static_int(s.attr("trips"), "a loop trip count around attention", s.span) for s in stack]
        site = n.attr("site") or n.out.name
        seen[site] = seen.get(site, 0) + 1
        base = site if seen[site] == 1 else f"{site}#{seen[site]}"
        k_type, v_type = mm.lw.types[n.inputs[1]], mm.lw.types[n.inputs[2]]
        dims_k = trips + [str(B), "P"] + _dims(k_type, mm.static)[2:]
        dims_v = trips + [str(B), "P"] + _dims(v_type, mm.static)[2:]
        pk = mm.add_input(f"past.{base}.key", TensorType(k_type.dtype, ()), dims=dims_k)
        pv = mm.add_input(f"past.{base}.value", TensorType(v_type.dtype, ()), dims=dims_v)
        mm.lw.cache_inputs[n.out.name] = (pk, pv)
        mm.lw.cache_names[n.out.name] = base
        if mm.lw.past_length is None:
            mm.lw.past_length = mm.top.dim(pk, len(trips) + 1)
    T = mm.top.dim(new, 1)
    rng = mm.top.op("Range", mm.lw.past_length, mm.top.op("Add", mm.lw.past_length, T), mm.ex.i64(1), name="positions")
    mm.lw.positions = mm.top.op("Unsqueeze", rng, mm.ex.i64([0]), name="positions")
    results = mm.lw.region(mm.top, g.body, [new])
    for name, value, ir in zip(g.output_names, results, g.body.results):
        mm.add_output(name, value, mm.lw.types[ir])
    for name, value, elem, rank in mm.lw.exports:
        past = next(i for i in mm.inputs if i.name == name.replace("present.", "past.", 1))
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in past.type.tensor_type.shape.dim]
        dims[-3] = "P + T"
        mm.add_output(name, value, elem=elem, dims=dims)
    lossy = sorted({p.kind for p in g.policies if p.kind in ("prune_key_channels", "topk_decode")})
    notes = tuple(f"the decode graph's cache keeps every key at full width: the `{k}` policy (a decode-time policy of "
                  "the PyTorch module) is not applied, so outputs equal the full forward's" for k in lossy)
    return mm.model("kv_decode", f"archc decode step of {g.name}: attention reads and extends explicit K/V caches", notes)
