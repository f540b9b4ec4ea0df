"""Bad inputs give one precise diagnostic: the exact line:column, a clear message, and a hint where useful.

Each case is a small .arch source; the table gives the (line, column) the error must point at, a
substring of its message and, where the diagnostic has one, a substring of its hint.
"""
from __future__ import annotations

import re
import textwrap

import pytest
from archc.dsl.lower import lower_module
from archc.dsl.parse import parse
from archc.ir.interpret import resolve_bindings
from archc.ir.verify import verify

from archc.errors import ArchError

FILE = "t.arch"


def diagnose(src: str) -> ArchError:
    """Compile `src` as `archc check` does; return the ArchError it must raise."""
    with pytest.raises(ArchError) as info:
        for g in lower_module(parse(src, FILE)):
            verify(g, resolve_bindings(g))
    return info.value


def arch(body: str, params: str = "d: int = 4", before: str = "") -> str:
    """An arch `A(params)` with input x: f32[B, T, d] and `body` (indented two spaces) after it."""
    body = textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
    return f"{before}arch A({params}) {{\n  input x: f32[B, T, d]\n{body}\n}}\n"


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


BLOCK_L = src("""
    block L(d: int) {
      input x: f32[B, T, d]
      layer p = Linear(d, d)
      return p(x)
    }
""")

BLOCK_ATT = src("""
    block Att(d: int, heads: int) {
      input x: f32[B, T, d]
      layer attn = Attention(d, heads)
      return attn(x)
    }
""")

