"""The IR text round-trips exactly (print -> parse -> print), and bad text fails at the right column."""
import math

import pytest
import sympy

from archc.errors import ArchError
from archc.ir.core import Graph, Node, Param, Policy, Region, Symbol, Value
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.ir.printer import print_graph, print_module
from archc.ir.shapes import BOOL, F32, I64, sym, tensor

B, T, d, n, r, k = (sym(s) for s in ("B", "T", "d", "n", "r", "k"))
BTD = tensor(F32, B, T, d)


def mlp() -> Graph:
    params = (
        Param("fc1.weight", tensor(F32, 4 * d, d), "normal", (("std", 0.02),)),
        Param("fc1.bias", tensor(F32, 4 * d), "zeros"),
        Param("fc2.weight", tensor(F32, d, 4 * d), "normal", (("std", 0.02),)),
    )
    nodes = (
        Node.make(Op.PARAM, [], [Value("w1", tensor(F32, 4 * d, d))], {"ref": "fc1.weight"}),
        Node.make(Op.PARAM, [], [Value("b1", tensor(F32, 4 * d))], {"ref": "fc1.bias"}),
        Node.make(Op.LINEAR, ["x", "w1", "b1"], [Value("h", tensor(F32, B, T, 4 * d))]),
        Node.make(Op.GELU, ["h"], [Value("a", tensor(F32, B, T, 4 * d))]),
        Node.make(Op.PARAM, [], [Value("w2", tensor(F32, d, 4 * d))], {"ref": "fc2.weight"}),
        Node.make(Op.LINEAR, ["a", "w2"], [Value("y", BTD)]),
    )
    symbols = (Symbol("d", "int", 64), Symbol("B", "dim"), Symbol("T", "dim"))
    return Graph("MLP", symbols, params, Region((Value("x", BTD),), nodes, ("y",)))


MLP_TEXT = """\
graph MLP(d: int = 64) dims(B, T) {
  param @fc1.weight : f32[4*d, d] init=normal(std=0.02)
  param @fc1.bias : f32[4*d] init=zeros()
  param @fc2.weight : f32[d, 4*d] init=normal(std=0.02)
  input %x : f32[B, T, d]
  %w1 = param() {ref="fc1.weight"} : f32[4*d, d]
  %b1 = param() {ref="fc1.bias"} : f32[4*d]
  %h = linear(%x, %w1, %b1) : f32[B, T, 4*d]
  %a = gelu(%h) : f32[B, T, 4*d]
  %w2 = param() {ref="fc2.weight"} : f32[d, 4*d]
  %y = linear(%a, %w2) : f32[B, T, d]
  output %y
}
"""


def looped() -> Graph:
    """A weight-shared loop whose two stacked weight copies alternate by trip."""
    body = Region(
        (Value("x.1", BTD),),
        (
            Node.make(Op.PARAM, [], [Value("w", tensor(F32, d, d))], {"ref": "core.w", "index": sympy.Mod(r, 2)}),
            Node.make(Op.LINEAR, ["x.1", "w"], [Value("h", BTD)]),
            Node.make(Op.ADD, ["x.1", "h"], [Value("x.2", BTD)]),
        ),
        ("x.2",),
    )
    loop = Node.make(Op.LOOP, ["x"], [Value("y", BTD)], {"trips": n, "var": "r"}, [body])
    params = (Param("core.w", tensor(F32, 2, d, d), "normal", (("std", 0.02),), copies=2),)
    policies = (Policy("share_kv", ("core.attn", "core.mlp"), (("across", "recursion"),)),)
    symbols = (Symbol("d", "int", 64), Symbol("n", "int", 4), Symbol("B", "dim"), Symbol("T", "dim"))
    return Graph("Looped", symbols, params, Region((Value("x", BTD),), (loop,), ("y",)), policies)


