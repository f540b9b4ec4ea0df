"""Source text -> AST. Lark (LALR) builds the tree; `ToAst` maps each rule onto an AST class.

No semantic checks happen here: names, types and shapes are the lowering's job.
"""
from __future__ import annotations

import json
import math
import threading
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from archc.dsl import ast as A
from archc.errors import ArchError, Span

MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_NESTING = 64


class _PostLex:
    """Drops newlines inside (...) and [...], merges runs of newlines, and bounds nesting."""

    always_accept = ("_NL",)

    def __init__(self, file: str):
        self.file = file
        self.open: list[Token] = []     # the brackets open at the current token (for diagnostics)

    def process(self, stream):
        depth = 0
        last_nl = True
        self.open = []
        signs = 0                       # consecutive `-` / `not` (each nests the expression one level)
        for tok in stream:
            signs = signs + 1 if tok.type in ("MINUS", "NOT") else 0
            if signs > MAX_NESTING:
                raise ArchError(f"more than {MAX_NESTING} `-` or `not` in a row", _tok_span(self.file, tok),
                                hint="simplify the expression: `- -x` is `x`")
            if tok.type == "_NL":
                if depth > 0 or last_nl:
                    continue
                last_nl = True
                yield tok
                continue
            if tok.type in ("LPAR", "LSQB", "LBRACE"):
                if tok.type != "LBRACE":
                    depth += 1
                    self.open.append(tok)
                if depth > MAX_NESTING:
                    raise ArchError(f"brackets nested more than {MAX_NESTING} deep", _tok_span(self.file, tok),
                                    hint="split the expression into several assignments")
            elif tok.type in ("RPAR", "RSQB") and depth > 0:
                depth -= 1
                self.open.pop()
            last_nl = False
            yield tok


def _tok_span(file: str, tok: Token) -> Span:
    line = tok.line or 1
    col = tok.column or 1
    end_line = tok.end_line or line
    end_col = tok.end_column or col + max(len(str(tok)), 1)
    return Span(file, line, col, end_line, end_col)


@lru_cache(maxsize=None)
def _grammar() -> str:
    return resources.files("archc.dsl").joinpath("arch.lark").read_text()


@lru_cache(maxsize=None)
def _parser() -> Lark:
    """The one LALR parser of the process: building its tables takes ~0.2 s, a parse a few ms.

    Its post-lexer is told each file's name before the parse (for its diagnostics) and resets its
    state per parse; `_PARSE_LOCK` keeps concurrent parses from sharing it.
    """
    return Lark(_grammar(), parser="lalr", lexer="contextual", propagate_positions=True,
                postlex=_PostLex("<string>"), maybe_placeholders=True, start="start")


_PARSE_LOCK = threading.Lock()


_TOKEN_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "DOT": "'.'", "_NL": "a newline", "NAME": "a name",
    "INT": "an integer", "FLOAT": "a number", "STRING": "a string", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "COMP_OP": "a comparison", "$END": "the end of the file",
}


def _describe(expected) -> str:
    names = []
    for t in sorted(expected):
        if t.startswith("__ANON") or t == "$END":
            continue
        names.append(_TOKEN_NAMES.get(t, repr(t.lower()) if t.isupper() else t))
    names = sorted(set(names))
    if len(names) > 8:
        names = names[:8] + ["..."]
    return ", ".join(names)


_HINTS = [
    # (condition on the offending token text / expected set, hint)
    (lambda tok, exp: "EQUAL" in exp and tok == "(", "a layer is declared as `layer NAME = Kind(args)`"),
    (lambda tok, exp: "COLON" in exp and (tok == "=" or exp == {"COLON"}),
     "inputs and parameters need a type: `input x: f32[B, T, d]`, `d: int = 64`"),
    (lambda tok, exp: "EQUAL" in exp and exp <= {"EQUAL", "LSQB"} and tok.isidentifier(),
     "a `=` is missing: declarations read `layer NAME = Kind(args)`, `memory NAME = Kind(args)`"),
    (lambda tok, exp: tok == "{" and "LPAR" in exp, "definitions take a parameter list: `arch Name(d: int = 64) {`"),
    (lambda tok, exp: "RBRACE" in exp and tok in ("", "$END"), "a `{` is missing its closing `}`"),
    (lambda tok, exp: tok == ":" and "EQUAL" in exp, "archc has no `:` blocks; use `{ ... }`"),
]


def _accepted(e: UnexpectedInput) -> set[str] | None:
    """The terminals the parser state really accepts (the contextual lexer also lists always-accepted newlines)."""
    st = getattr(e, "state", None)
    try:
        return set(st.parse_conf.parse_table.states[st.position])
    except Exception:
        return None


