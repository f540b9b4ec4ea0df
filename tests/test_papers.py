"""Each stdlib paper's distinctive mechanism, checked against the paper's rule computed by hand.

(Forward/backward at tiny sizes, golden IR and backend agreement for every stdlib model are in
test_stdlib.py and test_torch_backend.py; reference-implementation parity is in test_parity.py.)
"""
import itertools
import math

import pytest
import torch

import archc.stdlib as stdlib
from archc.ir.analysis import weight_applications
from archc.ir.interpret import GraphModule, init_params, run, schedule_values
from archc.testing import decode_stepwise


# -- 1 LSTM-PINN -------------------------------------------------------------------------------------


def _lstm_pinn(depth=3, seed=0):
    (g,) = stdlib.graphs("lstm_pinn")
    gen = torch.Generator().manual_seed(seed)
    p = {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in init_params(g, seed=0).items()}
    return g, p, {"depth": depth}


def test_lstm_pinn_trunk_is_one_lstm_cell_iterated_over_depth():
    g, p, b = _lstm_pinn()
    x = torch.rand(7, 2)
    cell = torch.nn.LSTMCell(32, 32)                       # torch's gate order is also (i, f, g, o)
    with torch.no_grad():
        cell.weight_ih.copy_(p["cell.ih.weight"])
        cell.weight_hh.copy_(p["cell.hh.weight"])
        cell.bias_ih.copy_(p["cell.bias"])
        cell.bias_hh.zero_()
    e = torch.tanh(x @ p["lift.weight"].T + p["lift.bias"])
    h = c = torch.zeros(7, 32)
    for _ in range(b["depth"]):
        h, c = cell(e, (h, c))
    ref = h @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(run(g, p, {"x": x}, b)["fields"], ref, atol=1e-6, rtol=1e-5)
    assert {q.name for q in g.params} == {"lift.weight", "lift.bias", "cell.ih.weight", "cell.hh.weight",
                                           "cell.bias", "head.weight", "head.bias"}     # one cell for every step


def _poisson_residual(u_of, x):
    """-Laplacian(u_0) - f for the manufactured solution u = sin(pi x) sin(pi y): a PINN's PDE loss."""
    x = x.clone().requires_grad_(True)
    u = u_of(x)[:, 0]
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
    f = 2 * torch.pi ** 2 * torch.sin(torch.pi * x[:, 0]) * torch.sin(torch.pi * x[:, 1])
    return (-lap - f).pow(2).mean()


def test_lstm_pinn_pde_residual_differentiates_through_the_depth_recurrence():
    """Second derivatives in x (the residual) and third-order terms (its parameter gradient) agree
    between the interpreter and the generated module, and a few steps reduce the residual."""
    from archc.api import load
    from archc.backends.torch import state_key
    g, p, b = _lstm_pinn()
    x = torch.rand(32, 2)
    ref_p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss_ref = _poisson_residual(lambda z: run(g, ref_p, {"x": z}, b)["fields"], x)
    loss_ref.backward()
    m = load(stdlib.path("lstm_pinn"))(depth=b["depth"])
    m.load_state_dict({state_key(k): v for k, v in p.items()})
    loss = _poisson_residual(m, x)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-4)
    grads = dict(m.named_parameters())
    for k, v in ref_p.items():
        torch.testing.assert_close(grads[state_key(k)].grad, v.grad, atol=1e-4, rtol=1e-3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.zero_grad()
        step = _poisson_residual(m, x)
        step.backward()
        opt.step()
    assert _poisson_residual(m, x).item() < first


# -- 8 Do language models use their depth efficiently? -----------------------------------------------


def _depth_probe(tokens, run_mask, p, b=None):
    (g,) = stdlib.graphs("depth_efficiency")
    return run(g, p, {"tokens": tokens, "run": run_mask}, b)


def test_depth_probes_are_the_reference_formulas_on_the_residual_stream():
    """analyze_norms.py's quantities, computed by hand from the sub-layer residual stream."""
    (g,) = stdlib.graphs("depth_efficiency")                       # 6 layers, d 32
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 7))
    out = _depth_probe(tokens, torch.ones(2, 7, 6, dtype=torch.bool), p)
    F = torch.nn.functional
    h = out["stream"]                                              # h_0, h_0 + a_0, h_1, ..., h_6
    for l in range(6):
        h_in, h_mid, h_out = h[:, :, 2 * l], h[:, :, 2 * l + 1], h[:, :, 2 * l + 2]
        a, m = h_mid - h_in, h_out - h_mid
        rel = lambda u, r: u.norm(dim=-1) / r.norm(dim=-1).clamp(min=1e-6)           # noqa: E731
        expect = torch.stack([rel(a, h_in), rel(m, h_mid), rel(a + m, h_in)], -1)
        cos = torch.stack([F.cosine_similarity(a, h_in, -1), F.cosine_similarity(m, h_mid, -1),
                           F.cosine_similarity(a + m, h_in, -1)], -1)
        torch.testing.assert_close(out["contribution"][:, :, l], expect, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["cosine"][:, :, l], cos, atol=1e-5, rtol=1e-4)
    normed = h[:, :, -1] * torch.rsqrt(h[:, :, -1].pow(2).mean(-1, keepdim=True) + 1e-6) * p["norm.weight"]
    torch.testing.assert_close(out["logits"], normed @ p["head.weight"].T, atol=1e-5, rtol=1e-4)


def test_depth_skip_intervention_removes_a_layer_and_only_affects_the_future():
    (g,) = stdlib.graphs("depth_efficiency")
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 8))
    full = torch.ones(2, 8, 6, dtype=torch.bool)
    base = _depth_probe(tokens, full, p)
    # a layer skipped everywhere = the same model built without it
    skip = full.clone()
    skip[:, :, 3] = False
    five = {k: (torch.cat([v[:3], v[4:]]) if k.startswith("layers.") else v) for k, v in p.items()}
    ref = _depth_probe(tokens, full[:, :, :5], five, {"n_layers": 5})["logits"]
    torch.testing.assert_close(_depth_probe(tokens, skip, p)["logits"], ref, atol=1e-5, rtol=1e-4)
    # the future-effect experiment: skip layer s at positions < t; nothing before layer s changes, and
    # positions before t are exactly the model without layer s there
    s, t = 2, 5
    early = full.clone()
    early[:, :t, s] = False
    out = _depth_probe(tokens, early, p)
    assert torch.equal(out["stream"][:, :, :2 * s + 1], base["stream"][:, :, :2 * s + 1])
    assert out["contribution"][:, :t, s].abs().max() < 1e-9
    without_s = full.clone()
    without_s[:, :, s] = False
    torch.testing.assert_close(out["logits"][:, :t], _depth_probe(tokens, without_s, p)["logits"][:, :t])
    change = (out["contribution"][:, t:, s + 1:] - base["contribution"][:, t:, s + 1:]).abs()
    assert change.max() > 0                                           # later layers feel it through attention


# -- 15 SelectivBench ---------------------------------------------------------------------------------


def _selectivbench_by_hand(p, tokens, selective, delta, heads=2):
    """One RecNet layer of the gated delta recurrence, token by token."""
    lin = lambda x, n: x @ p[f"mixers.{n}.weight"][0].T                               # noqa: E731
    x = p["encoder.weight"][tokens]
    B, T, d = x.shape
    split = lambda z: z.view(B, heads, -1)                                            # noqa: E731
    S = torch.zeros(B, heads, d // heads, d // heads)
    ys = []
    for t in range(T):
        xt = x[:, t]
        q = torch.nn.functional.normalize(split(lin(xt, "q")), dim=-1, eps=1e-6)
        k = torch.nn.functional.normalize(split(lin(xt, "k")), dim=-1, eps=1e-6)
        v = split(lin(xt, "v"))
        if selective:
            alpha = torch.sigmoid(split(lin(xt, "a_gate") + p["mixers.a_gate.bias"][0]))
            beta = torch.sigmoid(lin(xt, "b_gate") + p["mixers.b_gate.bias"][0])
        else:
            alpha, beta = torch.sigmoid(p["mixers.decay"][0]).expand(B, -1, -1), torch.ones(B, heads)
        S = S * alpha[:, :, None, :]
        recalled = (S @ k[..., None])[..., 0]
        S = S + beta[..., None, None] * (v - delta * recalled)[..., None] * k[:, :, None, :]
        ys.append((S @ q[..., None])[..., 0].flatten(1))
    h = x + torch.stack(ys, 1) @ p["mixers.o.weight"][0].T
    h = torch.nn.functional.layer_norm(h, (d,), p["norms.weight"][0], p["norms.bias"][0])
    return h @ p["decoder.weight"].T + p["decoder.bias"]


@pytest.mark.parametrize("selective,delta", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_selectivbench_taxonomy_corners_are_the_gated_delta_recurrence(selective, delta):
    (g,) = stdlib.graphs("selectivbench")
    b = {"n_layers": 1, "selective": selective, "delta": delta}
    gen = torch.Generator().manual_seed(0)
    p = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init_params(g, b, seed=0).items()}
    tokens = torch.randint(0, 16, (2, 6), generator=gen)
    torch.testing.assert_close(run(g, p, {"tokens": tokens}, b)["logits"],
                               _selectivbench_by_hand(p, tokens, selective, delta), atol=1e-5, rtol=1e-4)


def test_selectivbench_selective_gates_hold_a_memory_through_distractors():
    """Selectivity: with a write gate driven by a 'distractor' feature (write nothing on it), any
    number of distractors after a cue leaves the recalled value alone; the LTI model with the same
    weights cannot shut its input out. In-state mixing: the delta rule overwrites the value stored
    under a key, additive writes pile up."""
    (g,) = stdlib.graphs("selectivbench")
    b = {"n_layers": 1, "heads": 1, "d": 4, "dk": 2, "dv": 2, "vocab": 3}
    p = {k: torch.zeros_like(v) for k, v in init_params(g, b, seed=0).items()}
    # tokens 0, 1: cues (feature 0 = 1, value +-1 in feature 2); token 2: distractor (feature 1 = 1)
    p["encoder.weight"] = torch.tensor([[1.0, 0, 1, 0], [1.0, 0, -1, 0], [0, 1.0, 0, 3]])
    p["mixers.q.weight"][0] = p["mixers.k.weight"][0] = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]])
    p["mixers.v.weight"][0] = torch.tensor([[0, 0, 1.0, 1], [0, 0, 0, 0]])
    p["mixers.a_gate.bias"][0] = torch.full((2,), 30.0)                                   # no forgetting
    p["mixers.b_gate.weight"][0] = torch.tensor([[40.0, -40, 0, 0]])                     # write on cues only
    p["mixers.b_gate.bias"][0] = torch.full((1,), -20.0)
    p["mixers.decay"][0] = torch.full((1, 2), 30.0)
    p["mixers.o.weight"][0] = torch.tensor([[0, 0], [0, 0], [1.0, 0], [0, 0]])
    p["norms.weight"][0] = torch.ones(4)
    p["decoder.weight"] = torch.eye(3, 4)
    read = lambda seq, sel, dl: run(g, p, {"tokens": torch.tensor([seq])},                 # noqa: E731
                                    {**b, "selective": sel, "delta": dl})["logits"][0, -1]
    assert torch.allclose(read([0, 2, 2, 2, 2], 1.0, 1.0), read([0, 2], 1.0, 1.0), atol=1e-5)
    assert not torch.allclose(read([0, 2, 2, 2, 2], 0.0, 0.0), read([0, 2], 0.0, 0.0), atol=1e-2)
    assert torch.allclose(read([1, 0, 2], 1.0, 1.0), read([0, 2], 1.0, 1.0), atol=1e-5)
    assert not torch.allclose(read([1, 0, 2], 1.0, 0.0), read([0, 2], 1.0, 0.0), atol=1e-2)


def test_selectivbench_generator_follows_its_grammar_with_rule_breaking_gaps():
    from archc.tasks import selectivbench_batch, selectivbench_grammar
    gr = selectivbench_grammar(seed=3)
    assert len(gr.emits) > gr.symbols                                  # some symbols are ambiguous
    tokens, states, mask = selectivbench_batch(gr, 4, 64, gap_prob=0.5, seed=1)
    for b in range(4):
        prev = None
        for t in range(64):
            if mask[b, t]:
                assert tokens[b, t] == gr.emits[states[b, t]]
                if prev is not None and prev != 0:
                    assert states[b, t].item() in gr.successors[prev]
                prev = states[b, t].item()
            else:                                                       # a distractor breaks the rules
                assert tokens[b, t].item() not in gr.allowed_symbols(prev)
    assert (~mask).any() and mask.any()
    assert torch.equal(selectivbench_batch(gr, 4, 64, gap_prob=0.5, seed=1)[0], tokens)


# -- 11 HTM sequence memory -----------------------------------------------------------------------------


def _htm_stream(seqs, reps):
    sdr = lambda sym: torch.zeros(32).index_fill_(0, torch.arange(4 * sym, 4 * sym + 4), 1.0)   # noqa: E731
    stream = [s for _ in range(reps) for q in seqs for s in q]
    starts = [i == 0 for _ in range(reps) for q in seqs for i in range(len(q))]
    return stream, torch.stack([sdr(s) for s in stream])[None], torch.tensor(starts)[None]


