"""Causality of language models, proved by abstract interpretation over the IR (SPEC.md §12.6).

For a graph with one token input `i64[B, T]` (`lm_token_input`), every output with an axis of
length `T` is *causal* when its element at position t depends only on the tokens at positions
<= t. `causality(g)` decides it without running the model: each value gets an abstract value that
bounds, for every element, the last token position it may read.

The abstract value of a tensor (`AV`) describes its elements as functions of their index. Every
axis k has index variables (`x{k}_0`, one per *digit*: a reshape that merges [L, T] into one axis
keeps both digits, so `t` stays visible). Over those variables it holds:

* `terms`: the dependence. Element `idx` reads no token after `max(t.bound(idx) for t in terms
  whose guard holds at idx)`. A bound is a min over alternatives (each a valid upper bound); a
  guard is a conjunction of linear atoms `e <= 0` / `e < 0` over index variables and symbols. No
  applicable term: the element reads no token. `oo`: anything.
* `nz`: where the element may be nonzero (a disjunction of guards; None: anywhere). A product with
  a value that is zero outside u < t (`where(u < t, w, 0.0)`) only reads the other factor there,
  and a contraction over u then only reads u < t.
* `val`: the exact value of a token-free tensor, piecewise (`arange(T)` is `x0`, a comparison of
  two aranges is a linear atom): attention masks, position tensors and fade matrices are read
  exactly, so `mask = arange(T)[:, None] > arange(T)[None, :]` restricts the keys a query sees.

Positions are frame coordinates: token positions at the top level, segment-local ones inside a
scan body (the current segment starts at 0; earlier segments are negative, so a carried state
reads at most position -1). A route body that compacts tokens sees the position of its j-th token
as `p(j)`, an increasing function; at the scatter back, a bound `p(j')` with j' <= j is the token's
own position.

Rules, in brief (each op's handler below says more):

* elementwise ops take the union of their operands (broadcast); a product keeps only what is
  read where every factor may be nonzero;
* a reduction, softmax, top-k mask, norm or contraction over an axis reads every element of it
  (`sup` over its variable; a contraction only where the product may be nonzero); `cumsum` and
  `linear_scan` read positions up to the element's own;
* `attend` reads its query, and the keys and values its mask allows: causal (key position <=
  query position, queries aligned to the last keys), window, `prefix` keys (visible to every
  query), the `mask` operand when its value is known, route positions; a cross-attention (a
  `context`), a K/V share from another frame, or an unknown mask allow every key;
* slices, selects, concatenations, reshapes and permutations move index variables;
* `mem_write`, `bank_push`, `linear_attn`'s state read their whole operands (the memory is
  written with every position given to it); `mem_read` reads its queries position by position
  and the whole memory state;
* `scan`: the body runs in segment coordinates; carries enter shifted by one segment (what a
  segment wrote is history for the next); a concatenated yield at local position i is causal when
  it reads at most i; a fixpoint over the carries (widened to `oo` after a few rounds);
* `loop`, `halt_loop`: a fixpoint over the carries; a halting decision is read by every carry;
* `route_topk` with capacity < 1 (expert choice) makes every routed token depend on every score;
  `route_mask` (a per-token mask) is causal when its mask and body are;

It is conservative: an output it calls causal is causal for every value of the architecture
parameters (integer parameters keep the sign of their default); `tests/test_causality.py` checks
that against a perturbation oracle on every stdlib model and on random programs. When an output
is not proved causal, the verdict names the op where a term lost its position (a reduction over
the sequence, a prefix key, a memory written with the whole segment, an expert-choice route...)
with its source location.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import sympy
from sympy.core.function import AppliedUndef

from archc.errors import ArchError
from archc.ir.core import Graph, Node, Region, free_values
from archc.ir.ops import Op, attend_operands
from archc.ir.shapes import as_expr

OO = sympy.oo
MAX_TERMS = 48          # terms per value before they are merged into one (a coarser bound)
MAX_ALTS = 4            # alternatives per bound
MAX_PIECES = 24         # pieces of an exact value
MAX_DNF = 24            # conjunctions of a disjunction
FIX_ROUNDS = 4          # fixpoint rounds over loop carries before widening to oo


# -- atoms, guards, disjunctions ------------------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    """`expr <= 0`, or `expr < 0` when strict. Integer atoms are kept non-strict (e < 0 is e + 1 <= 0)."""

    expr: sympy.Expr
    strict: bool = False

    def negate(self) -> Atom:
        return _atom(-self.expr, not self.strict)

    def __str__(self) -> str:
        return f"{self.expr} {'<' if self.strict else '<='} 0"


@lru_cache(maxsize=65536)
def _atom(e, strict: bool = False) -> Atom:
    e = sympy.expand(e)
    if strict and e.is_integer:
        e, strict = e + 1, False
    return Atom(_route_order(e), strict)


def _route_order(e):
    """p(u) - p(v) (p a route's increasing position function) compares like u - v."""
    if not isinstance(e, sympy.Add):
        return e
    apps = [a for a in e.args if isinstance(a, AppliedUndef)]
    negs = [a for a in e.args if isinstance(a, sympy.Mul) and a.args[0] == -1 and len(a.args) == 2
            and isinstance(a.args[1], AppliedUndef)]
    rest = [a for a in e.args if a not in apps and a not in negs]
    if len(apps) == 1 and len(negs) == 1 and not rest and apps[0].func == negs[0].args[1].func:
        return apps[0].args[0] - negs[0].args[1].args[0]
    return e


@lru_cache(maxsize=65536)
def _truth(a: Atom) -> bool | None:
    """True / False when the atom is decided by the assumptions alone, else None."""
    e = a.expr
    if e == OO or e == -OO:
        return e == -OO
    if a.strict:
        if e.is_negative:
            return True
        if e.is_nonnegative:
            return False
    else:
        if e.is_nonpositive:
            return True
        if e.is_positive:
            return False
    return None


Guard = frozenset          # of Atom: a conjunction
TRUE: Guard = frozenset()


def _conj(*guards: Guard) -> Guard | None:
    """The conjunction, simplified; None when it is provably empty."""
    out = set()
    for g in guards:
        for a in g:
            t = _truth(a)
            if t is False:
                return None
            if t is None:
                out.add(a)
    res = frozenset(out)
    if len(res) > 1 and not _feasible(res):
        return None
    return res


@lru_cache(maxsize=65536)
def _feasible(g: Guard) -> bool:
    """False when two atoms bound one index variable from both sides with an empty range."""
    vs = set()
    for a in g:
        vs |= a.expr.free_symbols & _INDEX
    for v in vs:
        uppers, lowers, _ = _bounds_of(g, v)
        for L in lowers:
            for U in uppers:
                if _truth(_atom(L - U)) is False:
                    return False
    return True


def _dnf_and(a, b):
    """Conjunction of two disjunctions (None = true everywhere)."""
    if a is None:
        return b
    if b is None:
        return a
    out = []
    for x in a:
        for y in b:
            c = _conj(x, y)
            if c is not None and c not in out:
                out.append(c)
    return _cap_dnf(out)


def _dnf_or(a, b):
    if a is None or b is None:
        return None
    out = list(a)
    out += [c for c in b if c not in out]
    return _cap_dnf(out)


def _cap_dnf(d):
    if d is None or len(d) <= MAX_DNF:
        return d
    return None           # too many cases: "anywhere" (an over-approximation)


def _dnf_not(d):
    """Negation of a disjunction of conjunctions (exact; None when it blows up)."""
    if d is None:
        return []
    out = [TRUE]
    for conj in d:
        if not conj:
            return []
        alts = [frozenset([a.negate()]) for a in conj]
        out = _dnf_and(out, alts)
        if out is None:
            return None
    return out


def _bool_dnf(e) -> list[Guard] | None:
    """A sympy boolean over index variables as a disjunction of linear conjunctions (None: not linear)."""
    if e is sympy.true or e is True:
        return [TRUE]
    if e is sympy.false or e is False:
        return []
    if isinstance(e, sympy.And):
        out = [TRUE]
        for a in e.args:
            d = _bool_dnf(a)
            if d is None:
                return None
            out = _dnf_and(out, d)
            if out is None:
                return None
        return out
    if isinstance(e, sympy.Or):
        out: list = []
        for a in e.args:
            d = _bool_dnf(a)
            if d is None:
                return None
            out = _dnf_or(out, d)
            if out is None:
                return None
        return out
    if isinstance(e, sympy.Not):
        d = _bool_dnf(e.args[0])
        return None if d is None else _dnf_not(d)
    if isinstance(e, sympy.core.relational.Relational):
        lhs, rhs = e.lhs, e.rhs
        if not (_linearish(lhs) and _linearish(rhs)):
            return None
        if isinstance(e, sympy.StrictLessThan):
            return _dnf_lit(_atom(lhs - rhs, True))
        if isinstance(e, sympy.LessThan):
            return _dnf_lit(_atom(lhs - rhs))
        if isinstance(e, sympy.StrictGreaterThan):
            return _dnf_lit(_atom(rhs - lhs, True))
        if isinstance(e, sympy.GreaterThan):
            return _dnf_lit(_atom(rhs - lhs))
        if isinstance(e, sympy.Equality):
            return _dnf_and(_dnf_lit(_atom(lhs - rhs)), _dnf_lit(_atom(rhs - lhs)))
        if isinstance(e, sympy.Unequality):
            return _dnf_or(_dnf_lit(_atom(lhs - rhs, True)), _dnf_lit(_atom(rhs - lhs, True)))
    return None


def _dnf_lit(a: Atom):
    t = _truth(a)
    if t is True:
        return [TRUE]
    if t is False:
        return []
    return [frozenset([a])]


def _linearish(e) -> bool:
    """An expression atoms can hold: no Piecewise, Max/Min or float functions of index variables."""
    if not isinstance(e, sympy.Basic):
        return True
    for sub in sympy.preorder_traversal(e):
        if isinstance(sub, (sympy.Piecewise, sympy.Max, sympy.Min)) and _has_index(sub):
            return False
        if isinstance(sub, sympy.Function) and not isinstance(sub, AppliedUndef) and _has_index(sub) \
                and not isinstance(sub, (sympy.floor, sympy.ceiling)):
            return False
    return True


# -- index variables ------------------------------------------------------------------------------

_INDEX: set[sympy.Symbol] = set()
_VARS: dict[tuple, sympy.Symbol] = {}


def _ivar(name: str) -> sympy.Symbol:
    s = _VARS.get(("n", name))
    if s is None:
        s = sympy.Symbol(name, integer=True, nonnegative=True)
        _VARS[("n", name)] = s
        _INDEX.add(s)
    return s


def X(k: int, m: int = 0) -> sympy.Symbol:
    """The index variable of digit m of axis k of a value."""
    return _ivar(f"x{k}_{m}")


class _Temps:
    """Fresh temporary index variables (contracted axes, key indices)."""

    def __init__(self):
        self.n = 0

    def __call__(self) -> sympy.Symbol:
        self.n += 1
        return _ivar(f"t{self.n}")


def _has_index(e) -> bool:
    return isinstance(e, sympy.Basic) and bool(e.free_symbols & _INDEX)


def _route_fn(k: int):
    """p_k: the position of a route's j-th compacted token (strictly increasing)."""
    return sympy.Function(f"p{k}", integer=True, nonnegative=True)


# -- terms --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """Elements where `guard` holds read no token after min(bounds)."""

    bounds: frozenset
    guard: Guard = TRUE
    origin: tuple | None = field(default=None, compare=False)     # (node, reason): where it lost its position

    def subst(self, m: dict) -> Term | None:
        if not m:
            return self
        bounds = frozenset(_sub(b, m) for b in self.bounds)
        g = _conj(frozenset(_atom(a.expr.xreplace(m), a.strict) for a in self.guard))
        if g is None:
            return None
        return Term(_trim(bounds), g, self.origin)

    def is_top(self) -> bool:
        return all(b == OO for b in self.bounds)


def _sub(b, m):
    if b == OO:
        return OO
    return sympy.expand(b.xreplace(m))


def _trim(bounds: Iterable) -> frozenset:
    bs = set(bounds)
    if len(bs) > 1:
        bs.discard(OO)
    if len(bs) <= MAX_ALTS:
        return frozenset(bs)
    ranked = sorted(bs, key=lambda b: (not _has_index(b), len(str(b)), str(b)))
    return frozenset(ranked[:MAX_ALTS])


def _top(origin=None) -> Term:
    return Term(frozenset([OO]), TRUE, origin)


def _tag(t: Term, origin) -> Term:
    """Name where a term lost its position: the first construct of the model does (a limit of the
    analysis, a weak origin, only until one does)."""
    if origin is None or (t.origin is not None and not (_weak_origin(t.origin) and not _weak_origin(origin))):
        return t
    return replace(t, origin=origin)


@lru_cache(maxsize=65536)
def _le(a, b) -> bool:
    """a <= b provably (for every value of the symbols)."""
    if a == b:
        return True
    if b == OO or a == -OO:
        return True
    if a == OO or b == -OO:
        return False
    d = sympy.expand(a - b)
    return d.is_nonpositive is True


def _subsumes(t: Term, u: Term) -> bool:
    """t covers u: wherever u applies t applies, with a bound at least as large."""
    if not t.guard <= u.guard:
        return False
    if t.is_top():
        return True
    return all(any(_le(ub, tb) for ub in u.bounds) for tb in t.bounds)


def _union(*term_lists: Iterable[Term]) -> tuple[Term, ...]:
    out: list[Term] = []
    for ts in term_lists:
        for t in ts:
            if t is None:
                continue
            cover = next((i for i, o in enumerate(out) if _subsumes(o, t)), None)
            if cover is not None:
                o = out[cover]
                if _weak_origin(o.origin) and not _weak_origin(t.origin):
                    out[cover] = replace(o, origin=t.origin)      # name the model's construct, not the analysis
                continue
            out = [o for o in out if not _subsumes(t, o)] + [t]
    if len(out) > MAX_TERMS:
        out = [_merge(out)]
    return tuple(out)


def _weak_origin(origin) -> bool:
    """An origin that names a limit of the analysis (or a shift) rather than a construct of the model."""
    return origin is None or origin[2]


def _merge(terms: list[Term]) -> Term:
    """One term that reads everything (too many terms to keep): a coarse over-approximation."""
    origin = next((t.origin for t in terms if t.origin is not None), None)
    return _top(origin)


def _restrict(terms: Iterable[Term], dnf) -> tuple[Term, ...]:
    """The terms, only where `dnf` holds (None: everywhere)."""
    if dnf is None:
        return tuple(terms)
    out = []
    for t in terms:
        for conj in dnf:
            g = _conj(t.guard, conj)
            if g is not None:
                out.append(Term(t.bounds, g, t.origin))
    return _union(out)


# -- eliminating an index variable (the sup over an axis) -----------------------------------------


def _mono(e, v) -> int | None:
    """+1 if e is non-decreasing in v, -1 if non-increasing, 0 if free of it, None if unknown."""
    if not isinstance(e, sympy.Basic) or not e.has(v):
        return 0
    if e == v:
        return 1
    if isinstance(e, sympy.Add):
        ms = {_mono(a, v) for a in e.args}
        if None in ms or ms >= {1, -1}:
            return None
        return 1 if 1 in ms else (-1 if -1 in ms else 0)
    if isinstance(e, sympy.Mul):
        dep = [a for a in e.args if a.has(v)]
        if len(dep) != 1:
            return None
        coef = sympy.Mul(*[a for a in e.args if not a.has(v)])
        m = _mono(dep[0], v)
        if m is None:
            return None
        if coef.is_positive:
            return m
        if coef.is_negative:
            return -m
        return None
    if isinstance(e, AppliedUndef) and len(e.args) == 1:
        return _mono(e.args[0], v)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return _mono(e.args[0], v)
    if isinstance(e, (sympy.Max, sympy.Min)):
        ms = {_mono(a, v) for a in e.args}
        if None in ms or ms >= {1, -1}:
            return None
        return 1 if 1 in ms else (-1 if -1 in ms else 0)
    return None


def _linear_in(e, v):
    """(c, r) with e == c*v + r, c and r free of v; None if e is not linear in v."""
    e = sympy.expand(e)
    c = e.coeff(v)
    r = sympy.expand(e - c * v)
    if c.has(v) or r.has(v) or c == 0:
        return None
    return c, r


def _bounds_of(guard: Guard, v):
    """Upper and lower bounds on v from the guard's atoms, and the atoms free of v (kept)."""
    uppers, lowers, kept = [], [], []
    for a in guard:
        if not a.expr.has(v):
            kept.append(a)
            continue
        lin = _linear_in(a.expr, v)
        if lin is None:
            continue                                     # dropped: a weaker guard
        c, r = lin
        if c.is_positive:
            b = -r / c
            if a.strict:
                b = b - 1 if (c == 1 and r.is_integer) else b
            uppers.append(sympy.expand(b))
        elif c.is_negative:
            b = -r / c
            if a.strict:
                b = b + 1 if (c == -1 and r.is_integer) else b
            lowers.append(sympy.expand(b))
    return uppers, lowers, kept


def _rank(cands):
    """Candidate bounds, most informative first: those relating index variables, then short ones."""
    uniq = []
    for c in cands:
        if c not in uniq:
            uniq.append(c)
    return sorted(uniq, key=lambda b: (not _has_index(b), len(str(b)), str(b)))


ZERO = sympy.Integer(0)


def _sup_term(t: Term, v, hi, lo=ZERO, origin=None) -> Term | None:
    """Eliminate index variable v (lo <= v <= hi) from a term: the sup of its bound over v."""
    uppers, lowers, kept = _bounds_of(t.guard, v)
    all_up = _rank(uppers + [hi])
    all_lo = _rank(lowers + [lo])
    new_atoms = []
    pairs = [(L, U) for L in all_lo for U in all_up]
    if len(pairs) <= 16:
        for L, U in pairs:
            a = _atom(L - U)
            if _truth(a) is False:
                return None                              # infeasible: no element has this term
            if _has_index(a.expr):
                new_atoms.append(a)
    g = _conj(frozenset(kept), frozenset(new_atoms))
    if g is None:
        return None
    out = set()
    lost = False
    for b in t.bounds:
        if b == OO or not b.has(v):
            out.add(b)
            continue
        m = _mono(b, v)
        cands = all_up if m == 1 else all_lo if m == -1 else None
        if cands is None:
            out.add(OO)
            continue
        for c in cands[:MAX_ALTS]:
            r = _sub(b, {v: c})
            out.add(r)
        if not any(_has_index(_sub(b, {v: c})) for c in cands[:MAX_ALTS]) and _has_index(b):
            lost = True
    nt = Term(_trim(out), g, t.origin)
    if lost and not any(_le(b, 0) for b in nt.bounds):       # position 0 (or history) harms no position
        nt = _tag(nt, origin)
    return nt


def _sup(terms: Iterable[Term], ranges: list[tuple], origin=None) -> tuple[Term, ...]:
    """Eliminate several index variables [(v, hi), ...] (each 0 <= v <= hi)."""
    out = []
    for t in terms:
        cur = t
        for v, hi in ranges:
            if cur is None:
                break
            if not (any(isinstance(b, sympy.Basic) and b.has(v) for b in cur.bounds)
                    or any(a.expr.has(v) for a in cur.guard)):
                continue
            cur = _sup_term(cur, v, hi, origin=origin)
        if cur is not None:
            out.append(cur)
    return _union(out)


def _project(dnf, vs) -> Any:
    """∃ vs: drop the atoms that mention them (an over-approximation of where a value is nonzero)."""
    if dnf is None:
        return None
    out = []
    for conj in dnf:
        c = frozenset(a for a in conj if not any(a.expr.has(v) for v in vs))
        if c not in out:
            out.append(c)
    return _cap_dnf(out)


# -- abstract values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AV:
    """The abstract value of one tensor (see the module docstring)."""

    shape: tuple
    digits: tuple                       # per axis: the sizes of its digits, most significant first
    terms: tuple = ()
    nz: Any = None                      # list of Guard (a disjunction); None: anywhere
    val: Any = None                     # ((guard, expr), ...): exact, piecewise; None: unknown

    @property
    def rank(self) -> int:
        return len(self.shape)

    def vars(self, k: int) -> list[tuple]:
        """(variable, size) of axis k's digits."""
        return [(X(k, m), s) for m, s in enumerate(self.digits[k])]

    def ranges(self, axes=None) -> list[tuple]:
        axes = range(self.rank) if axes is None else axes
        return [(v, s - 1) for k in axes for v, s in self.vars(k)]

    def subst(self, m: dict, shape=None, digits=None, terms=None) -> AV:
        ts = self.terms if terms is None else terms
        ts = _union([t.subst(m) for t in ts]) if m else ts
        nz = None if self.nz is None else _cap_dnf([c for c in (_conj(frozenset(
            _atom(a.expr.xreplace(m), a.strict) for a in conj)) for conj in self.nz) if c is not None])
        val = None
        if self.val is not None:
            pieces = []
            for g, e in self.val:
                g2 = _conj(frozenset(_atom(a.expr.xreplace(m), a.strict) for a in g))
                if g2 is not None:
                    pieces.append((g2, e.xreplace(m) if isinstance(e, sympy.Basic) else e))
            val = tuple(pieces)
        return AV(self.shape if shape is None else tuple(shape), self.digits if digits is None else tuple(digits),
                  ts, nz, val)


def _single(shape) -> tuple:
    return tuple((d,) for d in shape)


def _blank(shape, terms=(), nz=None, val=None) -> AV:
    return AV(tuple(shape), _single(shape), tuple(terms), nz, val)


def _const_av(shape, value) -> AV:
    val = ((TRUE, value),)
    return AV(tuple(shape), _single(shape), (), _val_nz(val), val)


def _val_nz(val):
    """Where an exact value may be nonzero."""
    if val is None:
        return None
    out = []
    for g, e in val:
        if isinstance(e, (bool, sympy.logic.boolalg.Boolean)):
            d = _bool_dnf(e)
            if d is None:
                out.append(g)
                continue
            for c in d:
                cc = _conj(g, c)
                if cc is not None:
                    out.append(cc)
            continue
        if isinstance(e, sympy.Basic) and e.is_zero:
            continue
        out.append(g)
    return _cap_dnf(out)


def _val_truth(val, negate: bool = False):
    """Where a boolean exact value is true (false with `negate`): a disjunction, or None when unknown."""
    if val is None:
        return None
    out = []
    for g, e in val:
        b = _as_bool(e)
        d = _bool_dnf(sympy.Not(b) if negate else b)
        if d is None:
            return None
        for c in d:
            cc = _conj(g, c)
            if cc is not None and cc not in out:
                out.append(cc)
    if len(out) > MAX_DNF:
        return None
    return out


def _val_false(val):
    return _val_truth(val, negate=True)


def _as_bool(e):
    if isinstance(e, bool):
        return sympy.true if e else sympy.false
    if isinstance(e, sympy.logic.boolalg.Boolean):
        return e
    if isinstance(e, sympy.Basic) and e.is_number:
        return sympy.true if e != 0 else sympy.false
    return sympy.Ne(e, 0)


def _val_map(vals: list, fn):
    """Apply fn to the pieces of several exact values (their cross product); None when one is unknown."""
    if any(v is None for v in vals):
        return None
    out = []
    for combo in itertools.product(*vals):
        g = _conj(*[c[0] for c in combo])
        if g is None:
            continue
        try:
            e = fn(*[c[1] for c in combo])
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        if e is None:
            return None
        if isinstance(e, list):                       # fn split the piece: [(extra guard, expr), ...]
            for g2, e2 in e:
                gg = _conj(g, g2)
                if gg is not None:
                    out.append((gg, e2))
        else:
            out.append((g, e))
        if len(out) > MAX_PIECES:
            return None
    return tuple(out)


# -- the verdict -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """An output not proved causal, and the op where its dependence lost its position."""

    output: str
    node: Node | None
    reason: str
    mode: str | None = None            # "training" / "inference" when only that forward leaks

    def where(self) -> str:
        if self.node is not None and self.node.span is not None:
            return f"`{self.node.op.value}` at {self.node.span}"
        if self.node is not None:
            return f"`{self.node.op.value}`"
        return "an unknown op"


@dataclass(frozen=True)
class Verdict:
    graph: str
    applies: bool                      # a language model: one token input i64[B, T]
    causal: bool | None                # None when it does not apply
    leaks: tuple[Leak, ...] = ()
    declared: str | None = None        # the architecture's `noncausal` declaration (its reason)
    checked: tuple[str, ...] = ()      # the outputs with a sequence axis
    modes: tuple[str, ...] = ()        # the forwards analysed (inference, training)
    failures: tuple[str, ...] = ()     # ops the analysis could not model (it assumed they read everything)

    def line(self) -> str:
        """The one-line summary `archc cost` and `archc ir --remarks` print."""
        decl = ""
        if self.declared is not None:
            decl = "; declared non-causal" + (f" ({self.declared})" if self.declared else "")
        if not self.applies:
            return "causality: not analysed (not a language model: one i64 [B, T] token input)" + decl
        if self.causal:
            if not self.checked:
                return "causality: no output has a sequence axis" + decl
            return f"causality: causal (every position of {', '.join(self.checked)} reads only tokens up to it)" + decl
        leak = self.leaks[0]
        modes = {lk.mode for lk in self.leaks}
        head = "not causal"
        if modes == {"training"}:
            head = "causal at inference, not in training"
        elif modes == {"inference"}:
            head = "causal in training, not at inference"
        return (f"causality: {head}: `{leak.output}` reads later tokens through {leak.where()}: {leak.reason}"
                + decl)


# -- the interpreter -------------------------------------------------------------------------------


class _Analysis:
    def __init__(self, g: Graph, training: bool = False):
        self.g = g
        self.training = training
        self.temps = _Temps()
        self.sym_map: dict = {}
        defaults = {}
        for s in g.symbols:
            if s.kind == "dim":
                self.sym_map[sympy.Symbol(s.name)] = sympy.Symbol(s.name, integer=True, positive=True)
        from archc.ir.interpret import resolve_bindings
        try:
            defaults = resolve_bindings(g)
        except ArchError:
            defaults = {}
        for s in g.symbols:
            if s.kind == "int":
                v = defaults.get(s.name)
                kw = {"integer": True}
                if isinstance(v, (int, float)) and v > 0:
                    kw["positive"] = True
                elif isinstance(v, (int, float)) and v >= 0:
                    kw["nonnegative"] = True
                self.sym_map[sympy.Symbol(s.name)] = sympy.Symbol(s.name, **kw)
            elif s.kind == "float":
                v = defaults.get(s.name)
                kw = {"real": True}
                if isinstance(v, (int, float)) and v > 0:
                    kw["positive"] = True
                self.sym_map[sympy.Symbol(s.name)] = sympy.Symbol(s.name, **kw)
        self.env: dict[str, AV] = {}
        self.kv: dict[str, tuple] = {}
        self.frame = ("top",)
        self.routes = 0
        self.data_dims: list[tuple] = []     # (symbols rebound to a data-dependent count, the terms it reads)
        self.node: Node | None = None
        self.failures: list[str] = []        # ops the analysis could not model (treated as reading everything)

    # -- expressions from the graph --------------------------------------------------------------

    def x(self, e):
        """A graph expression with the analysis' assumption-carrying symbols."""
        if isinstance(e, bool):
            return sympy.true if e else sympy.false
        if isinstance(e, int):
            return sympy.Integer(e)
        if isinstance(e, float):
            return sympy.Float(e) if not e.is_integer() else sympy.Integer(int(e))
        if isinstance(e, sympy.Basic):
            return e.xreplace(self.sym_map)
        if isinstance(e, tuple):
            return tuple(self.x(v) for v in e)
        return e

    def shape(self, t) -> tuple:
        return tuple(self.x(as_expr(d)) for d in t.shape)

    def origin(self, reason: str, weak: bool = False):
        """Where a term loses its position: (this node, why, whether it is a limit of the analysis)."""
        return (self.node, reason, weak)

    # -- regions ----------------------------------------------------------------------------------

    def region(self, r: Region, args: list[AV]) -> list[AV]:
        for a, av in zip(r.args, args):
            self.env[a.name] = self.fit(av, self.shape(a.type))
        for n in r.nodes:
            self.visit(n)
        return [self.env[name] for name in r.results]

    def fit(self, av: AV, shape) -> AV:
        """The same abstract value, typed with `shape` (a region argument's own dims)."""
        if len(shape) != av.rank:
            return _blank(shape, self.whole(av))
        bad = [k for k, (d, s) in enumerate(zip(av.digits, shape)) if len(d) > 1 and not _same(sympy.Mul(*d), s)]
        if bad:
            av = self.collapse(av, bad)
        return replace(av, shape=tuple(shape), digits=tuple(
            d if len(d) > 1 else (s,) for d, s in zip(av.digits, shape)))

    def visit(self, n: Node):
        saved = self.node
        self.node = n
        try:
            fn = _HANDLERS.get(n.op)
            ins = [self.env[i] for i in n.inputs]
            if fn is None:
                outs = self.fallback(n, ins, f"`{n.op.value}` is not modelled: every element may read all of its operands")
            else:
                try:
                    outs = fn(self, n, ins)
                except (ArithmeticError, TypeError, ValueError, AttributeError, KeyError, IndexError,
                        RecursionError, sympy.SympifyError) as err:      # a limit of the analysis, not an error
                    self.failures.append(f"{n.op.value}: {type(err).__name__}: {err}")
                    outs = self.fallback(n, ins, f"the analysis could not model this `{n.op.value}`")
        finally:
            self.node = saved
        for o, av in zip(n.outputs, outs):
            self.env[o.name] = av

    def fallback(self, n: Node, ins: list[AV], reason: str) -> list[AV]:
        """Any op: every result element may read every element of its operands and of the values its
        regions read."""
        avs = list(ins)
        for r in n.regions:
            avs += [self.env[v] for v in free_values(r) if v in self.env]
        ts = self.whole(*avs, reason=reason, weak=True)
        return [_blank(self.shape(o.type), ts) for o in n.outputs]

    def whole(self, *avs: AV, reason: str | None = None, weak: bool = False) -> tuple[Term, ...]:
        """What an element reading every element of these values reads (every index variable eliminated)."""
        origin = self.origin(reason, weak) if reason else None
        out = []
        for av in avs:
            out.extend(_sup(av.terms, av.ranges(), origin))
        return _union(out)

    # -- alignment ---------------------------------------------------------------------------------

    def align(self, av: AV, shape, digits=None) -> AV:
        """`av` broadcast to `shape` (right-aligned), its index variables renamed to the result's."""
        R = len(shape)
        digits = tuple(digits) if digits is not None else _single(shape)
        off = R - av.rank
        if off < 0:
            return _blank(shape, self.whole(av))
        m = {}
        for k in range(av.rank):
            r = k + off
            mine = av.vars(k)
            if av.shape[k] == 1 and len(mine) == 1:
                m[mine[0][0]] = sympy.Integer(0)
                continue
            if not _same(av.shape[k], shape[r]):
                # a dim that is not the result's can only broadcast (be 1 at run time): every element
                av = self.collapse(av, [k])
                m[X(k, 0)] = sympy.Integer(0)
                continue
            theirs = [(X(r, j), s) for j, s in enumerate(digits[r])]
            if len(mine) == len(theirs) and all(_same(a[1], b[1]) for a, b in zip(mine, theirs)):
                for a, b in zip(mine, theirs):
                    m[a[0]] = b[0]
            elif len(mine) == 1:
                idx, stride = sympy.Integer(0), sympy.Integer(1)
                for v, s in reversed(theirs):
                    idx += v * stride
                    stride = stride * s
                m[mine[0][0]] = idx
            else:
                av = self.collapse(av, [k])
                m[X(k, 0)] = X(r, 0)
                m.update({v: sympy.Integer(0) for v, _ in mine[1:]})
        # variables of axes kept move from k to k + off: rename all at once
        return av.subst(m, shape, digits)

    def collapse(self, av: AV, axes) -> AV:
        """Forget the index variables of `axes` (their terms take the worst case; the value is unknown)."""
        rs = av.ranges(axes)
        vs = [v for v, _ in rs]
        terms = _sup(av.terms, rs, self.origin(_LOST, weak=True))
        val = av.val
        if val is not None and any(isinstance(e, sympy.Basic) and any(e.has(v) for v in vs) or
                                   any(a.expr.has(v) for a in g for v in vs) for g, e in val):
            val = None
        digits = list(av.digits)
        for k in axes:
            digits[k] = (av.shape[k],)
        return AV(av.shape, tuple(digits), terms, _project(av.nz, vs), val)

    def common_digits(self, shape, avs: list[AV]) -> tuple:
        """The digit structure of a broadcast result: the finest the operands agree on."""
        R = len(shape)
        out = []
        for r in range(R):
            best = (shape[r],)
            for av in avs:
                k = r - (R - av.rank)
                if k < 0 or av.shape[k] == 1:
                    continue
                d = av.digits[k]
                if len(d) > len(best) and _same(sympy.Mul(*d), shape[r]):
                    best = d
            out.append(tuple(best))
        return tuple(out)


def _same(a, b) -> bool:
    if a == b:
        return True
    try:
        return sympy.expand(a - b) == 0
    except TypeError:
        return False


# -- op handlers -------------------------------------------------------------------------------------

_HANDLERS: dict = {}


def handles(*ops):
    def deco(fn):
        for o in ops:
            _HANDLERS[o] = fn
        return fn
    return deco


@handles(Op.CONST)
def _h_const(A: _Analysis, n: Node, ins):
    v = A.x(n.attr("value"))
    terms = _data_terms(A, v)
    return [_const_av((), v) if not terms else _blank((), terms)]


@handles(Op.FULL)
def _h_full(A: _Analysis, n: Node, ins):
    shape = A.shape(n.out.type)
    v = A.x(n.attr("value"))
    terms = _data_terms(A, v)
    av = _const_av(shape, v)
    return [av if not terms else replace(av, terms=terms, val=None)]


def _data_terms(A: _Analysis, e) -> tuple:
    """Inside a route_mask body the length symbol counts the selected tokens: a value of it reads the mask."""
    out = []
    for syms, terms in A.data_dims:
        if isinstance(e, sympy.Basic) and any(e.has(s) for s in syms):
            out.extend(terms)
    return _union(out)




@handles(Op.ARANGE)
def _h_arange(A, n, ins):
    shape = A.shape(n.out.type)
    return [AV(shape, _single(shape), (), [frozenset([_atom(-X(0), True)])], ((TRUE, X(0)),))]


@handles(Op.PARAM, Op.KV_READ)
def _h_param(A, n, ins):
    if n.op is Op.KV_READ:
        return _kv_read(A, n)
    return [_blank(A.shape(n.out.type))]


_ZERO_PRESERVING = {Op.NEG, Op.ABS, Op.RELU, Op.GELU, Op.SILU, Op.TANH, Op.SIN, Op.SQRT, Op.DETACH, Op.CAST}
_SYMPY_UNARY = {Op.NEG: lambda e: -e, Op.ABS: sympy.Abs, Op.EXP: sympy.exp, Op.LOG: sympy.log,
                Op.SQRT: sympy.sqrt, Op.SIN: sympy.sin, Op.COS: sympy.cos, Op.TANH: sympy.tanh,
                Op.DETACH: lambda e: e}


@handles(Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.ABS, Op.TANH, Op.SIGMOID, Op.RELU, Op.GELU, Op.SILU,
         Op.SOFTPLUS, Op.SIN, Op.COS, Op.NOT, Op.DETACH, Op.CAST)
def _h_unary(A, n, ins):
    (a,) = ins
    nz = a.nz if n.op in _ZERO_PRESERVING else None
    val = None
    if a.val is not None:
        if n.op is Op.NOT:
            val = _val_map([a.val], lambda e: sympy.Not(_as_bool(e)))
        elif n.op is Op.CAST:
            val = _val_map([a.val], lambda e: _cast(e, n.attr("dtype")))
        elif n.op in _SYMPY_UNARY:
            val = _val_map([a.val], lambda e: _SYMPY_UNARY[n.op](e) if not isinstance(e, sympy.logic.boolalg.Boolean)
                           else None)
    if n.op is Op.NOT:
        nz = _val_false(a.val) if a.val is not None else None
    if n.op is Op.CAST and n.attr("dtype") == "bool":
        nz = a.nz
    if val is not None:
        nz = _val_nz(val) if nz is None else nz
    return [AV(a.shape, a.digits, a.terms, nz, val)]


def _cast(e, dtype):
    if dtype == "bool":
        return _as_bool(e)
    if isinstance(e, sympy.logic.boolalg.Boolean):
        return [(g, sympy.Integer(1)) for g in (_bool_dnf(e) or [])] + \
               [(g, sympy.Integer(0)) for g in (_bool_dnf(sympy.Not(e)) or [])] \
            if _bool_dnf(e) is not None and _bool_dnf(sympy.Not(e)) is not None else None
    if dtype == "i64":
        return e if e.is_integer else None
    return e


def _binary_val(op, a, b):
    if op is Op.ADD:
        return a + b
    if op is Op.SUB:
        return a - b
    if op is Op.MUL:
        return a * b
    if op is Op.DIV:
        return a / b
    if op is Op.POW:
        return a ** b
    if op in (Op.MAXIMUM, Op.MINIMUM):
        if not (_linearish(a) and _linearish(b)):
            return None
        d = _bool_dnf(sympy.Ge(a, b))
        nd = _bool_dnf(sympy.Lt(a, b))
        if d is None or nd is None:
            return None
        hi, lo = (a, b) if op is Op.MAXIMUM else (b, a)
        return [(g, hi) for g in d] + [(g, lo) for g in nd]
    rel = {Op.GT: sympy.Gt, Op.LT: sympy.Lt, Op.GE: sympy.Ge, Op.LE: sympy.Le, Op.EQ: sympy.Eq, Op.NE: sympy.Ne}
    if op in rel:
        return rel[op](a, b)
    if op is Op.AND:
        return sympy.And(_as_bool(a), _as_bool(b))
    if op is Op.OR:
        return sympy.Or(_as_bool(a), _as_bool(b))
    return None


@handles(Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM, Op.GT, Op.LT, Op.GE, Op.LE, Op.EQ, Op.NE,
         Op.AND, Op.OR)
def _h_binary(A, n, ins):
    shape = A.shape(n.out.type)
    digits = A.common_digits(shape, ins)
    a, b = (A.align(x, shape, digits) for x in ins)
    terms = _union(a.terms, b.terms)
    val = _val_map([a.val, b.val], lambda x, y: _binary_val(n.op, x, y))
    if n.op is Op.MUL:
        nz = _dnf_and(a.nz, b.nz)
        terms = _restrict(terms, nz)
    elif n.op is Op.DIV:
        nz = a.nz
        terms = _restrict(terms, nz)
    elif n.op in (Op.ADD, Op.SUB):
        nz = _dnf_or(a.nz, b.nz)
    elif n.op is Op.AND:
        nz = _dnf_and(a.nz, b.nz)
    elif n.op is Op.OR:
        nz = _dnf_or(a.nz, b.nz)
    else:
        nz = None
    if val is not None:
        vn = _val_nz(val)
        nz = vn if nz is None else _dnf_and(nz, vn) if vn is not None else nz
    return [AV(shape, digits, terms, nz, val)]


@handles(Op.WHERE)
def _h_where(A, n, ins):
    shape = A.shape(n.out.type)
    digits = A.common_digits(shape, ins)
    c, a, b = (A.align(x, shape, digits) for x in ins)
    yes, no = _val_truth(c.val), _val_false(c.val)
    if yes is not None and no is not None:
        terms = _union(c.terms, _restrict(a.terms, yes), _restrict(b.terms, no))
        nz = _dnf_or(_dnf_and(yes, a.nz) if a.nz is not None else yes,
                     _dnf_and(no, b.nz) if b.nz is not None else no)
    else:
        terms = _union(c.terms, a.terms, b.terms)
        nz = _dnf_or(a.nz, b.nz)
    val = None
    if c.val is not None and a.val is not None and b.val is not None:
        def pick(cv, av, bv):
            d, nd = _bool_dnf(_as_bool(cv)), _bool_dnf(sympy.Not(_as_bool(cv)))
            if d is None or nd is None:
                return None
            return [(g, av) for g in d] + [(g, bv) for g in nd]
        val = _val_map([c.val, a.val, b.val], pick)
    return [AV(shape, digits, terms, nz, val)]


def _axis(n: Node, rank: int) -> int:
    ax = int(n.attr("axis"))
    return ax + rank if ax < 0 else ax


def _drop_axis(av: AV, k: int, shape) -> AV:
    """`av` (free of axis k's variables) with axis k removed: later axes renumbered."""
    m = {}
    digits = list(av.digits)
    for j in range(k + 1, av.rank):
        for mm in range(len(av.digits[j])):
            m[X(j, mm)] = X(j - 1, mm)
    del digits[k]
    return av.subst(m, shape, digits)


_LOST = "the analysis cannot follow positions through it (an over-approximation)"
_UNRELATED = "its key positions cannot be related to its query positions"
_NO_MASK = "its mask is not known, so every key is assumed visible"
_WEAK_WHY = {_UNRELATED, _NO_MASK}
_REDUCE_REASON = "reduces over an axis that holds positions: every element reads all of them"


@handles(Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.ARGMAX)
def _h_reduce(A, n, ins):
    (a,) = ins
    k = _axis(n, a.rank)
    shape = A.shape(n.out.type)
    rs = a.ranges([k])
    terms = _sup(a.terms, rs, A.origin(f"`{n.op.value}` {_REDUCE_REASON}"))
    nz = _project(a.nz, [v for v, _ in rs]) if n.op in (Op.SUM, Op.MEAN, Op.AMAX) else None
    b = AV(a.shape, a.digits[:k] + ((a.shape[k],),) + a.digits[k + 1:], terms, nz, None)
    if n.attr("keepdim"):
        return [replace(b, shape=shape, digits=b.digits[:k] + ((sympy.Integer(1),),) + b.digits[k + 1:])]
    return [_drop_axis(b, k, shape)]


@handles(Op.SOFTMAX, Op.TOPK_MASK)
def _h_softmax(A, n, ins):
    (a,) = ins
    k = _axis(n, a.rank)
    rs = a.ranges([k])
    what = "softmax" if n.op is Op.SOFTMAX else "top-k"
    terms = _sup(a.terms, rs, A.origin(f"a {what} over an axis that holds positions reads all of them"))
    return [AV(a.shape, a.digits, terms, None, None)]


@handles(Op.CUMSUM)
def _h_cumsum(A, n, ins):
    (a,) = ins
    k = _axis(n, a.rank)
    if len(a.digits[k]) > 1:
        a = A.collapse(a, [k])
    v = X(k)
    y = A.temps()
    moved = [t.subst({v: y}) for t in a.terms]
    guarded = [Term(t.bounds, _conj(t.guard, frozenset([_atom(y - v)])) or TRUE, t.origin) for t in moved if t]
    terms = _sup(guarded, [(y, a.shape[k] - 1)], A.origin("a running sum"))
    return [AV(a.shape, a.digits, terms, None, None)]


@handles(Op.RMS_NORM, Op.LAYER_NORM, Op.L2_NORMALIZE)
def _h_norm(A, n, ins):
    a = ins[0]
    last = a.rank - 1
    origin = A.origin(f"`{n.op.value}` normalises over an axis that holds positions")
    terms = _sup(a.terms, a.ranges([last]), origin)
    for w in ins[1:]:
        wa = A.align(w, a.shape, a.digits)
        terms = _union(terms, _sup(wa.terms, wa.ranges([last]), origin))
    nz = a.nz if n.op is Op.L2_NORMALIZE else (_dnf_and(a.nz, A.align(ins[1], a.shape, a.digits).nz)
                                              if n.op is Op.RMS_NORM else None)
    return [AV(a.shape, a.digits, terms, nz, None)]


# -- contractions ------------------------------------------------------------------------------------


def _contract(A: _Analysis, operands: list[tuple[AV, str]], out: str, shape, reason: str) -> AV:
    """Einstein summation: each output letter is a result axis, the others are summed over."""
    letter_var: dict[str, Any] = {ch: X(i) for i, ch in enumerate(out)}
    letter_size: dict[str, Any] = {}
    ts, nzs = [], []
    for av, spec in operands:
        for k, ch in enumerate(spec):
            if len(av.digits[k]) > 1:
                av = A.collapse(av, [k])
        m = {}
        for k, ch in enumerate(spec):
            if av.shape[k] == 1:
                m[X(k)] = sympy.Integer(0)
                continue
            if ch not in letter_var:
                letter_var[ch] = A.temps()
            letter_size.setdefault(ch, av.shape[k])
            m[X(k)] = letter_var[ch]
        b = av.subst(m)
        ts.append(b.terms)
        nzs.append(b.nz)
    nz = None
    for z in nzs:
        nz = _dnf_and(nz, z)
    summed = [(v, letter_size[ch] - 1) for ch, v in letter_var.items() if ch not in out and ch in letter_size]
    terms = _sup(_restrict(_union(*ts), nz), summed, A.origin(reason))
    nz = _project(nz, [v for v, _ in summed])
    return _blank(shape, terms, nz)


_CONTRACT_REASON = "contracts over an axis that holds positions"


@handles(Op.EINSUM)
def _h_einsum(A, n, ins):
    lhs, rhs = n.attr("equation").replace(" ", "").split("->")
    specs = lhs.split(",")
    return [_contract(A, list(zip(ins, specs)), rhs, A.shape(n.out.type), f"einsum {_CONTRACT_REASON}")]


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@handles(Op.MATMUL)
def _h_matmul(A, n, ins):
    a, b = ins
    shape = A.shape(n.out.type)
    R = len(shape)
    batch = _LETTERS[:R - 2]
    m_, k_, n_ = "x", "y", "z"
    sa = batch[len(batch) - (a.rank - 2):] + m_ + k_
    sb = batch[len(batch) - (b.rank - 2):] + k_ + n_
    return [_contract(A, [(a, sa), (b, sb)], batch + m_ + n_, shape, f"matmul {_CONTRACT_REASON}")]


@handles(Op.LINEAR)
def _h_linear(A, n, ins):
    x, w = ins[0], ins[1]
    shape = A.shape(n.out.type)
    pre = _LETTERS[:x.rank - 1]
    out = _contract(A, [(x, pre + "y"), (w, "z" + "y")], pre + "z", shape, f"linear {_CONTRACT_REASON}")
    if len(ins) > 2:
        bias = A.align(ins[2], shape)
        out = replace(out, terms=_union(out.terms, bias.terms), nz=None)
    return [out]


def _gather_rows(A: _Analysis, src: AV, k: int, idx: AV, shape, reason: str) -> AV:
    """out[i.., j, rest] = src[i.., idx[i.., j], rest] (idx spans the result's first idx.rank axes)."""
    multi = [j for j in range(src.rank) if len(src.digits[j]) > 1]
    if multi:
        src = A.collapse(src, multi)
    ia = A.align(idx, shape[:idx.rank])
    m = {}
    for j in range(k):
        m.update({X(j, mm): X(j, mm) for mm in range(len(src.digits[j]))})
    # the rest of src's axes move after idx's
    for j in range(k + 1, src.rank):
        for mm in range(len(src.digits[j])):
            m[X(j, mm)] = X(idx.rank + j - k - 1, mm)
    terms = []
    if ia.val is not None and len(ia.val) <= 8:
        v = A.temps()
        moved = src.subst({**m, X(k): v})
        for g, e in ia.val:
            if not isinstance(e, sympy.Basic) or isinstance(e, sympy.logic.boolalg.Boolean):
                terms = None
                break
            terms.extend(_restrict([t2 for t2 in (t.subst({v: e}) for t in moved.terms) if t2], [g]))
    else:
        terms = None
    if terms is None:
        v = A.temps()
        moved = src.subst({**m, X(k): v})
        terms = list(_sup(moved.terms, [(v, src.shape[k] - 1)], A.origin(reason)))
    return _blank(shape, _union(terms, ia.terms))


@handles(Op.EMBEDDING)
def _h_embedding(A, n, ins):
    ids, table = ins
    return [_gather_rows(A, table, 0, ids, A.shape(n.out.type), "reads table rows at data-dependent indices")]


@handles(Op.GATHER)
def _h_gather(A, n, ins):
    x, idx = ins
    k = _axis(n, x.rank)
    return [_gather_rows(A, x, k, idx, A.shape(n.out.type), "gathers at data-dependent positions")]


@handles(Op.CONV1D)
def _h_conv1d(A, n, ins):
    x, w = ins[0], ins[1]
    shape = A.shape(n.out.type)
    k = x.rank - 2
    if len(x.digits[k]) > 1:
        x = A.collapse(x, [k])
    ksize = w.shape[-1]
    v = X(k)
    y = A.temps()
    moved = _sup(x.terms, x.ranges([x.rank - 1]), None)
    moved = [t.subst({v: y}) for t in moved]
    if n.attr("causal"):
        window = [_atom(y - v), _atom(v - ksize + 1 - y)]
        origin = None
    else:
        lo = sympy.floor((ksize - 1) / 2)
        window = [_atom(y - v - (ksize - 1 - lo)), _atom(v - lo - y)]
        origin = A.origin("a non-causal convolution reads later positions")
    guarded = [Term(t.bounds, g, t.origin) for t in moved if t for g in [_conj(t.guard, frozenset(window))] if g]
    terms = _sup(guarded, [(y, x.shape[k] - 1)], origin)
    if origin is not None:
        terms = tuple(_tag(t, origin) for t in terms)
    extra = [A.whole(w)]
    if len(ins) > 2:
        extra.append(A.whole(ins[2]))
    return [_blank(shape, _union(terms, *extra))]


# -- movement ----------------------------------------------------------------------------------------


@handles(Op.BROADCAST)
def _h_broadcast(A, n, ins):
    shape = A.shape(n.out.type)
    return [A.align(ins[0], shape, A.common_digits(shape, ins))]


@handles(Op.UNSQUEEZE)
def _h_unsqueeze(A, n, ins):
    (a,) = ins
    k = _axis(n, a.rank + 1)
    m = {}
    for j in range(k, a.rank):
        for mm in range(len(a.digits[j])):
            m[X(j, mm)] = X(j + 1, mm)
    digits = a.digits[:k] + ((sympy.Integer(1),),) + a.digits[k:]
    return [a.subst(m, A.shape(n.out.type), digits)]


@handles(Op.PERMUTE)
def _h_permute(A, n, ins):
    (a,) = ins
    perm = list(n.attr("perm"))
    m = {}
    for r, k in enumerate(perm):
        for mm in range(len(a.digits[k])):
            m[X(k, mm)] = X(r, mm)
    return [a.subst(m, A.shape(n.out.type), [a.digits[k] for k in perm])]


@handles(Op.SLICE)
def _h_slice(A, n, ins):
    (a,) = ins
    k = _axis(n, a.rank)
    if len(a.digits[k]) > 1:
        a = A.collapse(a, [k])
    start = A.x(as_expr(n.attr("start")))
    shape = A.shape(n.out.type)
    digits = list(a.digits)
    digits[k] = (shape[k],)
    out = a.subst({X(k): X(k) + start}, shape, digits)
    if start.is_positive:                          # a shift to later positions (weak: often realigned later)
        origin = A.origin(f"reads later positions: the slice starts at {start}", weak=True)
        out = replace(out, terms=tuple(_tag(t, origin) if any(isinstance(b, sympy.Basic) and b.has(X(k))
                                                               for b in t.bounds) else t for t in out.terms))
    return [_tag_lost(A, a, out, "reads a fixed position of an axis that holds positions")]


def _tag_lost(A: _Analysis, before: AV, after: AV, reason: str) -> AV:
    """Tag the terms that had index variables and lost them all (a fixed position was picked)."""
    if all(any(_has_index(b) for b in t.bounds) or t.is_top() for t in after.terms) or \
            not any(any(_has_index(b) for b in t.bounds) for t in before.terms):
        return after
    origin = A.origin(reason)
    ts = tuple(_tag(t, origin) if not any(_has_index(b) or _le(b, 0) for b in t.bounds) else t for t in after.terms)
    return replace(after, terms=ts)


@handles(Op.SELECT)
def _h_select(A, n, ins):
    a = ins[0]
    k = _axis(n, a.rank)
    shape = A.shape(n.out.type)
    if len(a.digits[k]) > 1:
        a = A.collapse(a, [k])
    if len(ins) > 1:                                 # a dynamic index: any element of the axis
        terms = _sup(a.terms, a.ranges([k]), A.origin("selects at a data-dependent position"))
        b = AV(a.shape, a.digits, _union(terms, A.whole(ins[1])), None, None)
        return [_drop_axis(b, k, shape)]
    idx = A.x(as_expr(n.attr("index")))
    b = a.subst({X(k): idx})
    b = _tag_lost(A, a, b, f"picks position {idx} of an axis that holds positions: what that position read "
                           "reaches every position that uses it")
    return [_drop_axis(b, k, shape)]


@handles(Op.CONCAT)
def _h_concat(A, n, ins):
    shape = A.shape(n.out.type)
    k = _axis(n, len(shape))
    digits = list(A.common_digits(shape, ins))
    digits[k] = (shape[k],)
    start = sympy.Integer(0)
    terms, nz, vals = [], [], []
    v = X(k)
    for av in ins:
        if len(av.digits[k]) > 1:
            av = A.collapse(av, [k])
        length = av.shape[k]
        al = A.align(replace(av, shape=av.shape[:k] + (shape[k],) + av.shape[k + 1:],
                             digits=av.digits[:k] + ((shape[k],),) + av.digits[k + 1:]), shape, digits)
        piece = al.subst({v: v - start})
        rng = [frozenset([_atom(start - v), _atom(v - start - length + 1)])]
        terms.extend(_restrict(piece.terms, rng))
        nz.extend((rng if piece.nz is None else _dnf_and(piece.nz, rng)) or [])
        if vals is not None and piece.val is not None:
            for g, e in piece.val:
                gg = _conj(g, rng[0])
                if gg is not None:
                    vals.append((gg, e))
        else:
            vals = None
        start = start + length
    nz = _cap_dnf(nz)
    if vals is not None and len(vals) > MAX_PIECES:
        vals = None
    return [AV(shape, tuple(digits), _union(terms), nz, tuple(vals) if vals is not None else None)]


@handles(Op.RESHAPE, Op.SPLIT_HEADS, Op.MERGE_HEADS)
def _h_reshape(A, n, ins):
    (a,) = ins
    return [_reshape(A, a, A.shape(n.out.type))]


def _reshape(A: _Analysis, a: AV, shape) -> AV:
    """Regroup digits. Source digits merged into one axis stay its digits ([B, L, T] -> [B, L*T] keeps
    (L, T)); a source digit split over several axes is a linear sum of their variables."""
    src = [(k, mm, s) for k in range(a.rank) for mm, s in enumerate(a.digits[k]) if s != 1]
    m = {X(k, mm): sympy.Integer(0) for k in range(a.rank) for mm, s in enumerate(a.digits[k]) if s == 1}
    out = [r for r, d in enumerate(shape) if d != 1]
    digits: list = [(sympy.Integer(1),) if d == 1 else None for d in shape]
    i = j = 0
    while i < len(src) and j < len(out):
        k, mm, s = src[i]
        r = out[j]
        d = shape[r]
        if _same(s, d):                                   # one digit to one axis
            digits[r] = (s,)
            m[X(k, mm)] = X(r, 0)
            i, j = i + 1, j + 1
            continue
        group, prod, i2 = [], sympy.Integer(1), i         # several digits merged into axis r
        while i2 < len(src) and not _same(prod, d):
            group.append(src[i2])
            prod = prod * src[i2][2]
            i2 += 1
        if _same(prod, d) and len(group) > 1:
            digits[r] = tuple(g[2] for g in group)
            for jj, (k2, mm2, _) in enumerate(group):
                m[X(k2, mm2)] = X(r, jj)
            i, j = i2, j + 1
            continue
        parts, prod, j2 = [], sympy.Integer(1), j         # one digit split over several axes
        while j2 < len(out) and not _same(prod, s):
            parts.append(out[j2])
            prod = prod * shape[out[j2]]
            j2 += 1
        if _same(prod, s) and len(parts) > 1:
            expr, stride = sympy.Integer(0), sympy.Integer(1)
            for p in reversed(parts):
                digits[p] = (shape[p],)
                expr += X(p, 0) * stride
                stride = stride * shape[p]
            m[X(k, mm)] = expr
            i, j = i + 1, j2
            continue
        break
    if i == len(src) and j == len(out):
        return a.subst(m, shape, digits)
    return _blank(shape, A.whole(a, reason="a reshape mixes positions with other axes"))


@handles(Op.ROPE)
def _h_rope(A, n, ins):
    a = ins[0]
    terms = _sup(a.terms, a.ranges([a.rank - 1]))
    if len(ins) > 1:
        pos = A.align(ins[1], a.shape[:2])
        terms = _union(terms, pos.terms)
    return [AV(a.shape, a.digits, terms, None, None)]


# -- attention ---------------------------------------------------------------------------------------


@handles(Op.ATTEND)
def _h_attend(A, n, ins):
    q, k, v, mask, qpos, kpos = attend_operands(n, ins)
    shape = A.shape(n.out.type)
    share = n.attr("kv_share")
    site = n.attr("site")
    frame_shared = True
    if share:
        k, v, kpos, frame_shared = _kv_lookup(A, share, site, k, v, kpos)
    if site:
        _kv_record(A, site, k, v, kpos)
    Tq, Tk = shape[1], k.shape[1]
    a_var = X(1)
    # keys: digits of axis 1 -> temporaries
    key_vars = [(A.temps(), s) for s in k.digits[1]]
    n_expr, stride = sympy.Integer(0), sympy.Integer(1)
    for kv_, s in reversed(key_vars):
        n_expr += kv_ * stride
        stride = stride * s
    def keys(av: AV | None, extra_axes=(2, 3)) -> list[Term]:
        """K, V or key-position terms over (batch, key digits); heads and channels summed over."""
        if av is None:
            return []
        if av.rank < 2:
            return list(A.whole(av))
        axes = [ax for ax in extra_axes if ax < av.rank]
        av = replace(av, terms=_sup(av.terms, av.ranges(axes)))
        if av.digits[1] != tuple(s for _, s in key_vars):
            av = A.collapse(av, [1])
        m = {}
        if av.shape[0] == 1 and len(av.digits[0]) == 1:
            m[X(0)] = sympy.Integer(0)
        kd = av.vars(1)
        if len(kd) == len(key_vars):
            m.update({kd[j][0]: key_vars[j][0] for j in range(len(kd))})
        else:
            m[kd[0][0]] = n_expr
        return list(av.subst(m).terms)

    kv_terms = _union(keys(k), keys(v), keys(kpos, ()))
    # what a query may see: a disjunction of (conjunction, why this case can look ahead)
    allowed, unmasked, qp = _attend_allowed(A, n, q, k, mask, qpos, kpos, a_var, key_vars, n_expr, Tq, Tk,
                                            frame_shared)
    own = a_var if qp is None else qp                      # what the query itself may read, at most
    seen = []
    key_ranges = [(kv_, s - 1) for kv_, s in key_vars]
    for conj, why in allowed:
        origin = A.origin(why, weak=why in _WEAK_WHY) if why else None
        ts = _restrict(kv_terms, [conj])
        ts = _sup(ts, key_ranges, origin)
        if why:      # name this attention where a key it may see reads past the query's position
            ts = tuple(t if any(_le(b, own) for b in t.bounds) else _tag(t, origin) for t in ts)
        seen.extend(ts)
    qa = A.align(q, shape[:3] + (q.shape[3],))
    q_terms = _sup(qa.terms, [(X(3), q.shape[3] - 1)])
    extra = []
    if mask is not None:       # the mask's value matters only at keys the rest allows
        ma = _attend_mask(A, mask, shape, key_vars)
        extra.extend(_sup(_restrict(ma.terms, [c for c, _ in unmasked]), key_ranges))
    if qpos is not None:
        extra.extend(A.align(qpos, shape[:2]).terms)
    return [_blank(shape, _union(q_terms, seen, extra))]


def _attend_mask(A: _Analysis, mask: AV, shape, key_vars) -> AV:
    """The mask ([Tq, Tk] or [B, Tq, Tk]) over the result's (batch, query) variables and the key digits."""
    B_, Tq = shape[0], shape[1]
    kd = tuple(s for _, s in key_vars)
    if mask.rank == 2:
        target = (Tq, sympy.Mul(*kd))
        digits = ((Tq,), kd)
        m_av = A.align(mask, target, digits)
        m = {X(0): X(1)}
        m.update({X(1, j): key_vars[j][0] for j in range(len(key_vars))})
    else:
        target = (B_, Tq, sympy.Mul(*kd))
        digits = ((B_,), (Tq,), kd)
        m_av = A.align(mask, target, digits)
        m = {X(0): X(0), X(1): X(1)}
        m.update({X(2, j): key_vars[j][0] for j in range(len(key_vars))})
    return m_av.subst(m)




def _attend_allowed(A: _Analysis, n: Node, q, k, mask, qpos, kpos, a_var, key_vars, n_expr, Tq, Tk, shared):
    """Which keys a query may attend to: [(conjunction, reason it may look ahead or None)]; the same
    without the mask (where the mask's own value matters); the query's position (None: unknown)."""
    causal = bool(n.attr("causal"))
    window = A.x(as_expr(n.attr("window") or 0))
    prefix = A.x(as_expr(n.attr("prefix") or 0))
    win_on = window != 0 and window.is_positive is True
    win_maybe = window != 0 and not win_on
    # positions: by index (queries aligned to the last Tq keys) or the position operands' exact values
    qp, kp = a_var + Tk - Tq, n_expr
    if qpos is not None or kpos is not None:
        qv = A.align(qpos, (Tq,) if qpos.rank == 1 else (qpos.shape[0], Tq)).val if qpos is not None else None
        kv_ = None
        if kpos is not None and len(key_vars) == 1:
            kv_ = A.align(kpos, (Tk,) if kpos.rank == 1 else (kpos.shape[0], Tk)).val
        if (qv is None or kv_ is None or len(qv) != 1 or len(kv_) != 1 or qv[0][0] or kv_[0][0]):
            qp = kp = None
        else:
            axis_q = 0 if qpos.rank == 1 else 1
            axis_k = 0 if kpos.rank == 1 else 1
            qp = qv[0][1].xreplace({X(axis_q): a_var, X(0): sympy.Integer(0)} if axis_q else {X(0): a_var})
            kp = kv_[0][1].xreplace({X(axis_k): key_vars[0][0], X(0): sympy.Integer(0)} if axis_k
                                    else {X(0): key_vars[0][0]})
    if not shared:
        qp = kp = None
    conj: list[Atom] = []
    why = None
    if causal and qp is not None:
        conj.append(_atom(kp - qp))
    elif (causal or win_on) and qp is None:
        why = _UNRELATED
    if win_on and qp is not None:
        if causal:
            conj.append(_atom(qp - kp - window, True))
        else:
            conj += [_atom(qp - kp - window, True), _atom(kp - qp - window, True)]
            why = why or "its window is symmetric: a query sees later keys"
    if not causal and not win_on:
        why = "attends to every key (not causal): later positions are visible"
        if win_maybe:
            why = "its window may be 0 (then it attends to every key)"
    struct = [(_conj(frozenset(conj)), why)]
    if prefix != 0 and (causal or window != 0) and not (prefix.is_zero is True):
        struct.append((frozenset([_atom(n_expr - prefix, True)]),
                       f"its first {prefix} keys (prefix) are visible to every query"))
    if mask is None:
        struct = [(c, w) for c, w in struct if c is not None]
        return struct, struct, qp
    ma = _attend_mask(A, mask, (q.shape[0], Tq), key_vars)
    truth = _val_truth(ma.val)
    if truth is None:          # the mask only hides more keys: what the rest allows, at most
        struct = [(c, w) for c, w in struct if c is not None]
        return [(c, _NO_MASK if (w is not None and not causal and not win_on) else w) for c, w in struct], struct, qp
    out = []
    for c, w in struct:
        if c is None:
            continue
        for t in truth:
            cc = _conj(c, t)
            if cc is not None:
                out.append((cc, w if w is None else (w + " (within its mask)")))
    if any(w is not None for _, w in struct) and not causal and not win_on:
        out = [(c, "its mask lets a query see later keys") for c, _ in out]
    return out, [(c, w) for c, w in struct if c is not None], qp




def _kv_record(A: _Analysis, site: str, k: AV, v: AV, kpos):
    prev = A.kv.get(site)
    entry = (k, v, kpos, A.frame)
    if prev is not None:
        pk, pv, ppos, pframe = prev
        if pframe == A.frame and pk.shape == k.shape and pk.digits == k.digits:
            entry = (replace(k, terms=_union(pk.terms, k.terms), val=None),
                     replace(v, terms=_union(pv.terms, v.terms), val=None),
                     kpos if (kpos is None and ppos is None) else None, A.frame)
        else:
            entry = (_blank(k.shape, A.whole(pk, k)), _blank(v.shape, A.whole(pv, v)), None, ("mixed",))
    A.kv[site] = entry


def _kv_lookup(A: _Analysis, share: str, site: str, k: AV, v: AV, kpos):
    """The K/V a shared site reads: its own or the source's (or the first recursion's)."""
    if share.startswith("recursion:"):
        src = site
    elif share.startswith("stochastic:"):
        src = share.split(":", 2)[2]
    else:
        src = share[len("from:"):]
    entry = A.kv.get(src)
    if entry is None:
        if share.startswith("recursion:"):
            return k, v, kpos, True
        reason = f"reads the K/V of `{src}`, which the analysis has not seen"
        return (_blank(k.shape, (_top(A.origin(reason, weak=True)),)), _blank(v.shape, (_top(A.origin(reason, weak=True)),)),
                None, False)
    sk, sv, spos, sframe = entry
    same = (sframe == A.frame and sk.shape == k.shape and sk.digits == k.digits and spos is None and kpos is None)
    if same:
        return (replace(k, terms=_union(k.terms, sk.terms), val=None),
                replace(v, terms=_union(v.terms, sv.terms), val=None), None, True)
    # a source of another length or frame: every one of its keys may be seen
    reason = f"reads the K/V of `{src}` from another frame, so every shared key is assumed visible"
    terms = _union(A.whole(k, v), A.whole(sk, sv, reason=reason, weak=True))
    return (_blank(k.shape, terms), _blank(v.shape, ()), None, False)


@handles(Op.KV_READ)
def _kv_read(A: _Analysis, n: Node, ins=()):
    site = n.attr("site")
    entry = A.kv.get(site)
    outs = []
    for o in n.outputs:
        outs.append(_blank(A.shape(o.type), (_top(A.origin(f"reads the K/V of `{site}`", weak=True)),)
                           if entry is None else ()))
    if entry is not None:
        sk, sv, spos, sframe = entry
        same = sframe == A.frame
        parts = [sk, sv, spos]
        for i, o in enumerate(n.outputs):
            p = parts[i] if i < len(parts) else None
            if p is None:
                outs[i] = _blank(A.shape(o.type))
            elif same and p.shape == A.shape(o.type):
                outs[i] = p
            else:
                outs[i] = _blank(A.shape(o.type), A.whole(p, reason=f"reads the K/V of `{site}` from another frame",
                                                          weak=True))
    return outs




# -- recurrences and memories ------------------------------------------------------------------------


@handles(Op.LINEAR_SCAN)
def _h_linear_scan(A, n, ins):
    a, b, h0 = ins
    shape = A.shape(n.out.type)
    k = _axis(n, len(shape))
    digits = A.common_digits(shape, [a, b])
    aa, bb = A.align(a, shape, digits), A.align(b, shape, digits)
    if len(digits[k]) > 1:
        aa, bb = A.collapse(aa, [k]), A.collapse(bb, [k])
    v = X(k)
    y = A.temps()
    moved = [t.subst({v: y}) for t in _union(aa.terms, bb.terms)]
    guarded = [Term(t.bounds, g, t.origin) for t in moved if t for g in [_conj(t.guard, frozenset([_atom(y - v)]))]
               if g is not None]
    terms = _sup(guarded, [(y, shape[k] - 1)], A.origin("a recurrence along an axis"))
    # h0 has the select's shape (the axis removed), broadcast against each step
    sel_shape = shape[:k] + shape[k + 1:]
    h = A.align(h0, sel_shape)
    hterms = _sup(h.terms, h.ranges())
    return [_blank(shape, _union(terms, hterms))]


@handles(Op.LINEAR_ATTN)
def _h_linear_attn(A, n, ins):
    q, k, v, s = ins
    y_shape, s_shape = A.shape(n.outputs[0].type), A.shape(n.outputs[1].type)
    t = A.temps()
    terms = list(_sup(q.terms, q.ranges([2])))
    for av in (k, v):
        if len(av.digits[1]) > 1:
            av = A.collapse(av, [1])
        b = av.subst({X(1): t})
        rows = _sup(b.terms, b.ranges([2]))
        terms.extend(_sup(_restrict(rows, [frozenset([_atom(t - X(1))])]), [(t, av.shape[1] - 1)]))
    state = A.whole(s)
    y = _blank(y_shape, _union(terms, state))
    s2 = _blank(s_shape, _union(state, A.whole(k, v, reason="linear attention's state sums every position")))
    return [y, s2]


@handles(Op.MEM_READ)
def _h_mem_read(A, n, ins):
    q, ws = ins[0], ins[1:]
    shape = A.shape(n.out.type)
    qterms = _sup(q.terms, q.ranges([q.rank - 1]))          # each query row is read whole
    wterms = A.whole(*ws, reason="reads a memory written with every position it was given")
    return [AV(shape, q.digits[:-1] + ((shape[-1],),), _union(qterms, wterms), None, None)]


@handles(Op.MEM_WRITE)
def _h_mem_write(A, n, ins):
    terms = A.whole(*ins, reason="writes every position it is given into the memory (one update per segment)")
    return [_blank(A.shape(o.type), terms) for o in n.outputs]


@handles(Op.BANK_PUSH)
def _h_bank_push(A, n, ins):
    buf, count, v = ins
    terms = _union(A.whole(buf), A.whole(count), A.whole(v, reason="pushes a value of every position onto a bank"))
    return [_blank(A.shape(n.outputs[0].type), terms), _blank(A.shape(n.outputs[1].type), A.whole(count))]


@handles(Op.BANK_VALID)
def _h_bank_valid(A, n, ins):
    _, count = ins
    return [_blank(A.shape(n.out.type), A.whole(count))]


# -- regions -------------------------------------------------------------------------------------------


def _join(a: AV, b: AV, origin=None) -> AV:
    """The least abstract value covering both (for loop carries): terms with one bound keep their common guard."""
    if a.digits != b.digits:
        diff = [k for k in range(a.rank) if a.digits[k] != b.digits[k]]
        a, b = _collapse_axes(a, diff, origin), _collapse_axes(b, diff, origin)
    val = a.val if a.val == b.val else None
    merged: dict = {}
    for t in _union(a.terms, b.terms):
        prev = merged.get(t.bounds)
        merged[t.bounds] = t if prev is None else Term(t.bounds, prev.guard & t.guard, prev.origin or t.origin)
    nz = a.nz if (a.nz is not None and b.nz is not None and set(b.nz) <= set(a.nz)) else None   # widened at once
    return AV(a.shape, a.digits, _union(merged.values()), nz, val)


def _collapse_axes(av: AV, axes, origin=None) -> AV:
    """`av` with the digits of `axes` forgotten (their variables taken at their worst)."""
    rs = av.ranges(axes)
    vs = [v for v, _ in rs]
    digits = tuple((av.shape[k],) if k in axes else d for k, d in enumerate(av.digits))
    return AV(av.shape, digits, _sup(av.terms, rs, origin), _project(av.nz, vs), None)


def _same_av(a: AV, b: AV) -> bool:
    if a.digits != b.digits or a.val != b.val:
        return False
    if (a.nz is None) != (b.nz is None) or (a.nz is not None and set(a.nz) != set(b.nz)):
        return False
    return all(any(_subsumes(u, t) for u in a.terms) for t in b.terms)


def _fixpoint(A: _Analysis, node: Node, region: Region, init: list[AV], step, widen_reason: str):
    """Run a loop body until its carried abstract values stop growing; `step(args) -> (carries', extra)`."""
    args = list(init)
    for rounds in range(FIX_ROUNDS + 1):
        new, extra = step(args)
        nxt = [_join(a, b, A.origin(_LOST, weak=True)) for a, b in zip(args, new)]
        if all(_same_av(a, b) for a, b in zip(args, nxt)):
            return args, extra
        if rounds == FIX_ROUNDS - 1:
            def widened(a: AV, b: AV) -> AV:
                grown = next((t.origin for t in b.terms if not _weak_origin(t.origin)
                              and not any(_subsumes(u, t) for u in a.terms)), None)
                return _blank(b.shape, (_top(grown or A.origin(widen_reason, weak=True)),))
            nxt = [b if _same_av(a, b) else widened(a, b) for a, b in zip(args, nxt)]
        args = nxt
    new, extra = step(args)
    return args, extra


def _loop_var(A: _Analysis, n: Node):
    var = n.attr("var")
    if var:
        A.sym_map[sympy.Symbol(var)] = sympy.Symbol(var, integer=True, nonnegative=True)


@handles(Op.LOOP)
def _h_loop(A, n, ins):
    _loop_var(A, n)
    r = n.regions[0]
    trips = A.x(as_expr(n.attr("trips")))
    data = _data_terms(A, trips)

    def step(args):
        outs = A.region(r, args)
        return outs, None

    init = [A.fit(a, A.shape(arg.type)) for a, arg in zip(ins, r.args)]
    if trips == 1:                                            # one trip: the body once, no fixpoint
        outs = A.region(r, init)
    else:
        carries, _ = _fixpoint(A, n, r, init, step, "a loop whose carried values keep growing")
        outs = A.region(r, carries)
        outs = [_join(c, o) for c, o in zip(carries, outs)]   # zero trips keep the initial values
    if data:
        outs = [replace(o, terms=_union(o.terms, data)) for o in outs]
    return [A.fit(o, A.shape(res.type)) for o, res in zip(outs, n.outputs)]


@handles(Op.HALT_LOOP)
def _h_halt_loop(A, n, ins):
    _loop_var(A, n)
    r = n.regions[0]
    halts: list = []

    def step(args):
        outs = A.region(r, args)
        halts.append(outs[0])
        return outs[1:], None

    init = [A.fit(a, A.shape(arg.type)) for a, arg in zip(ins, r.args)]
    carries, _ = _fixpoint(A, n, r, init, step, "a loop whose carried values keep growing")
    outs = A.region(r, carries)
    halt = A.whole(*(halts + [outs[0]]), reason="its halting decision reads positions of the whole sequence")
    if A.x(as_expr(n.attr("trips"))) == 1:
        halt = ()                       # one trip: the decision after it changes nothing
    res = [_join(c, o) for c, o in zip(carries, outs[1:])]
    res = [replace(o, terms=_union(o.terms, halt)) for o in res]
    res.append(_blank(A.shape(n.outputs[-1].type), halt))
    return [A.fit(o, A.shape(t.type)) for o, t in zip(res, n.outputs)]


@handles(Op.FUSED)
def _h_fused(A, n, ins):
    return A.region(n.regions[0], [])


def _shift(terms, amount) -> tuple:
    """Terms moved to the next segment's coordinates (subtract the segment length)."""
    out = []
    for t in terms:
        out.append(Term(frozenset(OO if b == OO else sympy.expand(b - amount) for b in t.bounds), t.guard, t.origin))
    return _union(out)


@handles(Op.SCAN)
def _h_scan(A, n, ins):
    r = n.regions[0]
    x, carries_in = ins[0], list(ins[1:])
    C = A.x(as_expr(n.attr("size")))
    stacked = list(n.attr("stacked", ()))
    nc = len(carries_in)
    if len(x.digits[1]) > 1:
        x = A.collapse(x, [1])
    seg_shape = A.shape(r.args[0].type)
    # the segment at local coordinates: x at frame position jC + i, minus jC
    seg_terms = []
    for t in x.terms:
        bounds = set()
        for b in t.bounds:
            if b == OO or not b.has(X(1)):
                bounds.add(b)
                continue
            lin = _linear_in(b, X(1))
            bounds.add(b if (lin is not None and lin[0] == 1) else OO)
        g = frozenset(a for a in t.guard if not a.expr.has(X(1)))
        seg_terms.append(Term(_trim(bounds), g, t.origin))
    seg = A.fit(AV(x.shape, x.digits, _union(seg_terms), _project(x.nz, [X(1)]), None), seg_shape)
    saved_frame = A.frame
    A.frame = saved_frame + (id(n),)
    init = [A.fit(c, A.shape(a.type)) for c, a in zip(carries_in, r.args[1:])]

    def step(args):
        outs = A.region(r, [seg] + args)
        return [replace(o, terms=_shift(o.terms, C)) for o in outs[:nc]], outs[nc:]

    try:
        carries, _ = _fixpoint(A, n, r, init, step, "a scan whose carried state keeps growing")
        outs = A.region(r, [seg] + carries)
    finally:
        A.frame = saved_frame
    results = []
    xlen = x.shape[1]
    for c, o in zip(n.outputs[:nc], outs[:nc]):
        results.append(_blank(A.shape(c.type), _scan_final(_sup(o.terms, o.ranges()), xlen, C)))
    for y, st, res in zip(outs[nc:], stacked, n.outputs[nc:]):
        shape = A.shape(res.type)
        if st:
            results.append(_stacked(y, C, shape))
        else:
            results.append(_concatenated(y, shape))
    return results


def _scan_final(terms, xlen, C) -> tuple:
    """A carry after the last segment, in frame coordinates: the last segment starts at most at xlen - 1."""
    out = []
    for t in terms:
        bs = frozenset(OO if b == OO else sympy.expand(b + xlen - 1) for b in t.bounds)
        out.append(Term(bs, TRUE, t.origin))
    return _union(out)


def _concatenated(y: AV, shape) -> AV:
    """Per-segment yields [B, C, ...] joined to [B, T, ...]: position n = jC + i reads n + sup_i(bound - i)."""
    i = X(1)
    if len(y.digits[1]) > 1:
        y = replace(y, digits=y.digits[:1] + ((y.shape[1],),) + y.digits[2:], terms=_sup(y.terms, y.ranges([1])))
    ts = []
    for t in y.terms:
        rel = Term(frozenset(OO if b == OO else sympy.expand(b - i) for b in t.bounds), t.guard, t.origin)
        for s in _sup([rel], [(i, y.shape[1] - 1)]):
            ts.append(Term(frozenset(OO if b == OO else sympy.expand(b + i) for b in s.bounds), s.guard, s.origin))
    return AV(tuple(shape), (y.digits[0],) + ((shape[1],),) + y.digits[2:], _union(ts), None, None)


def _stacked(y: AV, C, shape) -> AV:
    """Per-segment yields stacked on a new axis 1: segment j's entry reads jC + its local bound."""
    m = {}
    for k in range(1, y.rank):
        for mm in range(len(y.digits[k])):
            m[X(k, mm)] = X(k + 1, mm)
    moved = y.subst(m)
    j = X(1)
    ts = [Term(frozenset(OO if b == OO else sympy.expand(b + j * C) for b in t.bounds), t.guard, t.origin)
          for t in moved.terms]
    digits = (y.digits[0], (shape[1],)) + tuple(moved.digits[1:])
    return AV(tuple(shape), digits, _union(ts), None, None)


# -- routes ----------------------------------------------------------------------------------------------


def _route_body_input(A: _Analysis, x: AV, p, arg_shape, sel_terms) -> AV:
    """x at the routed tokens: element j is x at position p(j); plus what decided the selection."""
    if len(x.digits[1]) > 1:
        x = A.collapse(x, [1])
    j = X(1)
    ts = []
    for t in x.terms:
        t2 = t.subst({j: p(j)})
        if t2 is not None:
            ts.append(Term(t2.bounds, frozenset(a for a in t2.guard if not a.expr.has(j)), t2.origin))
    av = AV(tuple(arg_shape), _single(arg_shape)[:1] + ((arg_shape[1],),) + x.digits[2:],
            _union(ts, sel_terms), None, None)
    return av


def _unroute(A: _Analysis, y: AV, p, shape, origin) -> tuple:
    """Body results scattered back: a bound p(j') with j' <= j is at most the token's own position."""
    j = X(1)
    out = []
    for t in y.terms:
        bounds = set()
        for b in t.bounds:
            if b == OO:
                bounds.add(OO)
                continue
            apps = [a for a in b.atoms(AppliedUndef) if a.func == p]
            m = {}
            ok = True
            for ap in apps:
                if _le(ap.args[0], j):
                    m[ap] = j
                else:
                    ok = False
            b2 = b.xreplace(m) if ok else OO
            if b2 != OO and (b2.atoms(AppliedUndef) & set(apps) or _mono(b2, j) not in (0, 1)):
                b2 = OO
            bounds.add(b2)
        g = frozenset(a for a in t.guard if not a.expr.has(j) and not any(ap.func == p for ap in a.expr.atoms(AppliedUndef)))
        nt = Term(_trim(bounds), g, t.origin)
        if any(bb == OO for bb in bounds):
            nt = _tag(nt, origin)
        out.append(nt)
    return _union(out)


@handles(Op.ROUTE_TOPK)
def _h_route_topk(A, n, ins):
    r = n.regions[0]
    x, score = ins[0], ins[1]
    rest = list(ins[2:])
    among = rest.pop(0) if n.attr("has_among") else None
    weight = rest.pop(0) if n.attr("has_weight") else None
    infer = rest.pop(0) if n.attr("has_infer") else None
    shape = A.shape(n.outputs[0].type)
    sel_shape = A.shape(n.outputs[1].type)
    if infer is not None and not A.training:
        # the inference rule (SPEC §9.1): each token by its own `infer` mask (and `among`), like route_mask
        mask = infer if among is None else _h_binary(A, _FakeNode(Op.AND, n.outputs[1]), [infer, among])[0]
        out = _masked_route(A, n, x, mask, weight, shape)
        return [out, replace(A.align(mask, sel_shape), val=None)]
    cap = A.x(as_expr(n.attr("capacity")))
    every = cap == 1
    mask_sched = n.attr("schedule") == "mask"
    origin = A.origin("selects tokens by a top-k over the whole sequence (expert-choice routing): whether a "
                      "position is routed depends on later tokens")
    per_token = []
    if among is not None:
        per_token.append(A.align(among, shape[:2]).terms)
    if weight is not None:
        per_token.append(A.align(weight, shape[:2]).terms)
    sel_terms = () if every else A.whole(score, *([among] if among is not None else []), reason=origin[1])
    sel_terms = tuple(_tag(t, origin) for t in sel_terms)
    arg_shapes = [A.shape(a.type) for a in r.args]
    saved = A.frame
    if every or mask_sched:
        xin = A.fit(replace(x, terms=_union(x.terms, sel_terms)), arg_shapes[0])
        pos = AV(arg_shapes[1], _single(arg_shapes[1]), sel_terms, None, ((TRUE, X(1)),))
        args = [xin, pos]
        if mask_sched:
            args.append(_blank(arg_shapes[2], sel_terms, None, ((TRUE, sympy.true),) if every else None))
        (y,) = A.region(r, args)
        y_terms = A.fit(y, shape).terms if y.rank == len(shape) else A.whole(y)
    else:
        A.routes += 1
        p = _route_fn(A.routes)
        A.frame = saved + (("route", id(n)),)
        try:
            xin = _route_body_input(A, x, p, arg_shapes[0], sel_terms)
            pos = AV(arg_shapes[1], _single(arg_shapes[1]), sel_terms, None, ((TRUE, p(X(1))),))
            (y,) = A.region(r, [xin, pos])
        finally:
            A.frame = saved
        y_terms = _unroute(A, y, p, shape, origin)
    xa = A.align(x, shape)
    terms = _union(xa.terms, y_terms, sel_terms, *per_token)
    out = AV(shape, xa.digits, terms, None, None)
    sel = _blank(sel_shape, _union(sel_terms, *per_token[:1]))
    return [out, sel]


@dataclass(frozen=True)
class _FakeNode:
    """A node stand-in for reusing a handler on a derived value (its op and one result)."""

    op: Op
    out: Any
    span: Any = None

    def attr(self, key, default=None):
        return default


@handles(Op.ROUTE_MASK)
def _h_route_mask(A, n, ins):
    x, mask = ins[0], ins[1]
    weight = ins[2] if n.attr("has_weight") else None
    return [_masked_route(A, n, x, mask, weight, A.shape(n.out.type))]


def _masked_route(A: _Analysis, n: Node, x: AV, mask: AV, weight, shape) -> AV:
    """Each sample's tokens where `mask` holds, compacted in order, run the body; results scatter back."""
    r = n.regions[0]
    ma = A.align(mask, shape[:2])
    A.routes += 1
    p = _route_fn(A.routes)
    # the j-th selected token: which it is depends on the mask at positions up to it
    y_ = A.temps()
    moved = [t.subst({X(1): y_}) for t in ma.terms]
    prefix = _sup([Term(t.bounds, g, t.origin) for t in moved if t
                   for g in [_conj(t.guard, frozenset([_atom(y_ - p(X(1)))]))] if g is not None],
                  [(y_, shape[1] - 1)])
    arg_shapes = [A.shape(a.type) for a in r.args]
    xin = _route_body_input(A, x, p, arg_shapes[0], prefix)
    pos = AV(arg_shapes[1], _single(arg_shapes[1]), prefix, None, ((TRUE, p(X(1))),))
    dims = n.attr("dims", ("B", "T"))
    count = A.whole(mask, reason="the number of selected tokens (a length inside the route) counts the whole mask")
    rebound = [A.x(sympy.Symbol(dims[1]))] if len(dims) > 1 and dims[1] else []
    saved = A.frame
    A.frame = saved + (("route", id(n)),)
    A.data_dims.append((rebound, count))
    try:
        (y,) = A.region(r, [xin, pos] + [_blank(a) for a in arg_shapes[2:]])
    finally:
        A.data_dims.pop()
        A.frame = saved
    origin = A.origin("a routed token reads a later routed token")
    y_terms = _unroute(A, y, p, shape, origin)
    xa = A.align(x, shape)
    extra = [ma.terms]
    if weight is not None:
        extra.append(A.align(weight, shape[:2]).terms)
    return AV(shape, xa.digits, _union(xa.terms, y_terms, *extra), None, None)


# -- the analysis ----------------------------------------------------------------------------------------


def causality(g: Graph, training: bool | None = None) -> Verdict:
    """Whether every output of a language model reads, at position t, only the tokens at positions <= t.

    `training`: analyse the training forward (True), the inference one (False), or, by default,
    both when they differ (a top-k route's `infer` rule, a stochastic K/V share): the model is
    causal when both are.
    """
    from archc.ir.analysis import lm_token_input
    declared = getattr(g, "noncausal", None)
    tok = lm_token_input(g)
    if tok is None:
        return Verdict(g.name, False, None, (), declared)
    if training is None:
        modes = (False, True) if mode_dependent(g) else (False,)
    else:
        modes = (training,)
    leaks: list[Leak] = []
    checked: tuple = ()
    failures: list[str] = []
    for mode in modes:
        found, checked, failed = _analyse(g, tok, mode)
        label = ("training" if mode else "inference") if len(modes) > 1 else None
        leaks.extend(replace(lk, mode=label) for lk in found)
        failures += [f for f in failed if f not in failures]
    return Verdict(g.name, True, not leaks, tuple(leaks), declared, checked,
                   tuple("training" if m else "inference" for m in modes), tuple(failures))


def mode_dependent(g: Graph) -> bool:
    """Whether the training and inference forwards differ in a way that matters here."""
    return any((n.op is Op.ROUTE_TOPK and n.attr("has_infer")) or
               (n.op is Op.ATTEND and str(n.attr("kv_share") or "").startswith("stochastic:")) for n in g.walk())


def _analyse(g: Graph, tok, training: bool) -> tuple[list, tuple]:
    A = _Analysis(g, training)
    T = A.x(tok.type.shape[1])
    tshape = A.shape(tok.type)
    A.env[tok.name] = AV(tshape, _single(tshape), (Term(frozenset([X(1)])),), None, None)
    for nd in g.body.nodes:
        A.visit(nd)
    leaks, checked = [], []
    types = {a.name: a.type for a in g.inputs}
    for nd in g.body.walk():
        for o in nd.outputs:
            types[o.name] = o.type
    for name, res in zip(g.output_names, g.body.results):
        shape = A.shape(types[res])
        axes = [k for k, d in enumerate(shape) if d == T]
        if not axes:
            continue
        checked.append(name)
        bad = _first_leak(A.env[res], axes[0])
        if bad is not None:
            node, reason = bad.origin[:2] if bad.origin is not None else \
                (None, "its value at a position reads later positions")
            leaks.append(Leak(name, node, reason))
    return leaks, tuple(checked), A.failures


def _first_leak(av: AV, k: int) -> Term | None:
    """A term that may read a token after the element's position along axis k (None: causal); of
    several, one whose origin is a construct of the model rather than a limit of the analysis."""
    bad = _leaking(av, k)
    if not bad:
        return None
    model = [t for t in bad if not _weak_origin(t.origin)]
    return (model or [t for t in bad if t.origin is not None] or bad)[0]


def _leaking(av: AV, k: int) -> list[Term]:
    if len(av.digits[k]) > 1:
        return list(av.terms)
    pos = X(k)
    ranges = av.ranges()
    out = []
    for t in av.terms:
        if t.is_top():
            out.append(t)
            continue
        ok = False
        for b in t.bounds:
            rel = Term(frozenset([sympy.expand(b - pos)]), t.guard, t.origin)
            res = _sup([rel], ranges)
            if all(any(_le(bb, 0) for bb in s.bounds) for s in res):
                ok = True
                break
        if not ok:
            out.append(t)
    return out


def require_causal(g: Graph, source: str | None = None) -> Verdict:
    """`archc check`'s rule: a language model whose outputs are not causal must declare `noncausal`."""
    v = causality(g)
    if not v.applies or v.causal or v.declared is not None:
        return v
    leak = v.leaks[0]
    span = leak.node.span if leak.node is not None else None
    through = f" through `{leak.node.op.value}`" if leak.node is not None else ""
    mode = f" (in {leak.mode})" if leak.mode else ""
    raise ArchError(f"`{g.name}` is not causal{mode}: its output `{leak.output}` at position t reads tokens after t"
                    f"{through}: {leak.reason}", span, source=source,
                    hint="make the model causal, or declare it with `noncausal \"why\"` in the body of "
                         f"`{g.name}` (encoders, puzzle solvers, expert-choice training routers)")
