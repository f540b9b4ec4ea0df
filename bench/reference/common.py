"""Pieces shared by the reference models: rotary embedding, multi-head attention, SwiGLU, loading."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Rotary(nn.Module):
    """Half-split rotary embedding with a cos/sin table cached per (length, device)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) * 2 / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._table: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def table(self, n: int, device):
        if self._table is None or self._table[0] < n or self._table[1] != device:
            ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
            self._table = (n, device, ang.cos(), ang.sin())
        return self._table[2], self._table[3]

    def forward(self, x, pos=None):
        """x: [B, H, T, D]; pos: [B, T] token positions (default 0..T-1)."""
        T = x.shape[2]
        if pos is None:
            cos, sin = self.table(T, x.device)
            cos, sin = cos[:T], sin[:T]
        else:
            cos, sin = self.table(int(pos.max()) + 1, x.device)
            cos, sin = cos[pos][:, None], sin[pos][:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, rope: bool = True):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(d // heads) if rope else None

    def forward(self, x, causal=False, mask=None, pos=None):
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(d, ffn, bias=False)
        self.up = nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def load_archc_state(model: nn.Module, state: dict, stacked: dict[str, str] | None = None):
    """Load a generated module's state_dict: `stacked` maps an archc prefix holding a layer array
    (weights stacked on dim 0, e.g. `core.`) to the reference's ModuleList prefix (`core.{i}.`)."""
    own = {}
    for key, value in state.items():
        for prefix, target in (stacked or {}).items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                for i in range(value.shape[0]):
                    own[target.format(i=i) + rest] = value[i]
                break
        else:
            own[key] = value
    model.load_state_dict(own)
    return model
