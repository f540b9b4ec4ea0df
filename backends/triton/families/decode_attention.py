"""Decode attention over a K/V cache shaped by the site's policies (inference only).

The cached step of a decodable model (SPEC §17) calls `cache.attend(key, site, q, k, v, positions,
window, reads)` per attention instance. This family's launcher does the same thing -- it appends
the new K/V with `KVCache.store` (or reads the entry of the site it shares with) -- and then runs
generated kernels directly on the cache's storage:

* **shared K/V** (`share_kv` across recursions or from another layer): the entry read is the
  producer's; nothing is copied. Query heads are grouped per K/V head (GQA): one program owns the
  Tq x G query rows of one K/V head, so each K/V block is loaded once for the whole group;
* **ThinK pruned keys** (`prune_key_channels`): after the prompt, the older keys are stored with
  only their kept channels ([B, n_old, Hk, kept] plus the channel indices [B, Hk, kept]) and the
  recent ones full width. The kernel gathers the query's kept channels once and scores the old
  keys on them -- the zero-filled full-width keys the reference rebuilds are never materialised;
* **LycheeDecode top-k** (`topk_decode`): after the prompt, the dense heads run first and also
  write their log-sum-exp; a second kernel averages the dense heads' probabilities per key; the
  top-k keys are picked by `torch.topk`; a third kernel runs the sparse heads over the selected
  keys only (gathered by index inside the kernel).

All kernels use an online softmax over BLOCK_N keys with the causal / window mask computed from
positions (keys are at 0..Tk-1, queries at `positions`); fully masked rows give 0, as in
`torch_runtime.attention`. Specialisation: the pruned-key path, the top-k path and the window mask
exist in the text only when the site's policies / attrs need them.

`matches` is False: the full forward's attention needs a backward, which this family does not
have. The emitter's K/V-cached step asks `matches_cached` and emits `call_cached`.
"""
from __future__ import annotations

from archc.backends.triton.families._util import config_space, kernel_name, render, tuning_source
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node
from archc.ir.ops import Op

FAMILY = "decode_attention"

CONFIGS = config_space(BLOCK_M=(1, 4, 16), BLOCK_N=(16, 32, 64, 128), num_warps=(2, 4, 8), num_stages=(1, 2))
DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def matches(node: Node, graph: Graph) -> bool:
    """Never in the full forward (no backward here); see `matches_cached`."""
    return False


def matches_cached(node: Node, graph: Graph) -> bool:
    """An attention site the K/V-cached step attends through the cache."""
    return node.op is Op.ATTEND and node.attr("site") is not None


def _policies(node: Node, graph: Graph) -> set[str]:
    site = node.attr("site")
    return {p.kind for p in graph.policies if site in p.targets}


def spec(node: Node, graph: Graph) -> tuple:
    kinds = _policies(node, graph)
    window = node.attr("window")
    has_window = window is not None and not (getattr(window, "is_number", True) and int(window) == 0)
    share = (node.attr("kv_share") or "").split(":")[0]
    return ("prune_key_channels" in kinds, "topk_decode" in kinds, has_window, share)


# -- kernel text -----------------------------------------------------------------------------------

_ROWS = '''
    b = tl.program_id(2).to(tl.int64)
    sp = tl.program_id(0) % SPLITS                   # this program's share of the keys (split-K)
    r = (tl.program_id(0) // SPLITS) * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // HG
    hi = H0 + tl.program_id(1) * HG + r % HG
    hk = (H0 + tl.program_id(1) * HG) // G
    mask_m = qi < Tq
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    q_row = (b * Tq + qi[:, None]) * H + hi[:, None]
    q = tl.load(q_ptr + q_row * D + d[None, :], mask=mask_m[:, None] & (d < D)[None, :], other=0.0)
    qp = tl.load(qpos_ptr + b * Tq + qi, mask=mask_m, other=0)
'''

_KEPT = '''
    c = tl.arange(0, BLOCK_KEPT)
    ch = tl.load(kept_ptr + (b * HK + hk) * KEPT + c, mask=c < KEPT, other=0)
    qk = tl.load(q_ptr + q_row * D + ch[None, :], mask=mask_m[:, None] & (c < KEPT)[None, :], other=0.0)
'''

_ONLINE = '''
        s = tl.where(allowed, s * scale, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + @PV@
        m_i = m_new
'''


def _mask(kk: str, window: bool) -> str:
    """`allowed` for keys at positions `kk` (broadcastable to [BM, BN]) and query positions qp."""
    text = f"mask_m[:, None] & valid & ({kk} <= qp[:, None])"
    if window:
        text += f" & (qp[:, None] - {kk} < window)"
    return f"        allowed = {text}"


