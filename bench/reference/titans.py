"""Titans, Memory-as-Context (Behrouz et al. 2024), hand-written.

The long-term memory is a 2-layer MLP whose weights are per-sequence state. Each segment reads the
memory with its queries, attends over [persistent tokens; memory answer; segment] (causal: the
persistent keys visible to all, the memory answer for position j from position j on, causal within
the segment), then writes the memory with one inner gradient step on
sum_t lr_t * mean((M(k_t) - v_t)^2) with momentum and a forget gate, computed per sample with
torch.func (grad under vmap), and gates its output with the memory before the write (the last
position: after it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import grad, vmap

from bench.reference.common import SelfAttention, SwiGLU, load_archc_state


def memory_apply(w0, w1, x):
    """The memory MLP for one sample: x [T, d] -> [T, d]."""
    return F.gelu(x @ w0.T) @ w1.T


def inner_loss(w0, w1, k, v, lr):
    return ((memory_apply(w0, w1, k) - v).pow(2).mean(-1) * lr).sum()


_inner_grad = vmap(grad(inner_loss, argnums=(0, 1)))


class NeuralMemory(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w0 = nn.Parameter(torch.randn(hidden, d) / d ** 0.5)
        self.w1 = nn.Parameter(torch.randn(d, hidden) / hidden ** 0.5)


class Layer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = SelfAttention(d, heads)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.mlp = SwiGLU(d, ffn)

    def forward(self, x, mask):
        h = x + self.attn(self.attn_norm(x), mask=mask)
        return h + self.mlp(self.mlp_norm(h))


class TitansMACRef(nn.Module):
    def __init__(self, vocab=64, d=64, heads=4, ffn=None, seg=16, persist=4, mem_hidden=None, max_lr=0.1):
        super().__init__()
        ffn, mem_hidden = ffn or 4 * d, mem_hidden or 2 * d
        self.d, self.seg, self.persist, self.max_lr = d, seg, persist, max_lr
        self.embed = nn.Embedding(vocab, d)
        self.ltm = NeuralMemory(d, mem_hidden)
        self.persistent = nn.Parameter(torch.randn(persist, d) * 0.02)
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.lr_gate = nn.Linear(d, 1, bias=False)
        self.momentum_gate = nn.Linear(d, 1, bias=False)
        self.forget_gate = nn.Linear(d, 1, bias=False)
        self.core = Layer(d, heads, ffn)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        B, T = tokens.shape
        assert T % self.seg == 0, "sequence length must be a multiple of seg"
        x = self.embed(tokens)
        n = self.persist + 2 * self.seg
        visible = self.persist + self.seg
        # causal, and a key visible to a query when its segment position (-1: persistent) is at
        # most the query's: the memory token h_j = M(q_j) is seen from segment position j on
        seg_pos = torch.arange(self.seg, device=x.device)
        slot = torch.cat([torch.full((self.persist,), -1, device=x.device), seg_pos, seg_pos])
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & (slot[None, :] <= slot[:, None])
        w0 = self.ltm.w0.expand(B, -1, -1)
        w1 = self.ltm.w1.expand(B, -1, -1)
        m0, m1 = torch.zeros_like(w0), torch.zeros_like(w1)
        outputs = []
        for s in x.split(self.seg, dim=1):
            h = vmap(memory_apply)(w0, w1, F.normalize(self.query(s), dim=-1, eps=1e-6))
            context = torch.cat([self.persistent.expand(B, -1, -1), h, s], dim=1)
            o = self.core(context, mask)[:, visible:]
            lr = self.max_lr * torch.sigmoid(self.lr_gate(o)[..., 0])
            eta = torch.sigmoid(self.momentum_gate(o)[..., 0].mean(1))[:, None, None]
            alpha = torch.sigmoid(self.forget_gate(o)[..., 0].mean(1))[:, None, None]
            q = F.normalize(self.query(o), dim=-1, eps=1e-6)
            early = vmap(memory_apply)(w0, w1, q[:, :-1])          # before this segment's write
            g0, g1 = _inner_grad(w0, w1, F.normalize(self.key(o), dim=-1, eps=1e-6), self.value(o), lr)
            m0, m1 = eta * m0 - g0, eta * m1 - g1
            w0, w1 = (1 - alpha) * w0 + m0, (1 - alpha) * w1 + m1
            read = torch.cat([early, vmap(memory_apply)(w0, w1, q[:, -1:])], dim=1)
            outputs.append(o * torch.sigmoid(read))
        return self.head(self.norm(torch.cat(outputs, dim=1)))

    def load_archc_state(self, state):
        return load_archc_state(self, state)
