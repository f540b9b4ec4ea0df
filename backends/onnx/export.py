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
from archc.ir.shapes import DType, TensorType, as_expr, expr_str
from onnx import helper

from archc.errors import ArchError

OPSET = 18
IR_VERSION = 9


@dataclass(frozen=True)
class Exported:
    """One exported ONNX model and what a caller needs to feed it."""

    model: onnx.ModelProto
    kind: str                          # "forward" | "kv_decode" | "state_decode" | "recompute_decode"
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


_STATE_OPS = (Op.SCAN, Op.LINEAR_SCAN, Op.LINEAR_ATTN)


def _cached_instances(g: Graph) -> list[tuple[Node, list[Node]]]:
    """What the decode step caches, in program order, with the enclosing region ops (outermost first):
    attend nodes outside scan bodies, scans (not their bodies: they run as in the forward), and
    linear_scan / linear_attn."""
    out = []

    def walk(r: Region, stack: list[Node]):
        for n in r.nodes:
            if n.op is Op.ATTEND or n.op in _STATE_OPS:
                out.append((n, list(stack)))
            if n.op is not Op.SCAN:
                for sub in n.regions:
                    walk(sub, stack + [n])
    walk(g.body, [])
    return out


def _unsupported_sharing(g: Graph) -> str | None:
    """K/V sharing a decode-step graph does not express (None: none, or only what it expresses:
    `share_kv(source = ...)` / `stochastic_share` between attention sites both outside scan bodies or
    both inside, and shared K/V values that `insert-kv-sharing` made data flow)."""
    outside = {n.attr("site") for n, _ in _cached_instances(g) if n.op is Op.ATTEND}
    for n in g.walk():
        if n.op is Op.KV_READ:
            return "`kv_read` (K/V recorded elsewhere in the forward)"
        share = n.attr("kv_share") if n.op is Op.ATTEND else None
        if share and share.startswith("recursion:"):
            return "K/V shared across a recursion (-O2's insert-kv-sharing turns it into data flow)"
        if share and (n.attr("site") in outside) != (share.split(":")[-1] in outside):
            return "K/V shared between a scan's body and the rest of the model"
    return None


def step_blocker(g: Graph) -> str | None:
    """Why a cached decode-step graph (kv_decode / state_decode) cannot express `g`'s step although
    the PyTorch module may have one (None: it can): K/V sharing it does not express, or a cache
    under a region op other than `repeat` (a `route_mask` body runs per sample on the tokens it
    selects, so each sample would cache a different number of positions)."""
    why = _unsupported_sharing(g)
    if why is not None:
        return why
    for n, stack in _cached_instances(g):
        bad = next((s for s in stack if s.op not in (Op.LOOP, Op.FUSED)), None)
        if bad is not None:
            at = f" at line {n.span.line}" if n.span else ""
            return f"`{n.op.value}`{at} keeps a cache inside `{bad.op.value}`"
    return None


def decode_kind(g: Graph, state: bool = True) -> str | None:
    """Which decode-step graph `g` gets (SPEC §21.4): "kv_decode", "state_decode", "recompute_decode",
    or None (not a language model). `state=False` gives the models with recurrent state the
    recompute graph instead of "state_decode"."""
    from archc.ir.analysis import decode_blocker, kv_decode_blocker, lm_token_input
    if lm_token_input(g) is None:
        return None
    if step_blocker(g) is not None:
        return "recompute_decode"
    kv_blocked = kv_decode_blocker(g)
    if kv_blocked is None and _attention_instances(g):
        return "kv_decode"
    if state and kv_blocked is not None and decode_blocker(g) is None:
        return "state_decode"
    return "recompute_decode"


KINDS = ("kv_decode", "state_decode", "recompute_decode")


def export_decode(g: Graph, weights: dict[str, np.ndarray], bindings: dict[str, Any] | None = None,
                  runtime: list[str] | None = None, kind: str | None = None) -> Exported | None:
    """The decode-step graph of a language model (None for other graphs); see SPEC.md §21.4.

    `kind` (default `decode_kind(g)`) may ask for "recompute_decode" for any language model, or for
    the cached graph `decode_kind` picks ("kv_decode" or "state_decode")."""
    rewrite = cache_rewrite(g)
    if rewrite is not None:
        raise ArchError(f"cannot export a decode-step graph of `{g.name}`: {_REWRITE_REFUSAL}", rewrite.span,
                        hint="export the forward graph only (archc.api.export_onnx does this for such models)")
    best = decode_kind(g)
    if best is None:
        return None
    kind = best if kind is None else kind
    if kind not in KINDS:
        raise ArchError(f"unknown decode-step graph kind `{kind}`", hint="one of " + ", ".join(KINDS))
    if kind != "recompute_decode" and kind != best:
        raise ArchError(f"`{g.name}` has no `{kind}` graph: its cached decode step is `{best}`",
                        hint="ask for recompute_decode, which every language model has")
    if kind == "recompute_decode":
        return _recompute_decode(g, weights, bindings or {}, runtime_symbols(g) if runtime is None else runtime)
    return _cached_decode(g, weights, bindings or {}, kind)


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


