"""Names and text from a .arch file never become executable Python (property-based, SPEC.md §23).

Every naming position of a template (architecture, block, parameters, inputs, layers, arrays,
params, memories, variables, loop variables, outputs) gets a hostile name: Python keywords,
builtins, the generated module's own globals (`torch`, `nn`, `F`, `_param`, runtime helpers),
`nn.Module` attributes, dunders. The leading comment (the module docstring) carries quotes,
backslashes and a payload. The program must check, its generated module must be valid Python
whose module-level names are all distinct, the payload may appear only inside string literals,
and the module must agree with the interpreter (outputs and gradients, every -O level).
"""
from __future__ import annotations

import ast
import io
import tokenize

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archc.api as api
from archc.fuzz.differential import run_program
from archc.fuzz.mutate import HOSTILE_NAMES

# names the template itself needs in their archc meaning, and the input dimensions
_TAKEN = {"B", "T", "sum", "mean", "int", "float", "bool", "f32", "i64", "d", "yield_"}
POOL = sorted(set(HOSTILE_NAMES) - _TAKEN | {"forward_", "__call__", "register_buffer", "parameters", "cuda",
                                             "_step", "prefill", "decode", "reset_parameters", "KVCache", "attention",
                                             "grad", "n", "k", "v_1", "x_1", "mlp_memory", "gather_along"})

DOCS = ['""" + __import__("os").system("echo PWNED") + """',
        "''' PWNED ''' \\",
        '\\N{BELL} \\x00 PWNED \\u0000 "',
        'PWNED """ \\"\\"\\" \'\'\' \\\\" ok']

TEMPLATE = '''# {doc}
# second line {doc}
block {blk}({bp}: int) {{
  input {bi}: f32[B, T, {bp}]
  layer {bl} = Linear({bp}, {bp})
  {bv} = {bl}({bi})
  return {bv} * 2
}}
arch {arch}({ap}: int = 4, {ap2}: float = 0.5) {{
  input {inp}: f32[B, T, {ap}]
  layer {lay} = {blk}({ap})
  layer {arr}[2] = Linear({ap}, {ap})
  param {prm}: f32[{ap}] = ones()
  memory {mem} = Bank(slots = 2, shape = [{ap}])
  {v} = {lay}({inp}) * {prm}
  repeat {lv} in 2 share {arr} as cycle {{
    {v} = {v} + {arr}({v}) * {ap2}
  }}
  {mem}.push(mean({v}, axis = 1))
  output {out} = {v} + sum({mem}.items(), axis = 1, keepdim = true)
  output {out2} = {v} * {lv2}
}}
'''
SLOTS = ["blk", "bp", "bi", "bl", "bv", "arch", "ap", "ap2", "inp", "lay", "arr", "prm", "mem", "v", "lv", "out", "out2"]


def _program(names: list[str], doc: str) -> str:
    slots = dict(zip(SLOTS, names))
    slots["lv2"] = slots["ap2"]
    return TEMPLATE.format(doc=doc, **slots)


def _assert_inert(src: str) -> None:
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            assert name not in ("system", "__import__", "exec", "eval", "open"), ast.unparse(node)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if "PWNED" in tok.string:
            assert tok.type == tokenize.STRING, tok
    defined = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined += [a.asname or a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.Assign):
            defined += [t.id for t in node.targets if isinstance(t, ast.Name)]
    assert len(defined) == len(set(defined)), sorted(defined)


@settings(max_examples=6, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(POOL), min_size=len(SLOTS), max_size=len(SLOTS), unique=True),
       st.sampled_from(DOCS))
def test_hostile_names_and_docstrings_stay_inert(names, doc):
    src = _program(names, doc)
    compiled = api.compile(src)
    _assert_inert(compiled.source)
    assert "PWNED" in ast.get_docstring(ast.parse(compiled.source))
    v = run_program(src, seed=1, decode=False)
    assert not v.failed, f"{v.signature}\n{v.detail[:2000]}\n{src}"


def test_every_hostile_name_in_several_slots_compiles():
    """Every pool name, in four different slots (static checks only: cheap)."""
    for offset in range(4):
        for start in range(0, len(POOL), len(SLOTS)):
            names = (POOL[start:] + POOL[:start])[:len(SLOTS)]
            names = names[offset:] + names[:offset]
            compiled = api.compile(_program(names, DOCS[offset]))
            _assert_inert(compiled.source)
            compile(compiled.source, "<hostile>", "exec")
