"""Generated Triton kernels under TRITON_INTERPRET=1 (CPU) against the IR interpreter: forward and backward."""
import os

os.environ["TRITON_INTERPRET"] = "1"      # before any kernel is jitted: run them on the CPU

import pytest
import torch

pytest.importorskip("triton")

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import state_key
from archc.ir.interpret import GraphModule
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.backends.triton.emit import generate
from archc.passes import PASSES
from archc.testing import example_inputs


def _module(graphs, tag):
    code = generate(graphs).source
    return api.exec_module(code, f"<archc-triton-test:{tag}>", f"archc_triton_test_{tag}"), code


def _weights(out, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in sorted(out.items()) if v.is_floating_point()}


def _compare(g, mod, inputs, seed=3, grads=True):
    """Outputs, input gradients and parameter gradients of the generated module vs the interpreter."""
    gm = GraphModule(g, seed=seed)
    m = getattr(mod, g.name)()
    m.load_state_dict({state_key(k): v.detach() for k, v in gm.param_dict().items()}, strict=True)
    ins_ref = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    ins_got = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    ref = gm(**ins_ref)
    out = m(**ins_got)
    out = out if isinstance(out, dict) else {g.output_names[0]: out}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-4)
    if not grads:
        return
    w = _weights(ref)
    sum((ref[k] * w[k]).sum() for k in w).backward()
    sum((out[k] * w[k]).sum() for k in w).backward()
    got = dict(m.named_parameters())
    for name, p in zip(gm.names, gm.weights):
        if p.grad is not None:
            torch.testing.assert_close(got[state_key(name)].grad, p.grad, atol=1e-4, rtol=1e-3)
    for k, v in ins_ref.items():
        if v.is_floating_point() and v.grad is not None:
            torch.testing.assert_close(ins_got[k].grad, v.grad, atol=1e-4, rtol=1e-3)


REGION = """\
graph Chain(d: int = 6) dims(B, T) {
  param @norm.weight : f32[d] init=normal(std=1.0)
  param @ln.weight : f32[d] init=normal(std=1.0)
  param @ln.bias : f32[d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %y : f32[B, T, d]
  input %gate : f32[B, T, 1]
  input %bias : f32[d]
  %c = const() {dtype="f32", value=0.5} : f32[]
  %norm_weight = param() {ref="norm.weight"} : f32[d]
  %ln_weight = param() {ref="ln.weight"} : f32[d]
  %ln_bias = param() {ref="ln.bias"} : f32[d]
  %s = mul(%y, %c) : f32[B, T, d]
  %h = add(%x, %s) : f32[B, T, d]
  %n = rms_norm(%h, %norm_weight) {eps=1e-06} : f32[B, T, d]
  %g = sigmoid(%gate) : f32[B, T, 1]
  %m = mul(%n, %g) : f32[B, T, d]
  %l = layer_norm(%m, %ln_weight, %ln_bias) {eps=1e-05} : f32[B, T, d]
  %p = l2_normalize(%l) {eps=1e-06} : f32[B, T, d]
  %o = add(%p, %bias) : f32[B, T, d]
  output %o, %h
}
"""


def test_rows_kernel_with_norms_and_broadcasts_matches_interpreter():
    """rms_norm, layer_norm and l2_normalize in one row kernel, with [d], [B, T, 1] and scalar operands."""
    (g,) = parse_ir(REGION)
    h = PASSES["fuse-elementwise"](g)
    assert sum(1 for n in h.walk() if n.op is Op.FUSED) == 1
    mod, code = _module([h], "rows")
    assert "tl.sum(" in code and "_bwd(" in code
    inputs = example_inputs(h, {"d": 6}, batch=3, seq=5, seed=0)
    _compare(h, mod, inputs)


@pytest.mark.parametrize("name", ["depth_recurrent"])
def test_stdlib_model_forward_and_backward(name):
    graphs = [PASSES["fuse-elementwise"](g) for g in stdlib.graphs(name)]
    mod, _ = _module(graphs, name)
    for g in graphs:
        _compare(g, mod, example_inputs(g, seed=1))
