"""The symbolic cost model: exact formulas on small hand-built graphs."""

import pytest
import sympy

from archc.ir.core import Graph, Node, Param, Policy, Region, Symbol, Value
from archc.ir.cost import FLOPS, REGIONS, Cost, cost, flops_per_token
from archc.ir.ops import OPS, Op
from archc.ir.shapes import F32, I64, tensor

B, T, d, n, H, dh, C, k = sympy.symbols("B T d n H dh C k")
r = sympy.Symbol("r")
DIMS = (Symbol("B", "dim"), Symbol("T", "dim"))


def graph(nodes, args, results, params=(), policies=(), symbols=DIMS) -> Graph:
    return Graph("G", tuple(symbols), tuple(params), Region(tuple(args), tuple(nodes), tuple(results)), tuple(policies))


def node(op, inputs, name, type_, attrs=None, regions=()) -> Node:
    return Node.make(op, inputs, [Value(name, type_)], attrs, regions)


def param_node(name, ref, type_) -> Node:
    return node(Op.PARAM, [], name, type_, {"ref": ref})


def same(a, b) -> bool:
    return sympy.simplify(a - b) == 0


X = Value("x", tensor(F32, B, T, d))
W = Param("w", tensor(F32, 4 * d, d), "normal")


def linear_graph(bias=False):
    nodes = [param_node("w", "w", W.type)]
    ins = ["x", "w"]
    params = [W]
    if bias:
        params.append(Param("b", tensor(F32, 4 * d), "zeros"))
        nodes.append(param_node("b", "b", tensor(F32, 4 * d)))
        ins.append("b")
    nodes.append(node(Op.LINEAR, ins, "y", tensor(F32, B, T, 4 * d)))
    return graph(nodes, [X], ["y"], params)


def test_linear_flops_params_and_activations_are_exact():
    c = cost(linear_graph())
    assert c.flops == 8 * B * T * d ** 2
    assert c.params == 4 * d ** 2
    assert c.activation_bytes == 16 * B * T * d      # f32 [B, T, 4d]; param views are not activations
    assert c.kv_cache_bytes == 0


def test_linear_bias_adds_one_flop_per_output():
    c = cost(linear_graph(bias=True))
    assert same(c.flops, 8 * B * T * d ** 2 + 4 * B * T * d)
    assert same(c.params, 4 * d ** 2 + 4 * d)


def test_contractions_and_elementwise():
    a = Value("a", tensor(F32, B, T, d))
    m = Value("m", tensor(F32, B, d, T))
    nodes = [
        node(Op.MATMUL, ["a", "m"], "mm", tensor(F32, B, T, T)),
        node(Op.EINSUM, ["a", "a"], "e", tensor(F32, B, T, T), {"equation": "btd,bsd->bts"}),
        node(Op.ADD, ["a", "a"], "s", tensor(F32, B, T, d)),
        node(Op.RMS_NORM, ["a", "a"], "nrm", tensor(F32, B, T, d), {"eps": 1e-6}),
        node(Op.SUM, ["a"], "red", tensor(F32, B, T), {"axis": -1}),
        node(Op.RESHAPE, ["a"], "rs", tensor(F32, B * T, d), {"shape": [B * T, d]}),
        node(Op.ARGMAX, ["a"], "am", tensor(I64, B, T), {"axis": -1}),
    ]
    c = cost(graph(nodes, [a, m], ["mm"]))
    expected = 2 * B * T * T * d + 2 * B * T * T * d + B * T * d + 5 * B * T * d + B * T * d + B * T * d
    assert same(c.flops, expected)
    act = 4 * (2 * B * T * T + 3 * B * T * d + B * T) + 8 * B * T   # argmax is i64
    assert same(c.activation_bytes, act)


def attend_graph(attrs, hk=H):
    q = Value("q", tensor(F32, B, T, H, dh))
    kk = Value("k", tensor(F32, B, T, hk, dh))
    v = Value("v", tensor(F32, B, T, hk, dh))
    full = {"causal": False, "window": None, "prefix": 0} | attrs
    return graph([node(Op.ATTEND, ["q", "k", "v"], "o", tensor(F32, B, T, H, dh), full)], [q, kk, v], ["o"])


