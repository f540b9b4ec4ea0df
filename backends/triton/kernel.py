"""The contract between the Triton backend's emitter and the kernel generators it calls.

A *kernel family* (one module under `archc.backends.triton.families`, or the fused-region
generator) turns one IR node -- or one fusion region -- into a `KernelSource`: Python source text
holding one or more `@triton.jit` kernels specialised for that node (its dtypes, static sizes,
gates, loss, mask kind...), a launcher function the generated module calls, and, where the op
needs gradients, a `torch.autograd.Function` whose `apply` the launcher uses. The emitter pastes
the source into the generated module (deduplicated by `name`), so a generated module is standalone
apart from `torch` and `triton` (and `archc.backends.triton.autotune` for the per-GPU cache).

Rules for generators:
- the source is deterministic (same node, byte-identical text) and never contains text taken
  from a .arch file other than through `archc.backends.pyexpr` / sanitised identifiers;
- `name` is a legal Python identifier derived from the family and a short hash of the spec, so two
  nodes with the same spec share one kernel;
- `configs` is the autotuning space: a tuple of dicts of meta-parameters (block sizes as
  `BLOCK_*`, plus `num_warps` and `num_stages`); `default` is one of them, used when the
  per-GPU cache has no entry; `key` names the launcher arguments whose sizes form the shape bucket;
- every kernel runs under `TRITON_INTERPRET=1` on the CPU, and is tested there against the IR
  interpreter (forward and, where it has one, backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from archc.ir.core import Graph, Node


@dataclass(frozen=True)
class KernelSource:
    name: str                               # the launcher's Python name in the generated module
    family: str                             # e.g. "fused", "gated_scan", "memory_update"
    source: str                             # kernels + launcher (+ autograd.Function), Python text
    configs: tuple[dict[str, Any], ...]     # the autotuning space
    default: dict[str, Any]                 # used when the per-GPU cache has no entry
    key: tuple[str, ...] = ()               # launcher arguments whose shapes pick the shape bucket
    needs_grad: bool = False                # True when the source defines a backward
    doc: str = ""                           # one line for the generated module and `autotune --show`
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


class Family(Protocol):
    """What a module under `archc.backends.triton.families` exports."""

    FAMILY: str

    def matches(self, node: Node, graph: Graph) -> bool:
        """True when this family can generate a kernel for `node`."""

    def generate(self, node: Node, graph: Graph) -> KernelSource:
        """The kernel source for `node` (called only when `matches` is true)."""

    def call(self, node: Node, ks: KernelSource, args: list[str]) -> str:
        """A Python expression calling the launcher on the emitted argument names, with the
        same result (value or tuple of values) as the IR node."""