def _block_all(name: str, pruned: bool, window: bool) -> str:
    """Loops over every cached key: the pruned old keys (kept channels), then the full-width ones."""
    pv = f"_{name}_pv(p, vv, USE_DOT)"
    vload = ("        vv = tl.load(v_ptr + ((b * Tk + n[:, None]) * HK + hk) * DV + e[None, :],\n"
             "                     mask=kv[:, None] & (e < DV)[None, :], other=0.0)")
    online = render(_ONLINE, PV=pv)
    parts = []
    parts.append('''    kend = tl.minimum(tl.max(qp, axis=0) + 1, Tk).to(tl.int32)     # causal: no key after the last query
    chunk = tl.cdiv(tl.cdiv(kend, SPLITS), BLOCK_N) * BLOCK_N
    klo = sp * chunk
    khi = tl.minimum(klo + chunk, kend)''')
    if pruned:
        parts.append(f'''    for n0 in range(klo, tl.minimum(khi, N_OLD), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv = (n < N_OLD) & (n < khi)
        valid = kv[None, :]
        ko = tl.load(ko_ptr + ((b * N_OLD + n[:, None]) * HK + hk) * KEPT + c[None, :],
                     mask=kv[:, None] & (c < KEPT)[None, :], other=0.0)
        s = _@NAME@_qk(qk, ko, USE_DOT)
{_mask("n[None, :]", window)}
{vload}
{online}''')
    parts.append(f'''    for n0 in range(tl.maximum(klo, N_OLD), khi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kv = n < khi
        valid = kv[None, :]
        kn = tl.load(kn_ptr + ((b * (Tk - N_OLD) + n[:, None] - N_OLD) * HK + hk) * D + d[None, :],
                     mask=kv[:, None] & (d < D)[None, :], other=0.0)
        s = _@NAME@_qk(q, kn, USE_DOT)
{_mask("n[None, :]", window)}
{vload}
{online}''')
    return "\n".join(parts).replace("@NAME@", name)


def _block_selected(name: str, pruned: bool, window: bool) -> str:
    """One loop over each query row's selected keys (indices [BM, BN] gathered inside the kernel)."""
    pv = "tl.sum(p[:, :, None] * vv, axis=1)"
    old = ""
    if pruned:
        old = '''
        is_old = valid & (n < N_OLD)
        ko = tl.load(ko_ptr + ((b * N_OLD + n[:, :, None]) * HK + hk) * KEPT + c[None, None, :],
                     mask=is_old[:, :, None] & (c < KEPT)[None, None, :], other=0.0)
        s += tl.sum(qk[:, None, :] * ko, axis=2)'''
    return f'''    for j0 in range(0, TOP, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = mask_m[:, None] & (j < TOP)[None, :]
        n = tl.load(idx_ptr + (b * Tq + qi[:, None]) * TOP + j[None, :], mask=valid, other=0)
        is_new = valid & (n >= N_OLD)
        kn = tl.load(kn_ptr + ((b * (Tk - N_OLD) + n[:, :, None] - N_OLD) * HK + hk) * D + d[None, None, :],
                     mask=is_new[:, :, None] & (d < D)[None, None, :], other=0.0)
        s = tl.sum(q[:, None, :] * kn, axis=2){old}
{_mask("n", window)}
        vv = tl.load(v_ptr + ((b * Tk + n[:, :, None]) * HK + hk) * DV + e[None, None, :],
                     mask=valid[:, :, None] & (e < DV)[None, None, :], other=0.0)
{render(_ONLINE, PV=pv)}'''


_SIG = ("q_ptr, ko_ptr, kept_ptr, kn_ptr, v_ptr, qpos_ptr, idx_ptr, o_ptr, lse_ptr, pm_ptr, pl_ptr, pa_ptr, Tq, Tk, "
        "N_OLD, H, HK, G, HG, H0,\n        D, DV, KEPT, TOP, SPLITS, window, scale, BLOCK_M: tl.constexpr, "
        "BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,\n        BLOCK_KEPT: tl.constexpr, "
        "USE_DOT: tl.constexpr, SPLIT: tl.constexpr")

