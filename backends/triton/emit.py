"""`--target triton`: the PyTorch module of `backends/torch.py` whose hot regions call generated kernels.

The module is the torch backend's module (same class, parameters, state_dict, decoding), except:

* every `fused` region (from the `fuse-elementwise` pass) becomes one call of its generated
  launcher (`fused.generate`): forward and backward Triton kernels behind a
  `torch.autograd.Function`;
* every node some kernel family matches (`archc.backends.triton.families`, see kernel.py)
  becomes a call of that family's launcher (`matches` / `call`);
* a region node a family matches with `region_matches` (route_topk) keeps its region in torch
  while the family's launchers do the token gather (`gather_call`) and the write-back (`call`);
* in the K/V-cached decode step (prefill/decode), an attention site a family matches with
  `matches_cached` calls `call_cached` instead of `cache.attend`; the step's other nodes follow
  the rules above except that plain `matches` families stay out (the step runs without autograd
  concerns, but the cache, not the node, owns K/V there);
* everything else stays torch.

Kernel sources are pasted in once each (deduplicated by name), after the runtime helpers. The
module imports torch, triton, triton.language and `archc.backends.triton.autotune` (the per-GPU
configuration cache). Families are discovered at generation time: modules of the `families`
package exporting FAMILY, matches, generate and call, tried in module-name order.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field

from archc.backends.torch import GeneratedCode, _Emitter, generate as torch_generate
from archc.backends.triton import fused as fused_gen
from archc.backends.triton import runtime as triton_runtime
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node
from archc.ir.ops import Op

IMPORTS = ("import triton", "import triton.language as tl", "from archc.backends.triton import autotune as _tune")
_GLOBALS = {"triton", "tl", "_tune", "rows_view", "rows_cols", "broadcast_shape", "torch_backward"}


def families() -> list:
    """The kernel-family modules present, in module-name order."""
    from archc.backends.triton import families as pkg
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if all(hasattr(mod, a) for a in ("FAMILY", "matches", "generate", "call")):
            found.append(mod)
    return found


@dataclass
class Plan:
    """Which kernel each node uses, decided before any code is emitted (so names are reserved).

    A node's entry is (family, kernel source, how): how is "node" (the launcher replaces the node),
    "region" (route_topk: gather and write-back launchers around the region) or "cached" (the
    K/V-cached step's attention).
    """

    kernels: dict[str, KernelSource] = field(default_factory=dict)      # by launcher name, in order
    by_node: dict[tuple[str, int, bool], tuple[object, KernelSource, str]] = field(default_factory=dict)

    def add(self, g: Graph, n: Node, family, ks: KernelSource, how: str = "node") -> None:
        self.kernels.setdefault(ks.name, ks)
        self.by_node[(g.name, id(n), how == "cached")] = (family, ks, how)

    def lookup(self, g: Graph, n: Node, cached: bool = False):
        return self.by_node.get((g.name, id(n), cached))


def _has_kv_step(g: Graph) -> bool:
    from archc.ir.analysis import kv_decode_blocker, lm_token_input
    return lm_token_input(g) is not None and kv_decode_blocker(g) is None


def plan(graphs: list[Graph], fams: list | None = None) -> Plan:
    fams = families() if fams is None else fams
    p = Plan()
    for g in graphs:
        kv_step = _has_kv_step(g)
        for n in g.walk():
            if n.op is Op.FUSED:
                if any(not o.scalar for o in fused_gen.operands(n, g)):
                    p.add(g, n, fused_gen, fused_gen.generate(n, g))
                continue
            for fam in fams:
                if fam.matches(n, g):
                    p.add(g, n, fam, fam.generate(n, g))
                    break
                if n.regions and getattr(fam, "region_matches", None) and fam.region_matches(n, g):
                    p.add(g, n, fam, fam.generate(n, g), "region")
                    break
            if kv_step:
                for fam in fams:
                    if getattr(fam, "matches_cached", None) and fam.matches_cached(n, g):
                        p.add(g, n, fam, fam.generate(n, g), "cached")
                        break
    return p


class TritonEmitter(_Emitter):
    """The torch emitter with kernel calls for planned nodes."""

    def __init__(self, g: Graph, plan: Plan, cached: bool = False):
        super().__init__(g, cached=cached, taken=set(plan.kernels) | _GLOBALS |
                         {f"{k}_{suffix}" for k in plan.kernels for suffix in ("fn", "run", "launch", "fwd", "bwd")})
        self.plan = plan
        self.kernels_used: set[str] = set()

    def node(self, n: Node, indent: int):
        hit = self.plan.lookup(self.g, n)
        if hit is None or hit[2] == "region" or (self.cached and hit[0] is not fused_gen):
            return super().node(n, indent)
        family, ks, _ = hit
        self.kernels_used.add(ks.name)
        if family is fused_gen:
            args = [self.v(o.name) for o in fused_gen.operands(n, self.g)]
            expr = f"{ks.name}({', '.join(args)})"
        elif hasattr(family, "operands"):        # a region node: the values its body reads, then sizes
            names = family.operands(n, self.g)
            for m in (m for r in n.regions for m in r.walk()):
                if m.op in (Op.PARAM, Op.FULL) and m.out.name in names:
                    super().node(m, indent)     # weights and fills the body reads: bound before the call
            args = [self.v(i) for i in names] + [self.e(e, integer) for e, integer in family.sizes(n, self.g)]
            expr = family.call(n, ks, args)
        else:
            expr = family.call(n, ks, [self.v(i) for i in n.inputs])
        outs = [self.v(o.name) if o.name in self.read or len(n.outputs) == 1 else "_" for o in n.outputs]
        line = f"{', '.join(outs)} = {expr}" + ("  # " + ks.doc if ks.doc else "")
        if getattr(family, "guard", None) is None:
            self.out(line, indent)
            return
        self.out(f"if {family.guard(n, ks, args)}:", indent)      # else: the node's own code
        self.out(line, indent + 1)
        self.out("else:", indent)
        super().node(n, indent + 1)

    def _region_hit(self, n: Node):
        hit = self.plan.lookup(self.g, n)
        if hit is not None and hit[2] == "region":
            self.kernels_used.add(hit[1].name)
            return hit
        return None

    def route_gather(self, n: Node, x: str, pos: str) -> str:
        hit = self._region_hit(n)
        return hit[0].gather_call(n, hit[1], [x, pos]) if hit else super().route_gather(n, x, pos)

    def route_scatter(self, n: Node, args: list[str]) -> str:
        hit = self._region_hit(n)
        if not hit:
            return super().route_scatter(n, args)
        x, pos, xs, y, weight, among = args
        gates = ([weight] if n.attr("has_weight") else []) + ([among] if n.attr("has_among") else [])
        return hit[0].call(n, hit[1], [x, pos, xs, y, *gates])

    def cached_attend(self, n: Node, args: list[str]) -> str:
        hit = self.plan.lookup(self.g, n, cached=True)
        if hit is None:
            return super().cached_attend(n, args)
        self.kernels_used.add(hit[1].name)
        return hit[0].call_cached(n, hit[1], args)


def generate(graphs: list[Graph], source_file: str = "", doc: str = "", fams: list | None = None) -> GeneratedCode:
    """The `--target triton` module for `graphs` (deterministic text)."""
    p = plan(graphs, fams)
    runtime = [inspect.getsource(fn).rstrip() for fn in
               (triton_runtime.rows_cols, triton_runtime.broadcast_shape, triton_runtime.rows_view,
                triton_runtime.torch_backward)]
    load = "_tune.load()  # this GPU's tuned kernel configurations (kernels without an entry use their default)"
    prelude = tuple(runtime + [load] + [ks.source for ks in p.kernels.values()])   # a def first: ruff I001
    return torch_generate(graphs, source_file, doc,
                          make_emitter=lambda g, cached=False: TritonEmitter(g, p, cached),
                          imports=IMPORTS, prelude=prelude)
