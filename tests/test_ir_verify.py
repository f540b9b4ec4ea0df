"""Each IR invariant, broken once, is reported at its node with a message that names the cause."""
import textwrap

import pytest

from archc.errors import ArchError
from archc.ir.core import Graph
from archc.ir.parser import parse_ir
from archc.ir.verify import verify

HEADER = """\
graph G(d: int = 8, n: int = 4, m: int = 2, c: int = 16) dims(B, T) {
  param @w : f32[d, d] init=normal(std=0.02)
  param @bank : f32[2, d, d] init=zeros() copies=2
  input %x : f32[B, T, d]
"""
FIRST_BODY_LINE = 5


def build(body: str) -> Graph:
    """A graph with symbols d, n, m, c, dims B, T, params @w and @bank (2 copies), input %x : f32[B, T, d]."""
    (g,) = parse_ir(HEADER + textwrap.indent(textwrap.dedent(body), "  ") + "}\n")
    return g


def fails(g: Graph, fragment: str, bindings=None) -> ArchError:
    with pytest.raises(ArchError) as info:
        verify(g, bindings)
    assert fragment in info.value.message
    return info.value


MLP = """\
    %w1 = param() {ref="w"} : f32[d, d]
    %h = linear(%x, %w1) : f32[B, T, d]
    %a = gelu(%h) : f32[B, T, d]
    %y = add(%x, %a) : f32[B, T, d]
    output %y
"""

LOOP = """\
    %y = loop(%x) {trips=<n>, var="r"} : f32[B, T, d] {
      ^(%x.1 : f32[B, T, d]):
      %wr = param() {index=<Mod(r, 2)>, ref="bank"} : f32[d, d]
      %h = linear(%x.1, %wr) : f32[B, T, d]
      %z = loop(%h) {trips=2, var="s"} : f32[B, T, d] {
        ^(%h.1 : f32[B, T, d]):
        %h.2 = slice(%h.1) {axis=2, start=<r + s>, stop=<d + r + s>} : f32[B, T, d]
        yield %h.2
      }
      %x.2 = add(%x.1, %z) : f32[B, T, d]
      yield %x.2
    }
    output %y
"""

HALT = """\
    %y, %steps = halt_loop(%x) {trips=<n>, var="r"} : f32[B, T, d], i64[B] {
      ^(%x.1 : f32[B, T, d]):
      %x.2 = tanh(%x.1) : f32[B, T, d]
      %p = mean(%x.2) {axis=2} : f32[B, T]
      %q = mean(%p) {axis=1} : f32[B]
      %half = const() {dtype="f32", value=0.5} : f32[]
      %stop = gt(%q, %half) : bool[B]
      yield %stop, %x.2
    }
    output %y, %steps
"""

TOPK = """\
    %s = sum(%x) {axis=2} : f32[B, T]
    %xo, %sel = route_topk(%x, %s, %s) {capacity=<T/2>, has_weight=true} : f32[B, T, d], bool[B, T] {
      ^(%xs : f32[B, T/2, d], %pos : i64[B, T/2]):
      %z = gelu(%xs) : f32[B, T/2, d]
      yield %z
    }
    output %xo, %sel
"""

MASK = """\
    %s = sum(%x) {axis=2} : f32[B, T]
    %zero = const() {dtype="f32", value=0} : f32[]
    %mask = gt(%s, %zero) : bool[B, T]
    %xo = route_mask(%x, %mask) : f32[B, T, d] {
      ^(%xs : f32[B, T, d], %pos : i64[B, T]):
      %z = silu(%xs) : f32[B, T, d]
      yield %z
    }
    output %xo
"""

SCAN = """\
    %s0 = sum(%x) {axis=1} : f32[B, d]
    %s, %ys = scan(%x, %s0) {size=<c>, stacked=[false]} : f32[B, d], f32[B, T, d] {
      ^(%seg : f32[B, c, d], %s.1 : f32[B, d]):
      %m = sum(%seg) {axis=1} : f32[B, d]
      %s.2 = add(%s.1, %m) : f32[B, d]
      %y = tanh(%seg) : f32[B, c, d]
      yield %s.2, %y
    }
    output %s, %ys
"""

