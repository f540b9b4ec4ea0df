"""Caching policies (`cache kind(targets..., key=value)`): checked against the attention sites.

A policy names attention layers by path (`core.attn`, or a prefix such as `core`). Policies that
change what attention reads in a full forward pass (KV sharing) set the `kv_share` attribute of the
targeted `attend` nodes; the others only shape the decode cache and the cost model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy

from archc.dsl import ast as A
from archc.dsl.exprs import lower_expr
from archc.dsl.values import PathRef, Static, StrVal
from archc.ir.core import Policy
from archc.ir.shapes import as_expr, dims_equal, expr_str


@dataclass(frozen=True)
class PolicyKind:
    name: str
    options: dict[str, tuple[str, Any]]     # name -> (type, default); type: float|int|str|path
    check: Callable
    summary: str


def _sites(al, ref: PathRef) -> list[str]:
    sites = [s for s in al.attention_sites if s == ref.path or s.startswith(ref.path + ".")]
    if not sites:
        from archc.dsl.lower import suggest
        raise al.err(f"`{ref.path}` is not an attention layer of this architecture", ref.span,
                     hint=suggest(ref.path, al.attention_sites) or
                     ("attention layers: " + ", ".join(sorted(al.attention_sites)) if al.attention_sites
                      else "this architecture has no Attention layer"))
    return sites


def _share_kv(al, st, targets, opts, spans):
    across, src = opts.get("across"), opts.get("source")
    if st.kind == "stochastic_share" and src is None:
        raise al.err("stochastic_share needs `source = layer.attn`: the layer whose K/V may be read instead", st.span)
    if (across is None) == (src is None):
        raise al.err("share_kv needs exactly one of `across = \"recursion\"` or `source = layer.attn`", st.span)
    if across is not None:
        if across != "recursion":
            raise al.err(f"share_kv across {across!r} is not supported", spans["across"], hint='use across = "recursion"')
        for site in targets:
            loops = list(al.attention_sites[site]["loops"])
            if not loops:
                raise al.err(f"`{site}` is not inside a repeat, so there is no later recursion to share with",
                             st.span, hint="recursion-wise sharing applies to attention inside `repeat`")
            # the recursion is the outermost repeat around the layer (inner repeats walk its sub-layers)
            al.site_attrs[site] = {"kv_share": "recursion:" + loops[0]}
        return
    prod_sites = _sites(al, src)
    if len(prod_sites) != 1:
        raise al.err(f"`{src.path}` names {len(prod_sites)} attention layers; name one", src.span)
    prod = al.attention_sites[prod_sites[0]]
    if prod["copies"] is not None:
        raise al.err(f"`{prod_sites[0]}` belongs to a layer array, so it names {expr_str(prod['copies'])} layers; "
                     "the K/V source must be one layer", src.span,
                     hint="share from a single (non-array) layer")
    for site in targets:
        if site == prod_sites[0]:
            raise al.err(f"`{site}` cannot share KV with itself", st.span)
        cons = al.attention_sites[site]
        for key, what in (("head_dim", "head size"), ("kv_heads", "number of KV heads")):
            if dims_equal(cons[key], prod[key], al.defaults) is False:
                a = as_expr(cons[key]).subs(al.defaults)
                b = as_expr(prod[key]).subs(al.defaults)
                raise al.err(f"KV sharing between layers of different {what}: `{site}` has {what} "
                             f"{expr_str(cons[key])} = {a}, `{prod_sites[0]}` has {expr_str(prod[key])} = {b}", st.span,
                             hint="only layers whose K/V have the same shape can share a cache")
        kind = "from:" if opts.get("p") is None else f"stochastic:{opts['p']}:"
        al.site_attrs[site] = {"kv_share": kind + prod_sites[0]}


def _ratio(name, lo_open=False):
    def check(al, st, targets, opts, spans):
        r = opts[name]
        if not (0 <= r < 1):
            raise al.err(f"{name} must be in [0, 1), got {r}", spans.get(name, st.span))
        for k in ("recent", "observe", "k", "every"):
            if k in opts and opts[k] is not None and opts[k] < 0:
                raise al.err(f"{k} must be >= 0", spans.get(k, st.span))
    return check


def _positive(*names):
    def check(al, st, targets, opts, spans):
        for n in names:
            if opts[n] < 1:
                raise al.err(f"{n} must be at least 1, got {opts[n]}", spans.get(n, st.span))
    return check


def _stochastic(al, st, targets, opts, spans):
    p = opts["p"]
    if not (0 < p < 1):
        raise al.err(f"p must be in (0, 1), got {p}", spans.get("p", st.span))
    _share_kv(al, st, targets, {"source": opts["source"], "p": p}, spans)


POLICIES: dict[str, PolicyKind] = {p.name: p for p in [
    PolicyKind("share_kv", {"across": ("str", None), "source": ("path", None)}, _share_kv,
               "reuse K/V: across recursions of one layer (MoR), or from another layer (cross-layer sharing)"),
    PolicyKind("stochastic_share", {"source": ("path", None), "p": ("float", 0.5)}, _stochastic,
               "training: with probability p attend to `source`'s K/V (Stochastic KV Routing); deploy shared"),
    PolicyKind("recursion_wise", {}, lambda *a: None,
               "cache K/V per recursion only for the tokens routed to it (MoR recursion-wise caching)"),
    PolicyKind("prune_key_channels", {"ratio": ("float", 0.4), "recent": ("int", 32), "observe": ("int", 32)},
               _ratio("ratio"), "ThinK: keep the top (1-ratio) key channels per head, scored by the observation window"),
    PolicyKind("topk_decode", {"k": ("int", 64), "dense_heads": ("int", 0)}, _positive("k"),
               "LycheeDecode: sparse heads attend to the k highest-scoring cached tokens, chosen by dense heads"),
    PolicyKind("rewrite_kv", {"every": ("int", 64), "keep": ("int", 32)}, _positive("every"),
               "Bottlenecked Transformers: every N tokens a processor rewrites the cache, keeping `keep` entries"),
]}


def build_policies(al) -> list[Policy]:
    out: list[Policy] = []
    for st, scope, frame in al.cache_decls:
        st: A.CacheDecl
        kind = POLICIES.get(st.kind)
        if kind is None:
            from archc.dsl.lower import suggest
            raise al.err(f"unknown caching policy `{st.kind}`", st.span,
                         hint=suggest(st.kind, POLICIES) or f"policies: {', '.join(POLICIES)}")
        targets: list[str] = []
        for a in st.args:
            v = lower_expr(al, a, scope, frame) if not isinstance(a, A.Name) else PathRef(a.id, a.span)
            if not isinstance(v, PathRef):
                raise al.err("policy targets are attention layers, e.g. `core.attn`", a.span)
            targets.extend(t for t in _sites(al, v) if t not in targets)
        if not targets:
            raise al.err(f"`{st.kind}` needs at least one target layer", st.span)
        opts: dict[str, Any] = {k: d for k, (_, d) in kind.options.items()}
        stored: dict[str, Any] = {}        # what the IR keeps: parameter expressions stay symbolic
        spans = {}
        for kw in st.kwargs:
            if kw.name not in kind.options:
                raise al.err(f"`{st.kind}` has no option `{kw.name}`", kw.span,
                             hint=("options: " + ", ".join(kind.options)) if kind.options else "it takes no options")
            typ = kind.options[kw.name][0]
            spans[kw.name] = kw.value.span
            if typ == "path":
                if not isinstance(kw.value, (A.Name, A.Attr)):
                    raise al.err(f"`{kw.name}` must name an attention layer", kw.value.span)
                v = lower_expr(al, kw.value, scope, frame) if isinstance(kw.value, A.Attr) else PathRef(kw.value.id, kw.value.span)
                opts[kw.name] = v
                continue
            v = lower_expr(al, kw.value, scope, frame)
            if typ == "str":
                if not isinstance(v, StrVal):
                    raise al.err(f"`{kw.name}` must be a string", kw.value.span)
                opts[kw.name] = v.value
            else:
                if not isinstance(v, Static) or v.kind == "bool":
                    raise al.err(f"`{kw.name}` must be a compile-time number", kw.value.span)
                val = sympy.sympify(v.expr).subs(al.defaults)
                if not val.is_number:
                    raise al.err(f"`{kw.name}` must be a compile-time number", kw.value.span)
                opts[kw.name] = float(val) if typ == "float" else int(val)     # checked at the defaults
                from archc.dsl.lower import _attr_value
                if not sympy.sympify(v.expr).is_number:
                    stored[kw.name] = _attr_value(v.expr)
        kind.check(al, st, targets, opts, spans)
        args = tuple((k, stored.get(k, v.path if isinstance(v, PathRef) else v)) for k, v in opts.items()
                     if v is not None)
        out.append(Policy(st.kind, tuple(targets), args, st.span))
    return out
