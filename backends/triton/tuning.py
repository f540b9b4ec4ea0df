"""`archc autotune FILE`: run each architecture on this GPU, timing every configuration of every kernel.

The model is compiled for `--target triton` at -O2, instantiated with the `--set` parameters and
run once forward (and backward) on random inputs inside a dry `autotune.Session`, which counts the
(kernel, shape bucket) pairs met; a second run inside a real session times each configuration
(`triton.testing.do_bench`, median) behind a progress bar, and the fastest per pair is written to
this device's cache file.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from archc.errors import ArchError


def require_gpu() -> dict[str, str]:
    """This device's cache key, or a clear error when there is nothing to tune for."""
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ArchError("archc autotune times kernels on a GPU; TRITON_INTERPRET=1 runs them on the CPU",
                        hint="unset TRITON_INTERPRET")
    try:
        import torch
    except ImportError:                      # pragma: no cover - torch is a dependency
        raise ArchError("archc autotune needs torch") from None
    if not torch.cuda.is_available():
        raise ArchError("archc autotune needs a CUDA GPU, and this machine has none "
                        f"(torch {torch.__version__}: torch.cuda.is_available() is False)",
                        hint="run it on the machine the model will run on; without a cache entry, generated "
                             "kernels use their default configuration")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ArchError("archc autotune needs Triton", hint="pip install 'archc[triton]'") from None
    from archc.backends.triton.autotune import device_key
    key = device_key()
    if key is None:                          # pragma: no cover - cuda available implies a key
        raise ArchError("archc autotune could not identify the GPU")
    return key


def tune_file(path: str, arch: str | None, bindings: dict[str, Any], backward: bool,
              echo: Callable[[str], None] = print) -> None:
    key = require_gpu()
    import click
    import torch

    from archc import api
    from archc.backends.triton import autotune as tune
    from archc.passes import PRESETS, run_pipeline
    from archc.testing import example_inputs

    compiled = api.compile(path, target="triton", optimize=lambda g: run_pipeline(g, PRESETS["O2"]))
    mod = api.exec_module(compiled.source, f"<archc-autotune:{path}>", "archc_autotune")
    graphs = [g for g in compiled.graphs if arch is None or g.name == arch]
    if not graphs:
        raise ArchError(f"no architecture named `{arch}`; this file defines "
                        + ", ".join(g.name for g in compiled.graphs))
    cache = tune.load(key)
    echo(f"device: {key['name']} (sm {key['capability']}), triton {key['triton']}; cache {cache.path}")
    dims = {k: v for k, v in bindings.items() if k in ("B", "T")}
    for g in graphs:
        known = {s.name for s in g.symbols}
        unknown = sorted(set(bindings) - known - {"B", "T"})
        if unknown:
            raise ArchError(f"`{g.name}` has no parameter {', '.join(unknown)}")
        params = {k: v for k, v in bindings.items() if k in known and k not in ("B", "T")}
        model = getattr(mod, g.name)(**params).cuda()
        inputs = {k: v.cuda() for k, v in example_inputs(g, params, batch=int(dims.get("B", 2)),
                                                          seq=dims.get("T"), seed=0).items()}

        def step():
            out = model(**inputs)
            outs = out.values() if isinstance(out, dict) else [out]
            if backward and torch.is_grad_enabled():
                loss = sum(o.float().sum() for o in outs if o.is_floating_point() and o.requires_grad)
                if torch.is_tensor(loss):
                    loss.backward()
            torch.cuda.synchronize()

        with tune.Session(cache, dry=True) as dry:
            step()
        total = sum(dry.seen.values())
        if not total:
            echo(f"{g.name}: no generated kernels to tune")
            continue
        with click.progressbar(length=total, label=f"{g.name}: {len(dry.seen)} kernel/bucket pairs, {total} configs",
                               file=sys.stderr) as bar:
            with tune.Session(cache, step=bar.update) as session:
                step()
        for (name, bkt), (cfg, ms) in sorted(session.best.items()):
            text = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
            echo(f"  {name:<24} {bkt:<22} {text}   {ms * 1e3:.1f} us")
    cache.save()
    echo(f"wrote {cache.path}")
