"""Depth-recurrent Transformer (Chen 2026), hand-written: one shared block iterated `steps` times."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.reference.common import SelfAttention, load_archc_state


class LayerScale(nn.Module):
    def __init__(self, d: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), init))

    def forward(self, x):
        return x * self.gamma


class MLP(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Step(nn.Module):
    def __init__(self, d, heads, ffn, scale_init, gate_bias):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = SelfAttention(d, heads, rope=False)
        self.attn_scale = LayerScale(d, scale_init)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.mlp = MLP(d, ffn)
        self.mlp_scale = LayerScale(d, scale_init)
        self.gate = nn.Linear(d, d)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, h, adj):
        f = h + self.attn_scale(self.attn(self.attn_norm(h), mask=adj))
        f = f + self.mlp_scale(self.mlp(self.mlp_norm(f)))
        g = torch.sigmoid(self.gate(h))
        return h + g * (f - h)          # identity-biased gated update


class DepthRecurrentRef(nn.Module):
    def __init__(self, vocab=32, d=64, heads=4, ffn=None, steps=8, classes=2, scale_init=0.1, gate_bias=-2.0):
        super().__init__()
        self.steps = steps
        self.encoder = nn.Embedding(vocab, d)
        self.core = Step(d, heads, ffn or 4 * d, scale_init, gate_bias)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, tokens, adj):
        h = self.encoder(tokens)
        for _ in range(self.steps):
            h = self.core(h, adj)
        return self.head(self.norm(h))

    def load_archc_state(self, state):
        return load_archc_state(self, state)
