"""The Python API: parse, check, lower .arch sources; load stdlib models by name."""
from __future__ import annotations

from pathlib import Path

from archc.dsl.ast import Module
from archc.dsl.lower import lower_module
from archc.dsl.parse import parse as _parse
from archc.ir.core import Graph


def _read(path_or_source: str | Path) -> tuple[str | bytes, str]:
    p = Path(path_or_source) if not (isinstance(path_or_source, str) and "\n" in path_or_source) else None
    if p is not None and p.suffix == ".arch" and p.exists():
        return p.read_bytes(), str(p)
    if isinstance(path_or_source, str) and "\n" not in path_or_source and path_or_source.endswith(".arch"):
        from archc.errors import ArchError
        raise ArchError(f"no such file: {path_or_source}")
    return str(path_or_source), "<string>"


def parse(path_or_source: str | Path, file: str | None = None) -> Module:
    src, name = _read(path_or_source)
    return _parse(src, file or name)


def lower(path_or_source: str | Path, file: str | None = None) -> list[Graph]:
    """Parse and lower every `arch` in a file or source string to IR graphs (checked)."""
    return lower_module(parse(path_or_source, file))


def check(path_or_source: str | Path, file: str | None = None) -> list[Graph]:
    """Lower and verify; raises ArchError on the first problem."""
    from archc.ir.interpret import resolve_bindings
    from archc.ir.verify import verify
    graphs = lower(path_or_source, file)
    for g in graphs:
        verify(g, resolve_bindings(g))     # symbolic checks, then again at the default sizes
    return graphs


def load_ir(path_or_source: str | Path, arch: str | None = None) -> Graph:
    """The IR graph of one architecture in a file (the only one, or the one named `arch`)."""
    graphs = lower(path_or_source)
    if arch is None:
        if len(graphs) > 1:
            from archc.errors import ArchError
            raise ArchError(f"this file defines {len(graphs)} architectures ({', '.join(g.name for g in graphs)}); "
                            "name one")
        return graphs[0]
    for g in graphs:
        if g.name == arch:
            return g
    from archc.errors import ArchError
    raise ArchError(f"no architecture named `{arch}`; this file defines {', '.join(g.name for g in graphs)}")


# -- backends ------------------------------------------------------------------------------------

import hashlib as _hashlib
import linecache as _linecache
import types as _types
from dataclasses import dataclass as _dataclass

_MODULE_CACHE: dict[str, _types.ModuleType] = {}
TARGETS = ("torch", "triton")


@_dataclass(frozen=True)
class Compiled:
    """What `archc.compile` returns: the generated source and the IR it came from."""

    source: str
    graphs: tuple[Graph, ...]
    target: str
    class_names: tuple[str, ...] = ()     # the generated class of each graph (the arch name unless reserved)


def compile(path_or_source: str | Path, target: str = "torch",  # noqa: A001 - the API's name
            optimize=None, recur_blocks: int | None = None, recur_order: str = "sequence") -> Compiled:
    """Check a .arch file, apply `optimize` (a Graph -> Graph pipeline) to each graph, generate code for `target`.

    `recur_blocks=k` first re-expresses each stack of L distinct layers as k blocks applied
    recurrently (the `recur-blocks` pass; it changes the model, SPEC.md §18).
    `target="triton"` also runs the `fuse-elementwise` pass last (it is idempotent), so that the
    module's fusion regions become generated kernels whatever pipeline was asked for.
    """
    if target not in TARGETS:
        from archc.errors import ArchError
        raise ArchError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    graphs = check(path_or_source)
    if recur_blocks is not None:
        from archc.passes.recur_blocks import recur_blocks as recur
        graphs = [recur(g, k=recur_blocks, order=recur_order) for g in graphs]
    if optimize is not None:
        graphs = [optimize(g) for g in graphs]
    if target == "triton":
        from archc.backends.triton.emit import generate
        from archc.passes.fuse_elementwise import fuse_elementwise
        graphs = [fuse_elementwise(g) for g in graphs]
    else:
        from archc.backends.torch import generate
    src, name = _read(path_or_source)
    gen = generate(graphs, source_file=name if name != "<string>" else "")
    return Compiled(gen.source, tuple(graphs), target, gen.class_names)


