"""Mixture-of-Recursions (Bae et al. 2025), hand-written: expert-choice routing over a shared block.

Per recursion r the router scores every token; the top ceil-free floor((n_r - r) / n_r * T) of the
tokens still active continue (hierarchical filtering). Selected tokens are gathered into a compact
[B, k, d] sequence in their original order, run through the shared block with their original
positions (rotary and causal order), and scattered back as x + alpha * sigmoid(score) * (f(x) - x).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn as nn

from bench.reference.common import SelfAttention, SwiGLU, load_archc_state


class Layer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = SelfAttention(d, heads)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.mlp = SwiGLU(d, ffn)

    def forward(self, x, pos=None):
        h = x + self.attn(self.attn_norm(x), causal=True, pos=pos)
        return h + self.mlp(self.mlp_norm(h))


class MoRRef(nn.Module):
    def __init__(self, vocab=256, d=64, heads=4, ffn=None, n_r=3, block_layers=2, alpha=1.0):
        super().__init__()
        ffn = ffn or 4 * d
        self.n_r, self.alpha = n_r, alpha
        self.embed = nn.Embedding(vocab, d)
        self.first = Layer(d, heads, ffn)
        self.core = nn.ModuleList(Layer(d, heads, ffn) for _ in range(block_layers))
        self.router = nn.Linear(d, 1, bias=False)
        self.last = Layer(d, heads, ffn)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.first(self.embed(tokens))
        B, T, d = x.shape
        active = torch.ones(B, T, dtype=torch.bool, device=x.device)
        router_bce = torch.zeros(B, T, device=x.device)
        for r in range(self.n_r):
            score = self.router(x)[..., 0]
            k = max(1, math.floor((self.n_r - r) / self.n_r * T + 1e-9))
            pos = score.masked_fill(~active, float("-inf")).topk(k, dim=1).indices.sort(dim=1).values
            index = pos[..., None].expand(B, k, d)
            x_sel = x.gather(1, index)
            y = x_sel
            for layer in self.core:
                y = layer(y, pos)     # causal among the selected tokens = causal by original position
            w = self.alpha * torch.sigmoid(score.gather(1, pos))[..., None]
            valid = active.gather(1, pos)
            new = torch.where(valid[..., None], x_sel + w * (y - x_sel), x_sel)
            x = x.scatter(1, index, new)
            active = torch.zeros_like(active).scatter(1, pos, valid)
            # the router's BCE towards the top-k choice (the paper's auxiliary loss), per token
            router_bce = router_bce + (F.softplus(score) - active.float() * score) / self.n_r
        return {"logits": self.head(self.norm(self.last(x))), "depth_mask": active, "router_bce": router_bce}

    def load_archc_state(self, state):
        return load_archc_state(self, state, stacked={"core.": "core.{i}."})
