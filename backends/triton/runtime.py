"""Launcher helpers copied by source into every generated Triton module (like `torch_runtime`).

A fused kernel sees its iteration space as R rows of C columns: C is the last axis of the
region's iteration shape S, R the product of the others. An operand that broadcasts to S is
addressed as `row * rs + col * cs`; `rows_view` finds (rs, cs) from the strides of the operand
expanded to S, and makes a contiguous copy only when the leading axes cannot be addressed by one
row stride (e.g. an operand broadcast over the batch but not over time).
"""
from __future__ import annotations

import torch


def rows_cols(shape) -> tuple[int, int]:
    """(R, C) of an iteration shape: C is its last axis, R the product of the others."""
    if len(shape) == 0:
        return 1, 1
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows, int(shape[-1])


def broadcast_shape(*shapes):
    """The iteration shape of a fused kernel's operands (the common case, equal shapes, first)."""
    first = shapes[0]
    if all(s == first for s in shapes[1:]):
        return first
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, rank - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    raise RuntimeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = d
    return torch.Size(out)


def rows_view(t, shape):
    """(tensor, row stride, column stride, dense) addressing `t` broadcast to `shape` as rows x cols."""
    if not torch.is_tensor(t) or t.dim() == 0:
        t = torch.as_tensor(t)
        return t.reshape(1), 0, 0, False
    if t.shape == shape and t.is_contiguous():                       # full size, dense
        return t, shape[-1], 1, True
    if t.dim() == 1 and t.shape[0] == shape[-1] and t.stride(0) == 1 and len(shape) > 1:   # a [C] weight
        return t, 0, 1, False
    e = t.expand(shape)
    if len(shape) == 0:
        return e.reshape(1), 0, 0, False
    lead, strides = e.shape[:-1], e.stride()[:-1]
    rs, span, ok = None, 1, True        # need stride == rs * (product of the inner leading sizes)
    for size, st in zip(reversed(lead), reversed(strides)):
        if size != 1:
            if rs is None:
                rs = st // span
            ok = ok and st == rs * span
        span *= size
    rs = 0 if rs is None else rs
    if not ok:
        e = e.contiguous()
        return e, e.shape[-1], 1, True
    cs = e.stride()[-1] if e.shape[-1] != 1 else 0
    return e, rs, cs, (cs == 1 and rs == e.shape[-1])


def torch_backward(fn, args, grads):
    """Gradients of `fn(*args)` for `grads` by autograd through fn's torch ops, with a graph
    (`create_graph`): the differentiable backward a launcher uses when asked for higher derivatives.
    Each tensor argument is differentiated through its own view, so a tensor passed twice gets
    one gradient per position (autograd.Function sums them)."""
    args = [a.view_as(a) if torch.is_tensor(a) and a.requires_grad else a for a in args]
    with torch.enable_grad():
        outs = fn(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    need = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    if not pairs or not need:
        return (None,) * len(args)
    got = iter(torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], create_graph=True,
                                   allow_unused=True))
    return tuple(next(got) if torch.is_tensor(a) and a.requires_grad else None for a in args)