def test_attend_flops_and_kv():
    c = cost(attend_graph({}))
    assert same(c.flops, B * H * T ** 2 * (4 * dh + 5))
    assert same(c.kv_cache_bytes, 8 * B * T * H * dh)
    causal = cost(attend_graph({"causal": True}))
    assert same(causal.flops, B * H * T ** 2 * (4 * dh + 5) / 2)


def test_attend_grouped_kv_heads_and_window():
    c = cost(attend_graph({}, hk=2))
    assert same(c.flops, B * H * T ** 2 * (4 * dh + 5))          # queries' heads set the work
    assert same(c.kv_cache_bytes, 16 * B * T * dh)               # the cache holds 2 KV heads
    w = cost(attend_graph({"causal": True, "window": 128}))
    m = sympy.Min(128, T)
    assert same(w.flops, B * H * (T * m - m ** 2 / 2) * (4 * dh + 5))
    assert w.evaluate({"B": 1, "H": 1, "dh": 1, "T": 4096})["flops"] == (4096 * 128 - 128 ** 2 / 2) * 9


def loop_node(body_nodes, body_args, results, trips, var="r", op=Op.LOOP, inputs=("x",), out_type=X.type):
    attrs = {"trips": trips, "var": var}
    region = Region(tuple(body_args), tuple(body_nodes), tuple(results))
    return node(op, list(inputs), "out", out_type, attrs, [region])


def test_loop_body_depending_on_the_loop_symbol_sums_in_closed_form():
    # trip r works on the last T - r positions: sum_{r<n} B*(T-r)*d
    xs = Value("x.1", X.type)
    body = [
        node(Op.SLICE, ["x.1"], "tail", tensor(F32, B, T - r, d), {"axis": 1, "start": r, "stop": T}),
        node(Op.RELU, ["tail"], "act", tensor(F32, B, T - r, d)),
    ]
    g = graph([loop_node(body, [Value("r.0", tensor(I64)), xs], ["x.1"], n)], [X], ["out"],
              symbols=DIMS + (Symbol("d", "int", 8), Symbol("n", "int", 3)))
    c = cost(g)
    assert not c.flops.has(sympy.Sum)
    assert same(c.flops, B * d * (n * T - n * (n - 1) / 2))
    # activations: two f32 [B, T-r, d] per trip plus the loop's own result
    assert same(c.activation_bytes, 8 * B * d * (n * T - n * (n - 1) / 2) + 4 * B * T * d)
    assert c.evaluate({"B": 1, "T": 10})["flops"] == 8 * (10 + 9 + 8)


def test_loop_body_without_closed_form_stays_a_sum_and_still_evaluates():
    xs = Value("x.1", X.type)
    cap = sympy.ceiling(T * (n - r) / n)
    body = [node(Op.SLICE, ["x.1"], "kept", tensor(F32, B, cap, d), {"axis": 1, "start": 0, "stop": cap}),
            node(Op.EXP, ["kept"], "e", tensor(F32, B, cap, d))]
    c = cost(graph([loop_node(body, [Value("r.0", tensor(I64)), xs], ["x.1"], n)], [X], ["out"]))
    assert c.flops.has(sympy.Sum)
    assert c.evaluate({"B": 1, "d": 1, "T": 10, "n": 3})["flops"] == 10 + 7 + 4


def shared_kv_loop(kv_share):
    q = Value("q", tensor(F32, B, T, H, dh))
    attrs = {"causal": True, "window": None, "prefix": 0}
    if kv_share:
        attrs["kv_share"] = kv_share
    body = [node(Op.ATTEND, ["q", "q", "q"], "o", q.type, attrs)]
    loop = loop_node(body, [Value("r.0", tensor(I64)), Value("q.1", q.type)], ["o"], n, inputs=("q",), out_type=q.type)
    return graph([loop], [q], ["out"])