def _syntax_error(e: UnexpectedInput, file: str, source: str, unclosed: list | None = None) -> ArchError:
    line = getattr(e, "line", 1) or 1
    col = getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        ch = source[e.pos_in_stream] if 0 <= e.pos_in_stream < len(source) else "?"
        span = Span(file, line, col, line, col + 1)
        hint = "strings use double quotes" if ch == "'" else None
        return ArchError(f"unexpected character {ch!r}", span, hint=hint, source=source)
    at_end = isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END")
    if unclosed and (at_end or (isinstance(e, UnexpectedToken) and e.token.type == "RBRACE")):
        # a `}` or the end of the file inside (...) or [...]: point at the bracket left open
        o = unclosed[-1]
        closer = ")" if str(o) == "(" else "]"
        where = "the end of the file" if at_end else f"`}}` at line {e.token.line}"
        return ArchError(f"`{o}` is never closed", _tok_span(file, o), source=source,
                         hint=f"reached {where} inside it; add the missing `{closer}`")
    if at_end:
        lines = source.splitlines() or [""]
        last = len(lines)
        span = Span(file, last, len(lines[-1]) + 1, last, len(lines[-1]) + 2)
        return ArchError("unexpected end of file", span, hint="a `{` may be missing its closing `}`", source=source)
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    span = _tok_span(file, tok)
    text = "newline" if tok.type == "_NL" else repr(str(tok))
    exp = set(e.expected or ())
    accepted = _accepted(e)
    if accepted is not None and exp & accepted:
        exp &= accepted
    msg = f"unexpected {text}"
    desc = _describe(exp)
    if desc:
        msg += f"; expected {desc}"
    hint = None
    for cond, h in _HINTS:
        if cond(str(tok), exp):
            hint = h
            break
    if tok.type == "_NL":
        span = Span(file, span.line, span.column, span.line, span.column + 1)
    return ArchError(msg, span, hint=hint, source=source)


def parse(source: str | bytes, file: str = "<string>") -> A.Module:
    """Parse archc source into an AST Module; raises ArchError on any malformed input."""
    if isinstance(source, bytes):
        if len(source) > MAX_SOURCE_BYTES:
            raise ArchError(f"file is {len(source)} bytes; archc reads sources up to {MAX_SOURCE_BYTES} bytes",
                            Span(file, 1, 1, 1, 2))
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as err:
            line = source[: err.start].count(b"\n") + 1
            col = err.start - (source.rfind(b"\n", 0, err.start) + 1) + 1
            raise ArchError("file is not valid UTF-8 text", Span(file, line, col, line, col + 1),
                            hint="archc sources are UTF-8 text files") from None
    if len(source) > MAX_SOURCE_BYTES:
        raise ArchError(f"source is {len(source)} characters; archc reads sources up to {MAX_SOURCE_BYTES}",
                        Span(file, 1, 1, 1, 2))
    if "\x00" in source:
        i = source.index("\x00")
        line = source.count("\n", 0, i) + 1
        col = i - (source.rfind("\n", 0, i) + 1) + 1
        raise ArchError("file contains a NUL byte", Span(file, line, col, line, col + 1), source=source,
                        hint="archc sources are UTF-8 text files")
    lark = _parser()
    with _PARSE_LOCK:
        lark.options.postlex.file = file
        try:
            tree = lark.parse(source + "\n")
        except ArchError as err:
            raise err.with_source(source) from None
        except UnexpectedInput as err:
            raise _syntax_error(err, file, source, list(lark.options.postlex.open)) from None
        except RecursionError:
            raise ArchError("program is nested too deeply", Span(file, 1, 1, 1, 2), source=source) from None
    try:
        module = ToAst(file).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, ArchError):
            raise err.orig_exc.with_source(source) from None
        if not isinstance(err.orig_exc, RecursionError):
            raise
        raise _too_deep(tree, file, source) from None
    except RecursionError:
        raise _too_deep(tree, file, source) from None
    module.source = source
    module.doc = leading_comment(source)
    return module


def _too_deep(tree, file: str, source: str) -> ArchError:
    # the recursion limit can hit in lark's walk or inside a rule method (then wrapped in VisitError)
    return ArchError("program is nested too deeply", _deepest_stmt(tree, file), source=source,
                     hint="split long expressions into several assignments")


def _deepest_stmt(tree, file: str) -> Span:
    """The statement that holds the most deeply nested part of the tree (found without recursion)."""
    best, best_span = -1, Span(file, 1, 1, 1, 2)
    stack = [(tree, 0, None)]
    while stack:
        node, depth, stmt = stack.pop()
        if not isinstance(node, Tree):
            continue
        if str(node.data).endswith("_stmt") and not getattr(node.meta, "empty", True):
            stmt = node.meta
        if depth > best and stmt is not None:
            best, best_span = depth, _span(file, stmt)
        stack.extend((c, depth + 1, stmt) for c in node.children)
    return best_span