def load_module(path_or_source: str | Path, target: str = "torch") -> _types.ModuleType:
    """The generated module for a source and target, compiled in memory, cached on its content hash."""
    src, name = _read(path_or_source)
    raw = src if isinstance(src, bytes) else src.encode()
    key = _hashlib.sha256(raw + name.encode() + target.encode()).hexdigest()[:16]
    if key not in _MODULE_CACHE:
        compiled = compile(path_or_source, target=target)
        mod = exec_module(compiled.source, f"<archc:{Path(name).name}:{key}>", f"archc_generated_{key}")
        # architecture name -> class (an arch named like a keyword or import has a renamed class)
        mod.__archc_classes__ = {g.name: getattr(mod, c) for g, c in zip(compiled.graphs, compiled.class_names)}
        _MODULE_CACHE[key] = mod
    return _MODULE_CACHE[key]


def exec_module(code: str, filename: str, module_name: str) -> _types.ModuleType:
    """Execute generated source as a module whose source `inspect` can read (Triton's jit needs it)."""
    mod = _types.ModuleType(module_name)
    mod.__file__ = filename
    # register the source so tracebacks and inspect show the generated lines
    _linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exec(__import__("builtins").compile(code, filename, "exec"), mod.__dict__)
    return mod


def load(path_or_source: str | Path, arch: str | None = None, target: str = "torch", **overrides):
    """The generated nn.Module class of one architecture (`target` torch or triton); with overrides, an instance."""
    mod = load_module(path_or_source, target)
    graphs = [g for g in check(path_or_source)] if arch is None else None
    names = [g.name for g in graphs] if graphs is not None else [arch]
    if arch is None:
        if len(names) > 1:
            from archc.errors import ArchError
            raise ArchError(f"this file defines {len(names)} architectures ({', '.join(names)}); pass arch=...")
        arch = names[0]
    cls = mod.__archc_classes__.get(arch)
    if cls is None:
        from archc.errors import ArchError
        raise ArchError(f"no architecture named `{arch}`")
    return cls(**overrides) if overrides else cls


# -- ONNX and MLIR ---------------------------------------------------------------------------------


@_dataclass(frozen=True)
class OnnxExport:
    """One architecture exported to ONNX: the forward graph and, for language models, the decode step."""

    graph: Graph
    forward: object            # archc.backends.onnx.Exported
    decode: object | None


def _chosen(path_or_source, arch: str | None, optimize) -> list[Graph]:
    from archc.errors import ArchError
    graphs = check(path_or_source)
    if arch is not None:
        graphs = [g for g in graphs if g.name == arch]
        if not graphs:
            raise ArchError(f"no architecture named `{arch}`; this file defines "
                            + ", ".join(g.name for g in check(path_or_source)))
    return [optimize(g) for g in graphs] if optimize is not None else graphs


def export_onnx(path_or_source: str | Path, arch: str | None = None, weights=None, bindings: dict | None = None,
                seed: int = 0, static: bool = False, optimize=None) -> list[OnnxExport]:
    """ONNX models for the architectures of a .arch file (SPEC.md §21).

    `weights`: a path to a saved state_dict, a state_dict, or None for the generated module's
    initialisation under `torch.manual_seed(seed)`. `bindings` fix architecture parameters (and
    dims). Loop trip counts that no weight depends on become int64 graph inputs unless `static`.
    """
    from archc.backends.onnx import (check_shapes, export_decode, export_forward, load_weights, seeded_weights,
                                     weights_from_state_dict)
    from archc.backends.onnx.export import cache_rewrite
    from archc.errors import ArchError
    graphs = _chosen(path_or_source, arch, optimize)
    if weights is not None and len(graphs) > 1:
        raise ArchError(f"this file defines {len(graphs)} architectures ({', '.join(g.name for g in graphs)}); "
                        "weights belong to one of them", hint="choose it with --arch")
    out = []
    for g in graphs:
        if weights is None:
            w = seeded_weights(g, bindings, seed)
        elif isinstance(weights, (str, Path)):
            w = load_weights(g, weights, bindings)
        else:
            w = weights_from_state_dict(g, weights)
            check_shapes(g, w, bindings)
        runtime = [] if static else None
        # a model whose decode cache is rewritten (rewrite_kv) gets the forward graph only, with a note
        decode = None if cache_rewrite(g) is not None else export_decode(g, w, bindings, runtime)
        out.append(OnnxExport(g, export_forward(g, w, bindings, runtime), decode))
    return out