def test_shared_kv_counts_once_per_loop_and_reused_kv_counts_nothing():
    per_site = 8 * B * T * H * dh
    assert same(cost(shared_kv_loop(None)).kv_cache_bytes, n * per_site)
    assert same(cost(shared_kv_loop("recursion:r")).kv_cache_bytes, per_site)
    assert cost(shared_kv_loop("from:layers.0.attn")).kv_cache_bytes == 0
    # sharing the cache does not share the work
    assert same(cost(shared_kv_loop("recursion:r")).flops, cost(shared_kv_loop(None)).flops)


def test_shared_kv_inside_a_nested_loop_repeats_with_the_outer_loop():
    inner = shared_kv_loop("recursion:r").body.nodes[0]
    q = Value("q", tensor(F32, B, T, H, dh))
    outer = node(Op.LOOP, ["q"], "outer", q.type, {"trips": 3, "var": "c"},
                 [Region((Value("c.0", tensor(I64)), Value("q.2", q.type)), (inner,), ("out",))])
    assert same(cost(graph([outer], [q], ["outer"])).kv_cache_bytes, 3 * 8 * B * T * H * dh)


def test_shared_kv_counts_once_for_its_recursion_loop_not_an_inner_one():
    # MoR: recursion loop r around a stack of sub-layers j; sharing is across r, sub-layers are distinct
    inner = shared_kv_loop("recursion:r").body.nodes[0]
    inner = inner.replace(attrs={**inner.attr_dict, "var": "j", "trips": 2})
    q = Value("q", tensor(F32, B, T, H, dh))
    outer = node(Op.LOOP, ["q"], "outer", q.type, {"trips": 3, "var": "r"},
                 [Region((Value("q.2", q.type),), (inner,), ("out",))])
    assert same(cost(graph([outer], [q], ["outer"])).kv_cache_bytes, 2 * 8 * B * T * H * dh)


def test_prune_key_channels_policy_scales_the_keys_of_targeted_sites():
    def with_site(site, targets):
        g = attend_graph({"site": site})
        return g.replace(policies=(Policy("prune_key_channels", targets, (("ratio", 0.25),)),))

    keys = values = 4 * B * T * H * dh
    assert same(cost(with_site("core.attn", ("core",))).kv_cache_bytes, sympy.Rational(3, 4) * keys + values)
    assert same(cost(with_site("core.attn", ("core.attn",))).kv_cache_bytes, sympy.Rational(3, 4) * keys + values)
    assert same(cost(with_site("core.attn", ("cor",))).kv_cache_bytes, keys + values)     # '.' boundary
    assert same(cost(with_site("other", ("core",))).kv_cache_bytes, keys + values)


def test_params_include_the_copies_axis():
    bank = Param("bank.w", tensor(F32, n, d, d), "normal", copies=n)
    emb = Param("embed", tensor(F32, 1000, d), "normal")
    g = graph([], [X], ["x"], [bank, emb])
    assert same(cost(g).params, n * d ** 2 + 1000 * d)


def test_scan_runs_its_body_once_per_segment():
    seg = Value("seg", tensor(F32, B, C, d))
    region = Region((seg,), (node(Op.TANH, ["seg"], "h", seg.type),), ("h",))
    g = graph([node(Op.SCAN, ["x"], "ys", X.type, {"size": C}, [region])], [X], ["ys"])
    assert same(cost(g).flops, sympy.ceiling(T / C) * B * C * d)


def test_route_topk_runs_its_body_at_the_compacted_length():
    score = Value("score", tensor(F32, B, T))
    xk = Value("xk", tensor(F32, B, k, d))
    region = Region((xk,), (node(Op.SILU, ["xk"], "h", xk.type),), ("h",))
    g = graph([node(Op.ROUTE_TOPK, ["x", "score"], "routed", X.type, {"capacity": k / T}, [region])],
              [X, score], ["routed"])
    # body: silu (5/elt) on [B, k, d]; top-k over scores (2/elt); gated scatter (2/elt) on [B, T, d]
    assert same(cost(g).flops, 5 * B * k * d + 2 * B * T + 2 * B * T * d)


