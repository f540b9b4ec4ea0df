"""The small runtime shared by the interpreter and generated PyTorch modules.

Every function here is self-contained (it uses only `torch`, `F` and `math`), so the PyTorch
backend copies the source of the ones a model uses into the generated file: generated modules
import nothing from archc. The interpreter calls the same functions, so both agree by
construction on these kernels; the differential tests then check everything around them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps: float):
    return F.rms_norm(x, (x.shape[-1],), w, eps)      # one fused kernel (vs 6 elementwise passes)


def rope(x, base: float, pos=None):
    """Rotary embedding (half-split) on [B, T, H, D]; positions default to 0..T-1."""
    T, D = x.shape[1], x.shape[3]
    if D % 2:
        raise ValueError(f"rope needs an even head size, got {D}")
    if pos is None:
        pos = torch.arange(T, device=x.device)[None]      # one table for the batch: [1, T]
    half = D // 2
    freq = base ** (-torch.arange(half, dtype=x.dtype, device=x.device) * 2 / D)
    ang = pos.to(x.dtype)[..., None] * freq
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def repeat_kv(k, v, heads: int):
    """Grouped-query attention: repeat each K/V head for the query heads that share it."""
    if k.shape[2] != heads:
        k = k.repeat_interleave(heads // k.shape[2], dim=2)
        v = v.repeat_interleave(heads // v.shape[2], dim=2)
    return k, v


def attention(q, k, v, causal: bool = False, window: int = 0, prefix: int = 0, mask=None, qpos=None, kpos=None,
              sorted_pos: bool = False):
    """Scaled dot-product attention on [B, T, H, D] with grouped KV heads; fully masked rows give 0.

    causal/window compare positions (qpos/kpos, default: queries are the last Tq of Tk positions);
    the first `prefix` keys are visible to every query; `mask` ([Tq, Tk] or [B, Tq, Tk]) is true
    where attending is allowed. `sorted_pos`: qpos is kpos and strictly increasing per sample (a
    compacting route's positions), so causal order by position is causal order by index. Runs on
    F.scaled_dot_product_attention (fused kernels).
    """
    B, Tq, H = q.shape[:3]
    Tk = k.shape[1]
    k, v = repeat_kv(k, v, H)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    by_index = qpos is None and kpos is None or sorted_pos
    if mask is None and not window and (not causal or (not prefix and by_index and Tq == Tk)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
    allowed = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal or window:
        if qpos is None:
            qpos = (torch.arange(Tq, device=q.device) + (Tk - Tq))[None].expand(B, Tq)
        if kpos is None:
            kpos = torch.arange(Tk, device=q.device)[None].expand(B, Tk)
        qp, kp = qpos[:, :, None], kpos[:, None, :]
        if causal:
            allowed = allowed & (kp <= qp)[:, None]
        if window:
            dist = qp - kp if causal else (qp - kp).abs()
            allowed = allowed & (dist < window)[:, None]
        if prefix:
            allowed = allowed | (torch.arange(Tk, device=q.device) < prefix)[None, None, None, :]
    if mask is not None:
        m = mask if mask.dim() == 3 else mask[None]
        allowed = allowed & m[:, None]
    # a row with no visible key gives 0: attend it to everything (finite values and gradients), then zero it
    seen = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen)
    return torch.where(seen, out, 0.0).transpose(1, 2)


def topk_mask(x, k: int, axis: int):
    """True at the k largest entries along `axis`; of equal entries the lower index wins (as ONNX TopK)."""
    k = min(k, x.shape[axis])
    idx = torch.sort(x, dim=axis, descending=True, stable=True).indices.narrow(axis, 0, k)
    return torch.zeros_like(x, dtype=torch.bool).scatter(axis, idx, True)


def gather_along(x, idx, axis: int):
    """x[b, idx[b, j], ...] along `axis` for per-batch indices of rank axis + 1."""
    view = idx.reshape(idx.shape + (1,) * (x.dim() - idx.dim())).expand(idx.shape + x.shape[axis + 1:])
    return torch.gather(x, axis, view)


def conv1d(x, w, b, causal: bool):
    """1-D convolution over the sequence axis of [B, T, C]; causal pads on the left."""
    k = w.shape[-1]
    xt = x.transpose(-1, -2)
    xt = F.pad(xt, (k - 1, 0)) if causal else F.pad(xt, ((k - 1) // 2, k - 1 - (k - 1) // 2))
    return F.conv1d(xt, w, b).transpose(-1, -2)


def linear_scan(a, b, h, axis: int):
    """h_t = a_t * h_{t-1} + b_t along `axis` (sequential reference form)."""
    a, b = torch.broadcast_tensors(a, b)
    outs = []
    for t in range(a.shape[axis]):
        h = a.select(axis, t) * h + b.select(axis, t)
        outs.append(h)
    return torch.stack(outs, dim=axis)


def linear_attn(q, k, v, s):
    """Causal linear attention from state s [B, Dv, Dk]: y_t = (s + sum_{u<=t} v_u k_u^T) q_t."""
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("btk,bsk->bts", q, k).masked_fill(~causal, 0.0)
    y = torch.einsum("bvk,btk->btv", s, q) + torch.einsum("bts,bsv->btv", scores, v)
    return y, s + torch.einsum("btv,btk->bvk", v, k)


_MEMORY_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def mlp_memory(q, ws, act: str, residual: bool):
    """Apply per-sample MLP weights ws[i]: [B, out, in] to q: [B, ..., in]."""
    shape = q.shape
    h = q.reshape(shape[0], -1, shape[-1])
    x0 = h
    for i, w in enumerate(ws):
        h = torch.einsum("bti,boi->bto", h, w)
        if i < len(ws) - 1:
            h = _MEMORY_ACTS[act](h)
    if residual:
        h = h + x0
    return h.reshape(shape[:-1] + (h.shape[-1],))


def lq_normalize(ws, q: float):
    """Moneta's l_q retention: the memory applies W = A / ||A||_q^(q-2) of its accumulator A (per sample)."""
    return [a / a.abs().pow(q).sum(dim=(-2, -1), keepdim=True).pow((q - 2) / q).clamp_min(1e-12) for a in ws]


def _act_grad(act: str, z):
    """d act(z) / dz, elementwise (differentiable again: the outer pass trains through it)."""
    if act == "gelu":                     # Phi(z) + z phi(z), the erf form F.gelu computes
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "silu":                     # s (1 + z (1 - s))
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    raise ValueError(f"unknown memory activation {act!r}")


def _loss_grad(loss: str, err, p: float, delta):
    """d mean_d loss(err) / d err per token, err: [B, N, D] (the memory's attentional bias)."""
    if loss == "mse":
        g = 2 * err
    elif loss == "l1":
        g = torch.sign(err)
    elif loss == "lp":                    # (e^2 + 1e-6)^(p/2) -> p e (e^2 + 1e-6)^(p/2 - 1)
        g = p * err * (err * err + 1e-6).pow(p / 2 - 1)
    elif loss == "yaad":                  # e^2 while ||e|| <= delta, else delta * sqrt(e^2 + 1e-6)
        dl = delta.reshape(err.shape[0], -1, 1)
        small = err.norm(dim=-1, keepdim=True) <= dl
        g = torch.where(small, 2 * err, dl * err / (err * err + 1e-6).sqrt())
    elif loss == "huber":                 # delta 1: quadratic inside, linear outside
        g = err.clamp(-1.0, 1.0)
    else:
        raise ValueError(f"unknown memory loss {loss!r}")
    return g / err.shape[-1]


def memory_write(k, v, lr, momentum, forget, ws, ms, act: str, residual: bool, loss: str,
                 retention: str = "l2", q: float = 4.0, p: float = 3.0, delta=None):
    """One inner step: S = momentum*S - grad(sum_t lr_t * loss(M(k_t), v_t)), then the retention rule:
    l2: W = (1-forget)*W + S;  lq: A = (1-forget)*A + S with W = A / ||A||_q^(q-2) applied;
    kl: W = softmax((1-forget)*log W + S) per row (the weights stay on the simplex).

    Losses per token (mean over features): mse (e^2), l1 |e|, huber, lp (e^2 + 1e-6)^(p/2), yaad
    (e^2 while ||e|| <= delta_t, else delta_t * |e|, |e| smoothed as sqrt(e^2 + 1e-6)).
    Gradients are taken per sample (weights are per sample) at the weights the memory applies, by
    backpropagation through the memory MLP written out (no torch.autograd.grad): G_p = lr * dloss/dp,
    dW_i = sum_t G_{z_i}^T h_i, G_{z_(i-1)} = (G_{z_i} W_i) * act'(z_(i-1)). Being ordinary tensor
    ops, the step runs under torch.compile and inference mode, and the outer autograd pass trains
    through it (the memory learns end to end), as it did through autograd.grad(create_graph=True).
    When no memory weight requires a gradient the step is a constant of the outer pass.
    """
    applied = lq_normalize(ws, q) if retention == "lq" else ws
    B = k.shape[0]
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
        x0 = h = k.reshape(B, -1, k.shape[-1])
        inputs, pre = [], []
        for i, w in enumerate(applied):
            inputs.append(h)
            z = torch.einsum("bti,boi->bto", h, w)
            if i < len(applied) - 1:
                pre.append(z)
                h = _MEMORY_ACTS[act](z)
            else:
                h = z
        if residual:
            h = h + x0
        err = h - v.reshape(B, -1, v.shape[-1])
        gz = _loss_grad(loss, err, p, delta) * lr.reshape(B, -1, 1)
        grads = [None] * len(applied)
        for i in reversed(range(len(applied))):
            grads[i] = torch.einsum("bto,bti->boi", gz, inputs[i])
            if i:
                gz = torch.einsum("bto,boi->bti", gz, applied[i]) * _act_grad(act, pre[i - 1])
    return memory_update(ws, ms, grads, momentum, forget, retention)


def memory_update(ws, ms, grads, momentum, forget, retention: str):
    """S' = momentum * S - G, then the retention rule on W (see memory_write)."""
    new_m = [momentum.reshape((-1,) + (1,) * (m.dim() - 1)) * m - g for m, g in zip(ms, grads)]
    keep = [1 - forget.reshape((-1,) + (1,) * (w.dim() - 1)) for w in ws]
    if retention == "kl":
        new_w = [torch.softmax(f * w.clamp_min(1e-30).log() + m, dim=-1) for f, w, m in zip(keep, ws, new_m)]
    else:
        new_w = [f * w + m for f, w, m in zip(keep, ws, new_m)]
    return new_w, new_m


def bank_push(buf, count, v):
    """FIFO push of v [B, ...] into buf [B, N, ...] holding count [B] entries."""
    N = buf.shape[1]
    full = (count >= N).reshape((-1,) + (1,) * (buf.dim() - 1))
    shifted = torch.cat([buf[:, 1:], v.unsqueeze(1)], dim=1)
    slot = torch.arange(N, device=buf.device)[None, :] == count.clamp(max=N - 1)[:, None]
    slot = slot.reshape(buf.shape[:2] + (1,) * (buf.dim() - 2))
    placed = torch.where(slot, v.unsqueeze(1).expand_as(buf), buf)
    return torch.where(full, shifted, placed), torch.clamp(count + 1, max=N)


def bank_valid(buf, count):
    return torch.arange(buf.shape[1], device=buf.device)[None, :] < count[:, None]


def route_select(score, k: int, among=None):
    """Indices of the k highest-scoring tokens per sample (among candidates), in sequence order."""
    s = score if among is None else score.masked_fill(~among, float("-inf"))
    return torch.topk(s, k, dim=1).indices.sort(dim=1).values


def route_scatter(x, idx, x_sel, y, weight=None, among=None):
    """Write routed results back: x_sel + w * (y - x_sel) at the selected tokens; returns (x, sel)."""
    B, k = idx.shape
    tail = [1] * (x.dim() - 2)
    new = y if weight is None else x_sel + torch.gather(weight, 1, idx).reshape(B, k, *tail) * (y - x_sel)
    sel = torch.zeros(B, x.shape[1], dtype=torch.bool, device=x.device).scatter(1, idx, True)
    if among is not None:
        valid = torch.gather(among, 1, idx)
        new = torch.where(valid.reshape(B, k, *tail), new, x_sel)
        sel = sel & among
    out = x.scatter(1, idx.reshape(B, k, *tail).expand(B, k, *x.shape[2:]), new)
    return out, sel


def route_keep(score, k: int, among=None):
    """The selection as a mask over every token (bool [B, T]): the k tokens `route_select` picks."""
    if k >= score.shape[1]:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    idx = route_select(score, k, among)
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter(1, idx, True)


def route_blend(x, y, keep, weight=None, among=None):
    """Masked routing's write-back: where selected (and a candidate), x + w * (y - x); returns (x, sel)."""
    B, T = x.shape[:2]
    tail = [1] * (x.dim() - 2)
    sel = keep if among is None else keep & among
    new = y if weight is None else x + weight.reshape(B, T, *tail) * (y - x)
    return torch.where(sel.reshape(B, T, *tail), new, x), sel


def kv_lookup(store: dict, share: str, site: str, k, v, kpos, training: bool, generator=None):
    """K/V for an attention site under a sharing policy; records the site's own K/V for later readers."""
    if share.startswith("recursion:"):
        key = share + ":" + site
        if key not in store:
            store[key] = (k, v, kpos)
        return store[key]
    if share.startswith("stochastic:"):
        _, p, src = share.split(":", 2)
        if training and float(torch.rand((), generator=generator)) >= float(p):
            return k, v, kpos
    else:
        src = share[len("from:"):]
    if src not in store:
        raise RuntimeError(f"attention `{site}` reads the K/V of `{src}`, which has not run before it")
    return store[src]


def kv_reset(store: dict, var: str):
    """A recursion loop starting afresh forgets the K/V its previous run shared."""
    prefix = f"recursion:{var}:"
    for key in [key for key in store if key.startswith(prefix)]:
        del store[key]


class KVCache:
    """Decode-time K/V per attention-site instance, shaped by the model's caching policies.

    Keys name a site instance ("layers.attn[2]", "core.attn[0]@r=1"). `attend` appends the new
    tokens' K/V (unless the site reads another's) and attends over everything cached. Policies:
    prune_key_channels (ThinK: after prefill, older keys keep only the top channels per head,
    scored by the last `observe` queries; the `recent` newest keys and all later keys stay full
    width), topk_decode (LycheeDecode: heads >= dense_heads attend only to the k keys the dense
    heads weight most) and rewrite_kv (Bottlenecked Transformers: `rewrites` maps a site to
    (delimiter, top, processor); the model feeds tokens in `pieces` and calls `rewrite` after
    each). `nbytes()` counts the bytes the cached tensors actually hold.
    """

    def __init__(self, policies=None, rewrites=None):
        self.policies = dict(policies or {})      # site -> (kind, options)
        self.rewrites = dict(rewrites or {})      # site -> (delimiter, top, processor)
        self.entries = {}                          # key -> dict of tensors
        self.length = 0
        self.prefilled = False                     # decode-time policies act after the prompt
        self.steps = {}                            # delimiter -> where each sample's open step starts
        self.windows = {}                          # entry key -> its site's attention window
        self.q_from = 0                            # position of the oldest query kept for a rewrite
        self.states = {}                           # scan key -> (carries at the last full segment, its open segment)

    def policy(self, site, kind):
        p = self.policies.get(site)
        return p[1] if p is not None and p[0] == kind else None

    @staticmethod
    def site_of(key):
        """The attention site of an entry key: "layers.attn[1]@r=0" -> "layers.attn"."""
        return key.split("#")[0].split("[")[0].split("@")[0]

    def attend(self, key, site, q, k, v, qpos, window=0, reads=None, prefix=0, valid=None):
        """Append k/v under `key` (or read the entry `reads`) and attend with queries q at qpos; the
        first `prefix` entries (a sequence-free prefix) are visible to every query. `valid` (bool
        [B, n]) marks which new positions a masked route selected: the others' K/V are kept (the
        entry stays aligned with positions) but no query ever sees them."""
        e = self.store(key, site, q, k, v, reads, window)
        if valid is not None and reads is None:
            past = e.get("valid", torch.ones(valid.shape[0], e["v"].shape[1] - valid.shape[1], dtype=torch.bool,
                                             device=valid.device))
            e["valid"] = torch.cat([past, valid], 1)
        keys = self._keys(e)
        top = self.policy(site, "topk_decode")
        if top is not None and self.prefilled:
            return topk_attention(q, keys, e["v"], int(top["k"]), int(top["dense_heads"]), qpos, window)
        mask = e["valid"][:, None, :].expand(-1, q.shape[1], -1) if "valid" in e else None
        return attention(q, keys, e["v"], causal=True, window=window, prefix=prefix, qpos=qpos, mask=mask)

    def store(self, key, site, q, k, v, reads=None, window=0):
        """Append k/v under `key` (or look up the entry `reads`); returns the entry's tensors."""
        if reads is None:
            e = self.entries.setdefault(key, {"k": k[:, :0], "v": v[:, :0], "q_obs": q[:, :0]})
            if "kept" in e:                               # pruned: new keys stay full width
                e["k_recent"] = torch.cat([e["k_recent"], k], 1)
            else:
                e["k"] = torch.cat([e["k"], k], 1)
            e["v"] = torch.cat([e["v"], v], 1)
            think = self.policy(site, "prune_key_channels")
            if think is not None and "kept" not in e:
                e["q_obs"] = torch.cat([e["q_obs"], q], 1)[:, -int(think["observe"]):]
            if site in self.rewrites:                     # the open steps' queries choose the top-k
                e["q_step"] = torch.cat([e.get("q_step", q[:, :0]), q], 1)
                self.windows[key] = window
        else:
            e = self.entries[reads]
        return e

    def pieces(self, tokens):
        """`tokens` [B, n] cut after every position where some sample reads a rewrite_kv delimiter."""
        hit = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        for delimiter in {int(r[0]) for r in self.rewrites.values()}:
            hit |= (tokens == delimiter).any(0)
        ends = [i + 1 for i in hit.nonzero().flatten().tolist() if i + 1 < tokens.shape[1]] + [tokens.shape[1]]
        return [tokens[:, a:b] for a, b in zip([0] + ends[:-1], ends)]

    def rewrite(self, tokens):
        """rewrite_kv after the piece `tokens` was appended: for each sample whose piece ends with a
        delimiter, in every targeted entry, the step it ends (its entries since the sample's previous
        delimiter) plus the `top` earlier entries those queries attended to most go through the
        processor, which rewrites them in place. The next step starts after the delimiter."""
        if not self.rewrites or tokens.shape[1] == 0:
            return
        for delimiter in sorted({int(r[0]) for r in self.rewrites.values()}):
            starts = self.steps.setdefault(delimiter, [0] * tokens.shape[0])
            for b in (tokens[:, -1] == delimiter).nonzero().flatten().tolist():
                for key, e in self.entries.items():
                    rw = self.rewrites.get(self.site_of(key))
                    if rw is not None and int(rw[0]) == delimiter and "q_step" in e:
                        self._rewrite_entry(key, e, b, starts[b], int(rw[1]), rw[2])
                starts[b] = self.length
        first = min(min(s) for s in self.steps.values()) if self.steps else 0
        for e in self.entries.values():
            if "q_step" in e:
                e["q_step"] = e["q_step"][:, first - self.q_from:]
        self.q_from = first

    def _rewrite_entry(self, key, e, b, start, top, processor):
        """Sample b of entry `key`: gather last step + top-k, run the processor, write back."""
        length = e["k"].shape[1]
        k, v = e["k"][b:b + 1], e["v"][b:b + 1]
        idx = torch.arange(start, length, device=k.device)
        top = min(top, start)
        if top > 0:
            q = e["q_step"][b:b + 1, start - self.q_from:]
            probs = torch.softmax(causal_scores(q, k, idx[None], self.windows.get(key, 0)), dim=-1)
            attended = probs[..., :start].sum(dim=(1, 2))[0]       # over the step's queries and heads
            idx = torch.cat([torch.topk(attended, top).indices.sort().values, idx])
        new_k, new_v = processor(k[:, idx], v[:, idx], idx[None])
        rows = torch.full_like(idx, b)
        e["k"] = e["k"].index_put((rows, idx), new_k[0])
        e["v"] = e["v"].index_put((rows, idx), new_v[0])

    @staticmethod
    def _keys(e):
        if "kept" not in e:
            return e["k"]
        B, n, H, kept = e["k_pruned"].shape
        D = e["k_recent"].shape[-1]
        full = torch.zeros(B, n, H, D, dtype=e["k_pruned"].dtype, device=e["k_pruned"].device)
        full.scatter_(3, e["kept"][:, None].expand(B, n, H, kept), e["k_pruned"])
        return torch.cat([full, e["k_recent"]], 1)

    def compress(self):
        """End of prefill: apply ThinK's key-channel pruning to the targeted sites."""
        self.prefilled = True
        for key, e in self.entries.items():
            think = self.policy(self.site_of(key), "prune_key_channels")
            if think is None or "kept" in e or "k" not in e or float(think["ratio"]) <= 0:
                continue
            k, q = e["k"], e["q_obs"]
            B, n, Hk, D = k.shape
            recent = min(int(think["recent"]), n)
            keep = max(1, int((1 - float(think["ratio"])) * D))
            old, new = k[:, :n - recent], k[:, n - recent:]
            qg = q.unflatten(2, (Hk, q.shape[2] // Hk))                   # group query heads per KV head
            score = qg.pow(2).mean(dim=(1, 3)) * old.pow(2).mean(dim=1)   # [B, Hk, D]
            kept = torch.topk(score, keep, dim=-1).indices.sort(-1).values
            e["kept"] = kept
            e["k_pruned"] = torch.gather(old, 3, kept[:, None].expand(B, old.shape[1], Hk, keep)).contiguous()
            e["k_recent"] = new.contiguous()
            del e["k"], e["q_obs"]

    def scan_state(self, key):
        """A segment scan's state: (carries after the last complete segment, the open segment's inputs)."""
        return self.states.get(key)

    def keep_scan_state(self, key, carries, rest):
        self.states[key] = (tuple(carries), rest)

    def recurrent_state(self, key, initial):
        """A per-step recurrence's state after the tokens so far (`initial` before any)."""
        st = self.states.get(key)
        return initial if st is None else st[0][0]

    def keep_recurrent_state(self, key, state):
        self.states[key] = ((state,), None)

    def nbytes(self):
        kv = sum(t.numel() * t.element_size() for e in self.entries.values() for name, t in e.items()
                 if name != "q_obs")
        return kv + sum(t.numel() * t.element_size() for carries, rest in self.states.values()
                        for t in (*carries, rest) if t is not None)


def causal_scores(q, k, qpos, window=0):
    """Scaled scores [B, H, Tq, Tk] of queries at `qpos` over cached keys at 0..Tk-1 (K/V heads
    repeated for the query heads), -inf where causality or the window forbids."""
    D = q.shape[3]
    k, _ = repeat_kv(k, k, q.shape[2])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    kp = torch.arange(k.shape[1], device=q.device)[None, None, None, :]
    allowed = kp <= qpos[:, None, :, None]
    if window:
        allowed = allowed & (qpos[:, None, :, None] - kp < window)
    return scores.masked_fill(~allowed, float("-inf"))


def topk_attention(q, k, v, top: int, dense_heads: int, qpos, window=0):
    """LycheeDecode-style hybrid heads: dense heads attend to all keys; the others to the `top`
    keys the dense heads weight most (per sample and query)."""
    B, Tq, H = q.shape[:3]
    Tk = k.shape[1]
    scores = causal_scores(q, k, qpos, window)
    k, v = repeat_kv(k, v, H)
    probs = torch.softmax(scores, dim=-1)
    if 0 < dense_heads < H and top < Tk:
        chosen = torch.topk(probs[:, :dense_heads].mean(1), top, dim=-1).indices          # [B, Tq, top]
        keep = torch.zeros(B, Tq, Tk, dtype=torch.bool, device=q.device).scatter(2, chosen, True)
        sparse = scores[:, dense_heads:].masked_fill(~keep[:, None], float("-inf"))
        probs = torch.cat([probs[:, :dense_heads], torch.softmax(sparse, dim=-1)], dim=1)
    probs = torch.nan_to_num(probs, nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class TokenCache:
    """The incremental path of models that have no per-site K/V form (segment scans, non-causal
    routing, data-dependent halting): it keeps the token history and recomputes, which is exact."""

    def __init__(self):
        self.tokens = None
        self.length = 0

    def extend(self, tokens):
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], 1)
        self.length = self.tokens.shape[1]
        return self.tokens

    def nbytes(self):
        return 0 if self.tokens is None else self.tokens.numel() * self.tokens.element_size()


def next_token_probs(logits, temperature: float = 1.0, top_k=None, top_p=None):
    """The sampling distribution [B, V] of the next token given its logits [B, V] (temperature > 0).

    softmax(logits / temperature) in fp32; `top_k` keeps the k most probable tokens, then `top_p`
    (nucleus) keeps, of what remains renormalised, the smallest set of most probable tokens whose
    probability sums to >= top_p (always at least the most probable one); the kept probabilities
    are renormalised. Of equal probabilities the lower token index ranks first.
    """
    if temperature <= 0:
        raise ValueError(f"next_token_probs needs temperature > 0 (0 is greedy), got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is None and top_p is None:
        return probs
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    ranked, idx = order.values, order.indices
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if top_k is not None:
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        keep = (torch.arange(ranked.shape[-1], device=ranked.device) < int(top_k)).expand_as(ranked)
        ranked = ranked * keep
        ranked = ranked / ranked.sum(-1, keepdim=True)
    if top_p is not None and top_p < 1:
        before = ranked.cumsum(-1) - ranked            # the mass of the more probable tokens
        keep = keep & (before < top_p)
        keep[..., 0] = True
    probs = torch.zeros_like(probs).scatter(-1, idx, torch.where(keep, ranked, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def sample_next(logits, temperature: float = 1.0, top_k=None, top_p=None, generator=None):
    """Next token ids [B] from logits [B, V]: argmax at temperature 0 (of equal logits the lowest
    index), else one draw per row from `next_token_probs` with torch.multinomial(generator=...)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def lm_logits(out):
    """The last position's logits [B, V] of a language model's outputs (a tensor, or the dict entry
    "logits" of a model with several outputs)."""
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"generate samples from an output called `logits`; this model's outputs are "
                             f"{', '.join(sorted(out))}")
        out = out["logits"]
    if out.dim() == 3:
        return out[:, -1]
    if out.dim() == 2:
        return out
    raise ValueError(f"generate needs logits [B, T, vocab] or [B, vocab], got shape {tuple(out.shape)}")


def lm_sample(model, prompt, max_new_tokens: int, temperature, top_k, top_p, eos_token_id, generator):
    """New tokens [B, n_new] after the unpadded `prompt` [B, n]: one `prefill`, then one `decode` per
    token; a sample that produced eos_token_id repeats it, and the loop stops when all have."""
    if max_new_tokens <= 0:
        return prompt[:, :0]
    out, cache = model.prefill(prompt)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    new = []
    for i in range(max_new_tokens):
        nxt = sample_next(lm_logits(out), temperature, top_k, top_p, generator).to(prompt.dtype)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done = done | (nxt == eos_token_id)
        new.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        out, cache = model.decode(nxt[:, None], cache)
    return torch.cat(new, 1) if new else prompt[:, :0]


def lm_generate(model, prompt, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                eos_token_id=None, attention_mask=None, generator=None):
    """Autoregressive generation through `model.prefill` / `model.decode`; returns LongTensor
    [B, n_prompt + n_new]: the prompt as given, then the new tokens.

    temperature 0 is greedy (argmax; of equal logits the lowest index); otherwise each token is
    drawn from softmax(logits / temperature) filtered by top_k, then top_p (`next_token_probs`),
    with torch.multinomial(generator=generator): a seeded torch.Generator reproduces the output.
    The logits are the model's output (or its "logits" output) at the last position. A sample that
    produced `eos_token_id` keeps emitting it; generation stops early once every sample has.
    Runs under torch.no_grad() in the model's current mode: call `.eval()` first for inference.

    `attention_mask` [B, n_prompt] (1: real token, 0: left padding) allows prompts of different
    lengths. Pad tokens are never fed to the model (they would enter its recurrent state or cache):
    the samples are grouped by real prompt length, each group is prefilled and decoded as its own
    batch on its unpadded prompts (its own cache), groups in order of increasing length, and the
    rows are reassembled in the input's order and left padding. Each row is what generating it
    alone gives (up to the batch's floating-point effects); a group that stopped early at
    eos_token_id is padded with it. Without a mask every position is a real token.
    """
    if prompt.dim() != 2:
        raise ValueError(f"generate needs a prompt of token ids [B, n], got shape {tuple(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, n = prompt.shape
    max_new_tokens = max(int(max_new_tokens), 0)
    with torch.no_grad():
        if attention_mask is None:
            if n == 0:
                raise ValueError("generate needs at least one prompt token")
            return torch.cat([prompt, lm_sample(model, prompt, max_new_tokens, temperature, top_k, top_p,
                                                eos_token_id, generator)], 1)
        mask = attention_mask.to(device=prompt.device) != 0
        if mask.shape != prompt.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; the prompt's is {tuple(prompt.shape)}")
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(n, device=mask.device)[None] >= (n - lengths)[:, None]):
            raise ValueError("attention_mask must be 1 for the real tokens and 0 for left padding only")
        if B and int(lengths.min()) == 0:
            raise ValueError("every sample needs at least one real prompt token (attention_mask 1)")
        out = torch.cat([prompt, prompt.new_full((B, max_new_tokens), 0 if eos_token_id is None else eos_token_id)], 1)
        width = 0
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero()[:, 0]
            new = lm_sample(model, prompt[rows, n - length:], max_new_tokens, temperature, top_k, top_p,
                            eos_token_id, generator)
            out[rows, n:n + new.shape[1]] = new
            width = max(width, new.shape[1])
        return out[:, :n + width]