_HELPERS = '''
@triton.jit
def _@NAME@_qk(a, b, USE_DOT: tl.constexpr):
    """[M, K] x [N, K] -> [M, N] scores."""
    if USE_DOT:
        s = tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        s = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    return s


@triton.jit
def _@NAME@_pv(p, v, USE_DOT: tl.constexpr):
    """[M, N] x [N, E] -> [M, E]."""
    if USE_DOT:
        o = tl.dot(p, v, input_precision="ieee")
    else:
        o = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return o
'''

_ATTEND = '''
@triton.jit
def _@NAME@_@KIND@(
        @SIG@):
@ROWS@
@KEPT@
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
@LOOP@
@EPILOGUE@
'''

_FINAL = '''    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(o_ptr + q_row * DV + e[None, :], out, mask=mask_m[:, None] & (e < DV)[None, :])'''

_SPLIT_FINAL = '''    if SPLIT:                                        # partial softmax state, merged by _combine
        prow = ((sp * tl.num_programs(2) + b) * Tq + qi[:, None]) * H + hi[:, None]
        tl.store(pm_ptr + prow, m_i[:, None], mask=mask_m[:, None])
        tl.store(pl_ptr + prow, l_i[:, None], mask=mask_m[:, None])
        tl.store(pa_ptr + prow * DV + e[None, :], acc, mask=mask_m[:, None] & (e < DV)[None, :])
    else:
@FINAL@'''

_COMBINE = '''
@triton.jit
def _@NAME@_combine(pm_ptr, pl_ptr, pa_ptr, o_ptr, lse_ptr, NROW, H, H0, SPLITS, DV, BLOCK_S: tl.constexpr,
                    BLOCK_DV: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Merge the split-K partial (max, sum, accumulator) of one (sample, query, head) row."""
    row = tl.program_id(0).to(tl.int64)
    h = H0 + tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    ms = s < SPLITS
    idx = (s * NROW + row) * H + h
    m = tl.load(pm_ptr + idx, mask=ms, other=-1.0e30)
    l = tl.load(pl_ptr + idx, mask=ms, other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(ms, tl.exp(m - top), 0.0)
    total = tl.sum(w * l, axis=0)
    e = tl.arange(0, BLOCK_DV)
    a = tl.load(pa_ptr + idx[:, None] * DV + e[None, :], mask=ms[:, None] & (e < DV)[None, :], other=0.0)
    out = tl.sum(w[:, None] * a, axis=0) / tl.maximum(total, 1e-30)
    tl.store(o_ptr + (row * H + h) * DV + e, tl.where(total > 0, out, 0.0), mask=e < DV)
    if WRITE_LSE:
        tl.store(lse_ptr + row * H + h, top + tl.log(tl.maximum(total, 1e-30)))
'''

_PROBS = '''
@triton.jit
def _@NAME@_dense_probs(
        @SIG@):
    """Mean over the dense heads 0..H0-1 of their attention probabilities: [B, Tq, Tk]."""
    b = tl.program_id(2).to(tl.int64)
    qi = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = qi < Tq
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (n < Tk)[None, :]
    is_new = (n < Tk) & (n >= N_OLD)
    d = tl.arange(0, BLOCK_D)
    qp = tl.load(qpos_ptr + b * Tq + qi, mask=mask_m, other=0)
@ALLOWED@
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for h in range(H0):
        hk = h // G
        q_row = (b * Tq + qi[:, None]) * H + h
        q = tl.load(q_ptr + q_row * D + d[None, :], mask=mask_m[:, None] & (d < D)[None, :], other=0.0)
        kn = tl.load(kn_ptr + ((b * (Tk - N_OLD) + n[:, None] - N_OLD) * HK + hk) * D + d[None, :],
                     mask=is_new[:, None] & (d < D)[None, :], other=0.0)
        s = _@NAME@_qk(q, kn, USE_DOT)
@OLD_SCORES@
        lse = tl.load(lse_ptr + q_row, mask=mask_m[:, None], other=float("inf"))
        total += tl.where(allowed, tl.exp(s * scale - lse), 0.0)
    tl.store(o_ptr + (b * Tq + qi[:, None]) * Tk + n[None, :], total / H0, mask=mask_m[:, None] & valid)
'''

_OLD_PROBS = '''        c = tl.arange(0, BLOCK_KEPT)
        ch = tl.load(kept_ptr + (b * HK + hk) * KEPT + c, mask=c < KEPT, other=0)
        qk = tl.load(q_ptr + q_row * D + ch[None, :], mask=mask_m[:, None] & (c < KEPT)[None, :], other=0.0)
        ko = tl.load(ko_ptr + ((b * N_OLD + n[:, None]) * HK + hk) * KEPT + c[None, :],
                     mask=(n < N_OLD)[:, None] & (c < KEPT)[None, :], other=0.0)
        s += _@NAME@_qk(qk, ko, USE_DOT)'''