def test_halt_loop_counts_every_trip():
    xs = Value("x.1", X.type)
    body = [node(Op.TANH, ["x.1"], "h", X.type)]
    g = graph([loop_node(body, [xs], ["h"], 6, var=None, op=Op.HALT_LOOP)], [X], ["out"])
    assert same(cost(g).flops, 6 * B * T * d)


def test_evaluate_uses_defaults_and_bindings_and_names_missing_symbols():
    g = linear_graph().replace(symbols=DIMS + (Symbol("d", "int", 64),))
    c = cost(g)
    vals = c.evaluate({"B": 2, "T": 128})
    assert vals == {"params": 4 * 64 ** 2, "flops": 8 * 2 * 128 * 64 ** 2,
                    "activation_bytes": 16 * 2 * 128 * 64, "kv_cache_bytes": 0}
    assert c.evaluate({"B": 1, "T": 1, "d": 2})["params"] == 16      # bindings override defaults
    with pytest.raises(ValueError, match="no value for B, T"):
        c.evaluate({})


def test_table_shows_formulas_and_human_units():
    c = cost(linear_graph().replace(symbols=DIMS + (Symbol("d", "int", 1024),)))
    assert c.table() == (
        "params            4*d**2\n"
        "flops             8*B*T*d**2\n"
        "activation_bytes  16*B*T*d\n"
        "kv_cache_bytes    0\n")
    table = c.table({"B": 8, "T": 2048})
    assert "4.194 M  = 4*d**2" in table                 # 4 * 1024**2 parameters
    assert "137.439 GFLOP  = 8*B*T*d**2" in table
    assert "256.000 MiB  = 16*B*T*d" in table
    assert "0 B  = 0" in table
    assert "needs B, T" in c.table({})


def test_flops_per_token():
    assert flops_per_token(linear_graph()) == 8 * d ** 2
    with pytest.raises(ValueError):
        flops_per_token(linear_graph().replace(symbols=()))


def test_every_op_has_a_cost_rule():
    assert set(FLOPS) | set(REGIONS) == set(OPS)
    assert not set(FLOPS) & set(REGIONS)


def test_a_300_node_loop_body_costs_in_closed_form():
    xs = Value("x.1", X.type)
    body, prev = [], "x.1"
    for i in range(30):
        body += [
            param_node(f"w{i}", f"layer.w{i}", tensor(F32, d, d)),
            node(Op.LINEAR, [prev, f"w{i}"], f"h{i}", X.type),
            node(Op.SILU, [f"h{i}"], f"s{i}", X.type),
            node(Op.ADD, [prev, f"s{i}"], f"x{i}", X.type),
            node(Op.RMS_NORM, [f"x{i}", f"w{i}"], f"n{i}", X.type, {"eps": 1e-6}),
            node(Op.SLICE, [f"n{i}"], f"t{i}", tensor(F32, B, T - r, d), {"axis": 1, "start": r, "stop": T}),
            node(Op.MUL, [f"t{i}", f"t{i}"], f"m{i}", tensor(F32, B, T - r, d)),
            node(Op.SUM, [f"m{i}"], f"q{i}", tensor(F32, B, T - r), {"axis": -1}),
            node(Op.EXP, [f"n{i}"], f"e{i}", X.type),
            node(Op.MUL, [f"e{i}", f"n{i}"], f"y{i}", X.type),
        ]
        prev = f"y{i}"
    params = [Param(f"layer.w{i}", tensor(F32, d, d), "normal") for i in range(30)]
    g = graph([loop_node(body, [Value("r.0", tensor(I64)), xs], [prev], n)], [X], ["out"], params)
    c = cost(g)          # (speed belongs in bench/, not in a unit test: this machine is shared)
    assert isinstance(c, Cost) and not c.flops.has(sympy.Sum)