# (id, source, line, column, message substring, hint substring or None)
CASES = [
    # -- syntax --------------------------------------------------------------------------------------
    ("syntax-missing-brace-eof", "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x\n",
     3, 15, "unexpected end of file", "missing its closing `}`"),
    ("syntax-eof-after-open-brace", "arch A(d: int = 4) {", 1, 21, "unexpected end of file", "closing `}`"),
    ("syntax-stray-rparen", arch("output y = x )"), 3, 16, "unexpected ')'", None),
    ("syntax-stray-token-top-level", arch("output y = x") + "}\n", 5, 1, "unexpected '}'", None),
    ("syntax-single-quoted-string", arch("layer p = Linear(d, d, init = 'zeros')\noutput y = p(x)"),
     3, 33, "unexpected character \"'\"", "double quotes"),
    ("syntax-layer-without-equals", arch("layer p Linear(3)\noutput y = p(x)"),
     3, 11, "unexpected 'Linear'; expected '=', '['", "`layer NAME = Kind(args)`"),
    ("syntax-layer-call-form", arch("layer p(3)\noutput y = p(x)"),
     3, 10, "unexpected '('", "`layer NAME = Kind(args)`"),
    ("syntax-input-missing-type", "arch A(d: int = 4) {\n  input x\n  output y = x\n}\n",
     2, 10, "unexpected newline; expected ':'", "need a type"),
    ("syntax-param-missing-type", "arch A(d) {\n  input x: f32[B, T, d]\n  output y = x\n}\n",
     1, 9, "unexpected ')'; expected ':'", "`d: int = 64`"),
    ("syntax-unclosed-paren", arch("output y = sigmoid(x"), 3, 21, "`(` is never closed", "reached `}` at line 4"),
    ("syntax-unclosed-paren-nested", arch("output y = ((((x)))"), 3, 14, "`(` is never closed", "missing `)`"),
    ("syntax-unclosed-bracket-eof", "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x[0",
     3, 15, "`[` is never closed", "the end of the file"),
    ("syntax-dangling-operator", arch("output y = x +"), 3, 17, "unexpected newline", None),
    ("syntax-definition-without-params", "arch A {\n  input x: f32[B, T, d]\n}\n",
     1, 8, "unexpected '{'", "parameter list"),
    ("syntax-positional-after-keyword", arch("layer p = Linear(d, out_features = d, true)\noutput y = p(x)"),
     3, 41, "positional argument after a keyword argument", "positional arguments first"),
    ("syntax-non-ascii-name", arch("output é = x"), 3, 10, "unexpected character 'é'", None),
    ("syntax-nul-byte", "arch A(d: int = 4) {\x00}\n", 1, 21, "NUL byte", "UTF-8"),
    ("syntax-brackets-too-deep", arch("output y = " + "(" * 70 + "x" + ")" * 70), 3, 78,
     "nested more than 64 deep", "several assignments"),
    ("syntax-too-many-signs", arch("k = " + "-" * 70 + "1\noutput y = x"), 3, 71, "more than 64 `-` or `not` in a row",
     "`- -x` is `x`"),
    ("syntax-expression-too-deep", arch("y = x" + " + x" * 2000 + "\noutput z = y"), 3, 3,
     "program is nested too deeply", "several assignments"),
    ("statements-nested-too-deep", arch("".join(f"{'  ' * i}repeat i{i} in 2 {{\n" for i in range(70))
                                        + "  " * 70 + "x = x + 1\n" + "".join(f"{'  ' * i}}}\n" for i in reversed(range(70)))
                                        + "output y = x"), 67, 131, "statements nested more than 64 deep", "flatten"),
    # -- names -----------------------------------------------------------------------------------------
    ("unknown-name-did-you-mean", arch("hidden = x\noutput y = hiden"), 4, 14, "unknown name `hiden`",
     "did you mean `hidden`?"),
    ("unknown-function", arch("output y = sigmod(x)"), 3, 14, "unknown function `sigmod`", "did you mean `sigmoid`?"),
    ("layer-kind-called-as-function", arch("output y = Linear(x)"), 3, 14, "`Linear` is a layer kind",
     "layer my_linear = Linear"),
    ("unknown-layer-kind", arch("layer p = Linaer(d, d)\noutput y = p(x)"), 3, 13, "unknown layer kind `Linaer`",
     "did you mean `Linear`?"),
    ("unknown-memory-kind", arch("memory m = Bnak(slots = 2, shape = [d])\noutput y = x"), 3, 14,
     "unknown memory kind `Bnak`", "did you mean `Bank`?"),
    ("memory-kind-declared-as-layer", arch("layer m = Bank(slots = 2, shape = [d])\noutput y = x"), 3, 13,
     "`Bank` is a memory kind", "memory m = Bank(...)"),
    ("unknown-memory-method", arch("memory m = Bank(slots = 2, shape = [d])\ny = m.itemz()\noutput z = x"), 4, 7,
     "Bank `m` has no method `itemz`", "did you mean `items`?"),
    ("unknown-dtype", arch("input z: f16[B, T]\noutput y = x"), 3, 12, "unknown dtype `f16`", "f32, i64 and bool"),
    ("lowercase-free-dim-in-type", arch("input z: f32[B, t]\noutput y = x"), 3, 19, "unknown name `t` in a type",
     "upper-case"),
    # -- arguments -------------------------------------------------------------------------------------
    ("primitive-too-many-args", arch("layer p = Linear(d, d, true, \"normal\", 0.1, 0.0, 7)\noutput y = p(x)"),
     3, 52, "`Linear` takes at most 6 positional argument(s), got 7",
     'signature: Linear(in_features, out_features, bias=false, init="normal", std=auto, bias_init=0.0)'),
    ("primitive-missing-arg", arch("layer p = Linear(d)\noutput y = p(x)"), 3, 3,
     "`Linear` is missing argument `out_features`", "signature: Linear(in_features, out_features"),
    ("primitive-unknown-kwarg", arch("layer p = Linear(d, d, bais = true)\noutput y = p(x)"), 3, 26,
     "`Linear` has no argument `bais`", "did you mean `bias`?"),
    ("primitive-bad-choice", arch("layer p = Linear(d, d, init = \"ones\")\noutput y = p(x)"), 3, 33,
     "must be one of 'normal', 'zeros', 'xavier', got 'ones'", None),
    ("builtin-too-many-args", arch("output y = softmax(x, 1, 2)"), 3, 28,
     "`softmax` takes at most 2 positional argument(s), got 3", "signature: softmax(x, axis=-1)"),
    ("builtin-unknown-kwarg", arch("output y = softmax(x, axs = 1)"), 3, 25, "`softmax` has no argument `axs`",
     "did you mean `axis`?"),
    ("builtin-missing-arg", arch("output y = reshape(x)"), 3, 14, "`reshape` is missing argument `shape`",
     "signature: reshape(x, shape)"),
    ("builtin-kwarg-twice", arch("output y = softmax(x, axis = 1, axis = 2)"), 3, 35,
     "argument `axis` of `softmax` is given twice", None),
    ("builtin-axis-out-of-range", arch("output y = softmax(x, axis = 3)"), 3, 32,
     "axis 3 is out of range for a tensor of rank 3", None),
    ("block-missing-argument", arch("layer b = L()\noutput y = b(x)", before=BLOCK_L), 8, 3,
     "missing argument `d`", "pass `d=...`"),
    ("block-unknown-parameter", arch("layer b = L(d, e = 2)\noutput y = b(x)", before=BLOCK_L), 8, 18,
     "block `L` has no parameter `e`", None),
    ("block-wrong-number-of-inputs", arch("layer b = L(d)\noutput y = b(x, x)", before=BLOCK_L), 9, 14,
     "`b` (L) takes 1 input(s), got 2", "inputs: x"),
    # -- shapes and types ------------------------------------------------------------------------------
    ("shape-linear-last-dim", arch("layer p = Linear(d, d)\noutput y = p(concat([x, x], axis = -1))"), 4, 16,
     "Linear expects inputs with last dimension d, got f32[B, T, 2*d]", None),
    ("shape-block-input", arch("layer b = L(d)\noutput y = b(concat([x, x], axis = -1))", before=BLOCK_L), 9, 16,
     "input `x` of block `L` expects f32[B, T, d], got f32[B, T, 2*d]", "declared at line 2: input x: f32[B, T, d]"),
    ("carried-changes-shape", arch("repeat i in 2 {\n  x = x[:, :, 0]\n}\noutput y = x"), 4, 5,
     "`x` changes type inside the loop: f32[B, T, d] before, f32[B, T] here", "keeps its shape"),
    ("carried-changes-width", arch("repeat i in 2 {\n  x = concat([x, x], axis = -1)\n}\noutput y = x"), 4, 5,
     "f32[B, T, d] before, f32[B, T, 2*d] here", "keeps its shape"),
    ("embedding-needs-int-ids", arch("layer e = Embedding(8, d)\noutput y = e(x)"), 4, 16,
     "embedding ids must be i64, got f32[B, T, d]", None),
    ("too-many-indices", arch("output y = x[0, 0, 0, 0]"), 3, 14, "4 indices for a tensor of rank 3", None),
    ("slice-out-of-range", arch("output y = x[:, :, 0:9]"), 3, 22, "slice 0:9 does not fit a dimension of size d = 4",
     "0 <= start <= stop <= size"),
    ("static-division-by-zero", arch("k = d // 0\noutput y = x"), 3, 7, "division by zero", None),
    ("division-by-zero-at-defaults", arch("k = d // (d - 4)\noutput y = x"), 3, 7,
     "division by zero: the divisor d - 4 is 0", "parameter defaults"),
    ("division-by-zero-in-param-default", arch("output y = x * r", "d: int = 4, r: float = 1 / (d - 4)"), 1, 31, "division by zero: the divisor d - 4 is 0", "parameter defaults"),
    ("division-by-zero-at-a-loop-step", arch("repeat r in n {\n  x = x[:, :, d % (n - 1 - r)]\n}\noutput y = x",
                                             "d: int = 4, n: int = 3"), 4, 17,
     "division by zero: the divisor n - r - 1 is 0", "every loop step"),
    ("sqrt-of-negative-default", arch("output y = x * r", "d: int = 4, r: float = sqrt(d - 5)"), 1, 31, "this value is not a real number (sqrt(d - 5)", None),
    ("log-of-zero-default", arch("output y = x * r", "d: int = 4, r: float = log(d - 4)"), 1, 31, "this value is infinite", None),
    ("reshape-element-count", arch("output y = reshape(x, [B, T, 3])"), 3, 25,
     "cannot reshape f32[B, T, d] to [B, T, 3]: B*T*d elements vs 3*B*T", "element counts must match"),
    ("negative-dimension", arch("output y = zeros([B, -1])"), 3, 20, "shape has a negative dimension -1",
     "does not infer a dimension from -1"),
    ("broadcast-to-fewer-dims", arch("output y = broadcast(x, [B, d])"), 3, 27,
     "cannot broadcast f32[B, T, d] to [B, d]: the target has fewer dimensions", "reshape"),
    ("topk-mask-k-too-large", arch("output y = topk_mask(x, 9)"), 3, 27,
     "k = 9 is out of range for an axis of size d = 4", None),
    ("float-default-for-int-param", "arch A(d: int = 2.5) {\n  input x: f32[B, T, d]\n  output y = x\n}\n",
     1, 17, "`d` is an int but got a float value 2.5", "declare it `float`"),
    ("arch-param-missing-default", "arch A(d: int) {\n  input x: f32[B, T, d]\n  output y = x\n}\n",
     1, 8, "architecture parameter `d` needs a default value", "write `d: int = ...`"),
    ("unknown-param-type", "arch A(d: str = 4) {\n  input x: f32[B, T, d]\n  output y = x\n}\n",
     1, 8, "unknown parameter type `str`", "`int`, `float` or `bool`"),
    # -- loops and regions -----------------------------------------------------------------------------
    ("repeat-count-zero", arch("repeat i in 0 {\n  x = x + 1\n}\noutput y = x"), 3, 15,
     "the repeat count must be at least 1, got 0", None),
    ("repeat-count-negative-param", arch("repeat i in n - 5 {\n  x = x + 1\n}\noutput y = x", "d: int = 4, n: int = 3"),
     3, 15, "the repeat count must be at least 1, got n - 5 = -2", None),
    ("grad-last-exceeds-count", arch("repeat i in 2 grad last 3 {\n  x = x + 1\n}\noutput y = x"), 3, 27,
     "`grad last 3` exceeds the repeat count 2", None),
    ("grad-last-with-halt", arch("q = zeros([B, 2])\nrepeat i in 4 grad last 1 halt when q[:, 0] > q[:, 1] {\n"
                                 "  x = x + 1\n}\noutput y = x"), 4, 27, "cannot be combined", "inner repeat"),
    ("halt-condition-wrong-shape", arch("repeat i in 2 halt when x > 0 {\n  x = x + 1\n}\noutput y = x"), 3, 27,
     "`halt when` needs one bool per sample (bool[B]), got bool[B, T, d]", "q[:, 0] > q[:, 1]"),
    ("loop-variable-shadows", arch("repeat d in 2 {\n  x = x + 1\n}\noutput y = x"), 3, 3,
     "loop variable `d` shadows an existing name", None),
    ("compile-time-value-reassigned-in-loop", arch("k = 2\nrepeat i in 2 {\n  k = k + 1\n}\noutput y = x"), 5, 5,
     "`k` is a compile-time value and cannot be reassigned in a loop body", None),
    ("value-defined-inside-loop", arch("repeat i in 2 {\n  h = x + 1\n}\noutput y = h"), 6, 14,
     "unknown name `h`", "defined inside a loop body at line 4; assign it before the loop"),
    ("route-updates-outer-value",
     arch("s = x[:, :, 0]\nz = x\nroute x by topk(s, capacity = 0.5) {\n  z = x * 2\n  x = z\n}\noutput y = x"),
     6, 5, "only `x` may be updated inside `route x`; `z` is an outer value", "compute it after the route"),
    ("route-capacity-zero", arch("s = x[:, :, 0]\nroute x by topk(s, capacity = 0) {\n  x = x * 2\n}\noutput y = x"),
     4, 33, "capacity must be in (0, 1], got 0", "fraction of tokens"),
    ("route-capacity-above-one",
     arch("s = x[:, :, 0]\nroute x by topk(s, capacity = 1.5) {\n  x = x * 2\n}\noutput y = x"),
     4, 33, "capacity must be in (0, 1], got 1.5", "fraction of tokens"),
    ("route-capacity-schedule-reaches-zero",
     arch("s = x[:, :, 0]\nrepeat r in n + 1 {\n  route x by topk(s, capacity = (n - r) / n) {\n    x = x * 2\n  }\n}\n"
          "output y = x", "d: int = 4, n: int = 3"),
     5, 35, "capacity must be in (0, 1], got (n - r)/n = 0", "fraction of tokens"),
    ("memory-write-inside-route",
     arch("memory m = Bank(slots = 2, shape = [d])\ns = x[:, :, 0]\nroute x by topk(s, capacity = 0.5) {\n"
          "  m.push(x[:, 0])\n}\noutput y = x"),
     6, 5, "`m.push` changes memory state and is not allowed inside a route", None),
    ("yield-outside-scan", arch("yield x\noutput y = x"), 3, 3, "`yield` is only allowed as the last statement", None),
    ("scan-without-yield", arch("y = scan s in segments(x, 2) {\n  z = s\n}\noutput o = y"), 3, 3,
     "a scan body must end with `yield`", None),
    # -- layer arrays ----------------------------------------------------------------------------------
    ("layer-array-without-index",
     arch("layer core[n] = Linear(d, d)\nrepeat i in n {\n  x = core(x)\n}\noutput y = x", "d: int = 4, n: int = 3"),
     5, 9, "layer array `core` needs an index here", "`share core as cycle`"),
    ("layer-array-index-out-of-range-in-loop",
     arch("layer core[n] = Linear(d, d)\nrepeat i in n + 1 {\n  x = core[i](x)\n}\noutput y = x", "d: int = 4, n: int = 3"),
     5, 14, "index 3 is out of range for layer array `core` of 3 copies", None),
    ("layer-array-index-out-of-range", arch("layer core[n] = Linear(d, d)\noutput y = core[3](x)", "d: int = 4, n: int = 3"),
     4, 19, "index 3 is out of range for layer array `core` of 3 copies", None),
    ("index-single-layer", arch("layer p = Linear(d, d)\noutput y = p[0](x)"), 4, 14,
     "layer `p` is not an array; it cannot be indexed", "layer p[k] = ..."),
    ("share-single-layer", arch("layer p = Linear(d, d)\nrepeat i in 2 share p as cycle {\n  x = p(x)\n}\noutput y = x"),
     4, 17, "`p` is a single layer", "layer p[k] = ..."),
    ("unknown-share-strategy",
     arch("layer p[2] = Linear(d, d)\nrepeat i in 2 share p as random {\n  x = p(x)\n}\noutput y = x"),
     4, 17, "unknown sharing strategy `random`", "cycle"),
    # -- divisibility, einsum, require ----------------------------------------------------------------
    ("heads-do-not-divide-width", arch("layer attn = Attention(d, 4)\noutput y = attn(x)", "d: int = 6"), 3, 29,
     "the model width d (d = 6) is not divisible by heads (4)", None),
    ("split-heads-divisibility", arch("output y = split_heads(x, 3)"), 3, 29,
     "the last dimension (d = 4) is not divisible by heads (3)", None),
    ("einsum-malformed", arch("output y = einsum(\"btd,bsd->bts->x\", x, x)"), 3, 21,
     "malformed einsum equation 'btd,bsd->bts->x'", "bhtd,bhsd->bhts"),
    ("einsum-not-a-string", arch("output y = einsum(x, x)"), 3, 21, "the einsum equation must be a string", None),
    ("require-fails-with-message", arch("require d % 8 == 0, \"d must be a multiple of 8\"\noutput y = x"), 3, 11,
     "d must be a multiple of 8", None),
    ("require-fails-without-message", arch("require d > 8\noutput y = x"), 3, 11, "requirement failed", None),
    ("require-undecidable", arch("require T > 2\noutput y = x"), 3, 11, "cannot be decided at compile time",
     "checked once"),
    # -- policies ---------------------------------------------------------------------------------------
    ("kv-share-different-head-size",
     arch("layer a = Att(d, 4)\nlayer b = Att(d, 8)\noutput y = b(a(x))\ncache share_kv(b.attn, source = a.attn)",
          "d: int = 64", before=BLOCK_ATT),
     11, 3, "KV sharing between layers of different head size: `b.attn` has head size d/8 = 8, `a.attn` has d/4 = 16",
     "same shape"),
    ("kv-share-with-itself",
     arch("layer a = Att(d, 4)\noutput y = a(x)\ncache share_kv(a.attn, source = a.attn)", "d: int = 64", before=BLOCK_ATT),
     10, 3, "`a.attn` cannot share KV with itself", None),
    ("policy-target-not-attention", arch("layer p = Linear(d, d)\noutput y = p(x)\ncache share_kv(p, across = \"recursion\")"),
     5, 18, "`p` is not an attention layer of this architecture", "no Attention layer"),
    ("unknown-policy", arch("layer attn = Attention(d, 2)\noutput y = attn(x)\ncache share_everything(attn)"), 5, 3,
     "unknown caching policy `share_everything`", "policies: share_kv"),
    ("policy-unknown-option", arch("layer attn = Attention(d, 2)\noutput y = attn(x)\n"
                                   "cache prune_key_channels(attn, ratoi = 0.5)"), 5, 34,
     "`prune_key_channels` has no option `ratoi`", "options: ratio"),
    ("policy-ratio-out-of-range", arch("layer attn = Attention(d, 2)\noutput y = attn(x)\n"
                                       "cache prune_key_channels(attn, ratio = 1.5)"), 5, 42,
     "ratio must be in [0, 1), got 1.5", None),
    # -- structure --------------------------------------------------------------------------------------
    ("cyclic-blocks", src("""
        block P(d: int) {
          input x: f32[B, T, d]
          layer q = Q(d)
          return q(x)
        }
        block Q(d: int) {
          input x: f32[B, T, d]
          layer p = P(d)
          return p(x)
        }
        """) + arch("output y = x"), 8, 13, "cyclic block reference: P -> Q -> P", "cannot contain itself"),
    ("self-containing-block", src("""
        block P(d: int) {
          input x: f32[B, T, d]
          layer q = P(d)
          return q(x)
        }
        """) + arch("output y = x"), 3, 13, "cyclic block reference: P -> P", "use `repeat`"),
    ("arch-defined-twice", arch("output y = x") + arch("output y = x"), 5, 6, "`A` is defined twice", "its own name"),
    ("block-and-arch-same-name", src("""
        block A(d: int) {
          input x: f32[B, T, d]
          return x
        }
        """) + arch("output y = x"), 5, 6, "`A` is defined twice", "its own name"),
    ("redefine-builtin-layer", "block Linear(d: int) {\n  input x: f32[B, T, d]\n  return x\n}\n" + arch("output y = x"),
     1, 7, "`Linear` is a built-in layer and cannot be redefined", None),
    ("layer-declared-twice", arch("layer p = Linear(d, d)\nlayer p = Linear(d, d)\noutput y = p(x)"), 4, 3,
     "`p` is already defined", "declared once"),
    ("parameter-declared-twice", "arch A(d: int = 4, d: int = 5) {\n  input x: f32[B, T, d]\n  output y = x\n}\n",
     1, 20, "parameter `d` is declared twice", None),
    ("param-tensor-declared-twice", arch("param w: f32[d] = zeros()\nparam w: f32[d] = zeros()\noutput y = x"), 4, 3,
     "`w` is already defined", "declared once"),
    ("input-declared-twice", arch("input x: f32[B, d]\noutput y = x"), 3, 3, "`x` is already defined", None),
    ("output-declared-twice", arch("output y = x\noutput y = x"), 4, 3, "output `y` is declared twice", None),
    ("return-in-arch", arch("return x"), 3, 3, "`return` is only allowed in a block", "`output name = ...`"),
    ("output-in-block", src("""
        block L(d: int) {
          input x: f32[B, T, d]
          output y = x
        }
        """) + arch("layer b = L(d)\noutput y = b(x)"), 3, 3, "`output` is only allowed at the top level of an arch",
     None),
    ("block-without-return", src("""
        block L(d: int) {
          input x: f32[B, T, d]
          y = x
        }
        """) + arch("layer b = L(d)\noutput y = b(x)"), 1, 7, "block `L` has no `return`", "end the block with"),
    ("statement-after-return", src("""
        block L(d: int) {
          input x: f32[B, T, d]
          return x
          y = x
        }
        """) + arch("layer b = L(d)\noutput y = b(x)"), 4, 3, "statement after `return`", None),
    ("arch-without-output", arch("y = x"), 1, 6, "architecture `A` has no `output`", "output logits = ..."),
    ("no-arch-in-file", BLOCK_L, 1, 1, "no `arch` definition in this file", "arch Name(d: int = 64)"),
    ("expression-without-effect", arch("x + 1\noutput y = x"), 3, 5, "unexpected '+'", None),
    ("call-without-effect", arch("sigmoid(x)\noutput y = x"), 3, 3, "this expression has no effect", "assign it"),
    ("layer-reassigned", arch("layer p = Linear(d, d)\np = x\noutput y = x"), 4, 3,
     "`p` is a layer and cannot be reassigned", None),
    ("tuple-arity-mismatch", arch("a, b = x\noutput y = x"), 3, 3,
     "2 names on the left but the right side gives 1 value(s)", None),
    # found by the front-end fuzzer: an IndexError escaped as an internal error
    ("split-heads-of-a-scalar", arch("s = zeros([])\ny = split_heads(s, 2)\noutput o = x"), 4, 19,
     "split_heads splits the last dimension, but its argument is a scalar", "f32[B, T, d]"),
    ("merge-heads-of-a-vector", arch("s = zeros([4])\ny = merge_heads(s)\noutput o = x"), 4, 19,
     "merge_heads merges the last two dimensions, but its argument has rank 1", "f32[B, T, H, Dh]"),
    # found by the front-end fuzzer (seed 3000 campaign): an AttributeError escaped as an internal error
    ("loop-carry-becomes-static", arch("y = x\nrepeat i in 3 {\n  y = i\n}\noutput o = y"), 4, 3,
     "`y` is a tensor carried by this loop (f32[B, T, d]), but the loop body makes it a compile-time value",
     "full(shape, value)"),
    ("integer-too-large", arch("k = 99999999999999999999\noutput y = x"), 3, 7, "is too large", "62 bits"),
    # found by the front-end fuzzer (seed 5000 campaign): a TypeError, an AttributeError and a codegen
    # ValueError escaped as internal errors
    ("bool-dimension-in-a-block-input", src("""
        block Q(d: int) {
          input q: f32[N, true, d]
          return q
        }
        """) + arch("layer b = Q(d)\noutput y = b(x)"), 2, 19, "a dimension must be an integer, got", None),
    ("loop-carry-becomes-a-list", arch("y = x\nrepeat i in 3 {\n  y = [[y]]\n}\noutput o = y"), 4, 3,
     "`y` is a tensor carried by this loop (f32[B, T, d]), but the loop body makes it a list", "full(shape, value)"),
    ("memory-with-too-many-layers", arch("memory m = NeuralMemory(d, layers = 268435456)\noutput y = m.read(x)"), 3, 39,
     "at most 64 are supported", "1-4 layers"),
    ("float-literal-overflows", arch("output y = x * float(x > 9e999)"), 3, 28, "overflows to infinity", "finite"),
]

