"""Grammar-aware mutations of .arch sources, and hostile inputs built from scratch.

Every mutator takes the current text and a `random.Random` (or hypothesis' `st.randoms()`) and
returns new text (or bytes). They know the language through its own Lark grammar:

* token level (the Lark lexer of `dsl/arch.lark`): delete, duplicate or swap tokens; replace a
  token by another of the same terminal (a name by a name, a number by a number) or by any
  keyword or punctuation of the grammar;
* tree level (the Lark parse tree): splice a subtree of one seed file into another in place of a
  subtree of the same category (expression, statement, body, argument list, ...), or wrap an
  expression in deep nesting (parentheses, unary minus, calls, lists);
* line level: delete, duplicate, swap lines; truncate the text;
* values: numeric extremes (0, -1, 2**62, 2**63, 10**40, 1e308, 1e309, ...), hostile strings
  (bad JSON escapes, lone surrogates, quotes, very long), unicode identifiers and characters;
* bytes: invalid UTF-8, NUL, a BOM, CR-only and CRLF line ends, random bytes.

`generate_input(rng, seeds)` picks a seed and stacks 1-4 mutations, or (sometimes) builds a
hostile input from scratch.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Tree

Text = str | bytes

# -- the grammar's own lexer and parser ---------------------------------------------------------------


@lru_cache(maxsize=1)
def _lark() -> Lark:
    from archc.dsl.parse import _PostLex, _grammar
    return Lark(_grammar(), parser="lalr", lexer="contextual", propagate_positions=True,
                postlex=_PostLex("<mutate>"), maybe_placeholders=True, start="start")


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Every keyword and punctuation string of the grammar."""
    out = []
    for t in _lark().terminals:
        if t.pattern.type == "str":
            out.append(t.pattern.value)
    return tuple(sorted(set(out)))


_FALLBACK = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z_][A-Za-z_0-9]*|\d+\.\d*(?:[eE][+-]?\d+)?'
                       r'|\.\d+|\d+|\*\*|//|==|!=|<=|>=|\r?\n[\t ]*|[ \t\f]+|\S')


def tokens(text: str) -> list[tuple[str, int, int]]:
    """(terminal, start, end) for every token, comments and whitespace included."""
    try:
        out = []
        for tok in _lark().lex(text, dont_ignore=True):
            out.append((tok.type, tok.start_pos, tok.end_pos))
        return out
    except Exception:  # noqa: BLE001 - mutated text need not lex; fall back to a regex of the same terminals
        return [(_kind(m.group()), m.start(), m.end()) for m in _FALLBACK.finditer(text)]


def _kind(s: str) -> str:
    if s.startswith('"'):
        return "STRING"
    if s.startswith("#"):
        return "COMMENT"
    if s[0].isalpha() or s[0] == "_":
        return "NAME"
    if s[0].isdigit() or (s[0] == "." and len(s) > 1):
        return "FLOAT" if any(c in s for c in ".eE") else "INT"
    if s[0] in "\r\n":
        return "_NL"
    if s.isspace():
        return "WS"
    return "PUNCT"


_EXPR = {"add", "sub", "mul", "div", "floordiv", "mod", "matmul", "pow", "neg", "not_", "or_", "and_",
         "compare", "call", "index", "attr", "int_lit", "float_lit", "true_lit", "false_lit", "str_lit",
         "name", "list_lit"}


def _category(rule: str) -> str:
    if rule in _EXPR:
        return "expr"
    if rule.endswith("_stmt") or rule in ("arch_def", "block_def"):
        return "stmt" if rule.endswith("_stmt") else "definition"
    return rule


@lru_cache(maxsize=256)
def subtrees(text: str) -> tuple[tuple[str, int, int], ...]:
    """(category, start, end) of every subtree of a parseable text; () when it does not parse."""
    try:
        tree = _lark().parse(text + "\n")
    except Exception:  # noqa: BLE001
        return ()
    out = []
    stack = [tree]
    while stack:
        t = stack.pop()
        if not isinstance(t, Tree):
            continue
        m = t.meta
        if not getattr(m, "empty", True) and m.end_pos <= len(text):
            out.append((_category(str(t.data)), m.start_pos, m.end_pos))
        stack.extend(c for c in t.children if isinstance(c, Tree))
    return tuple(sorted(set(out)))


