"""Hierarchical Reasoning Model (Wang et al. 2025), hand-written.

Two post-norm Transformer modules at two timescales with additive input injection, the one-step
gradient (all but the final L and H updates of a segment run under no_grad), and ACT over segments
with a Q-head: a sample halts once q_halt > q_continue and keeps its state from then on.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bench.reference.common import SelfAttention, SwiGLU, load_archc_state


class PostNormLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.attn = SelfAttention(d, heads)
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.mlp = SwiGLU(d, ffn)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        h = self.attn_norm(x + self.attn(x))
        return self.mlp_norm(h + self.mlp(h))


class Reasoner(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.layer0 = PostNormLayer(d, heads, ffn)
        self.layer1 = PostNormLayer(d, heads, ffn)

    def forward(self, z, injection):
        return self.layer1(self.layer0(z + injection))


class HRMRef(nn.Module):
    def __init__(self, vocab=12, d=64, heads=2, ffn=None, h_cycles=2, l_cycles=2, segments=4):
        super().__init__()
        ffn = ffn or 4 * d
        self.d, self.h_cycles, self.l_cycles, self.segments = d, h_cycles, l_cycles, segments
        self.embed = nn.Embedding(vocab, d)
        self.low = Reasoner(d, heads, ffn)
        self.high = Reasoner(d, heads, ffn)
        self.head = nn.Linear(d, vocab, bias=False)
        self.q_head = nn.Linear(d, 2)
        self.z_h_init = nn.Parameter(torch.randn(d))
        self.z_l_init = nn.Parameter(torch.randn(d))

    def segment(self, z_h, z_l, x):
        with torch.no_grad():
            for i in range(self.h_cycles * self.l_cycles - 1):
                z_l = self.low(z_l, z_h + x)
                if (i + 1) % self.l_cycles == 0:
                    z_h = self.high(z_h, z_l)
        z_l = self.low(z_l, z_h + x)           # the one-step gradient: only the last L and H
        z_h = self.high(z_h, z_l)
        return z_h, z_l

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.embed(tokens) * math.sqrt(self.d)
        z_h = self.z_h_init.expand(B, T, self.d)
        z_l = self.z_l_init.expand(B, T, self.d)
        q = torch.zeros(B, 2, device=tokens.device)
        halted = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for _ in range(self.segments):
            new_h, new_l = self.segment(z_h.detach(), z_l.detach(), x)
            new_q = self.q_head(new_h[:, 0])
            keep = halted[:, None, None]
            z_h, z_l = torch.where(keep, z_h, new_h), torch.where(keep, z_l, new_l)
            q = torch.where(halted[:, None], q, new_q)
            halted = halted | (new_q[:, 0] > new_q[:, 1])
            if bool(halted.all()):
                break
        return {"logits": self.head(z_h), "q_logits": q}

    def load_archc_state(self, state):
        return load_archc_state(self, state)