def test_htm_learns_high_order_sequences_online():
    """A-B-C-D and X-B-C-Y share B-C: after 20 online presentations of each (Hebbian learning in the
    forward pass, no gradients), the prediction made at C depends on the first element."""
    (g,) = stdlib.graphs("htm_seqmem")
    A, B, C, D, X, Y = range(6)
    stream, x, reset = _htm_stream([[A, B, C, D], [X, B, C, Y]], 20)
    with torch.no_grad():
        out = run(g, init_params(g, seed=0), {"x": x, "reset": reset, "perm": torch.zeros(1, 128, 128)})
    columns = lambda t: set((out["predicted"][0, t].nonzero().flatten() // 4).tolist())      # noqa: E731
    for r in range(17, 20):                                          # the last presentations
        a, xs = 8 * r, 8 * r + 4
        assert columns(a + 2) == {D} and columns(xs + 2) == {Y}       # at C: D after A, Y after X
        assert columns(a) == {B} and columns(xs) == {B}
        assert out["anomaly"][0, a + 1:a + 4].abs().max() == 0 and out["anomaly"][0, xs + 1:xs + 4].abs().max() == 0
        assert out["anomaly"][0, a] == 1                              # a sequence start is never predicted
    assert out["next_perm"].max() <= 1 and out["next_perm"].min() >= 0


def test_htm_state_carries_across_calls_and_learn_0_freezes_it():
    (g,) = stdlib.graphs("htm_seqmem")
    p = init_params(g, seed=0)
    _, x, reset = _htm_stream([[0, 1, 2, 3]], 8)
    perm = run(g, p, {"x": x, "reset": reset, "perm": torch.zeros(1, 128, 128)})["next_perm"]
    frozen = run(g, p, {"x": x, "reset": reset, "perm": perm}, {"learn": 0.0})
    assert torch.equal(frozen["next_perm"], perm)
    assert frozen["anomaly"][0, 1:4].abs().max() == 0                  # the learned sequence is predicted
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    run(g, p, {"x": x, "reset": reset, "perm": perm})["logits"].sum().backward()
    assert p["classifier.weight"].grad.abs().sum() > 0                 # the SDR classifier is the trained part


# -- 12 HCAM ------------------------------------------------------------------------------------------


def test_hcam_attends_in_detail_only_inside_the_chunks_its_summaries_select():
    """Chunk summaries are means: a zero-mean edit inside a chunk keeps the coarse scores. Such an
    edit changes the output only when the chunk is one of the query's top-k (detailed attention
    happens there alone), and no gradient reaches the stored past (the reference detaches it)."""
    (g,) = stdlib.graphs("hcam")                                   # d 64, chunk 8, 8 chunks, top-2
    p = init_params(g, seed=0)
    q, mem = torch.randn(1, 1, 64), torch.randn(1, 64, 64)
    base = run(g, p, {"queries": q, "memories": mem})["out"]
    x = torch.nn.functional.layer_norm(q, (64,))
    summaries = mem.view(1, 8, 8, 64).mean(2)
    sim = (x @ p["attn.summary_query.weight"].T + p["attn.summary_query.bias"]) @ \
        (summaries @ p["attn.summary_key.weight"].T + p["attn.summary_key.bias"]).transpose(1, 2)
    kept = set(sim[0, 0].topk(2).indices.tolist())
    for c in range(8):
        edit = torch.randn(8, 64)
        edited = mem.clone()
        edited[0, 8 * c:8 * c + 8] += edit - edit.mean(0)           # same summary, new details
        out = run(g, p, {"queries": q, "memories": edited})["out"]
        assert torch.allclose(out, base, atol=1e-6) == (c not in kept), c
    mem.requires_grad_(True)
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    run(g, p, {"queries": q, "memories": mem})["out"].sum().backward()
    assert mem.grad is None or not mem.grad.any()


# -- 13 timescales and curricula -----------------------------------------------------------------------


def test_leaky_rnn_update_has_one_trainable_timescale_per_neuron():
    (g,) = stdlib.graphs("timescale_curriculum")
    gen = torch.Generator().manual_seed(0)
    p = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in init_params(g, seed=0).items()}
    x = torch.randint(0, 2, (3, 9, 1)).float()
    out = run(g, p, {"x": x})
    tau = 1 + torch.nn.functional.softplus(p["rho"])
    h, hs = torch.zeros(3, 32), []
    for t in range(9):
        h = (1 - 1 / tau) * h + (1 / tau) * torch.tanh(h @ p["rec.weight"].T + x[:, t] @ p["inp.weight"].T + p["inp.bias"])
        hs.append(h)
    ref = (torch.stack(hs, 1) @ p["readout.weight"].T + p["readout.bias"]).view(3, 9, 8, 2)
    torch.testing.assert_close(out["logits"], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["tau"], tau)
    assert (tau >= 1).all()


@pytest.mark.parametrize("multi_head", [0, 1])
def test_timescale_curricula_train_the_heads_the_paper_says(multi_head):
    """Single-head: stage s trains N = 2 + s alone; multi-head: every N <= 2 + s at once. A training
    loop applies the schedule per stage; only the scheduled heads' readout rows learn."""
    from archc.tasks import n_parity
    (g,) = stdlib.graphs("timescale_curriculum")
    m = GraphModule(g, {"hidden": 16, "heads": 4, "multi_head": multi_head}, seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    readout = m.names.index("readout.weight")
    for stage in range(3):
        v = m.apply_schedule("curriculum", stage)
        heads = list(range(v["first_head"], v["last_head"] + 1))
        assert v["n_task"] == 2 + stage and heads == (list(range(stage + 1)) if multi_head else [stage])
        x, y, mask = n_parity(8, 12, [2 + j for j in range(4)], seed=stage)
        logits = m(x=x[..., None].float())["logits"]
        loss = sum(torch.nn.functional.cross_entropy(logits[:, :, j][mask[:, :, j]], y[:, :, j][mask[:, :, j]])
                   for j in heads)
        opt.zero_grad()
        loss.backward()
        rows = m.weights[readout].grad.view(4, 2, 16).abs().sum((1, 2)) > 0
        assert rows.nonzero().flatten().tolist() == heads
        opt.step()


def test_n_parity_and_n_dms_targets():
    from archc.tasks import n_dms, n_parity
    x, y, mask = n_parity(2, 10, [1, 3], seed=0)
    assert torch.equal(y[..., 0], x) and not mask[:, :2, 1].any() and mask[:, 2:, 1].all()
    assert torch.equal(y[:, 5, 1], (x[:, 3] + x[:, 4] + x[:, 5]) % 2)
    x, y, mask = n_dms(2, 10, [2], seed=0)
    assert torch.equal(y[:, 7, 0], (x[:, 7] == x[:, 5]).long()) and not mask[:, 1, 0].any()


# -- 14 hierarchical parametric memories ---------------------------------------------------------------


def test_hier_memory_blocks_are_extra_ffn_units_fetched_along_the_path():
    """The fetched blocks act exactly as FFN hidden units appended to the anchor's (a wider FFN
    with the fetched keys as extra rows of W1 and values as extra columns of W2)."""
    (g,) = stdlib.graphs("hier_param_memory")                 # d 32, ffn 64, 4 units per node, 2 levels
    p = init_params(g, seed=0)
    tokens, path = torch.randint(0, 64, (1, 6)), torch.tensor([[1, 9]])
    out = run(g, p, {"tokens": tokens, "path": path})["logits"]
    wide = {k: v.clone() for k, v in p.items()}
    keys = p["layers.mem_keys"][:, path[0]].reshape(2, 8, 32)        # [layer, levels * units, d]
    values = p["layers.mem_values"][:, path[0]].reshape(2, 8, 32)
    wide["layers.up.weight"] = torch.cat([p["layers.up.weight"], keys], 1)
    wide["layers.down.weight"] = torch.cat([p["layers.down.weight"], values.transpose(1, 2)], 2)
    wide["layers.mem_values"] = torch.zeros_like(p["layers.mem_values"])
    ref = run(g, wide, {"tokens": tokens, "path": path}, {"ffn": 64 + 8})["logits"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_hier_memory_blocks_learn_only_from_contexts_routed_to_them():
    (g,) = stdlib.graphs("hier_param_memory")
    p = {k: v.requires_grad_(True) for k, v in init_params(g, seed=0).items()}
    path = torch.tensor([[0, 5], [2, 11]])                        # level 0: nodes 0-3, level 1: nodes 4-19
    run(g, p, {"tokens": torch.randint(0, 64, (2, 6)), "path": path})["logits"].pow(2).mean().backward()
    for bank in ("layers.mem_keys", "layers.mem_values"):
        touched = p[bank].grad.abs().sum((0, 2)) > 0
        assert touched.nonzero().flatten().tolist() == [0, 2, 5, 11], bank
    assert all(p[k].grad.abs().sum() > 0 for k in ("embed.weight", "layers.up.weight", "layers.attn.q.weight"))
    no_memory = {k: (torch.zeros_like(v) if k == "layers.mem_values" else v) for k, v in p.items()}
    tokens = torch.randint(0, 64, (1, 6))
    a, b = (run(g, no_memory, {"tokens": tokens, "path": torch.tensor([pth])})["logits"] for pth in ([0, 4], [3, 19]))
    assert torch.equal(a, b)                                      # without memory values: the anchor alone


# -- 17 CHEEM --------------------------------------------------------------------------------------------

_CHEEM = {"n_blocks": 3, "d": 16, "patches": 4}
_CHEEM_OP = torch.tensor([[1, 1, 1], [0, 2, 1], [1, 1, 1]])        # task 1: skip, adapt, new
_CHEEM_VERSION = torch.tensor([[0, 0, 0], [0, 1, 2], [0, 0, 0]])   # task 2 reuses task 0 everywhere


def _cheem_setup():
    (g,) = stdlib.graphs("cheem")
    p = init_params(g, _CHEEM, seed=0)
    images = torch.randn(3, 4, 48, generator=torch.Generator().manual_seed(0))
    p["centroids"] = _cheem(p, images)["query"]                     # one prototype image per task
    return p, images


def _cheem(p, images, op=_CHEEM_OP, version=_CHEEM_VERSION):
    (g,) = stdlib.graphs("cheem")
    return run(g, p, {"images": images, "op": op, "version": version}, _CHEEM)


def test_cheem_infers_the_task_from_centroids_and_runs_its_structure_per_sample():
    p, images = _cheem_setup()
    out = _cheem(p, images[[2, 0, 1]])
    assert out["task"].tolist() == [2, 0, 1]
    alone = torch.cat([_cheem(p, images[[i]])["logits"] for i in (2, 0, 1)])
    torch.testing.assert_close(out["logits"], alone, atol=1e-5, rtol=1e-4)   # each sample its own structure
    # task 2 reuses task 0's modules: with the same head it computes the same function
    p["classifier.weight"][2], p["classifier.bias"][2] = p["classifier.weight"][0], p["classifier.bias"][0]
    swapped = dict(p, centroids=p["centroids"][[2, 1, 0]])           # image 2 now maps to task 0
    moved = _cheem(swapped, images[[2]])
    assert moved["task"].tolist() == [0]
    torch.testing.assert_close(moved["logits"], _cheem(p, images[[2]])["logits"])


def test_cheem_skip_and_adapt_ops():
    p, images = _cheem_setup()
    base = _cheem(p, images[[1]])["logits"]
    # skip at block 0 = running a projection that is the identity (version 2, which task 0 does not use)
    ident = {k: v.clone() for k, v in p.items()}
    ident["vit.proj.weight"][0 * 3 + 2] = torch.eye(16)
    ident["vit.proj.bias"][0 * 3 + 2] = 0
    op, version = _CHEEM_OP.clone(), _CHEEM_VERSION.clone()
    op[1, 0], version[1, 0] = 1, 2
    torch.testing.assert_close(_cheem(ident, images[[1]], op, version)["logits"], base, atol=1e-5, rtol=1e-4)
    # adapt with a silent adapter = reuse of the same version
    op = _CHEEM_OP.clone()
    op[1, 1] = 1
    assert not torch.allclose(_cheem(p, images[[1]], op=op)["logits"], base)
    p["vit.adapt.fc2.weight"][1 * 3 + 1] = 0                         # block 1, task 1
    p["vit.adapt.fc2.bias"][1 * 3 + 1] = 0
    torch.testing.assert_close(_cheem(p, images[[1]])["logits"], _cheem(p, images[[1]], op=op)["logits"])


def test_cheem_a_tasks_loss_reaches_only_the_modules_of_its_structure():
    p, images = _cheem_setup()
    p = {k: v.requires_grad_(True) for k, v in p.items()}
    _cheem(p, images[[1, 1]])["logits"].pow(2).sum().backward()
    used = lambda name: (p[name].grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()   # noqa: E731
    assert used("vit.proj.weight") == [1 * 3 + 1, 2 * 3 + 2]              # block 0 skips; versions 1, 2
    assert used("vit.adapt.fc1.weight") == [1 * 3 + 1]                    # task 1's adapter at block 1
    assert used("classifier.weight") == [1]
    assert p["centroids"].grad is None or not p["centroids"].grad.any()


# -- 18 Synaptic resonance (a reconstruction) -----------------------------------------------------------


def test_synaptic_resonance_is_a_relevance_gated_hebbian_fast_weight():
    """The parallel form equals the explicit weight recurrence F_{t+1} = decay F_t + eta r_t post pre^T,
    token t using W + F_t; with zero relevance the layer is the plain FFN."""
    ffn_arch, _ = stdlib.graphs("synaptic_resonance")
    gen = torch.Generator().manual_seed(0)
    p = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init_params(ffn_arch, seed=0).items()}
    x = torch.randn(2, 7, 32, generator=gen)
    y = run(ffn_arch, p, {"x": x})["y"]
    z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * p["norm.weight"]
    pre = torch.nn.functional.normalize(torch.nn.functional.gelu(z @ p["ffn_layer.up.weight"].T), dim=-1, eps=1e-6)
    W = p["ffn_layer.down.weight"]
    r = torch.sigmoid(z @ p["ffn_layer.relevance.weight"].T + p["ffn_layer.relevance.bias"])[..., 0]
    F, ys = torch.zeros(2, 32, 64), []
    for t in range(7):
        ys.append(((W + F) @ pre[:, t, :, None])[..., 0])
        post = pre[:, t] @ W.T
        F = 0.9 * F + 0.5 * r[:, t, None, None] * post[:, :, None] * pre[:, t, None, :]
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-4)
    p["ffn_layer.relevance.bias"] = torch.full((1,), -1e4)              # nothing is relevant
    torch.testing.assert_close(run(ffn_arch, p, {"x": x})["y"], pre @ W.T, atol=1e-6, rtol=1e-5)


# -- 22 Phonetic Trajectory Memory ----------------------------------------------------------------------


def test_ptm_resonance_decodes_the_stream_from_its_rotation_trajectory():
    (g,) = stdlib.graphs("ptm_resonance")                    # 48 symbols, a 16-circle torus
    assert [q.name for q in g.params] == ["head.weight", "head.bias"]   # the encoding is not learned
    phones = torch.randint(0, 48, (2, 200))
    out = run(g, init_params(g, seed=0), {"phones": phones})
    r = out["resonance"]
    assert torch.equal(r.argmax(-1), phones)
    torch.testing.assert_close(r.max(-1).values, torch.full((2, 200), 16.0), atol=1e-3, rtol=0)
    assert r.topk(2, -1).values[..., 1].max() < 16 - 2                  # a clear margin to every other symbol
    # the points are on the torus; rotations commute, so the end point keeps counts, the path keeps order
    traj = out["trajectory"].view(2, 200, 2, 16)
    torch.testing.assert_close(traj.pow(2).sum(2), torch.ones(2, 200, 16))
    shuffled = phones[:, torch.randperm(200)]
    other = run(g, init_params(g, seed=0), {"phones": shuffled})["trajectory"]
    torch.testing.assert_close(other[:, -1], out["trajectory"][:, -1], atol=2e-3, rtol=0)
    assert not torch.allclose(other[:, 100], out["trajectory"][:, 100], atol=1e-2)


# -- 23 Nested Learning / Hope ---------------------------------------------------------------------------


def test_hope_memories_learn_from_values_they_generate_themselves():
    """After one chunk, M_k's weights are one decayed gradient step of sum_t eta_t |M_k(k_t) - M_k(v_t)|^2
    with the self-generated target M_k(v_t) held fixed; k, v, eta, alpha come from the other memories."""
    (g,) = stdlib.graphs("hope_nested")
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 4))                          # one chunk
    out = run(g, p, {"tokens": tokens})
    F = torch.nn.functional
    x = p["embed.weight"][tokens]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * p["norm.weight"]
    W = {m: [p[f"titans.{m}.w{i}"] for i in (0, 1)] for m in ("m_key", "m_value", "m_eta", "m_alpha")}
    mem = lambda ws, z: F.gelu(z @ ws[0].transpose(-1, -2)) @ ws[1].transpose(-1, -2)      # noqa: E731
    k = F.normalize(mem(W["m_key"], x), dim=-1, eps=1e-6)
    v = mem(W["m_value"], x)
    eta = 0.1 * torch.sigmoid(mem(W["m_eta"], x).mean(-1))
    alpha = torch.sigmoid(mem(W["m_alpha"], x).mean(-1).mean(1))
    target = mem(W["m_key"], v)
    W0, W1 = (w.expand(2, -1, -1).clone().requires_grad_() for w in W["m_key"])
    loss = ((mem((W0, W1), k) - target).pow(2).mean(-1) * eta).sum()
    G0, G1 = torch.autograd.grad(loss, (W0, W1))
    for name, Wi, Gi in (("key_w0", W0, G0), ("key_w1", W1, G1)):
        torch.testing.assert_close(out[name], (1 - alpha)[:, None, None] * Wi.detach() - Gi, atol=1e-5, rtol=1e-4)


def test_hope_cms_levels_change_exactly_at_their_update_frequencies():
    """The training loop of the Continuum Memory System: gradients accumulate every step, and level l
    steps its parameters only when the schedule says ((step + 1) % C_l == 0)."""
    from archc.api import load
    m = load(stdlib.path("hope_nested"))(d=8, c_fast=1, c_mid=2, c_slow=4)
    levels = {name: [q for n, q in m.named_parameters() if n.startswith(f"cms_{name}.")] for name in ("fast", "mid", "slow")}
    rest = [q for n, q in m.named_parameters() if not n.startswith("cms_")]
    opts = {name: torch.optim.SGD(ps, lr=0.1) for name, ps in levels.items()}
    main = torch.optim.SGD(rest, lr=0.1)
    tokens = torch.randint(0, 64, (2, 4))
    changed = {name: [] for name in levels}
    for step in range(4):
        before = {name: [q.detach().clone() for q in ps] for name, ps in levels.items()}
        flags = m.schedule_cms(step)
        torch.nn.functional.cross_entropy(m(tokens)["logits"].flatten(0, 1), tokens.flatten()).backward()
        main.step()
        main.zero_grad()
        for name, opt in opts.items():
            if flags[f"update_{name}"]:
                opt.step()
                opt.zero_grad()
        for name, ps in levels.items():
            changed[name].append(not all(torch.equal(a, q) for a, q in zip(before[name], ps)))
    assert changed == {"fast": [True] * 4, "mid": [False, True, False, True], "slow": [False] * 3 + [True]}