# -- value pools -----------------------------------------------------------------------------------

NUMBERS = ("0", "1", "2", "3", "7", "64", "0.0", "0.5", "1.5", "1e-3", "1e-320", "1e308", "1e309", "9e999",
           str(2 ** 31), str(2 ** 62), str(2 ** 62 + 1), str(2 ** 63), str(2 ** 64), "1" + "0" * 40,
           "9" * 400, "1" + "0" * 4400, "0" * 30 + "1", "1.", ".5", "2.5E+4", "1e-99999")
STRINGS = ('""', '"\\q"', '"\\u0000"', '"\\ud800"', '"\\udfff\\ud800"', '"a\\"b"', '"\\"\\"\\""', "\"'''\"",
           '"\\\\"', '"' + "x" * 5000 + '"', '"é变\u200b"', '"bnd,btd->btn"', '"ab,bc->ac"', '"a->"',
           '"aa,a->a"', '"->"', '"ab->ba"', '"abc,abd->abcd"', '"f32"', '"i64"', '"bool"', '"recursion"',
           '"gelu"', '"zeros"', '"\\u202e"', '"\\n"', '"__import__(\\"os\\")"', '"{}"', '"%s"')
UNICODE_NAMES = ("é", "变量", "x\u200b", "ｄ", "𝑥", "Ω", "dé", "a\u0301", "\u00a0", "\ufeffx", "x\u202e")
HOSTILE_NAMES = ("class", "def", "lambda", "import", "None", "True", "False", "self", "torch", "nn", "F", "math",
                 "super", "__init__", "__class__", "__dict__", "forward", "training", "state_dict", "_modules",
                 "__builtins__", "exec", "eval", "print", "open", "globals", "_param", "_Scope", "attention",
                 "kv", "dev", "grad", "B", "T", "d", "x_1", "v_1", "_", "__", "global", "nonlocal", "async",
                 "await", "pass", "del", "is", "with", "yield_", "int", "float", "bool", "f32", "i64", "sum")
CHARS = tuple("(){}[]=,.:+-*/\"'#0129xdTB@%!;\\$?`~^&|<>\t\n ") + ("é", "\u200b", "\r", "\f", "\v", "\x1b",
                                                                       "\u2028", "\x85", "\ufeff")


def _token_spans(text: str, kinds: tuple[str, ...] | None = None) -> list[tuple[str, int, int]]:
    toks = [t for t in tokens(text) if not t[0].startswith("__IGNORE") and t[0] != "WS"]
    if kinds is not None:
        toks = [t for t in toks if t[0] in kinds]
    return toks


def _replace(text: str, a: int, b: int, new: str) -> str:
    return text[:a] + new + text[b:]


# -- mutators: (text, rng, seeds) -> text --------------------------------------------------------------

def del_token(text, rng, seeds):
    toks = _token_spans(text)
    if not toks:
        return text
    _, a, b = rng.choice(toks)
    return _replace(text, a, b, "")


def dup_token(text, rng, seeds):
    toks = _token_spans(text)
    if not toks:
        return text
    _, a, b = rng.choice(toks)
    return text[:b] + " " + text[a:b] + text[b:]


def swap_tokens(text, rng, seeds):
    toks = _token_spans(text)
    if len(toks) < 2:
        return text
    (_, a, b), (_, c, d) = sorted(rng.sample(toks, 2), key=lambda t: t[1])
    return text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]


def same_kind_token(text, rng, seeds):
    """A token replaced by another token of the same terminal from any seed (a name by a name, ...)."""
    toks = _token_spans(text)
    if not toks:
        return text
    kind, a, b = rng.choice(toks)
    donor = rng.choice(seeds)
    pool = [donor[s:e] for k, s, e in _token_spans(donor) if k == kind]
    return _replace(text, a, b, rng.choice(pool)) if pool else text


def grammar_token(text, rng, seeds):
    """A keyword or punctuation of the grammar inserted or put in place of a token."""
    toks = _token_spans(text)
    word = rng.choice(_vocabulary())
    if not toks:
        return word
    _, a, b = rng.choice(toks)
    if rng.random() < 0.5:
        return _replace(text, a, b, word)
    return text[:a] + word + " " + text[a:]


