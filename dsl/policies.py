"""Caching policies (`cache kind(targets..., key=value)`): checked against the attention sites.

A policy names attention layers by path (`core.attn`, or a prefix such as `core`). Policies that
change what attention reads in a full forward pass (KV sharing) set the `kv_share` attribute of the
targeted `attend` nodes; the others only shape the decode cache and the cost model. `rewrite_kv`
also carries a region: its processor block, lowered once on the gathered cache entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy

from archc.dsl import ast as A
from archc.dsl.exprs import lower_expr
from archc.dsl.values import LayerInst, PathRef, Static, StrVal
from archc.ir.core import Policy, Region
from archc.ir.shapes import F32, I64, TensorType, as_expr, dims_equal, expr_str, substitute, sym


@dataclass(frozen=True)
class PolicyKind:
    name: str
    options: dict[str, tuple[str, Any]]     # name -> (type, default); type: float|int|str|path|layer
    check: Callable
    summary: str
    region: Callable | None = None          # builds the policy's region (rewrite_kv's processor)


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
                a = substitute(as_expr(cons[key]), al.defaults)
                b = substitute(as_expr(prod[key]), al.defaults)
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
        for k in ("recent", "observe"):
            if k in opts and opts[k] is not None and opts[k] < 0:
                raise al.err(f"{k} must be >= 0", spans.get(k, st.span))
    return check


def _positive(*names):
    def check(al, st, targets, opts, spans):
        for n in names:
            if opts[n] < 1:
                raise al.err(f"{n} must be at least 1, got {opts[n]}", spans.get(n, st.span))
    return check


def _rewrite_kv(al, st, targets, opts, spans):
    for key in ("processor", "delimiter"):
        if opts.get(key) is None:
            what = "the block that rewrites the entries" if key == "processor" else "the token id that ends a step"
            raise al.err(f"rewrite_kv needs `{key} = ...`: {what}", st.span,
                         hint="e.g. `cache rewrite_kv(layers.attn, processor = proc, delimiter = 10, top = 4)`")
    if opts["delimiter"] < 0:
        raise al.err(f"delimiter must be a token id (>= 0), got {opts['delimiter']}", spans["delimiter"])
    if opts["top"] < 0:
        raise al.err(f"top must be >= 0, got {opts['top']}", spans["top"])
    first = al.attention_sites[targets[0]]
    for site in targets[1:]:
        cons = al.attention_sites[site]
        for key, what in (("head_dim", "head size"), ("kv_heads", "number of KV heads")):
            if dims_equal(cons[key], first[key], al.defaults) is False:
                raise al.err(f"one processor rewrites every target, but `{site}` and `{targets[0]}` have different "
                             f"{what}s ({expr_str(cons[key])} and {expr_str(first[key])})", st.span,
                             hint="declare one rewrite_kv policy (and processor) per K/V shape")


def _processor_region(al, st, targets, opts, spans, scope):
    """Lower the processor block once, applied to the gathered entries k, v: f32[1, N, Hk, Dh]
    (N: the region's own dimension) with their cache positions as the token positions, so its
    attention layers apply RoPE at the entries' original positions."""
    from archc.dsl.layers import apply_layer
    from archc.dsl.lower import Frame, Scope
    inst, span = opts["processor"], spans["processor"]
    site = al.attention_sites[targets[0]]
    taken = {s.name for s in al.symbols} | set(al.dims)
    n = next(c for c in ("N", "N_kv", *(f"N_kv{i}" for i in range(1, len(taken) + 2))) if c not in taken)
    kt = TensorType(F32, (sympy.Integer(1), sym(n), as_expr(site["kv_heads"]), as_expr(site["head_dim"])))
    k, v = al.b.value("k", kt), al.b.value("v", kt)
    pos = al.b.value("pos", TensorType(I64, (sympy.Integer(1), sym(n))))
    sites_before = dict(al.attention_sites)
    call = A.Call(func=A.Name(id=inst.name, span=span), args=[A.Name(id="k", span=span), A.Name(id="v", span=span)],
                  kwargs=[], span=span)
    with al.b.region() as nodes:
        ret = apply_layer(al, inst, call, Scope(vars={"k": k, "v": v}), Frame(positions=pos), None)
    al.attention_sites.clear()             # the processor's own attention layers are no policy targets
    al.attention_sites.update(sites_before)
    outs = ret if isinstance(ret, tuple) else (ret,)
    if len(outs) != 2 or not all(o.type.dtype == F32 and o.type.rank == 4 and all(
            dims_equal(a, b, al.defaults) is not False for a, b in zip(o.type.shape, kt.shape)) for o in outs):
        raise al.err(f"the processor `{inst.name}` must return the rewritten (k, v), both {kt}; it returns "
                     + ", ".join(str(o.type) for o in outs), span,
                     hint="e.g. `return k + dk, v + dv` (a residual update: a zero-initialised dk, dv is the identity)")
    return Region((k, v, pos), tuple(nodes), tuple(o.name for o in outs))


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
    PolicyKind("rewrite_kv", {"processor": ("layer", None), "delimiter": ("int", None), "top": ("int", 4)},
               _rewrite_kv, "Bottlenecked Transformers: after each delimiter token a processor block rewrites the "
               "step's K/V entries and the `top` earlier entries its queries attended to most",
               region=_processor_region),
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
            if kw.name in spans:
                raise al.err(f"option `{kw.name}` is given twice", kw.span)
            typ = kind.options[kw.name][0]
            spans[kw.name] = kw.value.span
            if typ == "layer":
                inst = scope.lookup(kw.value.id) if isinstance(kw.value, A.Name) else None
                if not isinstance(inst, LayerInst) or inst.block is None or inst.copies is not None:
                    raise al.err(f"`{kw.name}` must name a layer declared from a block, e.g. "
                                 "`layer proc = CacheProcessor(...)`", kw.value.span,
                                 hint="the processor is a single (non-array) block instance taking (k, v)")
                opts[kw.name] = inst
                continue
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
                if typ == "int" and v.kind == "float":
                    raise al.err(f"`{kw.name}` must be an integer, got {expr_str(v.expr)}", kw.value.span)
                val = substitute(sympy.sympify(v.expr), al.defaults)
                if not val.is_number:
                    raise al.err(f"`{kw.name}` must be a compile-time number", kw.value.span)
                opts[kw.name] = float(val) if typ == "float" else int(val)     # checked at the defaults
                from archc.dsl.lower import _attr_value
                if not sympy.sympify(v.expr).is_number:
                    stored[kw.name] = _attr_value(v.expr)
        kind.check(al, st, targets, opts, spans)
        region = kind.region(al, st, targets, opts, spans, scope) if kind.region else None
        args = tuple((k, stored.get(k, v.path if isinstance(v, (PathRef, LayerInst)) else v)) for k, v in opts.items()
                     if v is not None)
        out.append(Policy(st.kind, tuple(targets), args, st.span, region))
    return out


def check_rewrites(al, g) -> None:
    """rewrite_kv edits the per-site K/V decode cache: the model must decode from one (SPEC §17), and a
    target must own its entry at full width (not read another site's, not ThinK-pruned)."""
    from archc.ir.analysis import kv_decode_blocker
    for p in g.policies:
        if p.kind != "rewrite_kv":
            continue
        blocker = kv_decode_blocker(g)
        if blocker is not None:
            raise al.err(f"rewrite_kv rewrites the K/V decode cache, but this model decodes by recomputing: {blocker}",
                         p.span, hint="a model decodes from a per-site K/V cache when every op acts token by token "
                                      "except causal self-attention (SPEC §17)")
        for site in p.targets:
            if al.site_attrs.get(site, {}).get("kv_share"):
                raise al.err(f"`{site}` reads another site's K/V (share_kv), so it has no cache entry to rewrite",
                             p.span, hint="rewrite the producer's site instead")
            for q in g.policies:
                if q.kind == "prune_key_channels" and site in q.targets:
                    raise al.err(f"`{site}` also has prune_key_channels: the processor rewrites full-width keys",
                                 p.span, hint="use one of the two policies per site")
