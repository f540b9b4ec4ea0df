"""Building ONNX graphs: scopes (the main graph and Loop/If bodies), unique names, constants, and
archc's symbolic expressions (shapes, indices, trip counts, capacities) compiled to scalar nodes.

A `Scope` is one ONNX graph under construction. A body scope may read any value of its enclosing
scopes (ONNX outer-scope references), so loop-invariant work is emitted in the outermost scope
that can compute it: an expression goes to the innermost scope that binds one of its symbols.
Symbols are compile-time numbers (substituted), runtime graph inputs (trip counts), dimensions
read from an input's shape, or a Loop's iteration counter.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import sympy
from archc.ir.shapes import DType, expr_str
from onnx import TensorProto, helper, numpy_helper

from archc.errors import ArchError

ELEM = {DType.F32: TensorProto.FLOAT, DType.I64: TensorProto.INT64, DType.BOOL: TensorProto.BOOL}
NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_,
         TensorProto.DOUBLE: np.float64}
I64, F32, F64, BOOL = TensorProto.INT64, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BOOL
INT64_MAX = np.iinfo(np.int64).max
_UNBOUND = object()


class Namer:
    """Unique value names: IR names are reserved up front, helpers get `base_1`, `base_2`, ..."""

    def __init__(self):
        self.used: set[str] = set()

    def reserve(self, name: str) -> None:
        self.used.add(name)

    def fresh(self, hint: str) -> str:
        base = hint or "v"
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


class Exporter:
    """What one exported model shares across its scopes: names, initializers, symbol sources."""

    def __init__(self, static: dict[str, Any]):
        self.names = Namer()
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self.static = dict(static)                         # symbol -> Python number (substituted)
        self.lazy: dict[str, Callable[[], str]] = {}       # symbol -> emits its value in the main graph
        self.top = Scope(self, None)
        self.hint = ""                                     # names new values after the IR value being lowered
        self._subst: dict[sympy.Basic, sympy.Basic] = {}

    # constants ---------------------------------------------------------------------------------
    def const(self, value, elem: int, hint: str = "c") -> str:
        """A constant tensor as a main-graph initializer (deduplicated by dtype, shape and bytes)."""
        arr = np.asarray(value, dtype=NUMPY[elem])
        key = (elem, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.names.fresh(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, v) -> str:
        return self.const(v, I64, "i64")

    def f32(self, v) -> str:
        return self.const(v, F32, "f32")

    def initializer(self, name: str, arr: np.ndarray) -> str:
        self.names.reserve(name)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    # symbols -----------------------------------------------------------------------------------
    def substitute(self, e):
        """`e` with the compile-time symbols replaced by their values."""
        if not isinstance(e, sympy.Basic):
            return sympy.sympify(e)
        hit = self._subst.get(e)
        if hit is None:
            reps = {s: sympy.sympify(self.static[s.name]) for s in e.free_symbols if s.name in self.static}
            hit = e.xreplace(reps) if reps else e
            self._subst[e] = hit
        return hit

    def number(self, e):
        """A compile-time value of `e`, or None when it depends on runtime symbols."""
        e = self.substitute(e)
        if e.free_symbols:
            return None
        if e in (sympy.true, sympy.false):
            return bool(e)
        return int(e) if e.is_Integer else float(e)

    @contextmanager
    def rebound(self, scope: Scope, name: str, value: str):
        """Inside `scope` (and the scopes under it), the symbol `name` is the int64 scalar `value`.

        A compile-time symbol stops being substituted while this lasts (expressions that mention it
        are then emitted in `scope`, where it is bound; caches keyed by substituted expressions are set
        aside), so everything else keeps its value: a scan's short last segment binds its size symbol
        to the remainder this way (SPEC §8.5).
        """
        saved = self.static.pop(name, _UNBOUND)
        saved_subst, self._subst = self._subst, {}
        scope.syms[name] = value
        try:
            yield
        finally:
            if saved is not _UNBOUND:
                self.static[name] = saved
            self._subst = saved_subst

    def static_int(self, e, what: str, span=None) -> int:
        v = self.number(e)
        if v is None or float(v) != int(v):
            raise ArchError(f"the ONNX backend needs {what} = {expr_str(e)} to be a compile-time integer", span,
                            hint="bind the symbols it uses at export time (archc compile --set NAME=VALUE)")
        return int(v)


class Scope:
    """One ONNX graph under construction: the main graph, or the body of a Loop or an If branch."""

    def __init__(self, ex: Exporter, parent: Scope | None):
        self.ex = ex
        self.parent = parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.syms: dict[str, str] = {}
        self.cache: dict[tuple, str] = {}
        self.produced: set[str] = set()       # values defined here (inputs and node outputs)
        self.computed: set[str] = set()       # node outputs only

    def child(self) -> Scope:
        return Scope(self.ex, self)

    # nodes -------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int = 1, **attrs):
        """Append one node; returns its output name (or the list of names when outputs > 1)."""
        outs = [self.ex.names.fresh(name or self.ex.hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        self.produced.update(outs)
        self.computed.update(outs)
        return outs[0] if outputs == 1 else outs

    def ops(self, op_type: str, *inputs: str, outputs: int, name: str | None = None, **attrs) -> list[str]:
        """`op` that always returns a list of output names (possibly empty-safe for one output)."""
        outs = self.op(op_type, *inputs, name=name, outputs=outputs, **attrs)
        return [outs] if isinstance(outs, str) else outs

    def add_input(self, hint: str, elem: int, rank: int | None, seq: bool = False) -> str:
        name = self.ex.names.fresh(hint)
        self.inputs.append(value_info(name, elem, rank, seq))
        self.produced.add(name)
        return name

    def add_output(self, value: str, elem: int, rank: int | None, seq: bool = False, hint: str | None = None) -> str:
        """Mark `value` as an output; values no node of this scope computed go through an Identity."""
        if value not in self.computed or any(o.name == value for o in self.outputs):
            value = self.op("Identity", value, name=hint or value)
        self.outputs.append(value_info(value, elem, rank, seq))
        return value

    def graph(self, name: str, initializers=()) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=list(initializers))

    # shapes --------------------------------------------------------------------------------------
    def dim(self, value: str, axis: int) -> str:
        """The size of one axis of a value, as an int64 scalar."""
        key = ("dim", value, axis)
        if key not in self.cache:
            shp = self.op("Shape", value, name="shape", start=axis, end=axis + 1 if axis != -1 else INT64_MAX)
            self.cache[key] = self.op("Squeeze", shp, self.ex.i64([0]), name="size")
        return self.cache[key]

    def shape_of(self, value: str, start: int = 0, end: int | None = None) -> str:
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", value, name="shape", **attrs)

    def vec(self, items: list) -> str:
        """A 1-D int64 tensor from ints, expressions and int64 scalar value names."""
        if all(not isinstance(x, str) and self.ex.number(x) is not None for x in items):
            return self.ex.i64([int(self.ex.number(x)) for x in items])
        parts = []
        for x in items:
            if isinstance(x, str):
                parts.append(self.op("Unsqueeze", x, self.ex.i64([0]), name="dim"))
            else:
                v = self.ex.number(x)
                parts.append(self.ex.i64([int(v)]) if v is not None else
                             self.op("Unsqueeze", self.int_expr(x), self.ex.i64([0]), name="dim"))
        return parts[0] if len(parts) == 1 else self.op("Concat", *parts, name="shape", axis=0)

    # symbolic expressions -------------------------------------------------------------------------
    def lookup(self, name: str) -> tuple[Scope, str]:
        s: Scope | None = self
        while s is not None:
            if name in s.syms:
                return s, s.syms[name]
            s = s.parent
        top = self.ex.top
        if name in self.ex.lazy:
            top.syms[name] = self.ex.lazy[name]()
            return top, top.syms[name]
        raise ArchError(f"the ONNX backend has no value for the symbol `{name}` here",
                        hint="dimensions come from the graph's inputs; other symbols must be architecture "
                             "parameters or loop variables")

    def _home(self, e: sympy.Basic) -> Scope:
        home: Scope = self.ex.top
        for s in e.free_symbols:
            owner, _ = self.lookup(s.name)
            if owner.depth > home.depth:
                home = owner
        return home

    def int_expr(self, e) -> str:
        """An integer-valued expression as an int64 scalar."""
        e = self.ex.substitute(e)
        if not e.free_symbols:
            return self.ex.i64(_int_number(e))
        home = self._home(e)
        key = ("int", e)
        if key not in home.cache:
            home.cache[key] = _emit_int(home, e)
        return home.cache[key]

    def float_expr(self, e) -> str:
        """A real-valued expression as a double scalar (rational functions of integers divide once)."""
        e = self.ex.substitute(e)
        if not e.free_symbols:
            return self.ex.const(float(e), F64, "f64")
        home = self._home(e)
        key = ("float", e)
        if key not in home.cache:
            home.cache[key] = _emit_float(home, e)
        return home.cache[key]

    def scalar(self, e, elem: int) -> str:
        """An expression as a scalar of the given element type (as the interpreter evaluates it)."""
        if elem == I64:
            return self.int_expr(e)
        if elem == BOOL:
            v = self.ex.number(e)
            if v is None:
                return self.op("Cast", self.int_expr(e), to=BOOL)
            return self.ex.const(bool(v), BOOL, "bool")
        v = self.ex.number(e)
        if v is not None:
            return self.ex.const(float(v), elem, "f32")
        return self.op("Cast", self.float_expr(e), to=elem)


def value_info(name: str, elem: int, rank: int | None, seq: bool = False, dims=None) -> onnx.ValueInfoProto:
    shape = dims if dims is not None else (None if rank is None else [None] * rank)
    if seq:
        return helper.make_tensor_sequence_value_info(name, elem, shape)
    return helper.make_tensor_value_info(name, elem, shape)


def _int_number(e) -> int:
    if e in (sympy.true, sympy.false):
        return int(bool(e))
    if not e.is_number or float(e) != int(e):
        raise ArchError(f"the ONNX backend expected an integer, got {expr_str(e)}")
    return int(e)


def is_int(e: sympy.Basic) -> bool:
    """Whether `e` is integer-valued by construction (all archc runtime symbols are integers)."""
    if e.is_Integer or e.is_Symbol:
        return True
    if e.is_Number:
        return False
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min, sympy.Mod)):
        return all(is_int(a) for a in e.args)
    if isinstance(e, sympy.Pow):
        return is_int(e.base) and e.exp.is_Integer and e.exp >= 0
    return isinstance(e, (sympy.floor, sympy.ceiling))


def _fold(sc: Scope, op: str, values: list[str]) -> str:
    out = values[0]
    for v in values[1:]:
        out = sc.op(op, out, v, name=op.lower())
    return out


def _floordiv(sc: Scope, num: sympy.Basic, den: sympy.Basic) -> str:
    """floor(num / den) exactly in int64: (num - num mod den) / den, with Python's mod sign."""
    n, d = sc.int_expr(num), sc.int_expr(den)
    rem = sc.op("Mod", n, d, name="mod", fmod=0)
    return sc.op("Div", sc.op("Sub", n, rem, name="sub"), d, name="floordiv")