def _cached_decode(g: Graph, weights, bindings, kind: str) -> Exported:
    """tokens [B, T] + the caches -> outputs for the new tokens + the updated caches (SPEC §21.4).

    kv_decode: per attention node, past K/V. state_decode adds `past.length` (tokens so far) and,
    per scan, its committed carries and open segment, per linear_scan / linear_attn its state.
    Caches inside `repeat` loops are stacked over the trip counts (outermost first).
    """
    from archc.backends.onnx.state import scan_key
    state = kind == "state_decode"
    mm = _Model(g, weights, bindings, [], "kv_decode")
    lw = mm.lw
    (tok,) = g.inputs
    B = tok.type.shape[0]
    new = mm.add_input(tok.name, tok.type)
    mm.bind_dims(new, tok.type)
    present_dims: dict[str, list] = {}

    def cache_input(name: str, dtype: DType, dims: list, out_dims: list | None = None) -> str:
        present_dims["present" + name[len("past"):]] = dims if out_dims is None else out_dims
        return mm.add_input(name, TensorType(dtype, ()), dims=dims)

    if state:
        lw.past_length = cache_input("past.length", DType.I64, [])
        lw.started = mm.top.op("Greater", lw.past_length, mm.ex.i64(0), name="started")
    instances = _cached_instances(g)
    n_scans = sum(1 for n, _ in instances if n.op is Op.SCAN)
    seen: dict[str, int] = {}
    owners: dict[tuple[str, str], tuple[str, list[Node]]] = {}    # (K, V) IR values -> the attend caching them
    for n, stack in instances:
        if any(s.op not in (Op.LOOP, Op.FUSED) for s in stack):
            raise ArchError(f"the decode graph caches {'attention' if n.op is Op.ATTEND else n.op.value} inside "
                            "`repeat` loops only", n.span)
        trips = [mm.ex.static_int(s.attr("trips"), "a loop trip count around a decode cache", s.span)
                 for s in stack if s.op is Op.LOOP]
        if n.op is Op.ATTEND:
            if n.attr("kv_share"):
                continue                                 # reads its source's cache (share_kv source / stochastic)
            owner = owners.get((n.inputs[1], n.inputs[2]))
            if owner is not None and [id(s) for s in owner[1]] == [id(s) for s in stack[:len(owner[1])]]:
                lw.kv_owner[n.out.name] = owner[0]       # the same K/V values, visible here: one cache
                continue
            owners.setdefault((n.inputs[1], n.inputs[2]), (n.out.name, stack))
            site = n.attr("site") or n.out.name
            seen[site] = seen.get(site, 0) + 1
            base = site if seen[site] == 1 else f"{site}#{seen[site]}"
            k_type, v_type = lw.types[n.inputs[1]], lw.types[n.inputs[2]]
            dims_k = trips + [str(B), "P"] + _dims(k_type, mm.static)[2:]
            dims_v = trips + [str(B), "P"] + _dims(v_type, mm.static)[2:]
            after = len(trips) + 1
            pk = cache_input(f"past.{base}.key", k_type.dtype, dims_k, dims_k[:after] + ["P + T"] + dims_k[after + 1:])
            pv = cache_input(f"past.{base}.value", v_type.dtype, dims_v, dims_v[:after] + ["P + T"] + dims_v[after + 1:])
            lw.cache_inputs[n.out.name] = (pk, pv)
            lw.cache_names[n.out.name] = base
            if lw.past_length is None:
                lw.past_length = mm.top.dim(pk, after)
            continue
        key = scan_key(n)
        base = key
        lw.cache_names[key] = base
        if n.op is Op.SCAN:
            nc = len(n.inputs) - 1
            past = [cache_input(f"past.{base}.carry{i}", o.type.dtype, trips + _dims(o.type, mm.static))
                    for i, o in enumerate(n.outputs[:nc])]
            x_type = lw.types[n.inputs[0]]
            R = "R" if n_scans == 1 else f"R{len([k for k in present_dims if k.endswith('.rest')])}"
            dims = trips + [str(B), R] + _dims(x_type, mm.static)[2:]
            past.append(cache_input(f"past.{base}.rest", x_type.dtype, dims,
                                    trips + [str(B), R + "'"] + _dims(x_type, mm.static)[2:]))
            lw.state_inputs[key] = past
        else:
            t = n.outputs[1].type if n.op is Op.LINEAR_ATTN else n.out.type
            dims = _dims(t, mm.static)
            if n.op is Op.LINEAR_SCAN:
                dims = dims[:1] + dims[2:]               # the state of the last position: [B, ...]
            lw.state_inputs[key] = [cache_input(f"past.{base}.state", t.dtype, trips + dims)]
    T = mm.top.dim(new, 1)
    if lw.past_length is not None:
        rng = mm.top.op("Range", lw.past_length, mm.top.op("Add", lw.past_length, T), mm.ex.i64(1), name="positions")
        lw.positions = mm.top.op("Unsqueeze", rng, mm.ex.i64([0]), name="positions")
    results = lw.region(mm.top, g.body, [new])
    for name, value, ir in zip(g.output_names, results, g.body.results):
        mm.add_output(name, value, lw.types[ir])
    for name, value, elem, rank in lw.exports:
        mm.add_output(name, value, elem=elem, dims=present_dims[name])
    if state:
        mm.add_output("present.length", mm.top.op("Add", lw.past_length, T, name="length"), elem=I64, dims=[])
    lossy = sorted({p.kind for p in g.policies if p.kind in ("prune_key_channels", "topk_decode")})
    notes = tuple(f"the decode graph's cache keeps every key at full width: the `{k}` policy (a decode-time policy of "
                  "the PyTorch module) is not applied, so outputs equal the full forward's" for k in lossy)
    doc = ("attention reads and extends explicit K/V caches" if not state else
           "attention K/V, segment scans' carries and open segments, and recurrences' states are explicit caches")
    return mm.model(kind, f"archc decode step of {g.name}: {doc}", notes)
