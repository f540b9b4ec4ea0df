"""AST -> IR: name resolution, static evaluation, shape checking and lowering, in one walk.

`lower_module(module)` is the one entry point. Blocks are inlined at each application; their
parameters are named by the path of layer names (`core.attn.q.weight`), so two applications of
one layer instance read the same parameters. Loops, routes and scans become region ops whose
carried values are the outer variables their bodies reassign.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import sympy

from archc.dsl import ast as A
from archc.dsl.values import LayerInst, MemInst, PathRef, Static, StrVal
from archc.errors import ArchError, Span
from archc.ir.builder import Builder
from archc.ir.core import Graph, Node, Param, Policy, Region, Symbol, Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, DType, TensorType, as_expr, dims_equal, expr_str, substitute, sym

DTYPES = {"f32": F32, "i64": I64, "bool": BOOL}
PARAM_KINDS = ("int", "float", "bool")


# ---------------------------------------------------------------------------------------------
# scopes


@dataclass
class Scope:
    """Names visible at one point. `parent` is None for an architecture or block body."""

    vars: dict[str, Any] = field(default_factory=dict)
    parent: "Scope | None" = None
    local_defs: dict[str, Span] = field(default_factory=dict)   # names first defined in this scope
    in_region: bool = False                                      # a loop/route/scan body
    carried: dict[str, Any] = field(default_factory=dict)        # carried name -> its fixed type
    no_mutation: bool = False                                    # memories may not be written (routes)
    loop_locals: dict[str, Span] = field(default_factory=dict)   # names that died with a loop body

    def any_scope(self, pred) -> bool:
        s: Scope | None = self
        while s is not None:
            if pred(s):
                return True
            s = s.parent
        return False

    def loop_local(self, name: str) -> Span | None:
        s: Scope | None = self
        while s is not None:
            if name in s.loop_locals:
                return s.loop_locals[name]
            s = s.parent
        return None

    def lookup(self, name: str):
        s: Scope | None = self
        while s is not None:
            if name in s.vars:
                return s.vars[name]
            s = s.parent
        return None

    def owner(self, name: str) -> "Scope | None":
        s: Scope | None = self
        while s is not None:
            if name in s.vars:
                return s
            s = s.parent
        return None

    def set(self, name: str, value, span: Span | None = None):
        """Rebind in the scope that owns `name`, else define here."""
        owner = self.owner(name)
        if owner is None:
            self.vars[name] = value
            if span is not None:
                self.local_defs[name] = span
        else:
            owner.vars[name] = value

    def names(self) -> list[str]:
        out: list[str] = []
        s: Scope | None = self
        while s is not None:
            out.extend(s.vars)
            s = s.parent
        return out


@dataclass
class Frame:
    """Where lowering is: the parameter prefix, copy indexing and token positions in effect."""

    path: str = ""
    copies: sympy.Basic | None = None
    index: sympy.Basic | None = None
    positions: Value | None = None
    loop_vars: dict[str, tuple[sympy.Basic, sympy.Basic]] = field(default_factory=dict)  # name -> (lo, hi)
    in_route: bool = False
    block_stack: tuple[str, ...] = ()


class Lowerer:
    def __init__(self, module: A.Module):
        self.module = module
        self.file = module.file
        self.blocks: dict[str, A.BlockDef] = {}
        self.archs: dict[str, A.ArchDef] = {}
        for d in module.definitions:
            table = self.blocks if isinstance(d, A.BlockDef) else self.archs
            other = self.archs if isinstance(d, A.BlockDef) else self.blocks
            if d.name in table or d.name in other:
                raise self.err(f"`{d.name}` is defined twice", d.name_span, hint="give each block and arch its own name")
            from archc.dsl.layers import PRIMITIVES
            if d.name in PRIMITIVES:
                raise self.err(f"`{d.name}` is a built-in layer and cannot be redefined", d.name_span)
            table[d.name] = d

    def err(self, msg: str, span: Span | None, hint: str | None = None) -> ArchError:
        return ArchError(msg, span, hint=hint, source=self.module.source)

    # -- entry -----------------------------------------------------------------------------------

    def lower(self) -> list[Graph]:
        if not self.archs:
            span = self.module.definitions[0].span if self.module.definitions else Span(self.file, 1, 1, 1, 2)
            raise self.err("no `arch` definition in this file", span,
                           hint="an architecture is declared as `arch Name(d: int = 64) { ... }`")
        self._check_block_cycles()
        return [ArchLowering(self, a).run() for a in self.archs.values()]

    def _check_block_cycles(self):
        """Reject blocks that (transitively) instantiate themselves."""
        edges: dict[str, list[tuple[str, Span]]] = {}
        for name, b in self.blocks.items():
            edges[name] = [(s.kind, s.kind_span) for s in _walk_stmts(b.body)
                           if isinstance(s, A.LayerDecl) and s.kind in self.blocks]
        state: dict[str, int] = {}

        def visit(n: str, chain: list[str]):
            state[n] = 1
            for m, span in edges.get(n, []):
                if state.get(m) == 1:
                    cyc = " -> ".join(chain[chain.index(m):] + [m]) if m in chain else f"{n} -> {m}"
                    raise self.err(f"cyclic block reference: {cyc}", span,
                                   hint="a block cannot contain itself; use `repeat` for recurrence")
                if state.get(m) is None:
                    visit(m, chain + [m])
            state[n] = 2

        for n in self.blocks:
            if state.get(n) is None:
                visit(n, [n])


def _walk_stmts(stmts):
    for s in stmts:
        yield s
        for attr in ("body",):
            inner = getattr(s, attr, None)
            if isinstance(inner, list):
                yield from _walk_stmts(inner)


def _assigned_names(stmts) -> dict[str, Span]:
    """Names a statement list (and nested bodies) assigns, with the first assignment's span."""
    out: dict[str, Span] = {}
    for s in _walk_stmts(stmts):
        if isinstance(s, (A.Assign, A.Scan)):
            for t in s.targets:
                out.setdefault(t, s.span)
        elif isinstance(s, A.Route):
            out.setdefault(s.var, s.span)
            if s.as_name:
                out.setdefault(s.as_name, s.span)
        for call in _calls_in(s):
            f = call.func
            if isinstance(f, A.Attr) and isinstance(f.base, A.Name):
                out.setdefault("@" + f.base.id + "." + f.name, call.span)
    return out