def _emit_int(sc: Scope, e: sympy.Basic) -> str:
    if e.is_Symbol:
        return sc.lookup(e.name)[1]
    if isinstance(e, sympy.Add):
        return _fold(sc, "Add", [sc.int_expr(a) for a in e.args])
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return sc.op("Neg", sc.int_expr(rest), name="neg")
        return _fold(sc, "Mul", [sc.int_expr(a) for a in e.args])
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp >= 0:
        return _fold(sc, "Mul", [sc.int_expr(e.base)] * int(e.exp)) if e.exp > 0 else sc.ex.i64(1)
    if isinstance(e, (sympy.Max, sympy.Min)) and all(is_int(a) for a in e.args):
        return sc.op("Max" if isinstance(e, sympy.Max) else "Min", *[sc.int_expr(a) for a in e.args])
    if isinstance(e, sympy.Mod) and all(is_int(a) for a in e.args):
        return sc.op("Mod", sc.int_expr(e.args[0]), sc.int_expr(e.args[1]), fmod=0)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        arg = e.args[0] if isinstance(e, sympy.floor) else -e.args[0]
        num, den = sympy.fraction(sympy.together(arg))
        if is_int(num) and is_int(den):
            out = _floordiv(sc, num, den) if den != 1 else sc.int_expr(num)
        else:
            out = sc.op("Cast", sc.op("Floor", sc.float_expr(arg)), to=I64)
        return out if isinstance(e, sympy.floor) else sc.op("Neg", out, name="ceil")
    if is_int(e):
        raise ArchError(f"the ONNX backend cannot lower the expression {expr_str(e)}")
    # a real-valued expression used where an integer is needed: the interpreter truncates with int()
    return sc.op("Cast", sc.float_expr(e), to=I64)


