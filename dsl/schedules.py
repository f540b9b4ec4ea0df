"""`schedule name(var: float) { p = expr ... }`: training-time functions of one variable.

A schedule maps a variable the training loop owns (training progress, the supervision step, a
uniform random draw) to architecture-parameter overrides (CGAR's recursion depths, a SortedNet
sub-network's depth) and to named values the loop reads (CGAR's per-step loss weights). Every
value is a compile-time expression of the parameters and the variable; `where(cond, a, b)` makes
piecewise values. The IR keeps them as `Graph.schedules`; the interpreter evaluates them
(`schedule_values`) and generated modules expose them as `schedule_<name>(x)` methods.
"""
from __future__ import annotations

import sympy

from archc.dsl import ast as A
from archc.dsl.values import Static
from archc.ir.core import Schedule
from archc.ir.shapes import expr_str, sym

VAR_KINDS = ("int", "float")


def lower_schedule(al, st: A.ScheduleDecl, scope) -> Schedule:
    from archc.dsl.lower import Frame, Scope, _attr_value
    if any(s.name == st.name for s in al.schedules):
        raise al.err(f"schedule `{st.name}` is declared twice", st.span)
    if st.var_type not in VAR_KINDS:
        raise al.err(f"a schedule's variable is `int` or `float`, got `{st.var_type}`", st.span,
                     hint="e.g. `schedule curriculum(progress: float) { ... }`")
    if scope.lookup(st.var) is not None:
        raise al.err(f"schedule variable `{st.var}` shadows an existing name", st.span)
    params = {s.name: s.kind for s in al.symbols}
    sscope = Scope(parent=scope)
    sscope.vars[st.var] = Static(sym(st.var), st.var_type)
    allowed = set(params) | {st.var}
    values: dict[str, sympy.Basic] = {}
    for s in st.body:
        if not (isinstance(s, A.Assign) and len(s.targets) == 1):
            raise al.err("a schedule body holds assignments `name = value`, one per line", s.span,
                         hint="each name is an architecture parameter to set or a value for the training loop")
        name = s.targets[0]
        if name == st.var:
            raise al.err(f"`{st.var}` is the schedule's variable and cannot be assigned", s.span)
        if name in values:
            raise al.err(f"`{name}` is assigned twice in schedule `{st.name}`", s.span)
        outer = scope.lookup(name)
        if outer is not None and name not in params:
            raise al.err(f"`{name}` is not an architecture parameter; a schedule sets parameters or defines new "
                         "values", s.span, hint="pick a new name for a value the training loop reads")
        v = al.static(s.value, sscope, Frame(), "a schedule value")
        unknown = sorted(x.name for x in sympy.sympify(v.expr).free_symbols if x.name not in allowed)
        if unknown:
            raise al.err(f"a schedule value may use the parameters and `{st.var}` only, not `{unknown[0]}`",
                         s.value.span, hint="dimensions such as B and T are known only when the model runs")
        if name in params:
            _check_kind(al, name, params[name], v, s.value.span)
        sscope.vars[name] = Static(v.expr, params.get(name, v.kind))
        values[name] = v.expr
    if not values:
        raise al.err(f"schedule `{st.name}` sets nothing", st.span, hint="add lines such as `depth = ...`")
    return Schedule(st.name, st.var, st.var_type, tuple((k, _attr_value(e)) for k, e in values.items()), st.span)


def _check_kind(al, name: str, kind: str, v: Static, span):
    ok = {"int": ("int",), "float": ("int", "float"), "bool": ("bool",)}[kind]
    if v.kind not in ok:
        raise al.err(f"`{name}` is an {kind} parameter but the schedule gives it a {v.kind} value "
                     f"{expr_str(v.expr)}", span, hint="use `//`, floor() or int-valued branches for int parameters")
