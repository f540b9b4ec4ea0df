"""The neural memory's inner step (`torch_runtime.memory_write`) is backpropagation through the
memory MLP written out by hand. The interpreter and the generated modules both call it, so the
differential tests cannot check it: here it is compared with `torch.autograd.grad` of the same loss
(the runtime's earlier implementation), values and the outer pass's gradients through the step,
for every activation, loss, retention rule, depth and the residual form."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from archc.backends import torch_runtime as rt


def autograd_memory_write(k, v, lr, momentum, forget, ws, ms, act, residual, loss, retention="l2", q=4.0, p=3.0,
                          delta=None):
    """The reference: d sum_t lr_t loss(M(k_t), v_t) / d W by autograd (create_graph under an outer pass)."""
    outer = torch.is_grad_enabled()
    applied = rt.lq_normalize(ws, q) if retention == "lq" else ws
    with torch.enable_grad():
        leaf = [w.clone() if (w.requires_grad and outer) else w.detach().requires_grad_(True) for w in applied]
        err = rt.mlp_memory(k, leaf, act, residual) - v
        if loss == "mse":
            per_token = err.pow(2).mean(-1)
        elif loss == "l1":
            per_token = err.abs().mean(-1)
        elif loss == "lp":
            per_token = (err.pow(2) + 1e-6).pow(p / 2).mean(-1)
        elif loss == "yaad":
            small = err.norm(dim=-1) <= delta.reshape(err.shape[:-1])
            per_token = torch.where(small, err.pow(2).mean(-1),
                                    delta.reshape(err.shape[:-1]) * (err.pow(2) + 1e-6).sqrt().mean(-1))
        else:
            per_token = F.huber_loss(err, torch.zeros_like(err), reduction="none").mean(-1)
        total = (per_token.reshape(lr.shape) * lr).sum()
        grads = torch.autograd.grad(total, leaf, create_graph=outer and any(w.requires_grad for w in ws))
    return rt.memory_update(ws, ms, grads, momentum, forget, retention)      # the same update rule


def _case(act, loss, retention, layers, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T, d, h = 2, 5, 4, 6
    shapes = [(d, d)] if layers == 1 else [(h, d)] + [(h, h)] * (layers - 2) + [(d, h)]
    ws = [torch.randn(B, o, i, generator=gen) / i ** 0.5 for o, i in shapes]
    if retention == "kl":
        ws = [w.softmax(-1) for w in ws]
    ms = [torch.randn(B, o, i, generator=gen) * 0.1 for o, i in shapes]
    data = {"k": torch.randn(B, T, d, generator=gen), "v": torch.randn(B, T, d, generator=gen),
            "lr": torch.rand(B, T, generator=gen), "momentum": torch.rand(B, generator=gen),
            "forget": torch.rand(B, generator=gen) * 0.2, "delta": torch.rand(B, T, generator=gen) + 0.5}
    return data, ws, ms


def _run(fn, data, ws, ms, act, loss, retention, residual, grad: bool):
    leaves = {k: v.clone().requires_grad_(grad) for k, v in data.items()}
    wl = [w.clone().requires_grad_(grad) for w in ws]
    ml = [m.clone().requires_grad_(grad) for m in ms]
    with torch.set_grad_enabled(grad):
        new_w, new_m = fn(leaves["k"], leaves["v"], leaves["lr"], leaves["momentum"], leaves["forget"], wl, ml, act,
                          residual, loss, retention, 4.0, 3.0, leaves["delta"] if loss == "yaad" else None)
    out = {f"w{i}": w for i, w in enumerate(new_w)} | {f"m{i}": m for i, m in enumerate(new_m)}
    if not grad:
        return out, {}
    gen = torch.Generator().manual_seed(1)
    total = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in out.values())
    named = {**{k: leaves[k] for k in ("k", "v", "lr")}, **{f"W{i}": w for i, w in enumerate(wl)}}
    grads = torch.autograd.grad(total, list(named.values()), allow_unused=True)
    return out, {k: g for k, g in zip(named, grads) if g is not None}


COMBOS = list(itertools.product(("gelu", "relu", "silu", "tanh"), ("mse", "l1", "huber", "lp", "yaad"),
                                ("l2", "lq", "kl")))


@pytest.mark.parametrize("act,loss,retention", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_the_written_out_step_equals_autograd(act, loss, retention):
    for layers, residual in ((1, False), (2, True), (3, False)):
        data, ws, ms = _case(act, loss, retention, layers, residual, seed=layers)
        for grad in (False, True):
            got, got_g = _run(rt.memory_write, data, ws, ms, act, loss, retention, residual, grad)
            want, want_g = _run(autograd_memory_write, data, ws, ms, act, loss, retention, residual, grad)
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=f"{key} ({layers} layers)")
            assert set(got_g) == set(want_g), (layers, sorted(got_g), sorted(want_g))
            for key in want_g:
                torch.testing.assert_close(got_g[key], want_g[key], atol=1e-4, rtol=1e-3,
                                           msg=f"outer gradient of {key} ({layers} layers)")


def test_the_step_runs_in_inference_mode_and_is_constant_without_weight_gradients():
    data, ws, ms = _case("gelu", "mse", "l2", 2, False)
    with torch.inference_mode():
        new_w, _ = rt.memory_write(data["k"], data["v"], data["lr"], data["momentum"], data["forget"], ws, ms,
                                   "gelu", False, "mse")
    want, _ = autograd_memory_write(data["k"], data["v"], data["lr"], data["momentum"], data["forget"], ws, ms,
                                    "gelu", False, "mse")
    torch.testing.assert_close(new_w[0], want[0])
    k = data["k"].clone().requires_grad_(True)                  # weights without gradients: no path through k
    new_w, _ = rt.memory_write(k, data["v"], data["lr"], data["momentum"], data["forget"], ws, ms, "gelu", False, "mse")
    assert not new_w[0].requires_grad