_LAUNCHER = '''

@TUNING@


def _@NAME@_launch(kernel, tag, config, q, ko, kept, kn, v, qpos, idx, out, lse, n_old, kept_n, top, heads, hg, h0,
                   window, rows_per_head=True):
    B, Tq, H, D = q.shape
    Tk, HK, DV = v.shape[1], v.shape[2], v.shape[3]
    use_dot = min(D, DV) >= 16                 # tl.dot needs 16-wide tiles (BLOCK_KEPT is at least 16)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 4

    def run(meta):
        dot = use_dot and top == 0 and meta["BLOCK_M"] >= 16 and meta["BLOCK_N"] >= 16
        if not dot:      # broadcast products are [BLOCK_M, BLOCK_N, D]: no more rows than there are
            meta = dict(meta, BLOCK_M=min(meta["BLOCK_M"], triton.next_power_of_2(Tq * hg)))
        if rows_per_head:
            blocks = triton.cdiv(Tq * hg, meta["BLOCK_M"])
            # split-K: enough programs to fill the GPU when few rows read a long cache (decode)
            splits = 1 if top else max(1, min(triton.cdiv(Tk, meta["BLOCK_N"]),
                                              triton.cdiv(2 * sms, blocks * (heads // hg) * B), 64))
            grid = (blocks * splits, heads // hg, B)
        else:
            splits = 1
            grid = (triton.cdiv(Tq, meta["BLOCK_M"]), triton.cdiv(Tk, meta["BLOCK_N"]), B)
        part = [out] * 3
        if splits > 1:
            part = [torch.empty(splits, B, Tq, H, dtype=torch.float32, device=q.device) for _ in range(2)]
            part.append(torch.empty(splits, B, Tq, H, DV, dtype=torch.float32, device=q.device))
        kernel[grid](q, ko, kept, kn, v, qpos, idx, out, lse, *part, Tq, Tk, n_old, H, HK, H // HK, hg, h0, D, DV,
                     kept_n, top, splits, window, 1.0 / D ** 0.5, BLOCK_D=triton.next_power_of_2(D),
                     BLOCK_DV=triton.next_power_of_2(DV), BLOCK_KEPT=max(16, triton.next_power_of_2(kept_n)),
                     USE_DOT=dot, SPLIT=splits > 1, **meta)
        if splits > 1:
            _@NAME@_combine[(B * Tq, heads)](*part, out, lse, B * Tq, H, h0, splits, DV,
                                             BLOCK_S=triton.next_power_of_2(splits),
                                             BLOCK_DV=triton.next_power_of_2(DV), WRITE_LSE=lse is not out)
    run(_@NAME@_config(tag, (B, Tq * hg, heads, Tk), config, run))


def @NAME@(cache, key, site, q, k, v, positions, window=0, reads=None, config=None):
    """Cached attention for `site` (@DOC@): appends k/v (or reads `reads`) and attends."""
    e = cache.store(key, site, q, k, v, reads, window)
    q = q.float().contiguous()
    qpos = positions.contiguous()
    vv = e["v"].float().contiguous()
    B, Tq, H = q.shape[:3]
    Tk, HK, DV = vv.shape[1], vv.shape[2], vv.shape[3]
@KEYS@
    out = torch.zeros(B, Tq, H, DV, dtype=torch.float32, device=q.device)
    if B * Tq * Tk == 0:
        return out
    args = (ko, kept, kn, vv, qpos)
@TOPK@
    _@NAME@_launch(_@NAME@_attend, "@NAME@_attend", config, q, *args, qpos, out, out, n_old, kept_n, 0, H, H // HK, 0,
                   window)
    return out
'''

_KEYS_PRUNED = '''    if "kept" in e:                                   # ThinK: old keys hold only their kept channels
        ko = e["k_pruned"].float().contiguous()
        kept = e["kept"].contiguous()
        kn = e["k_recent"].float().contiguous()
        n_old, kept_n = ko.shape[1], ko.shape[3]
    else:
        kn = e["k"].float().contiguous()
        ko, kept, n_old, kept_n = kn, qpos, 0, 0'''

_KEYS_DENSE = '''    kn = e["k"].float().contiguous()
    ko, kept, n_old, kept_n = kn, qpos, 0, 0'''