def number(text, rng, seeds):
    toks = _token_spans(text, ("INT", "FLOAT"))
    if not toks:
        return text
    _, a, b = rng.choice(toks)
    new = rng.choice(NUMBERS)
    if rng.random() < 0.2:
        new = "-" + new
    return _replace(text, a, b, new)


def string(text, rng, seeds):
    toks = _token_spans(text, ("STRING",))
    new = rng.choice(STRINGS)
    if not toks:
        return insert_char(text, rng, seeds) if rng.random() < 0.5 else text.replace("(", "(" + new + ", ", 1)
    _, a, b = rng.choice(toks)
    return _replace(text, a, b, new)


def unicode_name(text, rng, seeds):
    toks = _token_spans(text, ("NAME",))
    if not toks:
        return text
    _, a, b = rng.choice(toks)
    u = rng.choice(UNICODE_NAMES)
    new = rng.choice([u, text[a:b] + u, u + text[a:b]])
    return _replace(text, a, b, new)


def hostile_name(text, rng, seeds):
    """Every occurrence of one name replaced by a Python keyword, builtin or generated-code name."""
    toks = _token_spans(text, ("NAME",))
    if not toks:
        return text
    _, a, b = rng.choice(toks)
    old = text[a:b]
    return re.sub(rf"(?<![A-Za-z_0-9]){re.escape(old)}(?![A-Za-z_0-9])", rng.choice(HOSTILE_NAMES), text)


def insert_char(text, rng, seeds):
    i = rng.randint(0, len(text))
    return text[:i] + rng.choice(CHARS) + text[i:]


def _lines(text):
    return text.split("\n")


def del_line(text, rng, seeds):
    lines = _lines(text)
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def dup_line(text, rng, seeds):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines.insert(rng.randint(0, len(lines)), lines[i])
    return "\n".join(lines)


def swap_lines(text, rng, seeds):
    lines = _lines(text)
    if len(lines) < 2:
        return text
    i, j = rng.sample(range(len(lines)), 2)
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def truncate(text, rng, seeds):
    if rng.random() < 0.5:
        toks = _token_spans(text)
        if toks:
            return text[:rng.choice(toks)[2]]
    return text[:rng.randint(0, len(text))]


def splice(text, rng, seeds):
    """A subtree replaced by a subtree of the same category from any seed (else of any category)."""
    here = subtrees(text)
    if not here:
        return del_line(text, rng, seeds)
    cat, a, b = rng.choice(here)
    donor = rng.choice(seeds)
    there = subtrees(donor)
    same = [t for t in there if t[0] == cat]
    pool = same if same and rng.random() < 0.9 else list(there)
    if not pool:
        return text
    _, c, d = rng.choice(pool)
    return _replace(text, a, b, donor[c:d])


def nest(text, rng, seeds):
    """An expression wrapped in deep nesting: near the 64 limit, or far beyond it."""
    exprs = [t for t in subtrees(text) if t[0] == "expr"]
    depth = rng.choice([2, 63, 64, 65, 200, 3000])
    if not exprs:
        return text
    _, a, b = rng.choice(exprs)
    inner = text[a:b]
    style = rng.choice(["parens", "minus", "not", "relu", "list", "index", "power"])
    if style == "parens":
        new = "(" * depth + inner + ")" * depth
    elif style == "minus":
        new = "-" * depth + inner
    elif style == "not":
        new = "not " * depth + inner
    elif style == "relu":
        new = "relu(" * depth + inner + ")" * depth
    elif style == "list":
        new = "[" * depth + inner + "]" * depth
    elif style == "index":
        new = inner + "[0]" * depth
    else:
        new = inner + " ** 2" * depth
    return _replace(text, a, b, new)


def raw_bytes(text, rng, seeds) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    choice = rng.randrange(6)
    if choice == 0:
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        i = rng.randint(0, len(data))
        return data[:i] + junk + data[i:]
    if choice == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
    if choice == 2:
        return b"\xef\xbb\xbf" + data               # a UTF-8 byte-order mark
    if choice == 3:
        return data.replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\r"]))
    if choice == 4:
        i = rng.randint(0, len(data))
        return data[:i] + rng.choice([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]) + data[i:]
    return data[:rng.randint(0, len(data))] + b"\xe2\x82"   # cut inside a multi-byte character


