"""The MLIR backend: the generated PyTorch module, exported with `torch.export` and imported by
torch-mlir's FX importer into the `torch`, `linalg` (linalg-on-tensors) or `stablehlo` dialect.

torch.export traces one call, so the MLIR has the static shapes of the example inputs it is traced
with (B = 2 and a sequence length that fits every scan, or `--set B=... --set T=...`) and loops
unrolled at their trip counts. Ops whose generated code torch.export cannot trace are refused up
front with a diagnostic that names the op and its source line (`UNTRACEABLE`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from archc.ir.core import Graph
from archc.ir.ops import Op

from archc.errors import ArchError

DIALECTS = {"torch": "torch", "linalg": "linalg-on-tensors", "stablehlo": "stablehlo"}

#: ops whose PyTorch form torch.export cannot trace, and why
UNTRACEABLE = {
    Op.HALT_LOOP: "its per-sample early exit (`if halted.all(): break`) is data-dependent control flow",
    Op.ROUTE_MASK: "it runs each sample on a data-dependent number of tokens (`nonzero`), a shape torch.export "
                   "cannot specialise",
}

INSTALL_HINT = ("install torch-mlir from PyPI: pip install 'archc[mlir]' (wheels for Linux x86-64; it imports "
                "alongside torch 2.13 CPU), or use --target onnx")


def torch_mlir_available() -> str | None:
    """None when torch-mlir's FX importer imports, else why not."""
    try:
        from torch_mlir import fx  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"{type(err).__name__}: {err}"
    return None


def untraceable(g: Graph):
    """The first node torch.export cannot trace, with the reason (or None)."""
    for n in g.walk():
        if n.op in UNTRACEABLE:
            return n, UNTRACEABLE[n.op]
    return None


def export_mlir(path_or_source: str | Path, dialect: str = "torch", arch: str | None = None, weights=None,
                bindings: dict[str, Any] | None = None, seed: int = 0, optimize=None, generic: bool = False) -> str:
    """MLIR text of one architecture of a .arch file, through torch-mlir (SPEC.md §21).

    `generic` prints every op in MLIR's generic form, which any MLIR parser reads back even
    without the dialect registered (torch-mlir's Python bindings do not register stablehlo).
    """
    if dialect not in DIALECTS:
        raise ArchError(f"unknown MLIR dialect `{dialect}`; choose one of {', '.join(DIALECTS)}")
    why = torch_mlir_available()
    if why is not None:
        raise ArchError(f"--target mlir needs torch-mlir, which cannot be imported here ({why})", hint=INSTALL_HINT)
    from archc.api import _chosen
    graphs = _chosen(path_or_source, arch, optimize)
    if len(graphs) > 1:
        raise ArchError(f"this file defines {len(graphs)} architectures ({', '.join(g.name for g in graphs)}); "
                        "MLIR is written for one", hint="choose it with --arch")
    (g,) = graphs
    bad = untraceable(g)
    if bad is not None:
        node, reason = bad
        raise ArchError(f"torch-mlir cannot import `{g.name}`: op `{node.op.value}` cannot be traced by torch.export: "
                        f"{reason}", node.span, hint="--target onnx exports it (ONNX has real control flow)")
    return _import(g, DIALECTS[dialect], weights, bindings or {}, seed, generic)


def _module(g: Graph, weights, bindings: dict[str, Any], seed: int):
    """The generated nn.Module for `g` with the given parameters and weights, in eval mode."""
    import torch
    from archc.backends.onnx import load_weights, weights_from_state_dict
    from archc.backends.torch import generate, state_key
    namespace: dict[str, Any] = {}
    exec(compile(generate([g]).source, f"<archc:{g.name}>", "exec"), namespace)   # archc's own generated code
    symbols = {s.name for s in g.symbols if s.kind != "dim"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = namespace[g.name](**{k: v for k, v in bindings.items() if k in symbols})
    if weights is not None:
        w = load_weights(g, weights, bindings) if isinstance(weights, (str, Path)) else weights_from_state_dict(g, weights)
        module.load_state_dict({state_key(k): torch.from_numpy(v) for k, v in w.items()})
    return module.eval()


def _import(g: Graph, output_type: str, weights, bindings: dict[str, Any], seed: int, generic: bool) -> str:
    import warnings

    import torch
    from torch_mlir import fx

    from archc.testing import example_inputs
    module = _module(g, weights, bindings, seed)
    dims = {k: v for k, v in bindings.items() if k in ("B", "T")}
    inputs = example_inputs(g, {k: v for k, v in bindings.items() if k not in dims}, batch=int(dims.get("B", 2)),
                            seq=int(dims["T"]) if "T" in dims else None)
    args = [inputs[a.name] for a in g.inputs]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlir = fx.export_and_import(module, *args, output_type=output_type, func_name=g.name)
    except Exception as err:  # noqa: BLE001 - torch.export and the importer raise many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ArchError(f"torch-mlir could not import `{g.name}` ({output_type}): {type(err).__name__}: {first[:300]}",
                        hint="--target onnx supports every archc op") from None
    return mlir.operation.get_asm(print_generic_op_form=generic) if generic else str(mlir)