# -- 24 Diffusion-forcing sampler for recurrent-depth models ------------------------------------------------


def _huginn(**kw):
    from archc.api import load
    from archc.backends.torch import state_key
    (g,) = stdlib.graphs("rdepth_diffusion_sampler")
    m = load(stdlib.path("rdepth_diffusion_sampler"))(**kw).eval()
    m.load_state_dict({state_key(k): v for k, v in init_params(g, kw, seed=0).items()})
    return m


def _ar_generate(m, prompt, new_tokens, r):
    """Autoregressive decoding by hand: each new position runs r recurrences, earlier ones frozen."""
    B, P = prompt.shape
    tokens, state = prompt, torch.zeros(B, P, m.d)
    m.steps = r
    with torch.no_grad():
        out = m(tokens=tokens, state=state, frozen=torch.zeros(B, P, dtype=torch.bool))
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, out["logits"][:, -1:].argmax(-1)], 1)
            state = torch.cat([out["next_state"], torch.zeros(B, 1, m.d)], 1)
            frozen = torch.arange(tokens.shape[1]) < tokens.shape[1] - 1
            out = m(tokens=tokens, state=state, frozen=frozen.expand(B, -1))
    return tokens


def test_diffusion_sampler_with_a_one_token_wavefront_is_autoregressive_decoding():
    from archc.sampling import diffusion_forcing_generate
    m = _huginn()
    prompt = torch.randint(0, 64, (2, 3))
    got, passes = diffusion_forcing_generate(m, prompt, 6, inner=4, max_wavefront=1, exit_threshold=float("inf"),
                                             init_std=0.0)
    assert torch.equal(got, _ar_generate(m, prompt, 6, r=4)) and passes == 1 + 6


def test_diffusion_sampler_refines_a_wavefront_in_parallel_and_freezes_converged_positions():
    """With a recurrence that converges in one step (the adapter ignores the state), positions freeze
    as soon as their state stops moving: the sampler keeps several positions in flight, decodes the
    same tokens as autoregressive decoding with 4 recurrences per token, and each pass costs one."""
    from archc.sampling import diffusion_forcing_generate
    m = _huginn()
    with torch.no_grad():
        m.adapter.weight[:, :m.d] = 0
    prompt = torch.randint(0, 64, (2, 3))
    widths = []
    real_run = m.forward

    def counting(**kw):
        widths.append(int((~kw["frozen"][0]).sum()))
        return real_run(**kw)
    m.forward = counting
    got, passes = diffusion_forcing_generate(m, prompt, 8, inner=1, max_wavefront=4, headway=2, exit_threshold=1e-4)
    m.forward = real_run
    assert torch.equal(got, _ar_generate(m, prompt, 8, r=4))
    assert max(widths) > 1                                   # several positions refined in one pass
    assert passes < 1 + 8 * 2                                # fewer passes than two per token


def test_huginn_depth_schedules_and_truncated_backprop():
    (g,) = stdlib.graphs("rdepth_diffusion_sampler")
    lam = [schedule_values(g, "rate", z)["lam"] for z in (-1.0, 0.0, 1.0)]
    assert lam[1] == pytest.approx(4.0 * math.exp(-0.125)) and lam[0] < lam[1] < lam[2]
    assert schedule_values(g, "depth", 5)["steps"] == 6
    p = {k: v.requires_grad_(True) for k, v in init_params(g, seed=0).items()}
    for steps, reaches_init in ((2, True), (5, False)):                 # grad_steps = 2
        state = torch.randn(2, 4, 32, requires_grad=True)
        out = run(g, p, {"tokens": torch.randint(0, 64, (2, 4)), "state": state,
                         "frozen": torch.zeros(2, 4, dtype=torch.bool)}, {"steps": steps})
        out["logits"].sum().backward()
        assert (state.grad is not None and state.grad.abs().sum() > 0) == reaches_init, steps


# -- 40 TRM + CGAR -----------------------------------------------------------------------------------


def _trm_inputs(B=2, T=4, d=32, reset=True):
    z = torch.randn(B, T, d)
    return {"tokens": torch.randint(0, 12, (B, T)), "z_h": z, "z_l": z.clone(), "reset": torch.full((B,), reset)}


def test_trm_gradient_flows_only_through_the_last_outer_cycle():
    (g,) = stdlib.graphs("trm")
    for h_cycles, reaches_carry in ((1, True), (3, False)):
        p = {k: v.requires_grad_() for k, v in init_params(g, seed=0).items()}
        inp = _trm_inputs(reset=False)
        inp["z_h"].requires_grad_()
        inp["z_l"].requires_grad_()
        out = run(g, p, inp, {"h_cycles": h_cycles})
        out["logits"].pow(2).mean().backward()
        got = inp["z_h"].grad is not None and inp["z_h"].grad.abs().sum() > 0
        assert got == reaches_carry, h_cycles     # with T > 1 the carry enters only no-grad cycles
        assert not out["next_z_h"].requires_grad and not out["next_z_l"].requires_grad


def test_trm_reset_restarts_from_the_initial_states_and_carry_continues():
    (g,) = stdlib.graphs("trm")
    p = init_params(g, seed=0)
    inp = _trm_inputs()
    a = run(g, p, inp)
    inp2 = dict(inp, z_h=torch.randn(2, 4, 32), z_l=torch.randn(2, 4, 32))
    assert torch.equal(a["logits"], run(g, p, inp2)["logits"])        # a reset ignores the incoming carry
    cont = run(g, p, dict(inp, z_h=a["next_z_h"], z_l=a["next_z_l"], reset=torch.zeros(2, dtype=torch.bool)))
    assert not torch.allclose(cont["logits"], a["logits"])            # the next supervision step refines it
    assert torch.equal(a["halt"], a["q_logits"][:, 0] > 0)


def test_cgar_depth_curriculum_and_supervision_weights():
    (g,) = stdlib.graphs("trm")
    uses = weight_applications(g)["net.layer0.attn.q.weight"]        # applications of the network per step
    depth = {}
    for rho in (0.1, 0.45, 0.9):
        v = schedule_values(g, "curriculum", rho)
        depth[rho] = (v["l_cycles"], v["h_cycles"], 2 * int(uses.subs({"l_cycles": v["l_cycles"],
                                                                         "h_cycles": v["h_cycles"]})))
    # (n, T) = (2, 1), (4, 2), (6, 3); effective depth T (n + 1) * 2 layers = 6, 20, 42
    assert depth == {0.1: (2, 1, 6), 0.45: (4, 2, 20), 0.9: (6, 3, 42)}
    w = [schedule_values(g, "supervision", t)["weight"] for t in range(16)]
    assert sum(w) == pytest.approx(1.0)
    assert all(b / a == pytest.approx(0.7) for a, b in zip(w, w[1:]))


def test_cgar_curriculum_drives_a_deep_supervision_loop():
    """The training loop of the paper: per epoch the curriculum sets the depth; per supervision step
    the carry is fed back detached and the step's loss is weighted by the schedule."""
    (g,) = stdlib.graphs("trm")
    m = GraphModule(g, {"d": 16, "heads": 2, "n_sup": 3}, seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    tokens = torch.randint(0, 12, (4, 6))
    target = (tokens + 1) % 12
    seen = []
    for epoch in range(3):
        seen.append((m.apply_schedule("curriculum", epoch / 3)["l_cycles"], m.bindings["h_cycles"]))
        z = torch.zeros(4, 6, 16)
        carry = {"z_h": z, "z_l": z, "reset": torch.ones(4, dtype=torch.bool)}
        for step in range(3):
            out = m(tokens=tokens, **carry)
            w = m.apply_schedule("supervision", step)["weight"]
            loss = w * torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            carry = {"z_h": out["next_z_h"], "z_l": out["next_z_l"], "reset": torch.zeros(4, dtype=torch.bool)}
    assert seen == [(2, 1), (4, 2), (6, 3)]


# -- 47 Raptor ---------------------------------------------------------------------------------------


def _raptor_block(p, j, x, t, heads=4):
    """One Raptor block by hand: blocks[j] of the stacked parameters, at depth step t."""
    w = lambda name: p[f"blocks.{name}"][j]                      # noqa: E731
    F = torch.nn.functional
    tau = (F.silu(t * w("t_in.weight")[:, 0] + w("t_in.bias")) @ w("t_out.weight").T + w("t_out.bias") + 1)
    tau1, tau2, tau3 = tau.reshape(1, 1, -1).chunk(3, dim=-1)
    h = F.layer_norm(x, x.shape[-1:], w("norm1.weight"), w("norm1.bias"), 1e-5)
    split = lambda z: z.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    a = F.scaled_dot_product_attention(split(h @ w("attn.q.weight").T), split(h @ w("attn.k.weight").T),
                                       split(h @ w("attn.v.weight").T))
    x = x + tau1 * w("ls1.gamma") * (a.transpose(1, 2).flatten(-2) @ w("attn.o.weight").T)
    h = F.layer_norm(x, x.shape[-1:], w("norm2.weight"), w("norm2.bias"), 1e-5)
    mlp = (F.silu(h @ w("mlp.gate.weight").T) * (h @ w("mlp.up.weight").T)) @ w("mlp.down.weight").T
    x = x + tau2 * w("ls2.gamma") * mlp
    return tau3 * x


def test_raptor_loops_two_blocks_over_depth_phases_with_step_conditioning():
    roll, tf = stdlib.graphs("raptor")
    b = {"start": 2}
    p = init_params(roll, b, seed=0)
    assert {q.name: q.copies for q in roll.params} == {q.name: 2 for q in roll.params}   # two blocks, not six
    p["blocks.t_out.weight"] = torch.randn_like(p["blocks.t_out.weight"]) * 0.1        # make tau matter
    x = torch.randn(2, 5, 64)
    h, traj = x, [x]
    for i in range(6):                                # steps produce layers 3..8; phase boundary after 3 steps
        h = _raptor_block(p, 0 if i < 3 else 1, h, float(2 + i + 1))
        traj.append(h)
    torch.testing.assert_close(run(roll, p, {"x": x}, b)["y"], h, atol=1e-5, rtol=1e-4)
    # teacher forcing: each true activation h_i predicts h_{i+1} with the block and t of its step
    teacher = torch.stack(traj[:-1], 1)
    pred = run(tf, p, {"trajectory": teacher}, b)["predictions"]
    torch.testing.assert_close(pred, torch.stack(traj[1:], 1), atol=1e-5, rtol=1e-4)
    # the conditioning: another start layer (other t) changes the map, unless t_out is zero (tau = 1)
    assert not torch.allclose(run(roll, p, {"x": x}, {"start": 0})["y"], h, atol=1e-4)
    p["blocks.t_out.weight"].zero_()
    torch.testing.assert_close(run(roll, p, {"x": x}, {"start": 0})["y"], run(roll, p, {"x": x}, b)["y"])


def test_raptor_starts_near_the_unconditioned_block():
    (roll, _) = stdlib.graphs("raptor")
    p = init_params(roll, seed=0)
    x = torch.randn(1, 4, 64)
    out = run(roll, p, {"x": x}, {"depth": 2, "boundary": 1})["y"]
    q = dict(p, **{"blocks.t_out.weight": torch.zeros_like(p["blocks.t_out.weight"])})
    plain = run(roll, q, {"x": x}, {"depth": 2, "boundary": 1})["y"]
    assert (out - plain).abs().max() < 5e-3 * plain.abs().max()      # tau = 1 + O(1e-4 * |t_in|)


# -- 50 CoLa -----------------------------------------------------------------------------------------


def _llama_layer(p, i, x, heads=2):
    """Layer i of CoLa's stack by hand (pre-norm, causal attention with RoPE, SwiGLU)."""
    from test_parity import _rope
    F = torch.nn.functional
    w = lambda name: p[f"layers.{name}"][i]                      # noqa: E731
    norm = lambda h, g: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g   # noqa: E731
    split = lambda z: z.unflatten(-1, (heads, -1))               # noqa: E731
    h = norm(x, w("attn_norm.weight"))
    q, k, v = _rope(split(h @ w("attn.q.weight").T)), _rope(split(h @ w("attn.k.weight").T)), split(h @ w("attn.v.weight").T)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    x = x + a.transpose(1, 2).flatten(-2) @ w("attn.o.weight").T
    h = norm(x, w("mlp_norm.weight"))
    return x + (F.silu(h @ w("mlp.gate.weight").T) * (h @ w("mlp.up.weight").T)) @ w("mlp.down.weight").T


def _program_logits(p, tokens, program):
    x = p["embed.weight"][tokens]
    for i in program:
        x = _llama_layer(p, i, x)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * p["norm.weight"]
    return x @ p["head.weight"].T


@pytest.mark.parametrize("times,program", [(2, [0, 1, 2, 2, 3, 4, 5]), (1, [0, 1, 2, 3, 4, 5]), (0, [0, 1, 3, 4, 5])])
def test_cola_runs_its_program_of_layers(times, program):
    cola, _ = stdlib.graphs("cola")
    p = init_params(cola, seed=0)
    tokens = torch.randint(0, 64, (2, 5))
    got = run(cola, p, {"tokens": tokens}, {"loop_times": times})["logits"]
    torch.testing.assert_close(got, _program_logits(p, tokens, program), atol=1e-5, rtol=1e-4)


def test_cola_repeated_layers_get_their_own_cache_slots():
    from archc.api import load
    m = load(stdlib.path("cola"), arch="CoLa")()
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full = m(tokens)
        got, cache = decode_stepwise(m, tokens, 3)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-4)
    keys = sorted(cache.entries)
    assert len(keys) == 7                                   # one slot per program position, not per layer
    assert [k for k in keys if k.startswith("layers.attn[2]")] == ["layers.attn[2]@r=0,j=0", "layers.attn[2]@r=1,j=0"]
    assert cache.nbytes() == 7 * 2 * (2 * 8 * 32 * 4)       # 7 occurrences x (K + V) x B*T*d floats


def test_cola_polar_per_sample_programs_match_the_static_programs():
    cola, polar = stdlib.graphs("cola")
    p = init_params(polar, seed=0)                          # same parameter names as CoLa
    tokens = torch.randint(0, 64, (3, 5))
    ops = torch.tensor([[1, 1, 2, 1, 1, 1], [1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = run(polar, p, {"tokens": tokens, "ops": ops})["logits"]
    for b, times in enumerate((2, 0, 1)):
        ref = run(cola, p, {"tokens": tokens[b:b + 1]}, {"loop_times": times})["logits"]
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-5, rtol=1e-4)


# -- 41 Titans (LMM, MAG, MAL; MAC is in test_semantics.py) -------------------------------------------


def test_titans_lmm_state_after_a_chunk_is_the_update_rule():
    g = next(g for g in stdlib.graphs("titans") if g.name == "TitansLMM")
    p = init_params(g, seed=0)
    x = torch.randn(2, 4, 16)                                 # one chunk
    out = run(g, p, {"x": x})
    F = torch.nn.functional
    w = lambda n: p[f"lmm.{n}.weight"]                        # noqa: E731
    eps = 1.1920928955078125e-07
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w("store_norm")
    k, v = u @ w("key").T, u @ w("value").T
    lr = torch.sigmoid(u @ w("lr_gate").T + p["lmm.lr_gate.bias"])[..., 0]
    alpha = torch.sigmoid(u.mean(1) @ w("forget_gate").T + p["lmm.forget_gate.bias"])[:, 0]
    W0, W1 = (p[f"lmm.mem.w{i}"].expand(2, -1, -1).clone().requires_grad_() for i in (0, 1))
    loss = ((F.gelu(k @ W0.transpose(1, 2)) @ W1.transpose(1, 2) - v).pow(2).mean(-1) * lr).sum()
    G0, G1 = torch.autograd.grad(loss, (W0, W1))
    # S_1 = eta * 0 - grad;  W_1 = (1 - alpha) W_0 + S_1   (Titans eqs. 10, 13; momentum starts at zero)
    for i, (W, G) in enumerate(((W0, G0), (W1, G1))):
        torch.testing.assert_close(out[f"w{i}"], (1 - alpha)[:, None, None] * W.detach() - G, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["TitansMAG", "TitansMAL"])
def test_titans_memory_reaches_past_the_attention_window(arch):
    g = next(g for g in stdlib.graphs("titans") if g.name == arch)
    p = init_params(g, seed=0)
    t = torch.randint(0, 64, (1, 16))
    t2 = t.clone()
    t2[0, 0] = (t[0, 0] + 1) % 64
    # 2 layers of window-4 attention see at most 6 tokens back: with the memory frozen (no writes, no
    # forgetting) position 15 is blind to token 0 ...
    frozen = dict(p, **{"layers.lmm.forget_gate.weight": torch.zeros_like(p["layers.lmm.forget_gate.weight"]),
                        "layers.lmm.forget_gate.bias": torch.full_like(p["layers.lmm.forget_gate.bias"], -1e4)})
    same = [run(g, frozen, {"tokens": x}, {"max_lr": 0.0})["logits"][0, 15] for x in (t, t2)]
    torch.testing.assert_close(same[0], same[1])
    # ... except through the long-term memory, written with token 0's chunk
    diff = [run(g, p, {"tokens": x})["logits"][0, 15] for x in (t, t2)]
    assert not torch.allclose(diff[0], diff[1], atol=1e-6)


# -- 30 Miras (Moneta, Yaad, Memora) -----------------------------------------------------------------

MEM = """
arch M(d: int = 8) {
  input k: f32[B, T, d]
  input v: f32[B, T, d]
  input lr: f32[B, T]
  input delta: f32[B, T]
  memory mem = NeuralMemory(d, hidden = 16, residual = true OPTIONS)
  mem.write(k, v, lr = lr, forget = 0.25 WRITE)
  w0, w1 = mem.weights()
  output w0 = w0
  output w1 = w1
  output y = mem.read(k)
}
"""


def _memory(options="", write=""):
    from archc.api import lower
    (g,) = lower(MEM.replace("OPTIONS", options).replace("WRITE", write))
    return g


def _mem_inputs():
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=gen), dim=-1)
    return {"k": k, "v": torch.randn(2, 5, 8, generator=gen), "lr": torch.rand(2, 5, generator=gen),
            "delta": torch.full((2, 5), 1e9)}