GOOD = {"mlp": MLP, "loop": LOOP, "halt_loop": HALT, "route_topk": TOPK, "route_mask": MASK, "scan": SCAN}


@pytest.mark.parametrize("name", GOOD)
def test_well_formed_graphs_verify(name):
    verify(build(GOOD[name]))
    verify(build(GOOD[name]), bindings={"B": 2, "T": 32, "d": 8, "n": 4, "c": 16})


def test_failure_names_the_node_its_line_and_span():
    err = fails(build("%y = gelu(%x, %x) : f32[B, T, d]\noutput %y\n"), "gelu takes 1 to 1 operands, got 2")
    assert "in: %y = gelu(%x, %x) : f32[B, T, d]" in err.message
    assert (err.span.line, err.span.column) == (FIRST_BODY_LINE, 3)


# -- scoping and SSA (built by hand: the parser already rejects these) ------------------------


def _edit_node(g: Graph, i: int, **kw) -> Graph:
    nodes = list(g.body.nodes)
    nodes[i] = nodes[i].replace(**kw)
    return g.replace(body=g.body.__class__(g.body.args, tuple(nodes), g.body.results))


def test_undefined_operand():
    fails(_edit_node(build(MLP), 2, inputs=("nope",)), "operand %nope is not defined before use")


def test_use_before_definition():
    g = build(MLP)
    nodes = g.body.nodes
    swapped = g.body.__class__(g.body.args, (nodes[0], nodes[2], nodes[1], nodes[3]), g.body.results)
    fails(g.replace(body=swapped), "operand %h is not defined before use")


def test_region_value_is_not_visible_outside():
    g = build(LOOP)
    bad = g.body.__class__(g.body.args, g.body.nodes, ("h",))
    fails(g.replace(body=bad), "graph output %h is not defined")


def test_ssa_redefinition():
    g = build(MLP)
    out = g.body.nodes[2].outputs[0]
    fails(_edit_node(g, 2, outputs=(out.__class__("x", out.type),)), "value %x is defined more than once")


def test_region_argument_shadowing_is_an_ssa_error():
    g = build(LOOP)
    loop = g.body.nodes[0]
    region = loop.regions[0]
    arg = region.args[0].__class__("x", region.args[0].type)
    region = region.__class__((arg,), region.nodes, region.results)
    fails(_edit_node(g, 0, regions=(region,)), "value %x is defined more than once")


def test_undefined_yield():
    g = build(LOOP)
    region = g.body.nodes[0].regions[0]
    region = region.__class__(region.args, region.nodes, ("gone",))
    err = fails(_edit_node(g, 0, regions=(region,)), "region yield %gone is not defined")
    assert "in: %y = loop(%x)" in err.message


# -- per-op schema and shape rules ------------------------------------------------------------


@pytest.mark.parametrize("body,fragment", [
    ("%y = gelu(%x) {axis=1} : f32[B, T, d]", "gelu has no attribute 'axis'"),
    ("%y = sum(%x) : f32[B, T]", "sum needs attribute 'axis'"),
    ("%y = gelu(%x) : i64[B, T, d]", "results #0: type i64[B, T, d] does not match f32[B, T, d]"),
    ("%y = gelu(%x) : f32[B, T, d + 1]", "type f32[B, T, d + 1] does not match f32[B, T, d]"),
    ("%y = gelu(%x) : f32[B, T]", "does not match f32[B, T, d]"),
    ("%y, %z = gelu(%x) : f32[B, T, d], f32[B, T, d]", "results: expected 1 value(s), got 2"),
    ("%y = permute(%x) {perm=[0, 1]} : f32[B, T]", "permutation [0, 1] does not fit a tensor of rank 3"),
    ("%y = cast(%x) {dtype=\"f16\"} : f32[B, T, d]", "malformed attributes or operands"),
    ("%y = loop(%x) {trips=2} : f32[B, T, d]", "loop has 1 region(s), got 0"),
])
def test_op_schema_and_shape_rule(body, fragment):
    fails(build(body + "\noutput %y\n"), fragment)