assert len({c[0] for c in CASES}) == len(CASES), "case ids must be distinct"


@pytest.mark.parametrize("source,line,col,message,hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diagnostic(source, line, col, message, hint):
    err = diagnose(source)
    assert err.span is not None, err.render()
    assert (err.span.line, err.span.column) == (line, col), err.render()
    assert message in err.message, err.render()
    if hint is None:
        return
    assert err.hint is not None and hint in err.hint, err.render()


@pytest.mark.parametrize("source,line,col", [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_rendered_shape(source, line, col):
    """header `file:line:col: error: msg`, the source line, carets under the span, an optional hint."""
    err = diagnose(source)
    lines = err.render().split("\n")
    assert lines[0] == f"{FILE}:{line}:{col}: error: {err.message}"
    if "\n" in err.message:          # verifier messages carry an `in:` line; none of these cases do
        pytest.fail(err.render())
    text = source.splitlines()[line - 1].expandtabs(1) if line <= len(source.splitlines()) else None
    if not text:                      # nothing to show under the header (an empty line or no line)
        assert len(lines) == 1 + (err.hint is not None)
        return
    assert 3 <= len(lines) <= 4, err.render()
    assert lines[1] == "  " + (text if len(text) <= 200 else lines[1][2:])
    m = re.fullmatch(r"  ( *)(\^+)", lines[2])
    assert m, err.render()
    shown = lines[1][2:]
    start, width = len(m.group(1)), len(m.group(2))
    assert start + width <= max(len(shown), start + 1), err.render()
    if len(text) <= 200:
        assert start == col - 1, err.render()
        span = err.span
        if span.end_line == span.line:
            assert width == max(min(span.end_column - span.column, len(text) - start), 1), err.render()
    if err.hint is None:
        assert len(lines) == 3
    else:
        assert lines[3] == f"  hint: {err.hint}"


def test_long_line_keeps_the_caret_under_the_column():
    """A 400-character line is shown as a window around the error; the carets stay under the name."""
    source = arch("y = x" + " + x" * 100 + " + zz\noutput o = y")
    err = diagnose(source)
    assert (err.span.line, err.span.column) == (3, 411)
    _header, shown, carets, *_ = err.render().split("\n")
    assert len(shown) <= 2 + 4 + 200 + 4
    i = carets.index("^")
    assert shown[i:i + 2] == "zz" and carets[i:] == "^^"


def test_tabs_and_crlf_keep_columns():
    source = "arch A(d: int = 4) {\r\n\tinput x: f32[B, T, d]\r\n\toutput y = xx\r\n}\r\n"
    err = diagnose(source)
    assert (err.span.line, err.span.column) == (3, 13)
    _, shown, carets, _hint = err.render().split("\n")
    assert carets.index("^") == shown.index("xx")
