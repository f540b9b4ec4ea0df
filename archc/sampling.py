"""Samplers that drive generated modules: the diffusion-forcing sampler for recurrent-depth models.

`diffusion_forcing_generate` runs a module with the interface of stdlib `rdepth_diffusion_sampler`
(inputs `tokens` [B, L], `state` [B, L, d], `frozen` [B, L]; outputs `logits`, `next_state`; the
recurrence count is the attribute `steps`, the state width the attribute `d`).
"""
from __future__ import annotations

import torch


def _run(model, tokens, state, frozen, steps):
    saved = model.steps
    model.steps = steps
    try:
        out = model(tokens=tokens, state=state, frozen=frozen)
    finally:
        model.steps = saved
    return out["logits"], out["next_state"]


@torch.no_grad()
def diffusion_forcing_generate(model, prompt: torch.Tensor, new_tokens: int, *, inner: int = 4,
                               prefill_steps: int | None = None, max_wavefront: int = 16, headway: int = 1,
                               exit_threshold: float = 0.03, init_std: float = 1.0,
                               seed: int = 0) -> tuple[torch.Tensor, int]:
    """Greedy diffusion-forcing generation; returns (tokens [B, P + new_tokens], model passes).

    The prompt runs once with `prefill_steps` recurrences (the module's `steps` by default) and is
    frozen. Then every pass runs `inner` recurrence steps on all unfrozen positions (the wavefront)
    in parallel, re-decodes the token after each of them, appends `headway` positions (state drawn
    from N(0, init_std^2), token from the last position's logits) while the wavefront holds fewer
    than `max_wavefront`, and freezes the longest prefix of the wavefront whose relative state change
    ||s' - s|| / ||s'|| is below `exit_threshold` in every sample. A full wavefront that froze nothing
    freezes its oldest position, so every pass makes progress. With max_wavefront = 1, inner = r and
    exit_threshold = inf this is autoregressive decoding with r recurrence steps per token.
    """
    gen = torch.Generator().manual_seed(seed)
    B, P = prompt.shape
    d = model.d
    total = P + new_tokens

    def fresh(n):
        return torch.randn(B, n, d, generator=gen) * init_std

    tokens = prompt.clone()
    logits, state = _run(model, tokens, fresh(P), torch.zeros(B, P, dtype=torch.bool),
                         prefill_steps if prefill_steps is not None else model.steps)
    passes, done = 1, P
    if new_tokens == 0:
        return tokens, passes
    tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
    state = torch.cat([state, fresh(1)], 1)
    while done < total:
        L = tokens.shape[1]
        frozen = (torch.arange(L) < done).expand(B, L)
        logits, new_state = _run(model, tokens, state, frozen, inner)
        passes += 1
        if L - 1 > done:                                 # re-decode the tokens after the wavefront's positions
            tokens[:, done + 1:] = logits[:, done:L - 1].argmax(-1)
        change = (new_state - state).norm(dim=-1) / new_state.norm(dim=-1).clamp_min(1e-6)
        state = new_state
        settled = (change[:, done:] < exit_threshold).all(0).long()
        n = int(settled.cumprod(0).sum())                # the longest converged prefix of the wavefront
        if n == 0 and L - done >= max_wavefront:
            n = 1
        done += n
        grow = min(headway, total - L, max_wavefront - (L - done))
        if grow > 0:
            nxt = logits[:, L - 1:L].argmax(-1)
            tokens = torch.cat([tokens, nxt.expand(B, grow)], 1)
            state = torch.cat([state, fresh(grow)], 1)
    return tokens[:, :total], passes