def test_dims_checked_at_bindings():
    g = build("%y = gelu(%x) : f32[B, T, m]\noutput %y\n")
    verify(g)
    fails(g, "does not match f32[B, T, d]", bindings={"d": 8, "m": 2})


@pytest.mark.parametrize("body,fragment", [
    ("%y = param() {ref=\"missing\"} : f32[d, d]", "unknown parameter @missing"),
    ("%y = param() {ref=\"w\"} : f32[d, m]", "result #0: type f32[d, m] does not match f32[d, d]"),
    ("%y = param() {ref=\"bank\"} : f32[d, d]", "does not match f32[2, d, d]"),
    ("%y = param() {index=1, ref=\"bank\"} : f32[2, d, d]", "does not match f32[d, d]"),
])
def test_param_nodes(body, fragment):
    fails(build(body + "\noutput %y\n"), fragment, bindings={"d": 8, "m": 2})


def test_stacked_param_copy_drops_the_copies_axis():
    verify(build("%y = param() {index=1, ref=\"bank\"} : f32[d, d]\n%z = param() {ref=\"bank\"} : f32[2, d, d]\n"
                 "output %y, %z\n"))


# -- symbols ---------------------------------------------------------------------------------


def test_loop_variable_outside_its_loop():
    fails(build("%y = param() {index=<Mod(r, 2)>, ref=\"bank\"} : f32[d, d]\noutput %y\n"),
          "attribute index uses unknown symbol 'r'")


def test_unknown_symbol_in_a_result_shape():
    fails(build("%y = reshape(%x) {shape=[<B>, <T>, <d>]} : f32[B, T, q]\noutput %y\n"), "the type of %y uses unknown symbol 'q'")


def test_unknown_symbol_in_an_input_and_a_param():
    (g,) = parse_ir("graph G() dims(B) {\n  input %x : f32[B, Z]\n  output %x\n}\n")
    fails(g, "graph input %x uses unknown symbol 'Z'")
    (g,) = parse_ir("graph G() {\n  param @w : f32[k] init=zeros()\n  output \n}\n")
    assert fails(g, "parameter @w uses unknown symbol 'k'").span.line == 2


# -- region op contracts ---------------------------------------------------------------------


def _swap(text: str, old: str, new: str) -> Graph:
    assert old in text
    return build(text.replace(old, new))