MUTATORS = (del_token, dup_token, swap_tokens, same_kind_token, grammar_token, number, string, unicode_name,
            hostile_name, insert_char, del_line, dup_line, swap_lines, truncate, splice, splice, splice, nest)


# -- hostile inputs from scratch -------------------------------------------------------------------------

def _wrap(body: str) -> str:
    return "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n" + body + "  output y = x\n}\n"


def deep_input(rng) -> str:
    """Deep or long structures written from scratch."""
    n = rng.choice([10, 63, 64, 65, 100, 500])
    kind = rng.choice(["repeats", "blocks", "routes", "scans", "long-sum", "many-stmts", "many-layers",
                       "block-chain-calls", "wide-args"])
    if kind == "repeats":
        body = "x = x + 1\n"
        for i in range(n):
            body = f"repeat i{i} in 2 {{\n{body}}}\n"
        return _wrap(body)
    if kind == "routes":
        body = "x = x * 2\n"
        for _ in range(n):
            body = f"route x by where(sum(x, axis = -1) > 0) {{\n{body}}}\n"
        return _wrap(body)
    if kind == "scans":
        body = "yield s\n"
        for i in range(min(n, 80)):
            body = f"x = scan s in segments(x, 1) {{\n{body}}}\nyield x\n" if i else body
        return _wrap(f"x = scan s in segments(x, 1) {{\n{body}}}\n")
    if kind == "blocks":
        defs = [f"block K{i}(d: int) {{\n  input x: f32[B, T, d]\n  layer inner = K{i + 1}(d)\n  return inner(x)\n}}\n"
                for i in range(n)]
        defs.append(f"block K{n}(d: int) {{\n  input x: f32[B, T, d]\n  return x + 1\n}}\n")
        return "".join(defs) + _wrap("  layer top = K0(d)\n  x = top(x)\n")
    if kind == "block-chain-calls":
        defs = [f"block K{i}(d: int) {{\n  input x: f32[B, T, d]\n  layer a = K{i + 1}(d)\n  layer b = K{i + 1}(d)\n"
                f"  return a(x) + b(x)\n}}\n" for i in range(min(n, 24))]
        m = min(n, 24)
        defs.append(f"block K{m}(d: int) {{\n  input x: f32[B, T, d]\n  return x * 2\n}}\n")
        return "".join(defs) + _wrap("  layer top = K0(d)\n  x = top(x)\n")
    if kind == "long-sum":
        return _wrap("  y = x" + " + x" * (n * 20) + "\n  x = y\n")
    if kind == "many-stmts":
        return _wrap("".join(f"  x = x + {i}\n" for i in range(n * 20)))
    if kind == "many-layers":
        return _wrap("".join(f"  layer l{i} = Linear(d, d)\n  x = l{i}(x)\n" for i in range(n * 4)))
    args = ", ".join("d" for _ in range(n * 10))
    return _wrap(f"  layer l = Linear({args})\n  x = l(x)\n")


def seed_sources(root: Path | None = None) -> list[str]:
    """The stdlib and example programs, and the hostile test file: the seeds of mutation."""
    import archc.stdlib
    stdlib = Path(archc.stdlib.__file__).parent
    if root is None:     # the source tree (an editable install), else the current directory
        root = next((r for r in (stdlib.parent, Path.cwd()) if (r / "examples").is_dir()), stdlib.parent)
    paths = sorted(stdlib.glob("*.arch"))
    for extra in ("examples", "tests/data", "tests/regressions"):
        paths += sorted((root / extra).glob("*.arch"))
    return [p.read_text(encoding="utf-8") for p in paths]


def generate_input(rng: random.Random, seeds: list[str]) -> Text:
    """One fuzz input: a mutated seed (1-4 stacked mutations), raw bytes, or a deep structure."""
    r = rng.random()
    if r < 0.05:
        return deep_input(rng)
    text = rng.choice(seeds)
    for _ in range(rng.randint(1, 4)):
        text = rng.choice(MUTATORS)(text, rng, seeds)
    if r > 0.93:
        return raw_bytes(text, rng, seeds)
    return text


__all__ = ["MUTATORS", "deep_input", "generate_input", "raw_bytes", "seed_sources", "subtrees", "tokens"]
