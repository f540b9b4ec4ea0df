"""The ONNX backend: archc IR -> ONNX (opset 18) built with the `onnx` package's helpers.

    from archc.backends.onnx import export_forward, export_decode, seeded_weights, session
    fwd = export_forward(graph, seeded_weights(graph))       # Exported(model, kind, runtime_symbols)
    sess = session(fwd.model)                                # onnxruntime, CUDA when installed

Loops stay loops (`Loop` with the region as its body, so the node count does not grow with the
recursion count, which may be a graph input), halting is a `Loop` condition, routing is
TopK/GatherElements/ScatterElements, and the neural memory's inner gradient step is written out as
ONNX ops. See SPEC.md §21.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from archc.backends.onnx.export import (
    OPSET,
    Exported,
    decode_kind,
    export_decode,
    export_forward,
    runtime_symbols,
)
from archc.ir.core import Graph

from archc.errors import ArchError


def weights_from_state_dict(g: Graph, state: dict) -> dict[str, np.ndarray]:
    """IR-named float32 arrays from a state_dict keyed by IR names or generated-module keys."""
    from archc.backends.torch import state_key
    out: dict[str, np.ndarray] = {}
    missing = []
    for p in g.params:
        key = p.name if p.name in state else state_key(p.name)
        if key not in state:
            missing.append(p.name)
            continue
        t = state[key]
        arr = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
        out[p.name] = arr
    if missing:
        raise ArchError(f"the weights of `{g.name}` lack {len(missing)} parameter(s): {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""),
                        hint="a state_dict of the generated PyTorch module (archc compile --target torch) has every key")
    known = {p.name for p in g.params} | {state_key(p.name) for p in g.params}
    extra = sorted(k for k in state if k not in known)
    if extra:
        raise ArchError(f"the weights hold {len(extra)} key(s) `{g.name}` does not have: {', '.join(extra[:5])}")
    return out


def check_shapes(g: Graph, weights: dict[str, np.ndarray], bindings: dict[str, Any] | None = None) -> None:
    from archc.ir.interpret import Env, resolve_bindings
    env = Env(resolve_bindings(g, bindings))
    for p in g.params:
        want = tuple(env.eval_int(d) for d in p.type.shape)
        if tuple(weights[p.name].shape) != want:
            raise ArchError(f"weights for `{p.name}` have shape {list(weights[p.name].shape)}, expected {list(want)}",
                            hint="pass the architecture parameters the weights were trained with (--set NAME=VALUE)")


def load_weights(g: Graph, path: str | Path, bindings: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Weights from a `torch.save`d state_dict (or a module's state_dict saved whole)."""
    import torch
    p = Path(path)
    if not p.is_file():
        raise ArchError(f"no such weights file: {path}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad weights file
        raise ArchError(f"cannot read weights from {path}: {type(err).__name__}: {str(err).splitlines()[0]}",
                        hint="save them with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise ArchError(f"{path} does not hold a state_dict (got {type(state).__name__})",
                        hint="save them with torch.save(model.state_dict(), path)")
    weights = weights_from_state_dict(g, state)
    check_shapes(g, weights, bindings)
    return weights


def seeded_weights(g: Graph, bindings: dict[str, Any] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights of the generated PyTorch module built under `torch.manual_seed(seed)`."""
    import torch
    from archc.backends.torch import generate
    code = generate([g]).source
    namespace: dict[str, Any] = {}
    exec(compile(code, f"<archc:{g.name}>", "exec"), namespace)   # archc's own generated code
    symbols = {s.name for s in g.symbols if s.kind != "dim"}
    kwargs = {k: v for k, v in (bindings or {}).items() if k in symbols}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = namespace[g.name](**kwargs)
    return weights_from_state_dict(g, module.state_dict())


def providers() -> list[str]:
    """onnxruntime execution providers to use: CUDA first when onnxruntime-gpu provides it."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(model, threads: int | None = None):
    """An onnxruntime InferenceSession for a ModelProto, serialized bytes or a path."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3          # runtime parameters are initializers that are also inputs, on purpose
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=providers())


__all__ = ["OPSET", "Exported", "check_shapes", "decode_kind", "export_decode", "export_forward", "load_weights",
           "providers", "runtime_symbols", "seeded_weights", "session", "weights_from_state_dict"]