def leading_comment(source: str) -> str:
    """The comment block that opens a file: the paper's title and what is implemented."""
    out = []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#"):
            out.append(s[1:].strip())
        elif s == "" and not out:
            continue
        else:
            break
    return "\n".join(out).strip()


def _span(file, meta) -> Span:
    if getattr(meta, "empty", True):
        return Span(file, 1, 1, 1, 2)
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _split_args(items) -> tuple[list, list]:
    args, kwargs = [], []
    for it in items or []:
        if isinstance(it, A.Kwarg):
            kwargs.append(it)
        else:
            if kwargs:
                raise ArchError("positional argument after a keyword argument", it.span,
                                hint="put positional arguments first")
            args.append(it)
    return args, kwargs


_UNESCAPE = json.JSONDecoder()


def _unescape(tok, span: Span) -> str:
    """A string literal's value (JSON escapes); a bad escape or a lone surrogate is a diagnostic."""
    try:
        value = _UNESCAPE.decode(str(tok))
        value.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as err:
        raise ArchError(f"invalid string literal: {getattr(err, 'msg', None) or err.reason}", span,
                        hint='strings use JSON escapes: \\" \\\\ \\n \\t \\uXXXX') from None
    return value


@v_args(meta=True, inline=True)
class ToAst(Transformer):
    """One method per grammar rule; each builds the AST class of the same name."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta) -> Span:
        return _span(self.file, meta)

    # definitions
    def start(self, meta, *defs):
        return A.Module(file=self.file, source="", doc="", definitions=[d for d in defs if d is not None],
                        span=self._s(meta))

    def _definition(self, cls, meta, name, params, body):
        return cls(name=str(name), params=params or [], body=body, span=self._s(meta),
                   name_span=_tok_span(self.file, name))

    def arch_def(self, meta, name, params, body):
        return self._definition(A.ArchDef, meta, name, params, body)

    def block_def(self, meta, name, params, body):
        return self._definition(A.BlockDef, meta, name, params, body)

    def param_list(self, meta, *items):
        return [i for i in items if i is not None]

    def param_decl(self, meta, name, type_, default):
        return A.ParamSpec(name=str(name), type=str(type_), default=default, span=self._s(meta))

    def body(self, meta, *stmts):
        return [s for s in stmts if s is not None]

    # statements
    def input_stmt(self, meta, name, type_):
        return A.Input(name=str(name), type=type_, span=self._s(meta))

    def type_expr(self, meta, dtype, dims):
        return A.TypeExpr(dtype=str(dtype), dims=dims or [], span=self._s(meta))

    def layer_stmt(self, meta, name, count, kind, args):
        a, k = _split_args(args)
        return A.LayerDecl(name=str(name), count=count, kind=str(kind), args=a, kwargs=k, span=self._s(meta),
                           kind_span=_tok_span(self.file, kind))

    def param_stmt(self, meta, name, type_, init, args):
        a, k = _split_args(args)
        return A.ParamDecl(name=str(name), type=type_, init=str(init) if init is not None else "normal",
                           args=a, kwargs=k, span=self._s(meta))

    def memory_stmt(self, meta, name, kind, args):
        a, k = _split_args(args)
        return A.MemoryDecl(name=str(name), kind=str(kind), args=a, kwargs=k, span=self._s(meta),
                            kind_span=_tok_span(self.file, kind))

    def assign_stmt(self, meta, targets, value):
        return A.Assign(targets=targets, value=value, span=self._s(meta))

    def scan_stmt(self, meta, targets, var, seq, size, body):
        return A.Scan(targets=targets, var=str(var), seq=seq, size=size, body=body, span=self._s(meta))

    def name_list(self, meta, *names):
        return [str(n) for n in names]

    def expr_stmt(self, meta, expr):
        return A.ExprStmt(expr=expr, span=self._s(meta))

    def output_stmt(self, meta, name, value):
        return A.Output(name=str(name), value=value, span=self._s(meta))

    def return_stmt(self, meta, values):
        return A.Return(values=values, span=self._s(meta))

    def yield_stmt(self, meta, values):
        return A.Yield(values=values, span=self._s(meta))

    def repeat_stmt(self, meta, var, count, *rest):
        *opts, body = rest
        shares = [o for o in opts if isinstance(o, A.Share)]
        grad = [o for o in opts if isinstance(o, tuple) and o[0] == "grad"]
        halt = [o for o in opts if isinstance(o, tuple) and o[0] == "halt"]
        for kind, found in (("grad last", grad), ("halt when", halt)):
            if len(found) > 1:
                raise ArchError(f"`{kind}` given twice", found[1][1].span)
        return A.Repeat(var=str(var), count=count, shares=shares, grad_last=grad[0][1] if grad else None,
                        halt=halt[0][1] if halt else None, body=body, span=self._s(meta))

    def share_opt(self, meta, layer, strategy):
        return A.Share(layer=str(layer), strategy=str(strategy), span=self._s(meta))

    def grad_opt(self, meta, e):
        return ("grad", e)

    def halt_opt(self, meta, e):
        return ("halt", e)

    def route_stmt(self, meta, var, selector, *rest):
        *opts, body = rest
        weight = [o for o in opts if o[0] == "weight"]
        names = [o for o in opts if o[0] == "as"]
        return A.Route(var=str(var), selector=selector, weight=weight[0][1] if weight else None,
                       as_name=names[0][1] if names else None, body=body, span=self._s(meta))

    def topk_sel(self, meta, args):
        a, k = _split_args(args)
        return A.TopK(args=a, kwargs=k, span=self._s(meta))

    def where_sel(self, meta, e):
        return A.Where(mask=e, span=self._s(meta))

    def weight_opt(self, meta, e):
        return ("weight", e)

    def as_opt(self, meta, name):
        return ("as", str(name))

    def cache_stmt(self, meta, kind, args):
        a, k = _split_args(args)
        return A.CacheDecl(kind=str(kind), args=a, kwargs=k, span=self._s(meta))

    def schedule_stmt(self, meta, name, var, var_type, body):
        return A.ScheduleDecl(name=str(name), var=str(var), var_type=str(var_type), body=body, span=self._s(meta))

    def require_stmt(self, meta, cond, msg):
        return A.Require(cond=cond, message=_unescape(msg, _tok_span(self.file, msg)) if msg is not None else None,
                         span=self._s(meta))

    def noncausal_stmt(self, meta, msg):
        return A.NonCausal(reason=_unescape(msg, _tok_span(self.file, msg)) if msg is not None else None,
                           span=self._s(meta))

    # expressions
    def expr_list(self, meta, *items):
        return list(items)

    def arg_list(self, meta, *items):
        return [i for i in items if i is not None]

    def kwarg(self, meta, name, value):
        return A.Kwarg(name=str(name), value=value, span=self._s(meta))

    def _bin(op):
        def f(self, meta, left, right):
            return A.BinOp(op=op, left=left, right=right, span=self._s(meta))
        return f

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")
    floordiv, mod, matmul, pow = _bin("//"), _bin("%"), _bin("@"), _bin("**")
    and_, or_ = _bin("and"), _bin("or")

    def compare(self, meta, left, op, right):
        return A.BinOp(op=str(op), left=left, right=right, span=self._s(meta))

    def neg(self, meta, x):
        return A.UnaryOp(op="-", operand=x, span=self._s(meta))

    def not_(self, meta, x):
        return A.UnaryOp(op="not", operand=x, span=self._s(meta))

    def call(self, meta, func, args):
        a, k = _split_args(args)
        return A.Call(func=func, args=a, kwargs=k, span=self._s(meta))

    def index(self, meta, base, subs):
        return A.Index(base=base, subs=subs, span=self._s(meta))

    def subscripts(self, meta, *subs):
        return [s for s in subs if s is not None]

    def slice(self, meta, start, stop):
        return A.Slice(start=start, stop=stop, span=self._s(meta))

    def attr(self, meta, base, name):
        return A.Attr(base=base, name=str(name), span=self._s(meta))

    def int_lit(self, meta, tok):
        digits = str(tok).lstrip("0")
        if len(digits) > 40:   # far past 2**62 (lowering says so), and int() refuses 4300+ digits
            raise ArchError(f"integer {digits[:20]}... ({len(digits)} digits) is too large", self._s(meta),
                            hint="archc integers must fit in 62 bits")
        return A.Num(value=int(tok), span=self._s(meta))

    def float_lit(self, meta, tok):
        value = float(tok)
        if math.isinf(value):
            raise ArchError(f"number {str(tok)[:40]} is too large: it overflows to infinity", self._s(meta),
                            hint="float literals must be finite (at most about 1.8e308)")
        return A.Num(value=value, span=self._s(meta))

    def true_lit(self, meta):
        return A.Bool(value=True, span=self._s(meta))

    def false_lit(self, meta):
        return A.Bool(value=False, span=self._s(meta))

    def str_lit(self, meta, tok):
        return A.Str(value=_unescape(tok, self._s(meta)), span=self._s(meta))

    def name(self, meta, tok):
        return A.Name(id=str(tok), span=self._s(meta))

    def list_lit(self, meta, items):
        return A.ListLit(items=items or [], span=self._s(meta))
