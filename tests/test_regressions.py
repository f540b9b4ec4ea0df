"""One test per bug found in review: each failed before its fix."""
import pytest
import torch

from archc.api import check, lower
from archc.errors import ArchError
from archc.ir.interpret import GraphModule, init_params, run


def err(src: str) -> ArchError:
    with pytest.raises(ArchError) as e:
        check(src)
    return e.value


def test_broadcast_mismatch_at_defaults_is_reported():
    e = err("""
arch A(d: int = 8, ffn: int = 4 * d) {
  input x: f32[B, T, d]
  layer up = Linear(d, ffn)
  output y = x + up(x)
}
""")
    assert "cannot broadcast" in e.message and "default parameter values" in e.message
    assert "f32[B, T, d], f32[B, T, ffn]" in e.hint
    assert (e.span.line, e.span.column) == (5, 14)


def test_scan_stacks_per_segment_vectors_even_if_sizes_coincide():
    (g,) = check("""
arch S(d: int = 4, seg: int = 4) {
  input x: f32[B, T, d]
  y = scan s in segments(x, seg) {
    yield mean(s, axis = 1)
  }
  output y = y
}
""")
    out = run(g, {}, {"x": torch.randn(2, 8, 4)})["y"]
    assert out.shape == (2, 2, 4)                       # [B, segments, d], not concatenated


def test_symbolic_fill_value_and_memory_rate():
    (g,) = check("""
arch F(d: int = 4, alpha: float = 0.5) {
  input k: f32[B, T, d]
  memory mem = NeuralMemory(d, layers = 1)
  mem.write(k, k, lr = alpha)
  output y = full([B, T], alpha) + mem.read(k)[:, :, 0]
}
""")
    p = init_params(g, seed=0)
    a = run(g, p, {"k": torch.randn(1, 3, 4)}, {"alpha": 0.5})["y"]
    b = run(g, p, {"k": torch.randn(1, 3, 4)}, {"alpha": 2.0})["y"]
    assert a.shape == b.shape == (1, 3)


def test_bool_parameter_as_tensor_follows_overrides():
    (g,) = check("""
arch Bp(flag: bool = true) {
  input x: f32[B, T]
  output y = where(flag, x, -x)
}
""")
    x = torch.randn(2, 3)
    assert torch.equal(run(g, {}, {"x": x})["y"], x)
    assert torch.equal(run(g, {}, {"x": x}, {"flag": False})["y"], -x)


def test_bool_layer_option_must_be_literal():
    e = err("""
arch C(d: int = 8, c: bool = true) {
  input x: f32[B, T, d]
  layer attn = Attention(d, 2, causal = c)
  output y = attn(x)
}
""")
    assert "literal true or false" in e.message


def test_where_route_rebinds_its_own_dimension_names():
    (g,) = check("""
arch W(d: int = 4) {
  input x: f32[N, L, d]
  input m: bool[N, L]
  layer lin = Linear(d, d)
  h = x
  route h by where(m) {
    h = lin(h) + full([N, L, d], 1.0)
  }
  output y = h
}
""")
    p = init_params(g, seed=0)
    x, m = torch.randn(2, 5, 4), torch.rand(2, 5) < 0.5
    y = run(g, p, {"x": x, "m": m})["y"]
    ref = torch.where(m[..., None], x @ p["lin.weight"].T + 1, x)
    assert torch.allclose(y, ref, atol=1e-6)


def test_share_kv_from_an_array_is_rejected():
    e = err("""
arch K(d: int = 8) {
  input x: f32[B, T, d]
  layer stack[2] = Attention(d, 2)
  layer top = Attention(d, 2)
  h = x
  repeat i in 2 {
    h = stack[i](h)
  }
  output y = top(h)
  cache share_kv(top, source = stack)
}
""")
    assert "the K/V source must be one layer" in e.message


def test_slice_past_the_end_is_an_error():
    e = err("""
arch Sl(d: int = 8) {
  input x: f32[B, T, d]
  output y = x[:, :, 2:d + 5]
}
""")
    assert "does not fit" in e.message and (e.span.line, e.span.column) == (4, 22)


def test_inexact_division_is_not_an_integer():
    e = err("""
arch Dv(d: int = 8) {
  input x: f32[B, T, d]
  layer lin = Linear(d, d / 3)
  output y = lin(x)
}
""")
    assert "integer" in e.message


