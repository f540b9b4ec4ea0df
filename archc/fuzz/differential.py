"""Differential execution: one program through the interpreter, every -O preset and every backend.

The reference is the interpreter on the unoptimised IR (eval mode, `init_params(g, seed)`, inputs
from `archc.testing.example_inputs`). Against it, each *stage* must agree:

* `interp:<level>`: the interpreter on the IR after each registered preset (`PRESETS`, read at run
  time, so presets and passes added later are covered), verified between passes;
* `<backend>:<level>`: every registered backend on each preset's IR (today `torch`: the generated
  module, exec'd in memory, loaded with the same weights under `state_key` names);
* `decode:<level>`: for language-model-shaped graphs, the generated module's `prefill` and
  `decode` steps against the interpreter run on each prefix (skipped when a caching policy is
  lossy: `prune_key_channels` with ratio > 0).

Floating outputs agree within `atol = ATOL * max(1, max|ref|)` and `rtol = RTOL`, integer and
bool outputs exactly; parameter gradients of a fixed random projection of the outputs within
`GRAD_ATOL` / `GRAD_RTOL` (same scaling). A stage that raises is a failure too, as is a program
the checker rejects (the generator only writes programs that should check).

A floating mismatch is *ill-conditioned*, not failed, when the fp32 reference is itself no better:
the interpreter run in fp64 defines the exact answer, and the fp32 noise floor of a tensor is the
largest distance to it of the fp32 interpreter, with and without 1-ulp weight perturbations. If that
floor exceeds the tolerance and the stage is within `NOISE_FACTOR` times the floor of the fp64 answer
on every disagreeing tensor, two correct fp32 implementations may disagree this much (a saturated
softmax whose true gradient is ~1e-12, a `float(int(x))` or a `where` route at a decision boundary),
so the verdict is `ILL_CONDITIONED`: counted apart, not a failure.
"""
from __future__ import annotations

import math
import re
import traceback
import types
from dataclasses import dataclass
from typing import Callable

import torch

from archc.errors import ArchError

ATOL, RTOL = 1e-5, 1e-4
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-3

OK, FAILED, ILL_CONDITIONED = "ok", "failed", "ill-conditioned"
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class Verdict:
    status: str
    stage: str = ""          # check, interp:O1, torch:O0, decode:O1, ...
    kind: str = ""           # rejected, crash, runtime, mismatch, grad-mismatch, timeout
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def signature(self) -> str:
        if not self.failed:
            return self.status
        head = self.detail.splitlines()[0] if self.detail else ""
        if self.kind in ("mismatch", "grad-mismatch"):
            head = head.split(":")[0]             # the output or parameter that disagrees
            head = re.sub(r"\d+", "_", head)      # generated names carry counters
        elif self.kind == "crash":
            where = re.findall(r"\[at ([^\]]+)\]", self.detail)
            head = head.split(":")[0] + (f" at {where[-1]}" if where else "")
        else:
            head = re.sub(r"`[^`]*`|\d+", "_", head)[:60]
        return f"{self.kind}:{self.stage}:{head}"


class Unsupported(Exception):
    """A backend cannot run this graph (a stage is skipped, not failed)."""


# -- backends: (graph, params, inputs) -> outputs -------------------------------------------------

def torch_module(g) -> torch.nn.Module:
    """The generated nn.Module of one graph, compiled in memory (not cached)."""
    from archc.backends.torch import generate
    gen = generate([g])
    mod = types.ModuleType(f"archc_fuzz_{g.name}")
    exec(compile(gen.source, f"<archc-fuzz:{g.name}>", "exec"), mod.__dict__)
    return getattr(mod, gen.class_names[0])()


def _load(m: torch.nn.Module, params: dict[str, torch.Tensor], g) -> torch.nn.Module:
    """Load the reference weights that `g` (possibly optimized) still has: a pass may drop parameters
    nothing reads any more (-O2's insert-kv-sharing leaves a consumer's K/V projections dead);
    every parameter `g` has must be given (strict)."""
    from archc.backends.torch import state_key
    kept = {p.name for p in g.params}
    m.load_state_dict({state_key(k): v.detach() for k, v in params.items() if k in kept}, strict=True)
    return m.eval()


