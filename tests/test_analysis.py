import sympy

import archc.stdlib as stdlib
from archc.ir.analysis import is_acyclic, topological_order, weight_applications
from archc.ir.shapes import sym


def test_stdlib_regions_are_acyclic_and_in_order():
    for name in stdlib.names():
        for g in stdlib.graphs(name):
            assert is_acyclic(g.body)
            assert topological_order(g.body) == list(g.body.nodes)   # lowering emits in dependency order


def test_weight_applications_show_sharing():
    mor = stdlib.graphs("mor")[0]
    apps = weight_applications(mor)
    assert apps["core.attn.q.weight"] == sym("n_r") * sym("block_layers")   # one read per layer per recursion
    assert apps["first.attn.q.weight"] == 1
    hrm = stdlib.graphs("hrm")[0]
    h = weight_applications(hrm)
    assert h["low.layer0.attn.q.weight"] == sympy.expand(sym("segments") * sym("h_cycles") * sym("l_cycles"))