def test_yaad_with_an_infinite_threshold_is_the_l2_update():
    inp = _mem_inputs()
    mse = _memory()
    p = init_params(mse, seed=0)
    yaad = run(_memory(', loss = "yaad"', ", delta = delta"), p, inp)
    ref = run(mse, p, inp)
    for k in ("w0", "w1", "y"):
        torch.testing.assert_close(yaad[k], ref[k])
    # with a small threshold every token takes the (delta-scaled) l1 step instead
    small = run(_memory(', loss = "yaad"', ", delta = delta"), p, dict(inp, delta=torch.full((2, 5), 1e-3)))
    assert not torch.allclose(small["w1"], ref["w1"])


def test_moneta_with_p_2_and_q_2_is_decayed_gradient_descent():
    inp = _mem_inputs()
    g = _memory(', loss = "lp", p = 2.0, retention = "lq", q = 2.0')
    p = init_params(g, seed=0)
    got, ref = run(g, p, inp), run(_memory(), p, inp)
    for k in ("w0", "w1", "y"):
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def test_moneta_applies_the_lq_normalised_accumulator():
    inp = _mem_inputs()
    g = _memory(', loss = "lp", p = 3.0, retention = "lq", q = 4.0')
    p = init_params(g, seed=0)
    out = run(g, p, inp)
    F = torch.nn.functional
    A = [out["w0"], out["w1"]]                            # the state is the accumulator A
    W = [a / a.pow(4).sum(dim=(-2, -1), keepdim=True).pow(0.5) for a in A]
    y = F.gelu(inp["k"] @ W[0].transpose(1, 2)) @ W[1].transpose(1, 2) + inp["k"]
    torch.testing.assert_close(out["y"], y, atol=1e-5, rtol=1e-4)
    # and A moved by -lr * grad of the smoothed l3 loss, taken at the normalised weights of A_0
    A0 = [p[f"mem.w{i}"].expand(2, -1, -1) for i in (0, 1)]
    W0 = [(a / a.pow(4).sum(dim=(-2, -1), keepdim=True).pow(0.5)).clone().requires_grad_() for a in A0]
    err = F.gelu(inp["k"] @ W0[0].transpose(1, 2)) @ W0[1].transpose(1, 2) + inp["k"] - inp["v"]
    loss = ((err.pow(2) + 1e-6).pow(1.5).mean(-1) * inp["lr"]).sum()
    G = torch.autograd.grad(loss, W0)
    for a0, g_, a in zip(A0, G, A):
        torch.testing.assert_close(a, 0.75 * a0 - g_, atol=1e-5, rtol=1e-4)


def test_memora_keeps_its_weights_on_the_simplex_by_the_kl_rule():
    inp = _mem_inputs()
    g = _memory(', retention = "kl"')
    p = init_params(g, seed=0)
    out = run(g, p, inp)
    for k in ("w0", "w1"):
        assert (out[k] >= 0).all()
        torch.testing.assert_close(out[k].sum(-1), torch.ones(out[k].shape[:-1]))
    F = torch.nn.functional
    W0 = [torch.softmax(p[f"mem.w{i}"], -1).expand(2, -1, -1).clone().requires_grad_() for i in (0, 1)]
    err = F.gelu(inp["k"] @ W0[0].transpose(1, 2)) @ W0[1].transpose(1, 2) + inp["k"] - inp["v"]
    G = torch.autograd.grad((err.pow(2).mean(-1) * inp["lr"]).sum(), W0)
    for i in (0, 1):                                      # W1 = softmax(alpha log W0 - eta grad), alpha = 1 - 0.25
        torch.testing.assert_close(out[f"w{i}"], torch.softmax(0.75 * W0[i].log() - G[i], -1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options,write,msg", [
    (', loss = "lq"', "", "one of"),
    (', retention = "l1"', "", "one of"),
    (', loss = "lp", p = 0.5', "", "at least 1"),
    (', retention = "lq", q = 1.0', "", "above 1"),
    ("", ", delta = delta", "threshold of the \"yaad\" loss"),
])
def test_miras_memory_options_are_checked(options, write, msg):
    from archc.errors import ArchError
    with pytest.raises(ArchError, match=msg):
        _memory(options, write)


def test_triton_memory_family_leaves_the_miras_rules_to_torch():
    from archc.backends.triton.families import memory_update
    from archc.ir.ops import Op
    for g in stdlib.graphs("miras"):
        writes = [n for n in g.walk() if n.op is Op.MEM_WRITE]
        assert writes and not any(memory_update.matches(n, g) for n in writes), g.name


# -- 42 SortedNet --------------------------------------------------------------------------------------


def test_sortednet_sampler_draws_every_sub_network_uniformly():
    (g,) = stdlib.graphs("sortednet")
    draws = [schedule_values(g, "sample", (i + 0.5) / 300)["depth"] for i in range(300)]
    assert {d: draws.count(d) for d in set(draws)} == {2: 100, 4: 100, 6: 100}


def test_sortednet_sub_networks_are_nested_prefixes_with_shared_parameters():
    (g,) = stdlib.graphs("sortednet")
    m = GraphModule(g, seed=0)
    names = [p.name for p in g.params]
    tokens = torch.randint(0, 64, (2, 5))
    for u, depth in ((0.1, 2), (0.5, 4), (0.9, 6)):
        assert m.apply_schedule("sample", u)["depth"] == depth
        m.zero_grad()
        m(tokens=tokens)["logits"].pow(2).mean().backward()
        grad = m.param_dict()["layers.attn.q.weight"].grad        # [n_layers, d, d]: one slice per layer
        used = [bool(grad[i].abs().sum() > 0) for i in range(6)]
        assert used == [i < depth for i in range(6)]               # exactly the first `depth` layers
        assert m.param_dict()["head.weight"].grad.abs().sum() > 0  # the shared head serves every exit
    assert [p.name for p in g.params] == names                     # no sub-network adds a parameter


# -- 3 Stochastic KV routing ------------------------------------------------------------------------


def test_stochastic_kv_routing_trains_on_random_maps_and_deploys_the_shared_one():
    (g,) = stdlib.graphs("stoch_kv_routing")
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 6))
    eval_out = run(g, p, {"tokens": tokens})["logits"]                   # deployment: always shared
    src = stdlib.source("stoch_kv_routing")
    from archc.api import lower
    shared = lower(src.replace("stochastic_share(layer1.attn, source = layer0.attn, p = 0.5)",
                               "share_kv(layer1.attn, source = layer0.attn)")
                      .replace("stochastic_share(layer3.attn, source = layer2.attn, p = 0.5)",
                               "share_kv(layer3.attn, source = layer2.attn)"))[0]
    own = lower(src.replace("  cache stochastic_share(layer1.attn, source = layer0.attn, p = 0.5)\n", "")
                   .replace("  cache stochastic_share(layer3.attn, source = layer2.attn, p = 0.5)\n", ""))[0]
    torch.testing.assert_close(eval_out, run(shared, p, {"tokens": tokens})["logits"])
    # training: each of the 2 routed layers flips its own coin, so 4 maps occur, each ~1/4 of the time
    ref_own = run(own, p, {"tokens": tokens})["logits"]
    seen = {"shared": 0, "own": 0, "mixed": 0}
    for seed in range(40):
        out = run(g, p, {"tokens": tokens}, training=True, seed=seed)["logits"]
        key = "shared" if torch.allclose(out, eval_out) else "own" if torch.allclose(out, ref_own) else "mixed"
        seen[key] += 1
    assert seen["shared"] > 3 and seen["own"] > 3 and seen["mixed"] > 10, seen


def test_stochastic_kv_routing_halves_the_decode_cache():
    m = stdlib.load("stoch_kv_routing")().eval()
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        _, cache = m.prefill(tokens)
    assert sorted(cache.entries) == ["layer0.attn", "layer2.attn"]    # layers 1 and 3 store nothing
    assert cache.nbytes() == 2 * 2 * (2 * 6 * 32 * 4)                  # 2 layers x (K + V) x B*T*d floats


# -- 4 Depth-recurrent transformer, silent thinking ---------------------------------------------------


def test_depth_recurrent_is_identity_biased_and_runs_deeper_at_test_time():
    (g,) = stdlib.graphs("depth_recurrent")
    p = init_params(g, {"d": 16, "heads": 2}, seed=0)
    inp = {"tokens": torch.randint(0, 32, (2, 5)), "adj": torch.ones(2, 5, 5, dtype=torch.bool)}
    b = {"d": 16, "heads": 2}
    # a closed gate (bias -> -inf) makes every step the identity: the recurrence is biased to copy
    closed = dict(p, **{"core.gate.bias": torch.full_like(p["core.gate.bias"], -1e4)})
    torch.testing.assert_close(run(g, closed, inp, dict(b, steps=1))["logits"],
                               run(g, closed, inp, dict(b, steps=20))["logits"])
    # at the default bias each step moves the state only a little, and more steps keep changing it
    outs = [run(g, p, inp, dict(b, steps=s))["logits"] for s in (8, 9, 20)]
    assert torch.isfinite(outs[2]).all() and not torch.allclose(outs[0], outs[1])


def test_stochastic_kv_routing_generated_module_flips_the_interpreters_coins():
    """In training mode both draw one coin per routed execution, in program order, from torch's RNG."""
    from archc.api import load
    from archc.backends.torch import state_key
    (g,) = stdlib.graphs("stoch_kv_routing")
    p = init_params(g, seed=0)
    m = load(stdlib.path("stoch_kv_routing"))()
    m.load_state_dict({state_key(k): v for k, v in p.items()})
    tokens = torch.randint(0, 64, (2, 6))
    for seed in range(4):
        torch.manual_seed(seed)
        ref = run(g, p, {"tokens": tokens}, training=True)["logits"]
        torch.manual_seed(seed)
        torch.testing.assert_close(m.train()(tokens), ref, atol=1e-5, rtol=1e-4)


# -- 43 LycheeDecode ---------------------------------------------------------------------------------


def test_lycheedecode_is_exact_when_k_covers_the_context_and_sparse_otherwise():
    cls = stdlib.load("lycheedecode")
    wide, narrow = cls(k=64), cls(k=2)
    narrow.load_state_dict(wide.state_dict())
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = wide(tokens)
        for m, exact in ((wide, True), (narrow, False)):
            out, cache = m.prefill(tokens[:, :6])
            steps = [out]
            for t in range(6, 10):
                step, cache = m.decode(tokens[:, t:t + 1], cache)
                steps.append(step)
            got = torch.cat(steps, 1)
            torch.testing.assert_close(got[:, :6], full[:, :6], atol=1e-5, rtol=1e-4)   # the prompt is dense
            assert torch.allclose(got, full, atol=1e-5, rtol=1e-4) == exact


def test_lycheedecode_sparse_heads_attend_to_the_retrieval_heads_top_k():
    from archc.backends.torch_runtime import topk_attention
    gen = torch.Generator().manual_seed(0)
    B, Tk, H, D, k = 2, 12, 4, 8, 3
    q, kk, v = (torch.randn(B, n, H, D, generator=gen) for n in (1, Tk, Tk))
    qpos = torch.full((B, 1), Tk - 1)
    got = topk_attention(q, kk, v, k, 1, qpos)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / D ** 0.5
    dense = torch.softmax(scores, -1)
    top = dense[:, 0].topk(k, dim=-1).indices                     # chosen by the retrieval head (head 0)
    for b in range(B):
        idx = top[b, 0]
        torch.testing.assert_close(got[b, 0, 0], dense[b, 0, 0] @ v[b, :, 0])          # retrieval head: dense
        for h in range(1, H):                                      # sparse heads: dense attention on idx only
            w = torch.softmax(scores[b, h, 0, idx], -1)
            torch.testing.assert_close(got[b, 0, h], w @ v[b, idx, h], atol=1e-6, rtol=1e-5)


# -- 48 Talking Heads ----------------------------------------------------------------------------------


def test_talking_heads_svd_finds_a_planted_channel_and_ablating_it_silences_the_reader():
    """Plant a rank-1 channel: layer 0 head 1 writes direction u, layer 1 head 0 queries with u. The
    paper's weight analysis (per-head SVD, composition of a writer's W_OV with a reader's W_QK) finds
    the pair; the model's residual intervention (alpha = 0 on u after layer 0) cuts the channel."""
    (g,) = stdlib.graphs("talking_heads")
    b = {"d": 16, "heads": 2}
    p = init_params(g, b, seed=0)
    gen = torch.Generator().manual_seed(1)
    d, dh = 16, 8
    r = torch.randn(d, generator=gen)
    u = torch.nn.functional.normalize(r - r.mean(), dim=0)            # mean-free: LayerNorm keeps it
    w = torch.nn.functional.normalize(torch.randn(dh, generator=gen), dim=0)
    p["layers.wo"][0, 1] = 3.0 * torch.outer(torch.ones(dh) / dh ** 0.5, u)
    p["layers.wq"][1, 0] = 8.0 * torch.outer(u, w)
    p["layers.wk"][1, 0] = 0.5 * torch.randn(d, dh, generator=gen)
    p["layers.mlp.fc2.weight"].zero_()                                 # attention-only, as the analysis
    ov = torch.einsum("lhde,lhef->lhdf", p["layers.wv"], p["layers.wo"])   # x -> x W_OV
    qk = torch.einsum("lhde,lhfe->lhdf", p["layers.wq"], p["layers.wk"])   # scores = x W_QK y^T
    # composition of every layer-0 writer with every layer-1 reader's query side
    score = torch.tensor([[float(torch.linalg.matrix_norm(ov[0, a] @ qk[1, c])
                                 / (torch.linalg.matrix_norm(ov[0, a]) * torch.linalg.matrix_norm(qk[1, c])))
                           for c in range(2)] for a in range(2)])
    assert divmod(int(score.argmax()), 2) == (1, 0) and score[1, 0] > 0.99 > 2 * score.flatten()[[0, 1, 3]].max()
    _, _, vh = torch.linalg.svd(ov[0, 1])                              # the writer's top output direction ...
    left, _, _ = torch.linalg.svd(qk[1, 0])                            # ... is the reader's top input direction
    assert abs(vh[0] @ u) > 0.999 and abs(left[:, 0] @ u) > 0.999

    tokens = torch.randint(0, 64, (2, 8), generator=gen)

    def reader(channel, alpha):
        return run(g, p, {"tokens": tokens, "channel": channel[:, None]}, dict(b, alpha=alpha))["patterns"][:, 1]

    uniform = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    r = torch.randn(d, generator=gen)
    other = torch.nn.functional.normalize(r - r.mean() - (r @ u) * u, dim=0)
    base, cut, cut_other = reader(u, 1.0), reader(u, 0.0), reader(other, 0.0)
    assert (base[:, 0] - uniform).abs().max() > 0.5                     # the reader attends sharply ...
    torch.testing.assert_close(cut[:, 0], uniform.expand(2, 8, 8), atol=1e-4, rtol=0)   # ... only through u
    assert (cut_other[:, 0] - uniform).abs().max() > 0.5               # another direction does not
    torch.testing.assert_close(cut[:, 1], base[:, 1], atol=1e-2, rtol=0)   # the other head barely cares
    torch.testing.assert_close(reader(u, 1.0), base)                    # alpha = 1 is no edit


