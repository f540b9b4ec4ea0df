"""The typed AST of the archc language. Every node carries the Span of its source text."""
from __future__ import annotations

from dataclasses import dataclass, field

from archc.errors import Span


@dataclass(eq=False)
class Node:
    span: Span = field(repr=False, kw_only=True)


# -- expressions ------------------------------------------------------------------------------


class Expr(Node):
    pass


@dataclass(eq=False)
class Num(Expr):
    value: int | float


@dataclass(eq=False)
class Bool(Expr):
    value: bool


@dataclass(eq=False)
class Str(Expr):
    value: str


@dataclass(eq=False)
class Name(Expr):
    id: str


@dataclass(eq=False)
class Kwarg(Node):
    name: str
    value: Expr


@dataclass(eq=False)
class Call(Expr):
    func: Expr
    args: list[Expr]
    kwargs: list[Kwarg]


@dataclass(eq=False)
class Slice(Expr):
    start: Expr | None
    stop: Expr | None


@dataclass(eq=False)
class Index(Expr):
    base: Expr
    subs: list[Expr]


@dataclass(eq=False)
class Attr(Expr):
    base: Expr
    name: str


@dataclass(eq=False)
class BinOp(Expr):
    op: str          # + - * / // % @ ** and or == != < <= > >=
    left: Expr
    right: Expr


@dataclass(eq=False)
class UnaryOp(Expr):
    op: str          # - not
    operand: Expr


@dataclass(eq=False)
class ListLit(Expr):
    items: list[Expr]


# -- statements -------------------------------------------------------------------------------


class Stmt(Node):
    pass


@dataclass(eq=False)
class TypeExpr(Node):
    dtype: str
    dims: list[Expr]


@dataclass(eq=False)
class Input(Stmt):
    name: str
    type: TypeExpr


@dataclass(eq=False)
class LayerDecl(Stmt):
    name: str
    count: Expr | None
    kind: str
    args: list[Expr]
    kwargs: list[Kwarg]
    kind_span: Span = field(repr=False, kw_only=True)


@dataclass(eq=False)
class ParamDecl(Stmt):
    name: str
    type: TypeExpr
    init: str
    args: list[Expr]
    kwargs: list[Kwarg]


@dataclass(eq=False)
class MemoryDecl(Stmt):
    name: str
    kind: str
    args: list[Expr]
    kwargs: list[Kwarg]
    kind_span: Span = field(repr=False, kw_only=True)


@dataclass(eq=False)
class Assign(Stmt):
    targets: list[str]
    value: Expr


@dataclass(eq=False)
class Scan(Stmt):
    targets: list[str]
    var: str
    seq: Expr
    size: Expr
    body: list[Stmt]


@dataclass(eq=False)
class ExprStmt(Stmt):
    expr: Expr


@dataclass(eq=False)
class Output(Stmt):
    name: str
    value: Expr | None


@dataclass(eq=False)
class Return(Stmt):
    values: list[Expr]


@dataclass(eq=False)
class Yield(Stmt):
    values: list[Expr]


@dataclass(eq=False)
class Share(Node):
    layer: str
    strategy: str


@dataclass(eq=False)
class Repeat(Stmt):
    var: str
    count: Expr
    shares: list[Share]
    grad_last: Expr | None
    halt: Expr | None
    body: list[Stmt]


@dataclass(eq=False)
class TopK(Node):
    args: list[Expr]
    kwargs: list[Kwarg]


@dataclass(eq=False)
class Where(Node):
    mask: Expr


@dataclass(eq=False)
class Route(Stmt):
    var: str
    selector: TopK | Where
    weight: Expr | None
    as_name: str | None
    body: list[Stmt]


@dataclass(eq=False)
class CacheDecl(Stmt):
    kind: str
    args: list[Expr]
    kwargs: list[Kwarg]


@dataclass(eq=False)
class ScheduleDecl(Stmt):
    name: str
    var: str
    var_type: str
    body: list[Stmt]


@dataclass(eq=False)
class Require(Stmt):
    cond: Expr
    message: str | None


@dataclass(eq=False)
class NonCausal(Stmt):
    """`noncausal "why"`: the architecture's outputs may read later tokens (an encoder, a puzzle solver)."""
    reason: str | None


# -- definitions ------------------------------------------------------------------------------


@dataclass(eq=False)
class ParamSpec(Node):
    name: str
    type: str            # int | float | bool
    default: Expr | None


@dataclass(eq=False)
class Definition(Node):
    name: str
    params: list[ParamSpec]
    body: list[Stmt]
    name_span: Span = field(repr=False, kw_only=True)


@dataclass(eq=False)
class ArchDef(Definition):
    pass


@dataclass(eq=False)
class BlockDef(Definition):
    pass


@dataclass(eq=False)
class Module(Node):
    file: str
    source: str
    doc: str
    definitions: list[Definition]
