"""fuse-elementwise (SPEC §19.1): golden before/after, the `fused` op, every stdlib model at -O2."""
import re
import types

import pytest
import torch
from test_passes import _assert_same_outputs, _check_golden

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import state_key
from archc.errors import ArchError
from archc.ir.core import Graph
from archc.ir.interpret import init_params, resolve_bindings, run
from archc.ir.ops import FUSIBLE_OPS, Op
from archc.ir.parser import parse_ir
from archc.ir.printer import print_graph, print_module
from archc.ir.verify import verify
from archc.passes import PASSES, PRESETS, run_pipeline
from archc.testing import example_inputs

FUSE_BEFORE = """\
graph Fuse(d: int = 4) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  param @norm.weight : f32[d] init=ones()
  param @gate.weight : f32[1, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %y : f32[B, T, d]
  %w = param() {ref="w"} : f32[d, d]
  %a = linear(%x, %w) : f32[B, T, d]
  %c = const() {dtype="f32", value=0.5} : f32[]
  %s = mul(%a, %c) : f32[B, T, d]
  %h = add(%x, %s) : f32[B, T, d]
  %norm_weight = param() {ref="norm.weight"} : f32[d]
  %n = rms_norm(%h, %norm_weight) {eps=1e-06} : f32[B, T, d]
  %gate_weight = param() {ref="gate.weight"} : f32[1, d]
  %gl = linear(%y, %gate_weight) : f32[B, T, 1]
  %g = sigmoid(%gl) : f32[B, T, 1]
  %m = mul(%n, %g) : f32[B, T, d]
  %b = linear(%m, %w) : f32[B, T, d]
  %e = exp(%gl) : f32[B, T, 1]
  %t = tanh(%b) : f32[B, T, d]
  %u = mul(%t, %e) : f32[B, T, d]
  %z = loop(%u) {trips=2, var="i"} : f32[B, T, d] {
    ^(%v : f32[B, T, d]):
    %r = relu(%v) : f32[B, T, d]
    %q = sub(%r, %v) : f32[B, T, d]
    yield %q
  }
  %out = add(%z, %e) : f32[B, T, d]
  output %out, %h
}
"""

FUSE_AFTER = """\
graph Fuse(d: int = 4) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  param @norm.weight : f32[d] init=ones()
  param @gate.weight : f32[1, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %y : f32[B, T, d]
  %w = param() {ref="w"} : f32[d, d]
  %a = linear(%x, %w) : f32[B, T, d]
  %c = const() {dtype="f32", value=0.5} : f32[]
  %norm_weight = param() {ref="norm.weight"} : f32[d]
  %gate_weight = param() {ref="gate.weight"} : f32[1, d]
  %gl = linear(%y, %gate_weight) : f32[B, T, 1]
  %h, %m = fused() : f32[B, T, d], f32[B, T, d] {
    ^():
    %s = mul(%a, %c) : f32[B, T, d]
    %h.1 = add(%x, %s) : f32[B, T, d]
    %n = rms_norm(%h.1, %norm_weight) {eps=1e-06} : f32[B, T, d]
    %g = sigmoid(%gl) : f32[B, T, 1]
    %m.1 = mul(%n, %g) : f32[B, T, d]
    yield %h.1, %m.1
  }
  %b = linear(%m, %w) : f32[B, T, d]
  %e = exp(%gl) : f32[B, T, 1]
  %u = fused() : f32[B, T, d] {
    ^():
    %t = tanh(%b) : f32[B, T, d]
    %u.1 = mul(%t, %e) : f32[B, T, d]
    yield %u.1
  }
  %z = loop(%u) {trips=2, var="i"} : f32[B, T, d] {
    ^(%v : f32[B, T, d]):
    %q = fused() : f32[B, T, d] {
      ^():
      %r = relu(%v) : f32[B, T, d]
      %q.1 = sub(%r, %v) : f32[B, T, d]
      yield %q.1
    }
    yield %q
  }
  %out = add(%z, %e) : f32[B, T, d]
  output %out, %h
}
"""