# -- 46 Sparsity and the curse of depth --------------------------------------------------------------


def test_sparsity_cod_probes_read_the_residual_stream_and_skip_a_layer():
    gs = {g.name: g for g in stdlib.graphs("sparsity_cod")}
    g = gs["CoDDense"]
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 6))
    out = run(g, p, {"tokens": tokens})
    h = out["hidden"]                                                    # [B, n_layers + 1, T, d]
    torch.testing.assert_close(h[:, 0], p["embed.weight"][tokens])
    torch.testing.assert_close(out["layer_var"], h[:, 1:].var(-1, unbiased=False).mean(-1), atol=1e-5, rtol=1e-4)
    # skipping layer 1 makes it the identity; earlier layers are untouched, later ones see a new input
    skipped = run(g, p, {"tokens": tokens}, {"skip": 1})["hidden"]
    torch.testing.assert_close(skipped[:, :2], h[:, :2])
    torch.testing.assert_close(skipped[:, 2], skipped[:, 1])
    # the reference's causal effect of the skip on each later layer's update
    base, mod = h[:, 3] - h[:, 2], skipped[:, 3] - skipped[:, 2]
    assert ((mod - base).norm(dim=-1).mean() / base.norm(dim=-1).mean()) > 0.01
    # GQA shares each key/value head among heads // kv_heads query heads
    gqa = {q.name: q.type.shape for q in gs["CoDGQA"].params}
    assert str(gqa["layers.attn.k.weight"][1]) == "d*kv_heads/heads"


def test_sparsity_cod_moe_mixes_the_top_k_experts_and_keeps_variance_growth_lower():
    gs = {g.name: g for g in stdlib.graphs("sparsity_cod")}
    g = gs["CoDMoE"]
    b = {"n_layers": 1, "top_k": 2}
    p = init_params(g, b, seed=0)
    p["layers.attn.o.weight"].zero_()                                    # the layer is x + MoE(x)
    tokens = torch.randint(0, 64, (2, 5))
    x = p["embed.weight"][tokens]
    got = run(g, p, {"tokens": tokens}, b)["hidden"][:, 1]
    F = torch.nn.functional
    w = lambda n: p[f"layers.{n}"][0]                                    # noqa: E731
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w("mlp_norm.weight")
    probs = torch.softmax(u @ w("router.weight").T, -1)
    top = probs.topk(2, dim=-1)
    y = torch.zeros_like(x)
    for j in range(2):                                                   # only the chosen experts run
        e = top.indices[..., j]
        expert = (F.silu(torch.einsum("btd,btfd->btf", u, w("w_gate")[e]))
                  * torch.einsum("btd,btfd->btf", u, w("w_up")[e]))
        y = y + top.values[..., j, None] * torch.einsum("btf,btdf->btd", expert, w("w_down")[e])
    torch.testing.assert_close(got, x + y, atol=1e-5, rtol=1e-4)
    # the curse of depth at initialisation: each Pre-LN layer adds variance; the gated experts add less
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    var = {}
    for name in ("CoDDense", "CoDMoE"):
        v = [run(gs[name], init_params(gs[name], {"n_layers": 6}, seed=s), {"tokens": tokens},
                 {"n_layers": 6})["layer_var"].mean(0) for s in range(2)]
        var[name] = torch.stack(v).mean(0)
        assert (var[name][1:] > var[name][:-1]).all(), name
    assert var["CoDMoE"][-1] < 0.95 * var["CoDDense"][-1]


# -- 29 Locas --------------------------------------------------------------------------------------


def test_locas_glu_memory_starts_as_a_no_op_and_merges_into_a_wider_ffn():
    glu, _ = stdlib.graphs("locas")
    p = init_params(glu, seed=0)
    tokens = torch.randint(0, 64, (2, 6))
    host = run(glu, p, {"tokens": tokens}, {"mem_scale": 0.0})["logits"]
    torch.testing.assert_close(run(glu, p, {"tokens": tokens})["logits"], host)     # W_d^m = 0 at init
    # a trained memory, permanentized: [W_g; W_g^m], [W_u; W_u^m], [W_d, s W_d^m] at width ffn + rank
    p["layers.mem_down.weight"] = torch.randn_like(p["layers.mem_down.weight"]) * 0.1
    s = 0.5
    trained = run(glu, p, {"tokens": tokens}, {"mem_scale": s})["logits"]
    wide = {"ffn": 68}
    q = init_params(glu, wide, seed=1)
    for k in q:
        if ".mem_" not in k and k not in ("layers.gate.weight", "layers.up.weight", "layers.down.weight"):
            q[k] = p[k]
    q["layers.mem_down.weight"].zero_()
    for name in ("gate", "up"):
        q[f"layers.{name}.weight"] = torch.cat([p[f"layers.{name}.weight"], p[f"layers.mem_{name}.weight"]], 1)
    q["layers.down.weight"] = torch.cat([p["layers.down.weight"], s * p["layers.mem_down.weight"]], 2)
    torch.testing.assert_close(run(glu, q, {"tokens": tokens}, wide)["logits"], trained, atol=1e-5, rtol=1e-4)


def test_locas_glu_activation_guided_cloning():
    glu, _ = stdlib.graphs("locas")
    p = init_params(glu, seed=0)
    p["layers.attn.o.weight"][0].zero_()                     # layer 0's FFN reads the embeddings
    tokens = torch.randint(0, 64, (2, 6))
    energy = run(glu, p, {"tokens": tokens})["energy"]      # [B, n_layers, ffn]
    x = p["embed.weight"][tokens]
    u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * p["layers.mlp_norm.weight"][0]
    act = torch.nn.functional.silu(u @ p["layers.gate.weight"][0].T) * (u @ p["layers.up.weight"][0].T)
    torch.testing.assert_close(energy[:, 0], act.pow(2).sum(1), atol=1e-5, rtol=1e-4)
    # clone the top-r neurons by energy: with W_d^m = W_d[:, top] and s = -1 the memory cancels exactly
    # those host neurons, i.e. the memory computes what they compute
    top = energy.sum(0).topk(4, dim=-1).indices             # [n_layers, rank]
    cut = {k: v.clone() for k, v in p.items()}
    for l in range(2):
        for name in ("gate", "up"):
            p[f"layers.mem_{name}.weight"][l] = p[f"layers.{name}.weight"][l][top[l]]
        p["layers.mem_down.weight"][l] = p["layers.down.weight"][l][:, top[l]]
        cut["layers.down.weight"][l][:, top[l]] = 0.0
    torch.testing.assert_close(run(glu, p, {"tokens": tokens}, {"mem_scale": -1.0})["logits"],
                               run(glu, cut, {"tokens": tokens})["logits"], atol=1e-5, rtol=1e-4)


def test_locas_cloned_memory_learns_a_context_faster_than_a_random_one():
    """Test-time training of the memory only (backbone frozen) on one sequence: the cloned init
    reaches a lower loss than a random init of the same rank."""
    cls = stdlib.load("locas", arch="LocasGLU")
    tokens = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    loss = {}
    for init in ("clone", "random"):
        torch.manual_seed(0)
        m = cls(rank=8, d=16, heads=2)
        with torch.no_grad():
            if init == "clone":
                top = m(tokens)["energy"][0].topk(8, dim=-1).indices
                for l in range(2):
                    m.layers.mem_gate.weight[l] = m.layers.gate.weight[l][top[l]]
                    m.layers.mem_up.weight[l] = m.layers.up.weight[l][top[l]]
        opt = torch.optim.Adam([v for k, v in m.named_parameters() if ".mem_" in k], lr=1e-2)
        for _ in range(8):
            logits = m(tokens)["logits"]
            loss[init] = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
            opt.zero_grad()
            loss[init].backward()
            opt.step()
    assert loss["clone"] < loss["random"] - 0.1, loss


def test_locas_mlp_keys_from_activations_address_their_positions_and_values_start_at_zero():
    _, mlp = stdlib.graphs("locas")
    p = init_params(mlp, seed=0)
    tokens = torch.randint(0, 64, (1, 8))
    out = run(mlp, p, {"tokens": tokens})
    host = run(mlp, p, {"tokens": tokens}, {"mem_scale": 0.0})["logits"]
    torch.testing.assert_close(out["logits"], host)                      # W_v^m = 0: a no-op
    u = out["ffn_in"][0, 0]                                              # layer 0's normalised FFN inputs
    key = torch.nn.functional.normalize(u[[1, 3, 5, 6]], dim=-1)         # 4 keys from 4 positions
    assert torch.equal(torch.relu(u @ key.T).argmax(0), torch.tensor([1, 3, 5, 6]))
    # the values' first gradient step from zero (the gradient-initialised value) lowers the loss
    p["layers.mem_key.weight"][0] = key
    v = p["layers.mem_value.weight"].clone().requires_grad_()
    logits = run(mlp, dict(p, **{"layers.mem_value.weight": v}), {"tokens": tokens})["logits"]
    before = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    (grad,) = torch.autograd.grad(before, v)
    assert grad[0].abs().sum() > 0
    p["layers.mem_value.weight"] = -1.0 * grad
    after = run(mlp, p, {"tokens": tokens})["logits"]
    assert torch.nn.functional.cross_entropy(after[0, :-1], tokens[0, 1:]) < before


# -- 37 Contextual Memory Reweaving ---------------------------------------------------------------------


def test_cmr_reweaves_every_layers_past_latent_states_through_a_gate():
    (g,) = stdlib.graphs("cmr_reweave")
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 6))
    out = run(g, p, {"tokens": tokens})
    lat = out["latents"]                                                 # [B, n_layers, T, d]
    # by hand from the cached latents: 4 heads over (layer j, position t' < t) entries
    w = lambda n: p[f"reweave.{n}"]                                      # noqa: E731
    h = lat[:, -1]
    q = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w("norm.weight")) @ w("query.weight").T
    k = torch.einsum("bltd,led->blte", lat, w("key")).flatten(1, 2)
    v = torch.einsum("bltd,led->blte", lat, w("value")).flatten(1, 2)
    split = lambda z: z.unflatten(-1, (4, 8)).transpose(1, 2)            # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / 8 ** 0.5           # [B, H, T, L*T]
    t = torch.arange(6)
    allowed = (t[:, None] > t[None, :]).repeat(1, 3)                     # entry (j, t') sits at j*T + t'
    r = (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ split(v))
    r = r.transpose(1, 2).flatten(-2)
    gate = torch.sigmoid(torch.cat([h, r], -1) @ w("gate.weight").T + w("gate.bias"))
    y = h + gate * (r @ w("out.weight").T)
    torch.testing.assert_close(out["gate"], gate, atol=1e-5, rtol=1e-4)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * p["norm.weight"]
    torch.testing.assert_close(out["logits"], y @ p["head.weight"].T, atol=1e-5, rtol=1e-4)
    # causal: token 4 changes nothing before it; position 0 has no past to reweave
    t2 = tokens.clone()
    t2[:, 4] = (t2[:, 4] + 1) % 64
    other = run(g, p, {"tokens": t2})["logits"]
    torch.testing.assert_close(other[:, :4], out["logits"][:, :4])
    closed = dict(p, **{"reweave.gate.bias": torch.full_like(p["reweave.gate.bias"], -1e4)})
    plain = run(g, closed, {"tokens": tokens})["logits"]                 # a closed gate is the plain decoder
    torch.testing.assert_close(plain[:, 0], out["logits"][:, 0])
    assert not torch.allclose(plain[:, 1:], out["logits"][:, 1:])


# -- 38 Memory Retention Is Not Enough (memory rewriting) -----------------------------------------------


def _rewriting_graphs():
    return {g.name: g for g in stdlib.graphs("memory_rewriting_bench")}


def test_memory_rewriting_gru_agent_is_a_gru_stepped_over_the_observations():
    g = _rewriting_graphs()["GRUAgent"]
    gen = torch.Generator().manual_seed(0)
    p = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init_params(g, seed=0).items()}
    obs = torch.randint(0, 6, (3, 7), generator=gen)
    cell = torch.nn.GRUCell(32, 32)
    with torch.no_grad():
        for ours, theirs in [("ih.weight", "weight_ih"), ("ih.bias", "bias_ih"), ("hh.weight", "weight_hh"),
                             ("hh.bias", "bias_hh")]:
            getattr(cell, theirs).copy_(p[f"cell.{ours}"])
        h, hs = torch.zeros(3, 32), []
        for t in range(7):
            h = cell(p["embed.weight"][obs[:, t]], h)
            hs.append(h)
    ref = torch.stack(hs, 1) @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(run(g, p, {"tokens": obs})["logits"], ref, atol=1e-5, rtol=1e-4)


def _rewriting_by_hand(g, forget=True):
    """Weights under which the memory stores exactly what was shown last: one-hot observations
    (write(v) = v for v < 4, blank = 4, query = 5), one key and query for every observation,
    value e_v for write(v) and 0 otherwise, write gate open only on writes, and (with forget) the
    forget gate shut on writes (f = sigmoid(-30)) and open otherwise (f = sigmoid(30))."""
    b = {"d": 6, "dk": 2, "dv": 4}
    p = {k: torch.zeros_like(v) for k, v in init_params(g, b, seed=0).items()}
    p["embed.weight"] = torch.eye(6)
    p["key.weight"][0] = p["query.weight"][0] = torch.ones(6)
    p["value.weight"][:, :4] = torch.eye(4)
    is_write = torch.tensor([1.0, 1, 1, 1, 0, 0])
    p["write_gate.weight"][0] = 60.0 * is_write - 30.0
    if forget:
        p["forget_gate.weight"][0] = 30.0 - 60.0 * is_write
    return p, b


def test_memory_rewriting_forget_gate_overwrites_and_the_additive_memory_returns_a_mixture():
    graphs = _rewriting_graphs()
    fm, am = graphs["ForgetMemoryAgent"], graphs["AdditiveMemoryAgent"]
    pf, b = _rewriting_by_hand(fm)
    pa, _ = _rewriting_by_hand(am, forget=False)
    obs = torch.tensor([[1, 4, 4, 3, 4, 4, 2, 4, 4, 5],          # writes 1, 3, 2: the answer is 2
                        [0, 4, 1, 4, 4, 4, 4, 4, 4, 5],          # writes 0, 1: the answer is 1
                        [4, 4, 2, 4, 0, 2, 4, 3, 4, 5]])         # writes 2, 0, 2, 3: the answer is 3
    last = torch.tensor([2, 1, 3])
    read = run(fm, pf, {"tokens": obs}, b)["read"][:, -1]
    torch.testing.assert_close(read, torch.eye(4)[last], atol=1e-6, rtol=0)       # exactly the last write
    # every read along the way is the value shown last so far (zero before the first write)
    steps = run(fm, pf, {"tokens": obs}, b)["read"]
    shown = torch.zeros(3, 4)
    for t in range(10):
        shown = torch.where((obs[:, t] < 4)[:, None], torch.eye(6)[obs[:, t], :4], shown)
        torch.testing.assert_close(steps[:, t], shown, atol=1e-6, rtol=0)
    # with the same projections and write gate, additive writes return the sum of every value shown
    mixed = run(am, pa, {"tokens": obs}, b)["read"][:, -1]
    counts = torch.nn.functional.one_hot(obs, 6)[..., :4].sum(1).float()
    torch.testing.assert_close(mixed, counts, atol=1e-6, rtol=0)
    assert (mixed.argmax(-1) != last).any()                                          # stale values win
    # a saturated-open forget gate makes the forget memory exactly the additive one
    open_gate = dict(pf, **{"forget_gate.weight": torch.zeros_like(pf["forget_gate.weight"]),
                            "forget_gate.bias": torch.full_like(pf["forget_gate.bias"], 60.0)})
    torch.testing.assert_close(run(fm, open_gate, {"tokens": obs}, b)["read"], run(am, pa, {"tokens": obs}, b)["read"])


