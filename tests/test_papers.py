"""Each stdlib paper's distinctive mechanism, checked against the paper's rule computed by hand.

(Forward/backward at tiny sizes, golden IR and backend agreement for every stdlib model are in
test_stdlib.py and test_torch_backend.py; reference-implementation parity is in test_parity.py.)
"""
import pytest
import torch

import archc.stdlib as stdlib
from archc.ir.analysis import weight_applications
from archc.ir.interpret import GraphModule, init_params, run, schedule_values

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