def _emit_float(sc: Scope, e: sympy.Basic) -> str:
    if is_int(e):
        return sc.op("Cast", sc.int_expr(e), to=F64)
    num, den = sympy.fraction(sympy.together(e))
    if den != 1 and is_int(num) and is_int(den):
        return sc.op("Div", sc.float_expr(num), sc.float_expr(den), name="ratio")
    if isinstance(e, sympy.Add):
        return _fold(sc, "Add", [sc.float_expr(a) for a in e.args])
    if isinstance(e, sympy.Mul):
        return _fold(sc, "Mul", [sc.float_expr(a) for a in e.args])
    if isinstance(e, sympy.Pow):
        base = sc.float_expr(e.base)
        if e.exp == sympy.Rational(1, 2):
            return sc.op("Sqrt", base)
        if e.exp == -1:
            return sc.op("Reciprocal", base)
        return sc.op("Pow", base, sc.float_expr(e.exp))
    if isinstance(e, (sympy.Max, sympy.Min)):
        return sc.op("Max" if isinstance(e, sympy.Max) else "Min", *[sc.float_expr(a) for a in e.args])
    if isinstance(e, sympy.exp):
        return sc.op("Exp", sc.float_expr(e.args[0]))
    if isinstance(e, sympy.log):
        return sc.op("Log", sc.float_expr(e.args[0]))
    if isinstance(e, sympy.Abs):
        return sc.op("Abs", sc.float_expr(e.args[0]))
    raise ArchError(f"the ONNX backend cannot lower the expression {expr_str(e)}",
                    hint="supported: + - * /, powers, floor, ceiling, Max, Min, Mod, exp, log, abs")