def test_memory_rewriting_additive_memory_is_blind_to_the_order_of_writes():
    """For any weights: the additive state at the query is a sum over the earlier observations, so
    reordering them cannot change the answer (the order-blind bound of the training example); the
    forget memory and the GRU see the order."""
    graphs = _rewriting_graphs()
    gen = torch.Generator().manual_seed(1)
    obs = torch.tensor([[2, 4, 0, 4, 4, 1, 4, 5]])
    swapped = torch.tensor([[1, 4, 0, 4, 4, 2, 4, 5]])                             # first and last write swapped
    for name, blind in [("AdditiveMemoryAgent", True), ("ForgetMemoryAgent", False), ("GRUAgent", False)]:
        g = graphs[name]
        p = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in init_params(g, seed=0).items()}
        a, b = (run(g, p, {"tokens": o})["logits"][:, -1] for o in (obs, swapped))
        assert torch.allclose(a, b, atol=1e-5) == blind, name
    # the forget memory with its gate held open is the additive memory, shared weights and all
    fm, am = graphs["ForgetMemoryAgent"], graphs["AdditiveMemoryAgent"]
    p = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in init_params(fm, seed=0).items()}
    p["forget_gate.weight"].zero_()
    p["forget_gate.bias"].fill_(60.0)
    shared = {k: v for k, v in p.items() if not k.startswith("forget_gate.")}
    assert set(shared) == set(init_params(am, seed=0))
    torch.testing.assert_close(run(fm, p, {"tokens": obs})["logits"], run(am, shared, {"tokens": obs})["logits"],
                               atol=1e-5, rtol=1e-4)


def test_memory_rewriting_last_write_batch_overwrites_and_queries_the_latest_value():
    from archc.tasks import last_write_batch
    obs, targets, last = last_write_batch(64, 16, values=4, writes=(2, 5), min_delay=3, seed=7)
    assert obs.shape == (64, 16) and (obs[:, -1] == 5).all()
    for row, y, t in zip(obs.tolist(), targets.tolist(), last.tolist()):
        steps = [i for i, o in enumerate(row) if o < 4]
        assert 2 <= len(steps) <= 5 and steps[-1] == t and row[t] == y
        assert all(o == 4 for o in row[t + 1:-1]) and t <= 16 - 1 - 3 - 1             # blanks before the query
        assert all(row[a] != row[b] for a, b in itertools.pairwise(steps))                 # every write changes it
    assert torch.equal(last_write_batch(64, 16, values=4, writes=(2, 5), min_delay=3, seed=7)[0], obs)
    assert len(set(targets.tolist())) == 4
    with pytest.raises(ValueError, match="no room"):
        last_write_batch(2, 6, writes=(2, 5), min_delay=1)


# -- 35 MEMO -------------------------------------------------------------------------------------------


def test_memo_concatenates_one_specialized_block_per_task_over_shared_generalized_blocks():
    (g,) = stdlib.graphs("memo_cil")
    p = {k: v.requires_grad_() for k, v in init_params(g, seed=0).items()}
    x = torch.randn(3, 12, 16)
    out = run(g, p, {"x": x}, {"tasks": 2})
    f = out["features"]                                                  # [B, max_tasks, feat]
    assert f[:, 2:].abs().max() == 0 and out["logits"].shape == (3, 4) and out["aux_logits"].shape == (3, 3)
    # the expanded classifier over the concatenated features of the 2 blocks, on the 4 classes seen so far
    w_cat = torch.cat([p["fc.weight"][0], p["fc.weight"][1]], dim=1)      # [classes, 2 * feat]
    ref = torch.cat([f[:, 0], f[:, 1]], dim=1) @ w_cat.T + p["fc_bias"]
    torch.testing.assert_close(out["logits"], ref[:, :4], atol=1e-5, rtol=1e-4)
    # the auxiliary head reads the newest block only: its loss reaches block 1, not block 0
    out["aux_logits"].sum().backward(retain_graph=True)
    assert p["special.conv1.weight"].grad[1].abs().sum() > 0 and p["special.conv1.weight"].grad[0].abs().sum() == 0
    assert p["aux.weight"].grad[1].abs().sum() > 0 and p["aux.weight"].grad[[0, 2]].abs().sum() == 0
    # blocks of tasks not seen yet take no part
    for q in p.values():
        q.grad = None
    out["logits"].sum().backward()
    assert p["special.conv1.weight"].grad[2:].abs().sum() == 0 and p["stem.weight"].grad.abs().sum() > 0
    # a new task adds a block: the old blocks' features are unchanged and the old classes' logits move
    # only by the new block's slice of the classifier
    with torch.no_grad():
        grown = run(g, p, {"x": x}, {"tasks": 3})
        torch.testing.assert_close(grown["features"][:, :2], f[:, :2])
        new = grown["features"][:, 2] @ p["fc.weight"][2].T
        torch.testing.assert_close(grown["logits"][:, :4], out["logits"] + new[:, :4], atol=1e-5, rtol=1e-4)


# -- 45 Dual Memory Networks ---------------------------------------------------------------------------


def test_dmn_reads_both_memories_by_the_interactive_rule():
    (g,) = stdlib.graphs("dmn_clip")
    p = init_params(g, seed=0)
    for k in ("q_bias", "key_bias", "value_bias", "out_bias", "text_bias"):
        p[k] = 0.1 * torch.randn_like(p[k])                              # fitted biases (few-shot mode)
    images = torch.randn(2, 1, 32)
    out = run(g, p, {"images": images}, {"w_dyn": 0.0})
    F = torch.nn.functional
    f = F.normalize(images[:, 0], dim=-1)
    p_text = torch.softmax(100 * f @ F.normalize(p["text"] + p["text_bias"], dim=-1).T, -1)
    q = F.normalize(f + p["q_bias"], dim=-1)
    k = F.normalize(p["shots"] + p["key_bias"][:, None], dim=-1)          # [classes, n_shot, d]
    v = F.normalize(p["shots"] + p["value_bias"][:, None], dim=-1)
    a = torch.exp(-5.5 * (1 - torch.einsum("bd,cnd->bcn", q, k)))
    proto = F.normalize(F.normalize(torch.einsum("bcn,cnd->bcd", a, v), dim=-1) + p["out_bias"], dim=-1)
    p_static = torch.softmax(100 * torch.einsum("bcd,bd->bc", proto, f), -1)
    torch.testing.assert_close(out["probs"][:, 0], p_text + p_static, atol=1e-5, rtol=1e-4)


def test_dmn_dynamic_memory_keeps_the_most_certain_features_per_pseudo_label():
    (g,) = stdlib.graphs("dmn_clip")
    b = {"classes": 2, "slots": 2, "scale": 10.0}
    p = init_params(g, b, seed=0)
    e = torch.eye(32)
    p["text"] = e[:2].clone()
    gen = torch.Generator().manual_seed(0)
    conf = torch.tensor([0.3, 0.9, 0.5, 0.7, 0.2, 0.8])                  # weight on class 0's direction
    feats = torch.nn.functional.normalize(conf[:, None] * e[0] + 0.1 * torch.randn(6, 32, generator=gen), dim=-1)
    out = run(g, p, {"images": feats[None]}, b)
    probs = torch.softmax(10 * feats @ p["text"].T, -1)
    ent = -(probs * torch.log(probs + 1e-8)).sum(-1)
    to0 = probs.argmax(-1) == 0
    keep = ent.masked_fill(~to0, float("inf")).topk(2, largest=False).indices
    assert out["memory_valid"][0, 0].all() and not out["memory_valid"][0, 1].any()
    got = sorted(out["memory_entropy"][0, 0].tolist())
    torch.testing.assert_close(torch.tensor(got), ent[keep].sort().values, atol=1e-5, rtol=1e-4)
    kept = {tuple(torch.round(r, decimals=4).tolist()) for r in out["memory"][0, 0]}
    assert kept == {tuple(torch.round(feats[i], decimals=4).tolist()) for i in keep.tolist()}