def _calls_in(node):
    """All Call expressions directly inside one statement (not in nested bodies)."""
    stack = []
    for k, v in vars(node).items():
        if k == "body":
            continue
        stack.append(v)
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, A.Call):
            yield v
            stack.extend([v.func, *v.args, *[kw.value for kw in v.kwargs]])
        elif isinstance(v, A.Node):
            stack.extend(x for k2, x in vars(v).items() if k2 != "span")


# ---------------------------------------------------------------------------------------------


class ArchLowering:
    """Lowers one `arch` definition to a Graph."""

    def __init__(self, lw: Lowerer, arch: A.ArchDef):
        self.lw = lw
        self.arch = arch
        self.defaults: dict[sympy.Symbol, Any] = {}     # symbol -> numeric default (for checks)
        self.b = Builder(self.defaults)
        self.params: dict[str, Param] = {}
        self.param_order: list[str] = []
        self.symbols: list[Symbol] = []
        self.dims: list[str] = []
        self.cache_decls: list[tuple[A.CacheDecl, Scope, Frame]] = []
        self.schedules: list = []
        self.attention_sites: dict[str, dict] = {}
        self.mem_kinds_used: set[str] = set()
        self.outputs: list[Value] = []
        self.site_attrs: dict[str, dict] = {}
        self.batch = None
        self._positions_hint = None
        self.noncausal: str | None = None               # `noncausal "why"` (SPEC §12.6)

    err = property(lambda self: self.lw.err)

    # -- symbols and static values -------------------------------------------------------------

    def bind_params(self, specs: list[A.ParamSpec], scope: Scope, arch_level: bool,
                    given: dict[str, Any] | None = None, call_span: Span | None = None):
        seen: set[str] = set()
        for p in specs:
            if p.name in seen:
                raise self.err(f"parameter `{p.name}` is declared twice", p.span)
            seen.add(p.name)
            if p.type not in PARAM_KINDS:
                raise self.err(f"unknown parameter type `{p.type}`", p.span,
                               hint="parameters are `int`, `float` or `bool`")
            if arch_level:
                if p.default is None:
                    raise self.err(f"architecture parameter `{p.name}` needs a default value", p.span,
                                   hint=f"write `{p.name}: {p.type} = ...`")
                default = self.static(p.default, scope, Frame(), what=f"the default of `{p.name}`")
                self._check_kind(default, p.type, p.default.span, f"`{p.name}`")
                s = sym(p.name)
                value = substitute(default.expr, self.defaults)
                self.defaults[s] = _number(value)
                self.symbols.append(Symbol(p.name, p.type, _attr_default(default.expr, p.type)))
                scope.vars[p.name] = Static(s, p.type)
            else:
                assert given is not None
                if p.name in given:
                    v = given[p.name]
                elif p.default is not None:
                    v = self.static(p.default, scope, Frame(), what=f"the default of `{p.name}`")
                else:
                    raise self.err(f"missing argument `{p.name}`", call_span, hint=f"pass `{p.name}=...`")
                if isinstance(v, Static):
                    self._check_kind(v, p.type, call_span, f"`{p.name}`")
                scope.vars[p.name] = v

    def _check_kind(self, v: Static, kind: str, span: Span, what: str):
        if kind == "int" and v.kind == "float":
            raise self.err(f"{what} is an int but got a float value {expr_str(v.expr)}", span,
                           hint="use integer arithmetic (`//`) or declare it `float`")
        if kind == "bool" and v.kind != "bool":
            raise self.err(f"{what} is a bool but got {expr_str(v.expr)}", span)
        if kind != "bool" and v.kind == "bool":
            raise self.err(f"{what} is {kind} but got a bool", span)

    def value_at_defaults(self, e: sympy.Basic, frame: Frame | None = None) -> Any:
        subs = dict(self.defaults)
        v = substitute(sympy.sympify(e), subs)
        return v

    def static(self, e: A.Expr, scope: Scope, frame: Frame, what: str = "this value") -> Static:
        from archc.dsl.exprs import lower_expr
        v = lower_expr(self, e, scope, frame)
        if not isinstance(v, Static):
            raise self.err(f"{what} must be known at compile time", e.span,
                           hint="use architecture parameters, numbers and dimensions here, not tensors")
        return v

    def static_int(self, e: A.Expr, scope: Scope, frame: Frame, what: str, minimum: int | None = None) -> sympy.Basic:
        v = self.static(e, scope, frame, what)
        if v.kind != "int":
            raise self.err(f"{what} must be an integer, got {expr_str(v.expr)}", e.span)
        if minimum is not None:
            for val in self.sample_values(v.expr, frame):
                if val.is_number and val < minimum:
                    raise self.err(f"{what} must be at least {minimum}, got {shown(v.expr, val)}", e.span)
        return v.expr

    def sample_values(self, e: sympy.Basic, frame: Frame) -> list[sympy.Basic]:
        """`e` at the defaults, for every value of the loop variables in scope (up to 64 each)."""
        base = substitute(sympy.sympify(e), self.defaults)
        envs: list[dict] = [{}]
        for name, (lo, hi) in frame.loop_vars.items():
            s = sym(name)
            if s not in base.free_symbols:
                continue
            lo_v, hi_v = substitute(as_expr(lo), self.defaults), substitute(as_expr(hi), self.defaults)
            if not (lo_v.is_number and hi_v.is_number):
                continue
            vals = list(range(int(lo_v), int(hi_v) + 1))[:64]
            envs = [dict(env, **{name: v}) for env in envs for v in vals]
        return [substitute(base, {sym(k): v for k, v in env.items()}) for env in envs]

    # -- parameters ------------------------------------------------------------------------------

    def param(self, frame: Frame, suffix: str, shape, init: str, span: Span, **init_args) -> Value:
        name = f"{frame.path}.{suffix}" if frame.path else suffix
        shape = tuple(as_expr(s) for s in shape)
        stored = shape
        copies = frame.copies
        if copies is not None:
            stored = (as_expr(copies),) + shape
        ptype = TensorType(F32, stored)
        init_items = tuple(sorted((k, _attr_value(v)) for k, v in init_args.items() if v is not None))
        if name in self.params:
            prev = self.params[name]
            if prev.type != ptype:
                raise self.err(f"parameter `{name}` is used with two shapes: {prev.type} and {ptype}", span)
        else:
            self.params[name] = Param(name, ptype, init, init_items, copies if copies is not None else 1, span)
            self.param_order.append(name)
        attrs: dict[str, Any] = {"ref": name}
        if copies is not None:
            attrs["index"] = _attr_value(frame.index)
        return self.b.emit(Op.PARAM, [], attrs, span, names=[name.replace(".", "_")],
                           out_types=[TensorType(F32, shape)])[0]

    # -- constants -------------------------------------------------------------------------------

    def const(self, s: Static, span: Span, dtype: DType | None = None) -> Value:
        if dtype is None:
            dtype = {"int": I64, "float": F32, "bool": BOOL}[s.kind]
        if s.kind == "bool" and dtype is BOOL:
            value: Any = s.expr if s.expr not in (sympy.true, sympy.false) else bool(s.expr == sympy.true)
        else:
            value = _attr_value(s.expr if s.kind != "bool" else sympy.Integer(int(s.expr == sympy.true)))
        return self.b.emit1(Op.CONST, [], {"value": value, "dtype": dtype.value}, span, name="c")

    # -- the arch body ---------------------------------------------------------------------------

    def run(self) -> Graph:
        scope = Scope()
        self.bind_params(self.arch.params, scope, arch_level=True)
        frame = Frame()
        inputs: list[Value] = []
        from archc.dsl.stmts import StmtLowering
        sl = StmtLowering(self)
        for st in self.arch.body:
            if isinstance(st, A.Input):
                inputs.append(sl.arch_input(st, scope))
        sl.lower_block(self.arch.body, scope, frame, kind="arch")
        if not self.outputs:
            raise self.err(f"architecture `{self.arch.name}` has no `output`", self.arch.name_span,
                           hint="add `output logits = ...`")
        from archc.dsl.policies import build_policies, check_rewrites
        policies = build_policies(self)
        body = Region(tuple(inputs), tuple(self.b.top), tuple(v.name for v in self.outputs))
        body = apply_site_attrs(body, self.site_attrs)
        symbols = list(self.symbols) + [Symbol(d, "dim") for d in self.dims]
        g = Graph(self.arch.name, tuple(symbols), tuple(self.params[n] for n in self.param_order), body,
                  tuple(policies), self.lw.module.doc, self.lw.file, tuple(self.schedules), self.noncausal)
        check_rewrites(self, g)
        return g