@pytest.mark.parametrize("text,old,new,fragment", [
    (LOOP, "yield %x.2", "yield %wr", "loop region yields #0: type f32[d, d] does not match f32[B, T, d]"),
    (LOOP, "^(%x.1 : f32[B, T, d]):", "^(%x.1 : f32[B, T, d], %extra : f32[]):",
     "loop region arguments: expected 1 value(s), got 2"),
    (LOOP, "var=\"r\"} : f32[B, T, d] {", "var=\"r\"} : f32[B, T] {", "loop results #0"),
    (HALT, "yield %stop, %x.2", "yield %q, %x.2", "halt flag (first yield) must be bool[B], got f32[B]"),
    (HALT, "yield %stop, %x.2", "yield %x.2", "halt flag (first yield) must be bool[B], got f32[B, T, d]"),
    (HALT, "f32[B, T, d], i64[B] {", "f32[B, T, d], f32[B] {", "step counts (last result) must be i64[B]"),
    (TOPK, "%s, %s) {", "%s) {", "route_topk with has_among=False, has_weight=True takes 3 operands, got 2"),
    (TOPK, "yield %z", "yield %pos", "route_topk region yields #0: type i64[B, T/2] does not match f32[B, T/2, d]"),
    (TOPK, "f32[B, T, d], bool[B, T] {", "f32[B, T, d], f32[B, T] {", "route_topk returns (x_out, sel: bool)"),
    (TOPK, "%pos : i64[B, T/2]", "%pos : i64[B, T/2], %more : f32[]", "region takes (x_sel, pos), got 3"),
    (MASK, "%xo = route_mask(%x, %mask) : f32[B, T, d]", "%xo = route_mask(%x, %mask) : f32[B, d]",
     "route_mask routed result #0: type f32[B, d] does not match f32[B, T, d]"),
    (MASK, "yield %z", "yield %pos", "route_mask region yields #0: type i64[B, T] does not match f32[B, T, d]"),
    (SCAN, "^(%seg : f32[B, c, d]", "^(%seg : i64[B, c, d]", "scan segment i64[B, c, d] is not a size-c segment"),
    (SCAN, "yield %s.2, %y", "yield %y, %s.2", "scan yielded carries #0: type f32[B, c, d] does not match f32[B, d]"),
    (SCAN, "stacked=[false]", "stacked=[true]", "scan result #1 f32[B, T, d] is not the stacked yield f32[B, c, d]"),
    (SCAN, "yield %s.2, %y", "yield %s.2, %y, %m", "scan returns the carries and one value per extra yield"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith(" ") else "")
def test_region_contracts(text, old, new, fragment):
    fails(_swap(text, old, new), fragment)


def test_scan_segment_of_the_wrong_size_at_bindings():
    text = SCAN.replace("%seg : f32[B, c, d]", "%seg : f32[B, 32, d]").replace("tanh(%seg) : f32[B, c, d]",
                                                                              "tanh(%seg) : f32[B, 32, d]")
    verify(build(text))
    fails(build(text), "is not a size-c segment of f32[B, T, d]", bindings={"T": 64, "c": 16})


REWRITE = """\
graph G(d: int = 8) dims(B, T) {
  param @w : f32[d, d] init=normal(std=0.02)
  policy rewrite_kv(targets=["attn"], processor="proc", delimiter=1, top=2) {
    ^(%k : f32[1, N, 2, d/2], %v : f32[1, N, 2, d/2], %pos : i64[1, N]):
    @BODY@
  }
  input %x : f32[B, T, d]
  %y = add(%x, %x) : f32[B, T, d]
  output %y
}
"""


@pytest.mark.parametrize("body,fragment", [
    ("%k2 = mul(%k, %k) : f32[1, N, 2, d/2]\n    yield %k2, %v", None),
    ("yield %k", "must yield the rewritten (k, v)"),
    ("%k2 = sum(%k) {axis=3} : f32[1, N, 2]\n    yield %k2, %v", "must yield the rewritten (k, v)"),
    ("%k2 = mul(%k, %k) : f32[1, M, 2, d/2]\n    yield %k2, %v", "unknown symbol 'M'"),
])
def test_a_policy_region_is_isolated_and_yields_k_and_v(body, fragment):
    """rewrite_kv's processor region (SPEC §12.5, 9): its own dimension N, no body value, (k, v) out."""
    (g,) = parse_ir(REWRITE.replace("@BODY@", body))
    if fragment is None:
        verify(g)
    else:
        fails(g, fragment)


def test_a_policy_region_reads_no_body_value():
    from dataclasses import replace

    from archc.ir.core import Node, Region, Value
    from archc.ir.ops import Op
    (g,) = parse_ir(REWRITE.replace("@BODY@", "yield %k, %v"))
    p = g.policies[0]
    k = p.region.args[0]
    reads_x = Node.make(Op.ADD, ["k", "x"], [Value("k2", k.type)])     # %x is the graph's input
    g = g.replace(policies=(replace(p, region=Region(p.region.args, (reads_x,), ("k2", "v"))),))
    fails(g, "operand %x is not defined")


def test_only_rewrite_kv_has_a_region():
    (g,) = parse_ir(REWRITE.replace("@BODY@", "yield %k, %v"))
    fails(g.replace(policies=(g.policies[0].__class__("rewrite_kv", ("attn",)),)), "needs its processor region")
    (g,) = parse_ir(REWRITE.replace("@BODY@", "yield %k, %v").replace("rewrite_kv", "topk_decode"))
    fails(g, "takes no region")