def test_dmn_dynamic_memory_beats_zero_shot_on_a_test_stream():
    """Class clusters seen through noisy text prototypes: the memory of pseudo-labelled test features
    classifies the second half of the stream better than the zero-shot classifier."""
    (g,) = stdlib.graphs("dmn_clip")
    C, d, T = 5, 32, 100
    zero_shot, dynamic = [], []
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        means = torch.nn.functional.normalize(torch.randn(C, d, generator=gen), dim=-1)
        p = init_params(g, seed=0)
        p["text"] = torch.nn.functional.normalize(means + 0.6 * torch.randn(C, d, generator=gen), dim=-1)
        labels = torch.randint(0, C, (T,), generator=gen)
        feats = torch.nn.functional.normalize(means[labels] + 0.25 * torch.randn(T, d, generator=gen), dim=-1)
        out = run(g, p, {"images": feats[None]}, {"w_sta": 0.0})
        zero_shot.append(((feats @ p["text"].T).argmax(-1) == labels)[T // 2:].float().mean())
        dynamic.append((out["dynamic"][0].argmax(-1) == labels)[T // 2:].float().mean())
    assert sum(dynamic) / 4 > sum(zero_shot) / 4 + 0.1, (dynamic, zero_shot)


# -- 36 GBi-Net ----------------------------------------------------------------------------------------


def _gbinet_plane_sweep(C=32, steps=6):
    """GBi-Net with identity features and its refinement at zero: the cost is plain correlation."""
    (g,) = stdlib.graphs("gbinet_mvs")
    b = {"c_in": C, "hidden": 2 * C, "feat": C, "groups": 4, "steps": steps}
    p = init_params(g, b, seed=0)
    eye = torch.eye(C)
    for k in ("features.conv1.weight", "features.conv2.weight"):
        p[k].zero_()
    p["features.conv1.weight"][:, :, 1] = torch.cat([eye, -eye], 0)     # relu(x) - relu(-x) = x
    p["features.conv2.weight"][:, :, 1] = torch.cat([eye, -eye], 1)
    return g, b, p


def test_gbinet_binary_search_with_tolerance_bins_finds_the_depth():
    g, b, p = _gbinet_plane_sweep()
    tex = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))   # a textured scanline
    width = 3.0 / 4 / 2 ** 5                                             # the last node's width
    for disp in (4, 3):                                                  # depth = fb / disparity
        ref, src = tex[:, :24], tex[:, disp:disp + 24]
        out = run(g, p, {"ref": ref, "src": src}, b)
        assert (out["depth"][:, 8:] - 8.0 / disp).abs().max() <= width   # pixels whose hypotheses all see src
        e = out["edges"]                                                 # [B, steps, T, 5]
        assert torch.equal(e[:, 0], torch.tensor([1.0, 1.75, 2.5, 3.25, 4.0]).expand(2, 24, 5))
        for s in range(1, 6):                                            # two halves + a tolerance bin each side
            w = e[:, s, :, 1:] - e[:, s, :, :-1]
            inside = (e[:, s, :, 0] > 1.0) & (e[:, s, :, 4] < 4.0)
            torch.testing.assert_close(w[inside], torch.full_like(w[inside], 0.75 / 2 ** s))
        # step 1's logits are the group correlations at the 4 bin centres, summed over groups
        d = torch.tensor([1.375, 2.125, 2.875, 3.625])
        pos = (torch.arange(24.0)[:, None] - 8.0 / d).clamp(0, 23)
        i0 = pos.floor().long()
        frac = (pos - i0)[..., None]
        warped = src[:, i0] * (1 - frac) + src[:, (i0 + 1).clamp(max=23)] * frac   # [B, T, 4, C]
        corr = (ref[:, :, None] * warped).reshape(2, 24, 4, 4, 8).mean(-1).sum(-1)
        torch.testing.assert_close(out["logits"][:, 0], corr, atol=1e-5, rtol=1e-4)
    # a wrong first step (forced into the bin next to the true one) is undone by a tolerance bin
    p["cost.out.bias"][0] = torch.tensor([100.0, 0.0, 0.0, 0.0])
    ref, src = tex[:, :24], tex[:, 4:28]                                 # depth 2.0, in bin 1 of step 1
    out = run(g, p, {"ref": ref, "src": src}, b)
    labels = out["logits"].argmax(-1)[:, :, 8:]
    assert (labels[:, 0] == 0).all() and (labels[:, 1] == 3).all()       # step 2 leaves through the right edge
    assert (out["depth"][:, 8:] - 2.0).abs().max() <= width


# -- 34 Sparsey ----------------------------------------------------------------------------------------


def _spearman(x, y):
    """Spearman's rank correlation, ties given their average rank (no scipy needed)."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        r = torch.empty_like(v)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        for u in v.unique():
            r[v == u] = r[v == u].mean()
        return r - r.mean()
    a, b = ranks(x), ranks(y)
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_sparsey_code_selection_preserves_similarity_and_recalls_in_one_trial():
    """Each batch sample is a separate memory that stores the same 10 patterns (same draws), then sees
    one probe sharing 0..12 of the first pattern's 12 active bits."""
    (g,) = stdlib.graphs("sparsey")
    gen = torch.Generator().manual_seed(0)
    n, Q, K = 256, 8, 8
    b = {"n_in": n, "Q": Q, "K": K}

    def pattern():
        x = torch.zeros(n)
        x[torch.randperm(n, generator=gen)[:12]] = 1
        return x

    base = torch.stack([pattern() for _ in range(10)])
    on, off = base[0].nonzero()[:, 0], (base[0] == 0).nonzero()[:, 0]
    probes, overlap = [], []
    for j in range(13):
        for _ in range(2):
            x = torch.zeros(n)
            x[on[torch.randperm(12, generator=gen)[:j]]] = 1
            x[off[torch.randperm(len(off), generator=gen)[:12 - j]]] = 1
            probes.append(x)
            overlap.append(j / 12)
    N = len(probes)
    seq = torch.cat([base.expand(N, 10, n), torch.stack(probes)[:, None]], 1)
    noise = torch.cat([torch.rand(1, 10, Q, K, generator=gen).expand(N, 10, Q, K),
                       torch.rand(N, 1, Q, K, generator=gen)], 1)
    out = run(g, {}, {"x": seq, "noise": noise}, b)
    codes, fam = out["codes"], out["familiarity"]
    assert torch.equal(codes.sum(-1), torch.ones(N, 11, Q))             # one winner per module
    assert fam[:, 0].abs().max() == 0                                    # the first input is novel:
    torch.testing.assert_close(out["probs"][:, 0], torch.full((N, Q, K), 1 / K))   # a uniform draw
    shared = (codes[:, 10] * codes[:, 0]).sum((-1, -2)) / Q             # code intersection with pattern 0's
    torch.testing.assert_close(fam[-2:, 10], torch.ones(2))              # stored in one trial: G = 1 ...
    assert shared[-2:].min() >= 7 / 8                                    # ... and its code comes back
    assert fam[:2, 10].max() < 0.35 and shared[:2].max() <= 0.25         # an unrelated input: a new code
    assert _spearman(overlap, shared) > 0.75                             # similar inputs, overlapping codes
    assert _spearman(overlap, fam[:, 10]) > 0.9                          # familiarity tracks the overlap


# -- 27 WMAR -------------------------------------------------------------------------------------------


def _wmar_inputs(B, T, gen):
    return {"x": torch.randn(B, T, 16, generator=gen),
            "action": torch.nn.functional.one_hot(torch.randint(0, 4, (B, T), generator=gen), 4).float(),
            "noise": torch.rand(B, T, 4, 4, generator=gen)}


def test_wmar_rssm_prior_sees_the_past_posterior_the_present_and_samples_straight_through():
    (g,) = stdlib.graphs("wmar")
    p = init_params(g, seed=0)
    gen = torch.Generator().manual_seed(0)
    inp = _wmar_inputs(2, 6, gen)
    inp["x"].requires_grad_()
    out = run(g, p, inp)
    z = out["latent"].reshape(2, 6, 4, 4)
    torch.testing.assert_close(z, z.round().detach(), atol=1e-6, rtol=0)   # one-hot values ...
    torch.testing.assert_close(z.sum(-1), torch.ones(2, 6, 4))           # ... with the posterior's gradient

    def grad_x(value):
        (gx,) = torch.autograd.grad(value.sum(), inp["x"], retain_graph=True, allow_unused=True)
        return torch.zeros(2, 6) if gx is None else gx.abs().sum(-1)

    seen = grad_x(out["prior_logits"][:, 3])                            # the prior of step 3 ...
    assert (seen[:, :3] > 0).all() and (seen[:, 3:] == 0).all()         # ... reads x_0..x_2 only
    seen = grad_x(out["post_logits"][:, 3])                             # the posterior also reads x_3
    assert (seen[:, :4] > 0).all() and (seen[:, 4:] == 0).all()
    # the sample is the Gumbel-max draw of the unimix posterior
    gen = torch.Generator().manual_seed(1)
    inp = _wmar_inputs(4000, 1, gen)
    inp["x"] = inp["x"][:1].expand(4000, 1, 16)
    out = run(g, p, inp)
    probs = 0.99 * torch.softmax(out["post_logits"][0, 0], -1) + 0.01 / 4
    freq = out["latent"].reshape(4000, 4, 4).mean(0)
    assert (freq - probs).abs().max() < 0.035


def test_wmar_replay_schedule_keeps_every_task_in_proportion():
    """Three tasks of 2000 transitions each stream into a 300-entry buffer: the reservoir kept by the
    schedule's probability holds about a third of each task, a FIFO only the last task."""
    m = stdlib.load("wmar")(capacity=300)
    rng = torch.Generator().manual_seed(0)
    buffer, fifo = [], []
    for seen, task in enumerate([0] * 2000 + [1] * 2000 + [2] * 2000, start=1):
        keep = m.schedule_replay(seen)["keep"]
        if len(buffer) < 300:
            assert keep == 1.0
            buffer.append(task)
        elif torch.rand((), generator=rng) < keep:
            assert keep == pytest.approx(300 / seen)
            buffer[int(torch.randint(0, 300, (), generator=rng))] = task
        fifo = (fifo + [task])[-300:]
    share = [buffer.count(k) / 300 for k in range(3)]
    assert all(abs(s - 1 / 3) < 0.08 for s in share), share
    assert set(fifo) == {2}


# -- 19 Bottlenecked Transformers (rewrite_kv) -------------------------------------------------------

REWRITE = """
block Proc(kvh: int, hd: int) {
  input k: f32[B, N, kvh, hd]
  input v: f32[B, N, kvh, hd]
  layer mix = Linear(hd, hd, init = "zeros")
  return k + mix(k), v + mix(v)
}

arch Rw(vocab: int = 16, d: int = 8, heads: int = 2, top: int = 2) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads, rope = false)
  layer proc = Proc(heads, d / heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  output logits = head(x + attn(x))
  cache rewrite_kv(attn, processor = proc, delimiter = 1, top = top)
}
"""


def _bottlenecked(seed=0, scale=0.5):
    """The stdlib model with a processor whose output projection is no longer zero (a trained one)."""
    torch.manual_seed(seed)
    m = stdlib.load("bottlenecked_tf", d=32, heads=4)
    with torch.no_grad():
        m.processor.out.weight.normal_(0, scale)
    return m


def _steps(tokens, delimiters):
    """Random tokens other than the delimiter (10), with it at the given (sample, position) pairs."""
    tokens = tokens.clone()
    tokens[tokens == 10] = 11
    for b, t in delimiters:
        tokens[b, t] = 10
    return tokens


def test_bottlenecked_rewrite_changes_only_the_last_step_and_the_top_k_most_attended():
    from archc.api import load
    torch.manual_seed(0)
    m = load(REWRITE)()
    with torch.no_grad():
        m.proc.mix.weight.normal_(0, 1.0)
    tokens = torch.randint(2, 16, (2, 9))
    tokens[0, 3] = tokens[1, 2] = tokens[0, 8] = 1         # delimiter 1: sample 0 ends steps at 3 and 8
    _, cache = m.prefill(tokens[:, :4])
    before = type(cache)()                                 # the same cache, never rewritten from here on
    before.entries = {k: dict(e) for k, e in cache.entries.items()}
    before.length = cache.length
    m.decode(tokens[:, 4:9], cache)
    m._step(tokens[:, 4:9], before)
    (key,) = cache.entries
    old_k, new_k = before.entries[key]["k"], cache.entries[key]["k"]
    old_v, new_v = before.entries[key]["v"], cache.entries[key]["v"]
    # the top 2 earlier entries by the step's (positions 4..8) attention, summed over queries and heads
    x = m.embed.weight[tokens[0, 4:9]]
    q = (x @ m.attn.q.weight.T).unflatten(-1, (2, 4))
    scores = torch.einsum("qhd,khd->hqk", q, old_k[0]) / 2.0
    scores = scores.masked_fill(torch.arange(9)[None, None, :] > torch.arange(4, 9)[None, :, None], float("-inf"))
    top = torch.softmax(scores, -1)[:, :, :4].sum((0, 1)).topk(2).indices.tolist()
    changed = ((new_k != old_k).flatten(2).any(-1) | (new_v != old_v).flatten(2).any(-1))
    assert sorted(changed[0].nonzero().flatten().tolist()) == sorted(top + [4, 5, 6, 7, 8])
    assert not changed[1].any()                            # sample 1 read no delimiter in this piece
    # the rewritten entries are the processor applied to the gathered ones, in cache order
    idx = torch.tensor(sorted(top) + [4, 5, 6, 7, 8])
    want_k, want_v = m._processor(old_k[:1, idx], old_v[:1, idx], idx[None])
    torch.testing.assert_close(new_k[0, idx], want_k[0])
    torch.testing.assert_close(new_v[0, idx], want_v[0])
    assert cache.steps == {1: [9, 3]}                      # where each sample's next step starts


def test_bottlenecked_decoding_continues_on_the_rewritten_cache():
    """Decoding after a rewrite = the plain backbone (no policy) decoding from the rewritten K/V."""
    from archc.api import load
    m = _bottlenecked()
    source = stdlib.source("bottlenecked_tf")
    line = next(x for x in source.splitlines() if "cache rewrite_kv" in x)
    backbone = load(source.replace(line, ""))(d=32, heads=4)
    missing, unexpected = backbone.load_state_dict(m.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("processor.") for k in unexpected)
    tokens = _steps(torch.randint(0, 256, (2, 14)), [(0, 3), (0, 9), (1, 6), (1, 9)])
    with torch.no_grad():
        _, rewritten = m.prefill(tokens[:, :10])           # the prompt ends a step in both samples
        _, plain = backbone.prefill(tokens[:, :10])
        _, fresh = backbone.prefill(tokens[:, :10])
        for key, e in rewritten.entries.items():
            fresh.entries[key]["k"], fresh.entries[key]["v"] = e["k"], e["v"]
            assert not torch.equal(e["k"], plain.entries[key]["k"])
        for t in range(10, 14):
            got, rewritten = m.decode(tokens[:, t:t + 1], rewritten)
            want, fresh = backbone.decode(tokens[:, t:t + 1], fresh)
            other, plain = backbone.decode(tokens[:, t:t + 1], plain)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(got, other, atol=1e-3)


def test_bottlenecked_rewrites_after_each_delimiter_however_the_tokens_are_fed():
    m = _bottlenecked(seed=1)
    tokens = _steps(torch.randint(0, 256, (2, 16)), [(0, 2), (0, 7), (1, 5), (0, 12), (1, 12)])
    with torch.no_grad():
        whole, cache = m.prefill(tokens)
        out, c2 = m.prefill(tokens[:, :4])
        steps = [out]
        for a, b in ((4, 5), (5, 9), (9, 10), (10, 16)):
            o, c2 = m.decode(tokens[:, a:b], c2)
            steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-4)
    for key, e in cache.entries.items():
        torch.testing.assert_close(c2.entries[key]["k"], e["k"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(whole, m(tokens), atol=1e-3)     # the rewrites changed what later tokens read


def test_bottlenecked_zero_initialised_processor_decodes_like_the_backbone_and_trains():
    torch.manual_seed(0)
    m = stdlib.load("bottlenecked_tf", d=32, heads=4)
    assert not m.processor.out.weight.any()               # the residual update starts at zero
    tokens = _steps(torch.randint(0, 256, (2, 14)), [(0, 3), (1, 4), (0, 8), (1, 8), (0, 11)])
    full = m(tokens)
    torch.testing.assert_close(decode_stepwise(m, tokens, 5)[0], full, atol=1e-5, rtol=1e-4)
    # teacher-forced training through prefill: the processor gets a gradient at its zero init
    logits, _ = m.prefill(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert m.processor.out.weight.grad.abs().sum() > 0
    before = m(tokens).detach()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    m.zero_grad()
    after, _ = m.prefill(tokens)
    assert not torch.allclose(after, m(tokens), atol=1e-4)  # now the rewrites change later outputs
    assert not torch.allclose(m(tokens), before)


def test_bottlenecked_processor_module_matches_the_interpreter():
    from archc.ir.interpret import run_policy_region
    m = _bottlenecked()
    (g,) = stdlib.graphs("bottlenecked_tf")
    (policy,) = g.policies
    params = {k: v.detach() for k, v in m.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 7, 4, 8, generator=gen) for _ in range(2))
    pos = torch.tensor([[0, 2, 5, 6, 7, 8, 9]])
    want = run_policy_region(g, policy, params, [k, v, pos], {"d": 32, "heads": 4})
    got = m._processor(k, v, pos)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], k)


@pytest.mark.parametrize("policy,message", [
    ("cache rewrite_kv(attn, delimiter = 1)", "rewrite_kv needs `processor = ...`"),
    ("cache rewrite_kv(attn, processor = proc)", "rewrite_kv needs `delimiter = ...`"),
    ("cache rewrite_kv(attn, processor = head, delimiter = 1)", "must name a layer declared from a block"),
    ("cache rewrite_kv(attn, processor = proc, delimiter = -1)", "delimiter must be a token id"),
    ("cache rewrite_kv(attn, processor = proc, delimiter = 1.5)", "`delimiter` must be an integer, got 1.5"),
    ("cache rewrite_kv(attn, processor = proc, delimiter = 1, delimiter = 2)", "option `delimiter` is given twice"),
    (("cache rewrite_kv(attn, processor = proc, delimiter = 1)\n"
      "  cache prune_key_channels(attn, ratio = 0.5)"), "also has prune_key_channels"),
])
def test_bottlenecked_rewrite_kv_is_checked(policy, message):
    from archc.api import check
    from archc.errors import ArchError
    src = REWRITE.replace("  cache rewrite_kv(attn, processor = proc, delimiter = 1, top = top)", "  " + policy)
    with pytest.raises(ArchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(src)


def test_bottlenecked_rewrite_kv_needs_the_kv_decode_path_and_a_k_v_processor():
    from archc.api import check
    from archc.errors import ArchError
    scan = REWRITE.replace("  output logits = head(x + attn(x))",
                           "  x = x + attn(x)\n  output logits = head(cumsum(x, axis = 1))")
    with pytest.raises(ArchError, match="decodes by recomputing") as err:
        check(scan)
    assert err.value.span.line == scan.splitlines().index(
        "  cache rewrite_kv(attn, processor = proc, delimiter = 1, top = top)") + 1
    one = REWRITE.replace("return k + mix(k), v + mix(v)", "return k + mix(k)")
    with pytest.raises(ArchError, match=r"must return the rewritten \(k, v\)"):
        check(one)


def test_bottlenecked_onnx_exports_the_forward_and_refuses_the_decode_step():
    pytest.importorskip("onnx")
    from archc.api import export_onnx
    from archc.backends.onnx import export_decode, seeded_weights
    from archc.errors import ArchError
    (e,) = export_onnx(stdlib.path("bottlenecked_tf"))
    assert e.decode is None and any("rewrite_kv" in n for n in e.forward.notes)
    with pytest.raises(ArchError, match="cannot export a decode-step graph"):
        export_decode(e.graph, seeded_weights(e.graph))


# -- 28 Deep sequence models memorize geometrically ----------------------------------------------------


def test_geometric_memory_node2vec_places_nodes_by_graph_distance():
    """Trained only on adjacent pairs of a 24-node path, with room for a lookup table (d = 32 >= 24),
    Node2Vec's embeddings still order the pairs that never co-occurred by their distance in the graph."""
    from archc.tasks import graph_edges
    edges = graph_edges(24)                                              # [(u, v)] both directions
    i = torch.arange(24)
    hops = (i[:, None] - i[None, :]).abs().float()
    far = hops > 1                                                       # pairs never seen together
    cls = stdlib.load("geometric_memory", arch="Node2Vec")
    for seed in range(3):
        torch.manual_seed(seed)
        m = cls()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        for _ in range(300):
            logits = m(edges[None, :, 0])[0]
            loss = torch.nn.functional.cross_entropy(logits, edges[:, 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss < 0.67                                               # near the optimum, log 2 per inner node
        e = m.embed.weight.detach()
        e = torch.nn.functional.normalize(e - e.mean(0), dim=-1)
        dist = torch.cdist(e, e)
        assert torch.corrcoef(torch.stack([dist[far], hops[far]]))[0, 1] > 0.3, seed
    # random embeddings carry no such order
    e = torch.nn.functional.normalize(torch.randn(24, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    dist = torch.cdist(e, e)
    assert abs(torch.corrcoef(torch.stack([dist[far], hops[far]]))[0, 1]) < 0.2


def test_geometric_memory_path_queries_follow_the_tree():
    from archc.tasks import graph_edges, path_queries
    edges = graph_edges(12, "tree", seed=3)
    adj = set(map(tuple, edges.tolist()))
    rows = path_queries(edges, 12, count=20, seed=0)
    for r in rows.tolist():
        path = [v for v in r[3:] if v != 13]
        assert r[2] == 12 and path[0] == r[0] and path[-1] == r[1]
        assert all((a, b) in adj for a, b in zip(path, path[1:]))
    (g, _) = stdlib.graphs("geometric_memory")
    logits = run(g, init_params(g, {"nodes": 12}, seed=0), {"tokens": rows}, {"nodes": 12})["logits"]
    assert logits.shape == (20, rows.shape[1], 14)                       # nodes + SEP + PAD


# -- 26 Bi-Mem -------------------------------------------------------------------------------------------


def test_bimem_spreading_activation_recalls_a_facts_siblings_through_its_scene():
    """3 scenes of 4 facts; the query matches fact 5 (scene 1). Hierarchical search alone finds fact 5
    only; two hops of spreading activation bring in its scene's other facts, not the other scenes'."""
    (g,) = stdlib.graphs("bimem")
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(3, 32, generator=gen)
    facts = centre.repeat_interleave(4, 0) + 0.8 * torch.randn(12, 32, generator=gen)
    member = torch.nn.functional.one_hot(torch.arange(12) // 4, 4).bool()   # scene 3 stays empty
    query = facts[5] + 0.1 * torch.randn(32, generator=gen)
    inputs = {"query": query[None], "facts": facts[None], "member": member[None]}
    b = {"top_facts": 1, "top_scenes": 1, "k": 4}
    flat = run(g, {}, inputs, dict(b, hops=0))
    assert flat["fact_activation"][0].nonzero()[:, 0].tolist() == [5]
    out = run(g, {}, inputs, b)
    assert out["recalled"][0].nonzero()[:, 0].tolist() == [4, 5, 6, 7]
    act = out["fact_activation"][0]
    assert act[4:8].min() > torch.cat([act[:4], act[8:]]).max() and act[5] == act.max()
    # by hand: one hop spreads the initial activations both ways at once
    one = run(g, {}, inputs, dict(b, hops=1))
    f = torch.nn.functional.normalize(facts, dim=-1)
    scene = torch.nn.functional.normalize(member.float().T @ f / member.float().sum(0).clamp(min=1)[:, None], dim=-1)
    a = member.float() * (f @ scene.T).clamp(min=0)                      # salience-weighted edges
    torch.testing.assert_close(one["fact_activation"][0], flat["fact_activation"][0] + 0.5 * a @ flat["scene_activation"][0])
    torch.testing.assert_close(one["scene_activation"][0], flat["scene_activation"][0] + 0.5 * a.T @ flat["fact_activation"][0])


# -- 44 Few-shot continual learning, fast and slow weights ----------------------------------------------


def test_fscl_fast_weights_learn_tasks_under_consolidation_and_slow_weights_average_them():
    cls = stdlib.load("fscl_fastslow")
    torch.manual_seed(0)
    m = cls()
    out = m(torch.randn(4, 16))
    g_slow, g_fast = torch.autograd.grad(out["consolidation"] + out["fast_logits"].sum(), m.w1)[0]
    assert g_slow.abs().max() == 0 and g_fast.abs().max() > 0           # only the fast copy is bound
    gen = torch.Generator().manual_seed(0)
    solutions, drift = [], {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        m = cls()
        solutions = []
        for task in range(3):
            proj = torch.randn(16, 5, generator=gen)
            x = torch.randn(64, 16, generator=gen)
            y = (x @ proj).argmax(-1)
            with torch.no_grad():                                        # the fast weights start from the slow ones
                for p in (m.w1, m.b1, m.w2, m.b2):
                    p[1] = p[0]
            opt = torch.optim.SGD([m.w1, m.b1, m.w2, m.b2], lr=0.1)
            for _ in range(20):
                out = m(x)
                loss = torch.nn.functional.cross_entropy(out["fast_logits"], y) + lam * out["consolidation"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            solutions.append(m.w1[1].detach().clone())
            beta = m.schedule_consolidate(task)["beta"]
            with torch.no_grad():                                        # the second consolidation step
                for p in (m.w1, m.b1, m.w2, m.b2):
                    p[0] += beta * (p[1] - p[0])
        # the slow weights are the mean of the fast solutions of the tasks seen
        torch.testing.assert_close(m.w1[0].detach(), torch.stack(solutions).mean(0), atol=1e-6, rtol=1e-5)
        drift[lam] = sum(float((s - m.w1[0].detach()).norm()) for s in solutions)
    assert drift[1.0] < drift[0.0]                                       # consolidation keeps the fast weights near


# -- 31 SuperLocalMemory -------------------------------------------------------------------------------


def test_superlocalmemory_hopfield_channel_completes_a_noisy_cue():
    (g,) = stdlib.graphs("superlocalmemory")
    gen = torch.Generator().manual_seed(0)
    mem = torch.nn.functional.normalize(torch.randn(1, 8, 32, generator=gen), dim=-1)
    cue = mem[:, 3] + 0.9 * torch.randn(1, 32, generator=gen) / 32 ** 0.5
    zero = torch.zeros(1, 8)
    out = run(g, {}, {"query": cue, "memories": mem, "age": zero, "recalls": zero}, {"beta": 16.0})
    before = torch.nn.functional.cosine_similarity(cue, mem[:, 3])
    after = torch.nn.functional.cosine_similarity(out["state"], mem[:, 3])
    assert before < 0.8 and after > 0.99                                # the state settles on pattern 3
    assert out["recalled"][0, 3] and int(out["score"][0].argmax()) == 3
    # one update by hand: xi_1 = X^T softmax(beta X q)
    one = run(g, {}, {"query": cue, "memories": mem, "age": zero, "recalls": zero}, {"beta": 16.0, "steps": 1})
    q = torch.nn.functional.normalize(cue, dim=-1)
    torch.testing.assert_close(one["state"], torch.softmax(16.0 * mem[0] @ q[0], -1)[None] @ mem[0])


def test_superlocalmemory_forgetting_curve_decays_with_age_and_recall_resets_it():
    (g,) = stdlib.graphs("superlocalmemory")
    mem = torch.nn.functional.normalize(torch.randn(1, 6, 32), dim=-1)
    age = torch.tensor([[0.0, 5.0, 20.0, 50.0, 50.0, 50.0]])
    recalls = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 9.0]])
    out = run(g, {}, {"query": mem[:, 0], "memories": mem, "age": age, "recalls": recalls})
    r = out["retention"][0]
    torch.testing.assert_close(r, torch.exp(-age[0] / (10.0 * (1 + recalls[0]))))
    assert r[0] == 1.0 and (r[:4].diff() < 0).all() and (r[3:].diff() > 0).all()
    # an equally similar memory that is older ranks lower
    twins = torch.cat([mem[:, :1], mem[:, :1]], 1)
    out = run(g, {}, {"query": mem[:, 0], "memories": twins, "age": torch.tensor([[30.0, 1.0]]),
                      "recalls": torch.zeros(1, 2)}, {"k": 1})
    assert out["recalled"][0].tolist() == [False, True]


# -- 32 G-Memory ---------------------------------------------------------------------------------------


def test_g_memory_retrieves_the_similar_tasks_insight_and_interactions():
    """Three past tasks; the query resembles task 2. Its interactions come down, its insight comes up;
    with one hop over the query graph a linked task's insight joins the ranking."""
    (g,) = stdlib.graphs("g_memory")
    gen = torch.Generator().manual_seed(0)
    past = torch.randn(1, 3, 32, generator=gen)
    past[:, 0] = past[:, 0] + past[:, 2]                                  # task 0 resembles task 2 a little
    query = past[:, 2] + 0.2 * torch.randn(1, 32, generator=gen)
    links = torch.zeros(1, 3, 3, dtype=torch.bool)
    links[0, 2, 0] = links[0, 0, 2] = True                              # tasks 0 and 2 are linked
    supports = torch.zeros(1, 4, 3, dtype=torch.bool)
    supports[0, 0, 0] = supports[0, 1, 1] = supports[0, 2, 2] = True    # insight i from task i; 3 unsupported
    inputs = {"query": query, "past": past, "links": links, "supports": supports}
    out = run(g, {}, inputs, {"hops": 0})
    assert out["interactions"][0].tolist() == [False, False, True]
    assert out["insights"][0].tolist() == [False, False, True, False]
    out = run(g, {}, inputs, {"k_insights": 3})
    assert out["related"][0].tolist() == [True, False, True]             # task 0 via the query graph
    assert out["insights"][0].tolist() == [True, False, True, False]     # unrelated and unsupported insights stay out
    sim = torch.nn.functional.cosine_similarity(query[:, None], past, dim=-1)[0]
    torch.testing.assert_close(out["insight_score"][0], torch.stack([sim[0], torch.tensor(0.0), sim[2], torch.tensor(0.0)]))


# -- 33 Mem4Nav ----------------------------------------------------------------------------------------


def test_mem4nav_reversible_memory_decodes_what_it_wrote(monkeypatch):
    write, read = stdlib.graphs("mem4nav")
    p = init_params(write, seed=0)
    assert {q.name for q in read.params} == set(p)                      # one state_dict for both
    gen = torch.Generator().manual_seed(0)
    tokens, obs = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 6, 32, generator=gen)
    y = run(write, p, {"tokens": tokens, "observation": obs})
    assert (y["y1"] - tokens).abs().max() > 0.1                          # the write changed the state
    back = run(read, p, {"y1": y["y1"], "y2": y["y2"]})
    torch.testing.assert_close(back["tokens"], tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(back["observation"], obs, atol=1e-5, rtol=0)
    from archc.ir import interpret
    from archc.ir.shapes import DType
    monkeypatch.setitem(interpret.TORCH_DTYPES, DType.F32, torch.float64)   # lossless up to fp64 rounding
    p64 = {k: v.double() for k, v in p.items()}
    y = run(write, p64, {"tokens": tokens.double(), "observation": obs.double()})
    back = run(read, p64, {"y1": y["y1"], "y2": y["y2"]})
    assert (back["tokens"] - tokens.double()).abs().max() < 1e-12
    assert (back["observation"] - obs.double()).abs().max() < 1e-12


# -- 10 CoMEM (GUI agents' continuous memory) ------------------------------------------------------------


def test_comem_compresses_each_trajectory_into_fixed_soft_tokens_spliced_before_the_input():
    (g,) = stdlib.graphs("comem_gui")
    p = init_params(g, seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 5), generator=gen)
    for frames in (6, 11):                                               # any trajectory length ...
        traj = torch.randn(2, 2, frames, 24, generator=gen)
        out = run(g, p, {"trajectories": traj, "tokens": tokens}, {"frames": frames})
        assert out["soft_tokens"].shape == (2, 16, 32)                   # ... gives k x 8 embeddings
    # trajectory j fills soft tokens j*8 .. j*8+7: swapping the retrieved trajectories swaps the blocks
    swapped = run(g, p, {"trajectories": traj.flip(1), "tokens": tokens}, {"frames": 11})
    torch.testing.assert_close(swapped["soft_tokens"][:, :8], out["soft_tokens"][:, 8:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(swapped["soft_tokens"][:, 8:], out["soft_tokens"][:, :8], atol=1e-5, rtol=1e-4)
    # the memory is a prefix every input token reads, and only through the soft tokens
    other = run(g, p, {"trajectories": torch.randn(2, 2, 11, 24, generator=gen), "tokens": tokens}, {"frames": 11})
    assert (other["logits"] - out["logits"]).abs().amax(-1).min() > 0    # every position sees the memory
    q = dict(p, **{"proj.weight": torch.zeros_like(p["proj.weight"])})   # a blank memory: no trajectory content
    a = run(g, q, {"trajectories": traj, "tokens": tokens}, {"frames": 11})["logits"]
    b = run(g, q, {"trajectories": torch.randn(2, 2, 11, 24, generator=gen), "tokens": tokens}, {"frames": 11})["logits"]
    torch.testing.assert_close(a, b)


# -- 9 D-Mem ---------------------------------------------------------------------------------------------


def _attend_by_hand(q, k, v, heads=4, mask=None):
    split = lambda z: z.unflatten(-1, (heads, -1)).transpose(1, 2)      # noqa: E731
    s = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ split(v)).transpose(1, 2).flatten(-2)


def test_dmem_gate_routes_weak_retrievals_to_full_attention_over_the_history():
    (g,) = stdlib.graphs("dmem")
    p = init_params(g, seed=0)
    gen = torch.Generator().manual_seed(0)
    facts, history = torch.randn(1, 16, 32, generator=gen), torch.randn(1, 24, 32, generator=gen)
    questions = torch.cat([facts[:, :3] + 0.1 * torch.randn(1, 3, 32, generator=gen),   # answerable from facts
                           torch.randn(1, 3, 32, generator=gen)], 1)                     # not in the bank
    inputs = {"questions": questions, "facts": facts, "history": history}
    w = lambda n: p[f"{n}.weight"]                                       # noqa: E731
    match = torch.nn.functional.normalize(questions, dim=-1) @ torch.nn.functional.normalize(facts, dim=-1).transpose(1, 2)
    top = torch.zeros_like(match, dtype=torch.bool).scatter(-1, match.topk(4, -1).indices, True)
    fast = _attend_by_hand(questions @ w("q_fast").T, facts @ w("k_fast").T, facts @ w("v_fast").T, mask=top)
    slow = _attend_by_hand(questions @ w("q_slow").T, history @ w("k_slow").T, history @ w("v_slow").T)
    torch.testing.assert_close(run(g, p, inputs, {"threshold": 0.0})["answer"], fast, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run(g, p, inputs, {"threshold": 1.0})["answer"], slow, atol=1e-5, rtol=1e-4)
    # a gate that trusts a retrieval with a strong best match (quality > 0.5 iff best > 0.6)
    for k in ("gate.fc1.weight", "gate.fc1.bias", "gate.fc2.weight", "gate.fc2.bias"):
        p[k] = torch.zeros_like(p[k])
    p["gate.fc1.weight"][0, 0] = 1.0
    p["gate.fc2.weight"][0, 0] = 20.0
    p["gate.fc2.bias"][0] = -20.0 * float(torch.nn.functional.gelu(torch.tensor(0.6)))
    out = run(g, p, inputs, {"threshold": 0.5})
    assert out["slow"][0].tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(out["answer"], torch.cat([fast[:, :3], slow[:, 3:]], 1), atol=1e-5, rtol=1e-4)


# -- 5 VideoLucy -----------------------------------------------------------------------------------------


def test_videolucy_backtracks_coarse_to_fine_and_stops_when_confident():
    (g,) = stdlib.graphs("videolucy")
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 8, 32, generator=gen).expand(2, 8, 32)
    question = torch.stack([frames[0, :4].mean(0),                     # a question about the first half
                            frames[0, 5] + 0.05 * torch.randn(32, generator=gen)])   # ... about frame 5
    out = run(g, {}, {"question": question, "frames": frames}, {"threshold": 0.95})
    assert out["start"].tolist() == [0, 5] and out["width"].tolist() == [4, 1]   # sample 0 stopped a level early
    f = torch.nn.functional.normalize
    torch.testing.assert_close(out["evidence"][0], f(frames[0, :4].sum(0), dim=0))
    torch.testing.assert_close(out["evidence"][1], f(frames[0, 5], dim=0))
    assert (out["confidence"] > 0.95).all()
    # without the confident stop every sample descends to a single frame
    deep = run(g, {}, {"question": question, "frames": frames}, {"threshold": 2.0})
    assert deep["width"].tolist() == [1, 1] and deep["start"][1] == 5


# -- HRM (paper 20): the one-step gradient ------------------------------------------------------------------


def _uses(loss: torch.Tensor, param: torch.Tensor) -> int:
    """How many times the autograd graph of `loss` reads `param` (edges into its AccumulateGrad node)."""
    seen, stack, uses = set(), [loss.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is param:
                uses += 1
            stack.append(nxt)
    return uses


HRM_FULL_BPTT = stdlib.source("hrm").replace(" grad last 1 {", " {")


@pytest.mark.parametrize("cycles", [(2, 2, 1), (3, 2, 2)])
def test_hrm_gradient_flows_only_through_the_last_l_step_and_h_step(cycles):
    """Everything but the final L-step and H-step of a segment runs without gradient, at any cycle
    counts, and the carry is detached between segments (no gradient reaches the initial states). The
    graph holds one L-step and one H-step per segment (ACT's freeze of halted samples selects between
    segments' results); with `grad last 1` removed (full backpropagation through time) it holds every
    application."""
    import archc
    h, l_, seg = cycles
    kw = dict(vocab=8, d=16, heads=2, h_cycles=h, l_cycles=l_, segments=seg)
    tokens = torch.randint(0, 8, (2, 5))
    for src, expect_low, expect_high in ((stdlib.path("hrm"), seg, seg), (HRM_FULL_BPTT, seg * h * l_, seg * h)):
        torch.manual_seed(0)
        model = archc.load(src, **kw) if isinstance(src, str) else stdlib.load("hrm", **kw)
        model.eval()                                   # run every segment (no halting decisions from q)
        loss = model(tokens)["logits"].square().sum()
        params = dict(model.named_parameters())
        low = next(p for n, p in params.items() if n.startswith("low.layer0.") and p.dim() == 2)
        high = next(p for n, p in params.items() if n.startswith("high.layer0.") and p.dim() == 2)
        assert (_uses(loss, low), _uses(loss, high)) == (expect_low, expect_high)
        loss.backward()
        for init in (model.z_h_init, model.z_l_init):
            assert init.grad is None or not init.grad.any()
        assert low.grad is not None and low.grad.abs().sum() > 0


# -- HMT (paper 6): memory recall over a FIFO of segment memories -------------------------------------------


def test_hmt_segments_are_causal_and_recall_reads_the_last_n_mem_memories():
    """A segment's logits never depend on later segments; the third segment reads the first through the
    memory queue; a queue of 1 entry and one of 8 agree while at most one memory exists (segments 1-2)
    and differ from segment 3 on, when the 1-entry queue has dropped the first segment's memory."""
    kw = dict(vocab=16, d=16, heads=2, seg=4, sensory=2)
    torch.manual_seed(0)
    big = stdlib.load("hmt", n_mem=8, **kw)
    small = stdlib.load("hmt", n_mem=1, **kw)
    small.load_state_dict(big.state_dict())
    tokens = torch.randint(0, 16, (2, 16))
    out = big(tokens)
    other_future = tokens.clone()
    other_future[:, 8:] = (tokens[:, 8:] + 1) % 16
    assert torch.equal(big(other_future)[:, :8], out[:, :8])
    other_first = tokens.clone()
    other_first[:, :2] = (tokens[:, :2] + 3) % 16          # outside segment 2's sensory tail
    assert not torch.allclose(big(other_first)[:, 8:12], out[:, 8:12], atol=1e-6)
    one = small(tokens)
    torch.testing.assert_close(one[:, :8], out[:, :8])
    assert not torch.allclose(one[:, 8:], out[:, 8:], atol=1e-6)