_TOPK = '''    top = cache.policy(site, "topk_decode")
    if top is not None and cache.prefilled:
        k_top, dense = int(top["k"]), int(top["dense_heads"])
        if 0 < dense < H and k_top < Tk:                 # LycheeDecode: sparse heads see the top-k keys
            lse = torch.empty(B, Tq, H, dtype=torch.float32, device=q.device)
            _@NAME@_launch(_@NAME@_attend_lse, "@NAME@_attend_lse", config, q, *args, qpos, out, lse, n_old, kept_n,
                           0, dense, 1, 0, window)
            probs = torch.empty(B, Tq, Tk, dtype=torch.float32, device=q.device)
            _@NAME@_launch(_@NAME@_dense_probs, "@NAME@_dense_probs", config, q, *args, qpos, probs, lse, n_old,
                           kept_n, 0, dense, 1, dense, window, rows_per_head=False)
            chosen = torch.topk(probs, k_top, dim=-1).indices.contiguous()
            _@NAME@_launch(_@NAME@_attend_selected, "@NAME@_attend_selected", config, q, *args, chosen, out, lse,
                           n_old, kept_n, k_top, H - dense, 1, dense, window)
            return out'''


def _split_epilogue(final: str) -> str:
    """Partials when the keys are split across programs, else `final` (the normalised output)."""
    return render(_SPLIT_FINAL, FINAL="\n".join("    " + line for line in final.splitlines())).rstrip("\n")


def generate(node: Node, graph: Graph) -> KernelSource:
    pruned, topk, window, share = sp = spec(node, graph)
    name = kernel_name(FAMILY, sp)
    kept = _KEPT.strip("\n") if pruned else ""
    rows = _ROWS.strip("\n")
    split_rows = rows
    plain_rows = rows.replace("    sp = tl.program_id(0) % SPLITS                   # this program's share of the keys (split-K)\n", "")
    plain_rows = plain_rows.replace("(tl.program_id(0) // SPLITS)", "tl.program_id(0)")
    final = _FINAL
    kernels = [render(_HELPERS, NAME=name), render(_COMBINE, NAME=name),
               render(_ATTEND, NAME=name, KIND="attend", SIG=_SIG, ROWS=split_rows, KEPT=kept,
                      LOOP=_block_all(name, pruned, window), EPILOGUE=_split_epilogue(final))]
    if topk:
        lse = "    tl.store(lse_ptr + q_row, m_i[:, None] + tl.log(tl.maximum(l_i, 1e-30))[:, None], mask=mask_m[:, None])"
        kernels.append(render(_ATTEND, NAME=name, KIND="attend_lse", SIG=_SIG, ROWS=split_rows, KEPT=kept,
                              LOOP=_block_all(name, pruned, window), EPILOGUE=_split_epilogue(final + "\n" + lse)))
        allowed = "    allowed = mask_m[:, None] & valid & (n[None, :] <= qp[:, None])"
        if window:
            allowed += " & (qp[:, None] - n[None, :] < window)"
        kernels.append(render(_PROBS, NAME=name, SIG=_SIG, ALLOWED=allowed, OLD_SCORES=_OLD_PROBS.replace("@NAME@", name) if pruned else ""))
        kernels.append(render(_ATTEND, NAME=name, KIND="attend_selected", SIG=_SIG, ROWS=plain_rows, KEPT=kept,
                              LOOP=_block_selected(name, pruned, window), EPILOGUE=final))
    doc = ", ".join([w for w, on in (("ThinK-pruned keys", pruned), ("top-k sparse heads", topk),
                                     ("window", window), (f"{share}-shared K/V", bool(share))) if on]) or "dense"
    launcher = render(_LAUNCHER, NAME=name, DOC=doc, TUNING=tuning_source(name, CONFIGS, DEFAULT),
                      KEYS=_KEYS_PRUNED if pruned else _KEYS_DENSE,
                      TOPK=render(_TOPK, NAME=name) if topk else "")
    src = "\n\n".join(k.strip("\n") for k in kernels) + "\n" + launcher
    return KernelSource(name=name, family=FAMILY, source=src, configs=CONFIGS, default=DEFAULT,
                        key=("q", "k"), needs_grad=False, doc=f"decode attention ({doc})")


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    return call_cached(node, ks, args)


def call_cached(node: Node, ks: KernelSource, args: list[str]) -> str:
    """args = (key, site, q, k, v, positions, window, reads): the arguments of `cache.attend`."""
    key, site, q, k, v, positions, window, reads = args
    return f"{ks.name}(cache, {key}, {site}, {q}, {k}, {v}, {positions}, {window}, reads={reads})"