def apply_site_attrs(region: Region, site_attrs: dict[str, dict]) -> Region:
    """Attach per-attention-site attributes decided by cache policies (e.g. kv_share)."""
    if not site_attrs:
        return region
    nodes = []
    for n in region.nodes:
        if n.op is Op.ATTEND and n.attr("site") in site_attrs:
            attrs = n.attr_dict
            attrs.update(site_attrs[n.attr("site")])
            n = n.replace(attrs=attrs)
        if n.regions:
            n = n.replace(regions=tuple(apply_site_attrs(r, site_attrs) for r in n.regions))
        nodes.append(n)
    return Region(region.args, tuple(nodes), region.results)


def _number(v):
    if isinstance(v, sympy.Basic) and v.is_number:
        if v == sympy.true:
            return True
        if v == sympy.false:
            return False
        return int(v) if v.is_Integer else float(v)
    return v


def _attr_value(v):
    """Numbers as Python numbers, symbolic expressions as sympy."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, sympy.Basic):
        if v in (sympy.true, sympy.false):
            return bool(v)
        if v.is_Integer:
            return int(v)
        if v.is_Float:
            return float(v)
        return v
    return v


def _attr_default(e: sympy.Basic, kind: str):
    if kind == "bool":
        return bool(e == sympy.true)
    v = _attr_value(e)
    if kind == "float" and isinstance(v, int):
        return float(v)
    return v


def shown(expr, value) -> str:
    """`expr = value` for a symbolic expression, just the value for a literal."""
    v = sympy.sympify(value)
    text = str(int(v)) if v.is_Integer else (f"{float(v):g}" if v.is_number else str(v))
    e = sympy.sympify(expr)
    return text if e.is_number else f"{expr_str(e)} = {text}"


def suggest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"did you mean `{close[0]}`?" if close else None


def lower_module(module: A.Module) -> list[Graph]:
    """The one entry point from AST to IR."""
    lw = None
    try:
        lw = Lowerer(module)
        return lw.lower()
    except ArchError as e:
        raise e.with_source(module.source)
    except RecursionError:
        span = getattr(lw, "last_stmt_span", None) or Span(module.file, 1, 1, 1, 2)
        raise ArchError("program is nested too deeply to lower", span, source=module.source,
                        hint="split long expressions into several assignments, or nest fewer blocks") from None