def test_require_on_runtime_dims_is_rejected():
    e = err("""
arch Rq(d: int = 8) {
  input x: f32[B, T, d]
  require T > 4
  output y = x
}
""")
    assert "cannot be decided at compile time" in e.message


def test_misspelled_name_in_input_type_is_unknown():
    e = err("""
arch Ty(dim: int = 8) {
  input x: f32[B, T, dm]
  output y = x
}
""")
    assert "unknown name `dm`" in e.message and "dim" in (e.hint or "")


def test_sum_of_bool_is_float_typed():
    (g,) = check("""
arch Sb(d: int = 3) {
  input m: bool[B, T]
  output n = sum(m, axis = 1)
}
""")
    assert str(g.body.nodes[-1].out.type).startswith("f32") or "f32" in str(g)
    assert run(g, {}, {"m": torch.ones(2, 4, dtype=torch.bool)})["n"].tolist() == [4.0, 4.0]


def test_attend_builtin_in_route_masks_by_original_position():
    (g,) = check("""
arch Ar(d: int = 4) {
  input x: f32[B, T, d]
  input s: f32[B, T]
  h = x
  route h by topk(s, capacity = 0.5) {
    q = unsqueeze(h, 2)
    h = attend(q, q, q, causal = true)[:, :, 0]
  }
  output y = h
}
""")
    from archc.ir.ops import Op
    attend = next(n for n in g.walk() if n.op is Op.ATTEND)
    assert attend.attr("has_pos") is True


def test_non_causal_window_is_symmetric():
    from archc.backends.torch_runtime import attention
    q = torch.randn(1, 6, 1, 4)
    out = attention(q, q, q, window=2)
    manual = []
    for t in range(6):
        keys = [u for u in range(6) if abs(t - u) < 2]
        w = torch.softmax(torch.stack([q[0, t, 0] @ q[0, u, 0] for u in keys]) / 2.0, 0)
        manual.append(sum(wi * q[0, u, 0] for wi, u in zip(w, keys)))
    assert torch.allclose(out[0, :, 0], torch.stack(manual), atol=1e-5)


def test_halt_loop_resets_shared_recursion_kv():
    src = """
arch Hk(d: int = 8) {
  input x: f32[B, T, d]
  layer attn = Attention(d, 2, rope = false)
  h = x
  c = zeros([B])
  repeat i in 2 halt when c > 5.0 {
    h = h + attn(h)
    c = c + 1.0
  }
  output y = h
  cache share_kv(attn, across = "recursion")
}
"""
    (g,) = check(src)
    m = GraphModule(g, seed=0)
    x = torch.randn(1, 4, 8)
    first, again = m(x=x)["y"], m(x=x)["y"]       # a second forward must not reuse the first's K/V
    assert torch.allclose(first, again)


def test_memory_write_gradient_holds_keys_fixed():
    """The inner step differentiates the memory loss in W only, even when k = f(M(q))."""
    from archc.backends.torch_runtime import memory_write, mlp_memory
    torch.manual_seed(0)
    w0 = torch.randn(4, 4, requires_grad=True)
    ws = [w0.expand(2, 4, 4)]
    q = torch.randn(2, 3, 4)
    k = mlp_memory(q, ws, "gelu", False)             # keys read from the same memory
    v = torch.randn(2, 3, 4)
    lr, z = torch.full((2, 3), 0.1), torch.zeros(2)
    with_graph, _ = memory_write(k, v, lr, z, z, ws, [torch.zeros(2, 4, 4)], "gelu", False, "mse")
    with torch.no_grad():
        no_graph, _ = memory_write(k, v, lr, z, z, ws, [torch.zeros(2, 4, 4)], "gelu", False, "mse")
    torch.testing.assert_close(with_graph[0], no_graph[0])


def test_generated_full_with_a_loop_variable_value():
    """The PyTorch backend wrote `float(<sympy expr>)` for a symbolic `full` value (a loop counter)."""
    from archc.api import load
    src = """
arch A(d: int = 4, n: int = 3) {
  input x: f32[B, d]
  h = x
  repeat i in n {
    h = h * full([B, 1], i + 1)
  }
  output y = h
}
"""
    (g,) = check(src)
    x = torch.randn(2, 4)
    torch.testing.assert_close(load(src)()(x), run(g, {}, {"x": x})["y"])
    torch.testing.assert_close(load(src)()(x), x * 6)