def routed() -> Graph:
    cap = T / 2
    body = Region(
        (Value("xs", tensor(F32, B, cap, d)), Value("pos", tensor(I64, B, cap))),
        (Node.make(Op.GELU, ["xs"], [Value("z", tensor(F32, B, cap, d))]),),
        ("z",),
    )
    route = Node.make(Op.ROUTE_TOPK, ["x", "s"], [Value("xo", BTD), Value("sel", tensor(BOOL, B, T))],
                      {"capacity": cap}, [body])
    inputs = (Value("x", BTD), Value("s", tensor(F32, B, T)))
    symbols = (Symbol("d", "int", 8), Symbol("B", "dim"), Symbol("T", "dim"))
    return Graph("Routed", symbols, (), Region(inputs, (route,), ("xo", "sel")))


KITCHEN_SINK = {
    "i": 3, "neg": -7, "tiny": 1e-06, "big": 1.5e20, "half": 0.5, "negzero": -0.0,
    "pinf": math.inf, "ninf": -math.inf, "yes": True, "no": False, "nothing": None,
    "s": 'say "hi"\nnew line \u2713 \u00e9 \\ {x}, <y> : %z',
    "l": [1, [2.5, "a,b]"], [], 2 * d],
    "e": sympy.Mod(r, 2), "q": d / 2, "fe": sympy.Float(0.5) * d, "m": sympy.Max(1, n - 1),
}


def every_attr() -> Graph:
    node = Node.make(Op.CONST, [], [Value("c", tensor(F32))], KITCHEN_SINK)
    params = (Param("bank", tensor(F32, k, d), "uniform", (("lo", -1), ("hi", 1.0)), copies=k),)
    symbols = (Symbol("d", "int", 8), Symbol("k", "int", 3), Symbol("eps", "float", 1e-06),
               Symbol("flag", "bool", True), Symbol("h", "int", d / 2), Symbol("free", "int"))
    return Graph("Attrs", symbols, params, Region((), (node,), ("c",)))


GRAPHS = [mlp, looped, routed, every_attr]


def test_golden_mlp_text():
    assert print_graph(mlp()) == MLP_TEXT
    assert parse_ir(MLP_TEXT) == [mlp()]


@pytest.mark.parametrize("build", GRAPHS, ids=lambda f: f.__name__)
def test_print_parse_print(build):
    text = print_graph(build())
    graphs = parse_ir(text)
    assert print_module(graphs) == text
    assert graphs == [build()]


def test_module_of_several_graphs():
    text = print_module([g() for g in GRAPHS])
    assert print_module(parse_ir(text)) == text
    assert [g.name for g in parse_ir(text)] == ["MLP", "Looped", "Routed", "Attrs"]


def test_attribute_values_parse_to_python_values():
    (g,) = parse_ir(print_graph(every_attr()))
    attrs = g.body.nodes[0].attr_dict
    assert type(attrs["i"]) is int and type(attrs["tiny"]) is float and attrs["tiny"] == 1e-06
    assert attrs["s"] == KITCHEN_SINK["s"]
    assert attrs["l"] == (1, (2.5, "a,b]"), (), 2 * d)
    assert attrs["pinf"] == math.inf and attrs["ninf"] == -math.inf and attrs["nothing"] is None
    assert math.copysign(1, attrs["negzero"]) == -1
    assert g.params[0].copies == k and g.symbols[4].default == d / 2


def test_nan_regions_and_empty_lists_round_trip():
    text = """\
graph Edge() {
  %c = const() {value=nan} : f32[]
   = loop() {trips=2} :  {
    ^():
    yield 
  } {
    ^(%a : i64[]):
    %b, %e = linear_attn(%a, %a, %a, %c) : f32[2, 3], bool[Max(1, T)]
    yield %b
  }
  output 
}
"""
    assert print_module(parse_ir(text)) == text


def test_spans_point_at_lines():
    (g,) = parse_ir(MLP_TEXT, file="mlp.ir")
    span = g.body.nodes[2].span
    assert (span.file, span.line, span.column) == ("mlp.ir", 8, 3)
    assert g.params[1].span.line == 3


