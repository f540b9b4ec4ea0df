"""Parity with public reference implementations (PyPI, test-only dependencies), weights copied.

Each test builds the reference module, copies archc's randomly initialised weights into it (or
the reverse), runs both on the same inputs and compares outputs, final states and gradients.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import archc.stdlib as stdlib
from archc.ir.interpret import init_params, run

# -- TRM: lucidrains' tiny-recursive-model -----------------------------------------------------------


def _rope(x):
    """Half-split rotary embedding on [B, T, H, D], positions 0..T-1, base 10000 (as TRM's)."""
    T, D = x.shape[1], x.shape[-1]
    freq = 10000.0 ** (-torch.arange(D // 2, dtype=x.dtype) * 2 / D)
    ang = torch.arange(T, dtype=x.dtype)[:, None] * freq
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class _PostNormNet(torch.nn.Module):
    """TRM's network written directly in torch: 2 post-norm layers (attention + SwiGLU, weightless RMSNorm)."""

    def __init__(self, params, heads, eps):
        super().__init__()
        self.w = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v.detach().clone())
                                         for k, v in params.items() if k.startswith("net.")})
        self.heads, self.eps = heads, eps

    def norm(self, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        for i in (0, 1):
            w = lambda name: self.w[f"net_layer{i}_{name}_weight"]     # noqa: E731
            heads = lambda t: t.unflatten(-1, (self.heads, -1))       # noqa: E731
            q, k, v = _rope(heads(x @ w("attn_q").T)), _rope(heads(x @ w("attn_k").T)), heads(x @ w("attn_v").T)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = self.norm(x + a.transpose(1, 2).flatten(-2) @ w("attn_o").T)
            mlp = (F.silu(x @ w("mlp_gate").T) * (x @ w("mlp_up").T)) @ w("mlp_down").T
            x = self.norm(x + mlp)
        return x


def test_trm_matches_tiny_recursive_model():
    trm_pkg = pytest.importorskip("tiny_recursive_model")
    (g,) = stdlib.graphs("trm")
    b = {"vocab": 10, "d": 16, "heads": 2, "h_cycles": 3, "l_cycles": 2}
    p = {k: v.requires_grad_() for k, v in init_params(g, b, seed=0).items()}
    torch.manual_seed(0)
    ref = trm_pkg.TinyRecursiveModel(dim=16, num_tokens=10, network=_PostNormNet(p, 2, 1e-5),
                                     num_refinement_blocks=3, num_latent_refinements=2)
    with torch.no_grad():
        ref.input_embed.weight.copy_(p["embed.weight"] * math.sqrt(16))   # TRM scales embeddings by sqrt(d)
        ref.to_pred.weight.copy_(p["head.weight"])
    tokens = torch.randint(0, 10, (2, 6))
    z = torch.zeros(2, 6, 16)
    out = run(g, p, {"tokens": tokens, "z_h": z, "z_l": z, "reset": torch.ones(2, dtype=torch.bool)}, b)
    y0, z0 = p["h_init"].detach().expand(2, 6, 16), p["l_init"].detach().expand(2, 6, 16)
    outputs, latents, pred, _ = ref(tokens, y0, z0)
    torch.testing.assert_close(out["logits"], pred, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["next_z_h"], outputs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["next_z_l"], latents, atol=1e-5, rtol=1e-4)
    # gradients: only the last of the h_cycles refinement blocks is differentiated, in both
    out["logits"].pow(2).mean().backward()
    pred.pow(2).mean().backward()
    for name, rp in ref.network.w.items():           # net_layer0_attn_q_weight -> net.layer0.attn.q.weight
        torch.testing.assert_close(p[name.replace("_", ".")].grad, rp.grad, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(p["embed.weight"].grad, ref.input_embed.weight.grad * math.sqrt(16), atol=1e-5,
                               rtol=1e-3)
    torch.testing.assert_close(p["head.weight"].grad, ref.to_pred.weight.grad, atol=1e-5, rtol=1e-3)



# -- Titans: lucidrains' titans-pytorch NeuralMemory ---------------------------------------------------


def test_titans_memory_matches_titans_pytorch():
    titans = pytest.importorskip("titans_pytorch")
    g = next(g for g in stdlib.graphs("titans") if g.name == "TitansLMM")
    p = {k: v.requires_grad_() for k, v in init_params(g, seed=0).items()}
    torch.manual_seed(0)
    # one head, a 2-layer GELU MLP memory without the residual LayerNorm wrapper, weights committed
    # after every chunk (batch_size = chunk_size): the chunked update rule of Titans eqs. 10 and 13
    ref = titans.NeuralMemory(dim=16, chunk_size=4, batch_size=4, heads=1, momentum=True,
                              mem_model_norm_add_residual=False, default_model_kwargs=dict(depth=2, expansion_factor=2.))
    pairs = {"retrieve_norm.weight": "lmm.retrieve_norm.weight", "store_norm.weight": "lmm.store_norm.weight",
             "to_queries.weight": "lmm.query.weight", "to_keys.weight": "lmm.key.weight",
             "to_values.weight": "lmm.value.weight",
             "to_adaptive_step.0.weight": "lmm.lr_gate.weight", "to_adaptive_step.0.bias": "lmm.lr_gate.bias",
             "to_momentum.0.weight": "lmm.momentum_gate.weight", "to_momentum.0.bias": "lmm.momentum_gate.bias",
             "to_decay_factor.0.weight": "lmm.forget_gate.weight", "to_decay_factor.0.bias": "lmm.forget_gate.bias"}
    refp = dict(ref.named_parameters())
    with torch.no_grad():
        for theirs, ours in pairs.items():
            refp[theirs].copy_(p[ours])
        for i in (0, 1):                 # theirs: x @ W with W [in, out]; ours: W [out, in]
            refp[f"memory_model_parameters.{i}"].copy_(p[f"lmm.mem.w{i}"].T[None])
    x = torch.randn(2, 12, 16)
    out = run(g, p, {"x": x})
    y, state = ref(x)
    torch.testing.assert_close(out["y"], y, atol=1e-5, rtol=1e-4)
    for i in (0, 1):                     # the memory's weights after the last chunk
        torch.testing.assert_close(out[f"w{i}"], state.weights[f"weights.{i}"].transpose(-1, -2), atol=1e-5,
                                   rtol=1e-4)
    # the outer gradient flows through the inner updates identically
    (out["y"].pow(2).mean() + out["w1"].pow(2).mean()).backward()
    (y.pow(2).mean() + state.weights["weights.1"].pow(2).mean()).backward()
    for theirs, ours in pairs.items():
        torch.testing.assert_close(p[ours].grad, refp[theirs].grad, atol=1e-5, rtol=1e-3, msg=lambda s: f"{ours}: {s}")
    for i in (0, 1):
        torch.testing.assert_close(p[f"lmm.mem.w{i}"].grad, refp[f"memory_model_parameters.{i}"].grad[0].T,
                                   atol=1e-5, rtol=1e-3)


# -- HCAM: lucidrains' HTM-pytorch ---------------------------------------------------------------------


def _hcam_params(ref):
    a = ref.attn
    kv = a.attn.to_kv.weight
    p = {"norm.weight": ref.norm.weight, "norm.bias": ref.norm.bias,
         "attn.summary_query.weight": a.to_summary_queries.weight, "attn.summary_query.bias": a.to_summary_queries.bias,
         "attn.summary_key.weight": a.to_summary_keys.weight, "attn.summary_key.bias": a.to_summary_keys.bias,
         "attn.q.weight": a.attn.to_q.weight, "attn.k.weight": kv[:64], "attn.v.weight": kv[64:],
         "attn.o.weight": a.attn.to_out.weight, "attn.o.bias": a.attn.to_out.bias}
    return {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}


def test_hcam_matches_htm_pytorch():
    """HTMBlock(dim 64, 4 heads, chunk 8, top-2): outputs and every parameter gradient."""
    htm = pytest.importorskip("htm_pytorch")
    torch.manual_seed(0)
    ref = htm.HTMBlock(dim=64, heads=4, dim_head=16, topk_mems=2, mem_chunk_size=8)
    with torch.no_grad():
        for w in ref.parameters():
            w.normal_(0, 0.2)                      # biases and norm affine away from their trivial init
    (g,) = stdlib.graphs("hcam")
    p = _hcam_params(ref)
    assert set(p) == {q.name for q in g.params}
    queries, memories = torch.randn(2, 5, 64), torch.randn(2, 64, 64)
    out = run(g, p, {"queries": queries, "memories": memories})["out"]
    expected = ref(queries, memories)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    a = ref.attn                                    # the reference's gradients, in archc's names
    ref_grads = {"norm.weight": ref.norm.weight.grad, "attn.summary_query.weight": a.to_summary_queries.weight.grad,
                 "attn.summary_key.bias": a.to_summary_keys.bias.grad, "attn.q.weight": a.attn.to_q.weight.grad,
                 "attn.k.weight": a.attn.to_kv.weight.grad[:64], "attn.v.weight": a.attn.to_kv.weight.grad[64:],
                 "attn.o.bias": a.attn.to_out.bias.grad}
    for k, gr in ref_grads.items():
        torch.testing.assert_close(p[k].grad, gr, atol=1e-4, rtol=1e-3, msg=lambda s: f"{k}: {s}")