def test_fuse_elementwise_golden():
    """A residual add + norm + gate chain absorbs the linear feeding the gate; a [B, T, 1] value read
    later cannot be a result, so the group splits after it; loop bodies fuse on their own."""
    _check_golden("fuse-elementwise", FUSE_BEFORE, FUSE_AFTER)


def test_o2_runs_fusion_last():
    assert PRESETS["O2"][-1] == "fuse-elementwise"
    assert PRESETS["O2"][2:2 + len(PRESETS["O1"])] == PRESETS["O1"]     # after insert-kv-sharing, schedule-depth


def test_fused_region_must_hold_fusible_ops_only():
    bad = FUSE_AFTER.replace("%t = tanh(%b) : f32[B, T, d]", "%t = linear(%b, %w) : f32[B, T, d]")
    (g,) = parse_ir(bad)
    with pytest.raises(ArchError, match="fused region may hold only elementwise"):
        verify(g)
    wrong = FUSE_AFTER.replace("%u = fused() : f32[B, T, d] {", "%u = fused() : f32[B, T, 1] {")
    (g,) = parse_ir(wrong)
    with pytest.raises(ArchError, match="fused results"):
        verify(g, resolve_bindings(g))
    assert {Op.RMS_NORM, Op.LAYER_NORM, Op.ADD, Op.SIGMOID} <= FUSIBLE_OPS and Op.LINEAR not in FUSIBLE_OPS


_CASES = [(n, g) for n in stdlib.names() for g in stdlib.graphs(n)]
_O2: dict[str, Graph] = {}
# models with no elementwise or norm op at all: Node2Vec (geometric_memory) is one embedding lookup
# and one contraction
NOTHING_TO_FUSE = ("Node2Vec",)


def _o2(g: Graph) -> Graph:
    if g.name not in _O2:
        _O2[g.name] = run_pipeline(g, PRESETS["O2"], verify=True)
    return _O2[g.name]


@pytest.mark.parametrize("name,g", _CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_o2_fuses_keeps_semantics_and_is_a_fixpoint(name, g):
    h = _o2(g)
    assert h.output_names == g.output_names and h.params == g.params
    assert any(n.op is Op.FUSED for n in h.walk()) or g.name in NOTHING_TO_FUSE, \
        "every stdlib model has a norm or an elementwise chain"
    for n in h.walk():
        if n.op is Op.FUSED:
            body = n.regions[0].nodes
            assert all(m.op in FUSIBLE_OPS for m in body)
            assert len(body) >= 2 or body[0].op in (Op.RMS_NORM, Op.LAYER_NORM, Op.L2_NORMALIZE)
    _assert_same_outputs(g, h, seed=2)
    text = print_graph(h)
    assert print_graph(PASSES["fuse-elementwise"](h)) == text
    assert print_module(parse_ir(text)) == text
    verify(h, resolve_bindings(h))


@pytest.mark.parametrize("name", stdlib.names())
def test_o2_torch_module_matches_interpreter(name):
    """The PyTorch backend writes a fused region's body inline, under the region's result names."""
    compiled = api.compile(stdlib.path(name), optimize=lambda g: run_pipeline(g, PRESETS["O2"]))
    # no call to a fused-region helper: the region's body is written inline
    assert not re.search(r"\bfused\w*\s*\(", compiled.source)
    mod = types.ModuleType(f"archc_o2_{name}")
    exec(compile(compiled.source, f"<archc-o2:{name}>", "exec"), mod.__dict__)
    for g in stdlib.graphs(name):
        m = getattr(mod, g.name)().eval()      # as the interpreter runs by default
        params = init_params(g, seed=3)
        m.load_state_dict({state_key(k): v for k, v in params.items()}, strict=True)
        inputs = example_inputs(g, seed=1)
        ref = run(g, params, inputs)
        out = m(**inputs)
        out = out if isinstance(out, dict) else {g.output_names[0]: out}
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-4)