BAD = [
    # (text, line, column, message fragment)
    ("graph G() {\n  input %x : f32[]\n  %y = frobnicate(%x) : f32[]\n  output %y\n}\n", 3, 8, "unknown op 'frobnicate'"),
    ("graph G() {\n  input %x : f16[B]\n  output %x\n}\n", 2, 14, "unknown dtype 'f16'"),
    ("graph G() {\n  input %x : f32[]\n  %y = gelu(%z) : f32[]\n  output %y\n}\n", 3, 13, "undefined value %z"),
    ("graph G() {\n  input %x : f32[]\n  %x = gelu(%x) : f32[]\n  output %x\n}\n", 3, 3, "duplicate definition of %x"),
    ("graph G() {\n  input %x : f32[]\n  %y = sum(%x) {axis=foo} : f32[]\n  output %y\n}\n", 3, 22,
     "malformed attribute value 'foo'"),
    ("graph G() {\n  input %x : f32[]\n  %y = sum(%x) {axis=1 keepdim=true} : f32[]\n  output %y\n}\n", 3, 24,
     "expected ',' or '}'"),
    ("graph G() {\n  input %x : f32[]\n  %y = sum(%x) {s=\"open} : f32[]\n  output %y\n}\n", 3, 19, "unterminated string"),
    ("graph G() {\n  input %x : f32[B, 2*]\n  output %x\n}\n", 2, 21, "bad expression"),
    ("graph G() {\n  input %x : f32[]\n  %y = sum(%x) {n=<d + (1>} : f32[]\n  output %y\n}\n", 3, 19,
     "unterminated <expression>"),
    ("graph G() {\n  input %x : f32[]\n  %y = gelu(%x) : f32[]\n  output %y, %q\n}\n", 4, 14, "undefined value %q"),
    ("graph G(n: tensor) {\n  output \n}\n", 1, 12, "unknown symbol kind 'tensor'"),
    ("graph G() {\n  input %x : f32[]\n  output %x\n", 3, 12, "unexpected end of input"),
    ("graph G() {\n  input %x : f32[] extra\n  output %x\n}\n", 2, 20, "unexpected 'extra'"),
    ("graph G() {\n  input %x : f32[]\n  %y = loop(%x) {trips=2} : f32[] {\n    ^(%x.1 : f32[]):\n"
     "    yield %x.1\n  }\n  %z = gelu(%x.1) : f32[]\n  output %z\n}\n", 7, 13, "undefined value %x.1"),
    ("graph G() {\n  param @w : f32[2] init=zeros()\n  param @w : f32[2] init=zeros()\n  output \n}\n", 3, 9,
     "duplicate parameter @w"),
    ("graph G() {\n  inptu %x : f32[]\n  output %x\n}\n", 2, 3, "expected a node line"),
    ("graph G() {\n  policy share_kv(across=\"depth\")\n  output \n}\n", 2, 10, "must start with targets"),
]


@pytest.mark.parametrize("text,line,column,fragment", BAD, ids=[b[3] for b in BAD])
def test_bad_ir_points_at_the_token(text, line, column, fragment):
    with pytest.raises(ArchError) as info:
        parse_ir(text, file="bad.ir")
    err = info.value
    assert fragment in err.message
    assert (err.span.file, err.span.line, err.span.column) == ("bad.ir", line, column)
    assert err.render().startswith(f"bad.ir:{line}:{column}: error:")


def test_compile_time_conditions_round_trip_inside_angle_brackets():
    """A bool const whose value is a relation on a dimension (`related or T > 0.0`, found by the
    front-end fuzzer) prints as `<T > 0.0>`: the `>` of the relation must not end the expression."""
    text = """\
graph Rel() {
  %c = const() {dtype="bool", value=<T > 0.0>} : bool[]
  %e = const() {dtype="bool", value=<(T >= 2) & (d < 8)>, w=[<T > 1>, 3]} : bool[]
  output %c, %e
}
"""
    (g,) = parse_ir(text)
    value = g.body.nodes[0].attr("value")
    assert value == sympy.StrictGreaterThan(sym("T"), sympy.Float(0.0))
    assert g.body.nodes[1].attr("w")[0] == sympy.StrictGreaterThan(sym("T"), 1)
    assert print_module(parse_ir(print_module([g]))) == print_module([g])