def _torch_backend(g, params, inputs):
    m = _load(torch_module(g), params, g)
    # positionally: an input named like a Python keyword or a generated global (`class`, `torch`)
    # is a legal, renamed parameter of forward (`class_1`), so its .arch name is no keyword
    out = m(*(inputs[a.name] for a in g.inputs))
    out = out if isinstance(out, dict) else {g.output_names[0]: out}
    return out, dict(m.named_parameters())


Backend = Callable[..., tuple[dict, dict]]
BACKENDS: dict[str, Backend] = {"torch": _torch_backend}
"""Backends the differential runner tries: name -> fn(graph, params, inputs) -> (outputs, named
parameters whose `.grad` the runner reads after backward, keyed by `state_key`). Raise `Unsupported`
to skip a graph. A backend module may register itself here (e.g. one that needs a GPU, when present)."""


# -- comparison -------------------------------------------------------------------------------------

class Mismatch(Exception):
    pass


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    if got.shape != ref.shape:
        raise Mismatch(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if got.dtype != ref.dtype:
        raise Mismatch(f"{name}: dtype {got.dtype}, expected {ref.dtype}")
    if not ref.is_floating_point():
        if not torch.equal(got, ref):
            bad = (got != ref).sum().item()
            raise Mismatch(f"{name}: {bad} of {ref.numel()} entries differ")
        return
    scale = max(1.0, float(ref.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if ref.numel() else 1.0)
    try:
        torch.testing.assert_close(got.detach(), ref.detach(), atol=atol * scale, rtol=rtol, equal_nan=True)
    except AssertionError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise Mismatch(f"{name}: " + "; ".join(lines[:4])) from None


def _compare(outs: dict, ref: dict) -> None:
    if set(outs) != set(ref):
        raise Mismatch(f"outputs: {sorted(outs)}, expected {sorted(ref)}")
    for k in ref:
        _close(k, outs[k], ref[k], ATOL, RTOL)


def _loss(outs: dict, weights: dict) -> torch.Tensor:
    total = torch.zeros(())
    for k, o in outs.items():
        if o.is_floating_point() and o.requires_grad:
            total = total + (o * weights[k]).nan_to_num(0.0, 0.0, 0.0).mean()
    return total


def _projection(ref: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 7)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else None for k, v in ref.items()}


def _compare_grads(named: dict, ref_params: dict) -> None:
    from archc.backends.torch import state_key
    for k, p in ref_params.items():
        got = named[state_key(k)].grad if state_key(k) in named else None
        if p.grad is None:
            if got is not None and got.abs().max() > 0:
                raise Mismatch(f"{k}: gradient {got.abs().max():.3g} where the reference has none")
            continue
        if got is None:
            if p.grad.abs().max() > 0:
                raise Mismatch(f"{k}: no gradient, the reference has {p.grad.abs().max():.3g}")
            continue
        _close(k, got, p.grad, GRAD_ATOL, GRAD_RTOL)


def _mismatched(got: dict, ref: dict, atol: float, rtol: float) -> list[str]:
    """Names of floating tensors in `ref` that `got` does not match (missing ones count too)."""
    bad = []
    for k, r in ref.items():
        o = got.get(k)
        if r is None or not r.is_floating_point():
            continue
        if o is None or o.shape != r.shape:
            bad.append(k)
            continue
        try:
            _close(k, o, r, atol, rtol)
        except Mismatch:
            bad.append(k)
    return bad


class Conditioning:
    """The fp64 interpreter's outputs and gradients, and the fp32 noise floor around them (lazily:
    only a mismatch pays for it)."""

    ULPS = (0, 1, 1, 1, 1)

    def __init__(self, g, params: dict, inputs: dict, weights: dict, grads: bool):
        self.g, self.params, self.inputs, self.weights, self.grads = g, params, inputs, weights, grads
        self._done = False

    def _run(self, params: dict, inputs: dict, weights: dict, f64: bool) -> tuple[dict, dict]:
        from archc.ir import interpret
        from archc.ir.shapes import DType
        ps = {k: v.clone().requires_grad_(self.grads) for k, v in params.items()}
        old = interpret.TORCH_DTYPES[DType.F32]
        interpret.TORCH_DTYPES[DType.F32] = torch.float64 if f64 else torch.float32
        try:
            outs = interpret.run(self.g, ps, inputs)
            if self.grads:
                loss = _loss(outs, weights)
                if loss.requires_grad:
                    loss.backward()
        finally:
            interpret.TORCH_DTYPES[DType.F32] = old
        outs = {k: v.detach().double() for k, v in outs.items() if v.is_floating_point()}
        return outs, {k: p.grad.double() for k, p in ps.items() if p.grad is not None}

    def _compute(self) -> None:
        if self._done:
            return
        self._done = True

        def f64(d):
            return {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in d.items()}
        self.exact_out, self.exact_grad = self._run(f64(self.params), f64(self.inputs), f64(self.weights), True)
        self.floor_out = {k: torch.zeros_like(v) for k, v in self.exact_out.items()}
        self.floor_grad = {k: torch.zeros_like(v) for k, v in self.exact_grad.items()}
        gen = torch.Generator().manual_seed(0)
        for ulps in self.ULPS:
            def nudge(v, ulps=ulps):
                sign = torch.randint(0, 2, v.shape, generator=gen).to(v.dtype) * 2 - 1
                return v * (1 + sign * ulps * 2.0 ** -24)
            outs, grads = self._run({k: nudge(v.detach()) for k, v in self.params.items()}, self.inputs,
                                    self.weights, False)
            for got, exact, floor in ((outs, self.exact_out, self.floor_out), (grads, self.exact_grad, self.floor_grad)):
                for k, v in got.items():
                    if k in floor and v.shape == floor[k].shape:
                        floor[k] = torch.maximum(floor[k], (v - exact[k]).abs().nan_to_num(0.0, 0.0, 0.0))

    def explains(self, got: dict, ref: dict, bad: list[str], grads: bool) -> bool:
        """Every tensor in `bad` (of `got` vs the fp32 `ref`) is noise: some element's fp32 noise floor
        exceeds the tolerance (else the fp32 reference is accurate, and the stage is wrong), the
        stage's largest distance to the fp64 answer is within NOISE_FACTOR x the largest floor, and on
        the elements whose floor is within the tolerance (stable ones) it is within NOISE_FACTOR x the
        tolerance. (Floors per element are undersampled by a few perturbed runs where a rounding
        flip moves a discrete decision, hence the tensor-wide bound on unstable elements.)"""
        if not bad:
            return False
        try:
            self._compute()
        except Exception:  # noqa: BLE001  (no fp64 answer: the mismatch stands)
            return False
        exact, floor = (self.exact_grad, self.floor_grad) if grads else (self.exact_out, self.floor_out)
        atol, rtol = (GRAD_ATOL, GRAD_RTOL) if grads else (ATOL, RTOL)
        for k in bad:
            if k not in exact or got.get(k) is None or got[k].shape != exact[k].shape:
                return False
            e, f = exact[k], floor[k]
            scale = max(1.0, float(e.abs().nan_to_num(0.0, 0.0, 0.0).max()) if e.numel() else 1.0)
            tol = atol * scale + rtol * e.abs()
            unstable = f > tol
            if not bool(unstable.any()):
                return False
            dist = (got[k].detach().double() - e).abs().nan_to_num(math.inf, math.inf, math.inf)
            if float(dist.max()) > NOISE_FACTOR * float(f.max()):
                return False
            if not bool((dist <= NOISE_FACTOR * tol)[~unstable].all()):
                return False
        return True


# -- the runner ----------------------------------------------------------------------------------------

def program_inputs(g, seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random inputs; the sequence length is a multiple of every scan's segment size (and >= 6)."""
    from archc.ir.interpret import Env, resolve_bindings
    from archc.ir.ops import Op
    from archc.testing import example_inputs
    env = Env(resolve_bindings(g))
    sizes = [env.eval_int(n.attr("size")) for n in g.walk() if n.op is Op.SCAN]
    step = math.lcm(*sizes) if sizes else 1
    return example_inputs(g, batch=batch, seq=step * math.ceil(6 / step), seed=seed)


def _fail(stage: str, kind: str, detail: str) -> Verdict:
    return Verdict(FAILED, stage, kind, detail)


def _crash(stage: str, err: BaseException) -> Verdict:
    ours = [fr for fr, _ in traceback.walk_tb(err.__traceback__)
            if str(fr.f_globals.get("__name__", "")).startswith("archc.")]
    loc = f" [at {ours[-1].f_globals['__name__']}:{ours[-1].f_code.co_name}]" if ours else ""
    if isinstance(err, ArchError):
        return _fail(stage, "runtime", f"{err.message}{loc}\n{err.render()}")
    return _fail(stage, "crash", f"{type(err).__name__}: {str(err)[:400]}{loc}\n"
                 + "".join(traceback.format_exception(err))[-3000:])


def _wanted(stage: str, only: set[str] | None) -> bool:
    return only is None or stage in only


def run_program(source: str, seed: int = 0, only: set[str] | None = None, decode: bool = True,
                grads: bool = True) -> Verdict:
    """Check `source` and run every stage on each of its architectures (`only`: just these stages)."""
    from archc.api import check
    try:
        graphs = check(source, "program.arch")
    except ArchError as err:
        return _fail("check", "rejected", err.render())
    except Exception as err:  # noqa: BLE001
        return _crash("check", err)
    worst = Verdict(OK)
    for g in graphs:
        v = _run_graph(g, seed, only, decode, grads)
        if v.failed:
            return v
        worst = v if v.status == ILL_CONDITIONED else worst
    return worst


def _run_graph(g, seed, only, decode, grads) -> Verdict:
    from archc.ir.interpret import init_params, run
    from archc.passes import PRESETS, run_pipeline

    params = init_params(g, seed=seed)
    inputs = program_inputs(g, seed)
    ref_params = {k: v.clone().requires_grad_(grads) for k, v in params.items()}
    stage = "interp:O0"
    try:
        ref = run(g, ref_params, inputs)
        weights = _projection(ref, seed)
        if grads:
            loss = _loss(ref, weights)
            if loss.requires_grad:
                loss.backward()
    except Exception as err:  # noqa: BLE001
        return _crash(stage, err)
    ref = {k: v.detach() for k, v in ref.items()}
    cond = Conditioning(g, params, inputs, weights, grads)
    variants = {"O0": g}
    worst = Verdict(OK)          # ILL_CONDITIONED once any stage was
    for level, names in PRESETS.items():
        if level == "O0" or not names:
            continue
        stage = f"pass:{level}"
        try:
            variants[level] = run_pipeline(g, names, verify=True)
        except Exception as err:  # noqa: BLE001
            return _crash(stage, err)
    for level, gl in variants.items():
        stage = f"interp:{level}"
        if level != "O0" and _wanted(stage, only):
            v = _stage(stage, lambda: (run(gl, {k: p.clone().requires_grad_(grads) for k, p in params.items()},
                                           inputs), None), ref, ref_params, weights, grads, cond, interp=True)
            if v.failed:
                return v
            worst = v if v.status == ILL_CONDITIONED else worst
        for name, backend in BACKENDS.items():
            stage = f"{name}:{level}"
            if _wanted(stage, only):
                v = _stage(stage, lambda: backend(gl, params, inputs), ref, ref_params, weights, grads, cond)
                if v.failed:
                    return v
                worst = v if v.status == ILL_CONDITIONED else worst
        stage = f"decode:{level}"
        if decode and _wanted(stage, only) and (level == "O0" or level == list(variants)[-1]):
            v = _decode(stage, gl, params, inputs)
            if v.failed:
                return v
    return worst


def _stage(stage, fn, ref, ref_params, weights, grads, cond=None, interp=False) -> Verdict:
    try:
        outs, named = fn()
    except Unsupported:
        return Verdict(OK)
    except Exception as err:  # noqa: BLE001
        return _crash(stage, err)
    ill = None
    try:
        _compare({k: v.detach() for k, v in outs.items()}, ref)
    except Mismatch as err:
        got = {k: v.detach() for k, v in outs.items()}
        if set(got) == set(ref) and cond is not None and cond.explains(got, ref, _mismatched(got, ref, ATOL, RTOL), False):
            ill = Verdict(ILL_CONDITIONED, stage, "mismatch", str(err))
        else:
            return _fail(stage, "mismatch", str(err))
    if not grads:
        return ill or Verdict(OK)
    try:
        loss = _loss(outs, weights)
        if loss.requires_grad:
            loss.backward()
    except Exception as err:  # noqa: BLE001
        return _crash(stage + ":backward", err)
    if interp:
        return ill or Verdict(OK)     # the interpreter's own gradients are checked through the backends
    try:
        _compare_grads(named, ref_params)
    except Mismatch as err:
        from archc.backends.torch import state_key
        got = {k: named[state_key(k)].grad for k in ref_params if state_key(k) in named}
        want = {k: p.grad for k, p in ref_params.items()}
        bad = _mismatched({k: v for k, v in got.items() if v is not None}, want, GRAD_ATOL, GRAD_RTOL)
        if cond is not None and cond.explains(got, want, bad, True):
            return Verdict(ILL_CONDITIONED, stage, "grad-mismatch", str(err))
        return _fail(stage, "grad-mismatch", str(err))
    return ill or Verdict(OK)


def _decode(stage: str, g, params, inputs) -> Verdict:
    """prefill + decode steps of the generated module against the interpreter on each prefix."""
    from archc.ir.analysis import lm_token_input
    from archc.ir.interpret import run
    from archc.ir.ops import Op
    tok = lm_token_input(g)
    if tok is None:
        return Verdict(OK)
    for p in g.policies:
        if p.kind == "prune_key_channels" and float(dict(p.args).get("ratio", 0.4)) > 0:
            return Verdict(OK)       # lossy by design
    from archc.ir.interpret import Env, resolve_bindings
    env = Env(resolve_bindings(g))
    from archc.ir.analysis import partial_segment_blocker
    scans = [n for n in g.walk() if n.op is Op.SCAN]
    tokens = inputs[tok.name]
    T = tokens.shape[1]
    if all(partial_segment_blocker(g, n) is None for n in scans):
        step, prompt = 1, max(1, T // 2 - 1)     # off every segment boundary, then token by token (SPEC §8.5)
    else:
        step = math.lcm(*(env.eval_int(n.attr("size")) for n in scans))
        prompt = step * max(1, (T // step) // 2)
    T_sym = tok.type.shape[1]
    types_ = {o.name: o.type for n in g.walk() for o in n.outputs} | {a.name: a.type for a in g.inputs}
    seq = {name: types_[r].rank >= 2 and types_[r].shape[1] == T_sym for name, r in zip(g.output_names, g.body.results)}
    try:
        m = _load(torch_module(g), params, g)
        with torch.no_grad():
            out, cache = m.prefill(tokens[:, :prompt])
            outs = [(prompt, prompt, out)]
            t = prompt
            while t < T:
                o, cache = m.decode(tokens[:, t:t + step], cache)
                t += step
                outs.append((t, step, o))
    except Exception as err:  # noqa: BLE001
        return _crash(stage, err)
    for end, n, o in outs:
        o = o if isinstance(o, dict) else {g.output_names[0]: o}
        try:
            with torch.no_grad():
                ref = run(g, params, {tok.name: tokens[:, :end]})
        except Exception as err:  # noqa: BLE001
            return _crash(stage + ":reference", err)
        ref = {k: (v[:, -n:] if seq[k] else v) for k, v in ref.items()}
        try:
            _compare(o, ref)
        except Mismatch as err:
            return _fail(stage, "mismatch", f"{err} (tokens {end - n}..{end})")
    return Verdict(OK)
