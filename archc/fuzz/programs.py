"""Random well-formed architectures, in the spirit of Csmith: correct by construction.

`random_program(seed)` writes one .arch file from random choices: blocks (one or two inputs,
tuple returns, arrays of blocks), `repeat` with `share ... as cycle | sequence`, explicit copy
indices, `grad last`, `halt when`; `route` by `topk` (capacity, `among`, `weight`, `as`) and by
`where`; segment scans with carried state and stacked outputs; the three memories (NeuralMemory,
LinearMemory, Bank); every primitive layer; built-in attention with RoPE; caching policies
(`share_kv` across recursions or from a source layer, `stochastic_share`, `recursion_wise`,
`prune_key_channels`, `topk_decode`, `rewrite_kv` with a zero-initialised processor block when the
program decodes from a K/V cache); random small sizes.

Every statement keeps a *stream* variable's type (`f32[B, L, d]`, where `L` is `T`, a segment
size, or the compacted length inside a top-k route), so any statement can follow any other; the
generator tracks what each place allows (no memory writes inside routes, no shapes built from `T`
inside a top-k route, what a block may see, which attention sites can share K/V). A program the
checker rejects is itself a finding (a generator bug or a false rejection).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

ACTS = ("tanh", "gelu", "silu", "relu", "sigmoid", "softplus")
PARAMS = ("d", "heads", "kvh", "hidden", "n", "k", "seg")       # passed to every block, in this order


@dataclass(frozen=True)
class Ctx:
    """Where a statement goes: the stream variable, its length, and what that place allows."""

    var: str = "x"
    length: str | None = "T"          # a name that builds tensors of the stream's length, or None
    depth: int = 0                    # region nesting
    in_route: bool = False            # no memory writes, only `var` may be reassigned
    loop_vars: tuple[tuple[str, str], ...] = ()   # (loop variable, its count)
    in_block: bool = False            # sees only the block's parameters and inputs
    outermost_loop: str | None = None


@dataclass
class Site:
    """An attention layer, as far as caching policies care."""

    path: str
    kv: str                           # how many K/V heads: "heads" or "kvh" (sharing needs equal shapes)
    top_level: bool                   # applied at the top of the arch body (not inside a region)
    loop: str | None                  # the outermost repeat around its first application
    array: bool
    order: int


class Gen:
    def __init__(self, rng: random.Random, max_stmts: int = 6, max_depth: int = 2):
        self.rng = rng
        self.max_stmts = max_stmts
        self.max_depth = max_depth
        self.count = 0
        self.blocks: list[str] = []               # block definitions (text)
        self.block_sites: dict[str, list[tuple[str, str, bool]]] = {}   # block -> (site, kv, in a region)
        self.no_arrays = 0                        # > 0 while writing a block that a layer array will copy
        self.sites: list[Site] = []
        self.memories: list[tuple[str, str]] = []  # (name, kind) declared at the arch top level
        self.extra_outputs: list[str] = []
        self.sizes = self._sizes()
        self.lossy_decode = False
        self.segs: list[str] = []
        self.rewrites: list[tuple[str, list[str], str]] = []   # rewrite_kv: (processor block, layer, policy)

    # names and sizes ------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _sizes(self) -> dict[str, int]:
        r = self.rng
        heads = r.choice([1, 2, 2, 4])
        kvh = r.choice([h for h in (1, 2, 4) if heads % h == 0])
        d = heads * r.choice([2, 4]) if heads < 4 else 8
        return {"vocab": r.choice([5, 11, 32]), "d": d, "heads": heads, "kvh": kvh,
                "hidden": r.choice([4, 8, 2 * d]), "n": r.choice([1, 2, 3]), "k": r.choice([1, 2, 3]),
                "seg": r.choice([1, 2, 4])}

    # statements -------------------------------------------------------------------------------------
    def body(self, ctx: Ctx, count: int | None = None) -> list[str]:
        n = count if count is not None else self.rng.randint(1, max(1, self.max_stmts - 2 * ctx.depth))
        out: list[str] = []
        for _ in range(n):
            out += self.stmt(ctx)
        return out

    def stmt(self, ctx: Ctx) -> list[str]:
        r = self.rng
        kinds = ["layer", "layer", "layer", "elementwise", "elementwise", "mix", "attend"]
        if ctx.depth < self.max_depth:
            kinds += ["repeat", "repeat", "route_topk", "route_where", "block"]
            if ctx.length == "T" and not ctx.in_route and not ctx.in_block:
                kinds += ["scan"]
            if ctx.loop_vars:
                kinds += ["loopvar"]
        if not ctx.in_route and not ctx.in_block and ctx.length is not None:
            kinds += ["memory"]
        if not ctx.in_block and ctx.depth == 0 and ctx.length == "T":
            kinds += ["tokens"]
        return getattr(self, "s_" + r.choice(kinds))(ctx)

    def s_layer(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        name = self.fresh("l")
        kind = r.choice(["Linear", "MLP", "SwiGLU", "Attention", "Attention", "Conv1d", "LayerScale", "GRU"])
        norm = r.choice([None, "RMSNorm", "LayerNorm"])
        lines = []
        arg = x
        if norm:
            nn = self.fresh("n")
            lines.append(f"layer {nn} = {norm}(d)")
            arg = f"{nn}({x})"
        if kind == "Linear":
            opt = r.choice(["", ", bias = true", ', init = "xavier"'])
            lines.append(f"layer {name} = Linear(d, d{opt})")
        elif kind == "MLP":
            lines.append(f"layer {name} = MLP(d, hidden, act = \"{r.choice(['gelu', 'relu', 'silu', 'tanh'])}\")")
        elif kind == "SwiGLU":
            lines.append(f"layer {name} = SwiGLU(d, hidden)")
        elif kind == "Conv1d":
            if ctx.length is None or ctx.in_route:
                lines.append(f"layer {name} = Linear(d, d)")
            else:
                lines.append(f"layer {name} = Conv1d(d, d, {r.choice([1, 2, 3])}, causal = {r.choice(['true', 'false'])})")
        elif kind == "LayerScale":
            lines.append(f"layer {name} = LayerScale(d, init = 0.5)")
        elif kind == "GRU":
            cell = self.fresh("cell")
            lines.append(f"layer {cell} = GRUCell(d, d)")
            return lines + [f"{x} = {cell}({arg}, {x})"]
        else:
            ctor, kv = self.attention_ctor()
            lines.append(f"layer {name} = {ctor}")
            self.note_site(name, ctx, kv)
        return lines + [f"{x} = {x} + {name}({arg})"]

    def attention_ctor(self) -> tuple[str, str]:
        r = self.rng
        opts = ["kv_heads = kvh"] if r.random() < 0.5 else []
        if r.random() < 0.3:
            opts.append("causal = false")
        if r.random() < 0.2:
            opts.append(f"window = {r.choice([1, 2, 3])}")
        if r.random() < 0.15:
            opts.append(f"prefix = {r.choice([1, 2])}")
        if r.random() < 0.2:
            opts.append("rope = false")
        return f"Attention(d, heads{''.join(', ' + o for o in opts)})", ("kvh" if opts[:1] == ["kv_heads = kvh"] else "heads")

    def note_site(self, path: str, ctx: Ctx, kv: str, array: bool = False, in_region: bool = False) -> None:
        if ctx.in_block:
            self._block_sites.append((path, kv, in_region or ctx.depth > self._block_depth))
            return
        self.sites.append(Site(path, kv, ctx.depth == 0 and not in_region, ctx.outermost_loop, array,
                               len(self.sites)))

    def s_elementwise(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        forms = [f"{x} = {r.choice(ACTS)}({x})",
                 f"{x} = {x} * sigmoid({x}) + 0.5 * {x}",
                 f"{x} = l2_normalize({x}) * 2.0",
                 f"{x} = {x} - 0.5 * mean({x}, axis = -1, keepdim = true)",   # not a zero mean: no decision on rounding noise
                 f"{x} = where({x} > 0.0, {x}, {x} * 0.1)",
                 f"{x} = max({x}, -1.0) + min({x}, 1.0)",
                 f"{x} = abs({x}) * 0.5 - {x}",
                 f"{x} = {x} * 1 + 0",
                 f"{x} = {x} / 2 + 0.25 * (1.0 - 2.0 * 0.5) - -{x}",
                 f"{x} = detach({x}) + {x} * 0.0 + {x}",
                 f"{x} = float(int({x} * 4.0)) / 4.0 + {x}",
                 f"{x} = {x} * float({x} > 0.0)",
                 f"{x} = merge_heads(split_heads({x}, heads) * 0.5)",
                 f"{x} = transpose(transpose({x}, 1, 2), 1, 2) + tanh({x}) ** 2 * 0.1"]   # bounded: x + 0.1 x**2 iterated overflowed
        return [r.choice(forms)]

    def s_mix(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        t = self.fresh("t")
        forms = [[f"{x} = {x} + cumsum({x}, axis = 1) * 0.1"],
                 [f"{t} = softmax(einsum(\"btd,bsd->bts\", {x}, {x}) / sqrt(d), axis = -1)", f"{x} = {x} + {t} @ {x}"],
                 [f"{x} = {x} + amax({x}, axis = 1, keepdim = true) * 0.1 - logsumexp({x}, axis = -1, keepdim = true)"],
                 [f"{x} = {x} * float(topk_mask({x}, {min(r.choice([1, 2, 3]), self.sizes['d'])}, axis = -1)) + {x} * 0.5"],
                 [f"{x} = {x} + softmax({x}, axis = -1) * sum({x}, axis = -1, keepdim = true)"]]
        lines = r.choice(forms)
        if r.random() < 0.4:
            a, b = self.fresh("fa"), self.fresh("fb")
            lines = [f"layer {a} = Linear(d, d, bias = true, bias_init = 1.0)", f"layer {b} = Linear(d, d)",
                     f"{t} = sigmoid({a}({x}))",
                     f"{x} = linear_scan({t}, (1.0 - {t}) * {b}({x}), zeros([B, d]))"]
        if r.random() < 0.3:
            w = self.fresh("w")
            lines = [f"param {w}: f32[d] = {r.choice(['ones()', 'zeros()', 'normal(std = 0.5)', 'uniform(bound = 0.5)'])}",
                     f"{x} = {x} * {w} + {x}"]
        if r.random() < 0.2:
            c = self.fresh("c")
            lines = [f"layer {c} = Linear(2 * d, d)", f"{x} = {c}(concat([{x}, relu({x})], axis = -1))"]
        return lines

    def s_attend(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        q, k, v, o = (self.fresh(p) for p in ("q", "k", "v", "o"))
        lines = [f"layer {p} = Linear(d, d)" for p in (q, k, v, o)]
        hq, hk, hv = (self.fresh("h") for _ in range(3))
        lines += [f"{hq} = split_heads({q}({x}), heads)", f"{hk} = split_heads({k}({x}), heads)",
                  f"{hv} = split_heads({v}({x}), heads)"]
        rope = r.random() < 0.6
        qa, ka = (f"rope({hq})", f"rope({hk})") if rope else (hq, hk)
        opt = r.choice(["causal = true", "causal = false", "causal = true, window = 2", "window = 1"])
        return lines + [f"{x} = {x} + {o}(merge_heads(attend({qa}, {ka}, {hv}, {opt})))"]

    def s_loopvar(self, ctx: Ctx) -> list[str]:
        var, _ = self.rng.choice(ctx.loop_vars)
        x = ctx.var
        return [self.rng.choice([f"{x} = {x} + {var} * 0.1", f"{x} = {x} * (1.0 / ({var} + 1))"])]

    def s_repeat(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        var = self.fresh("i")
        count = r.choice(["n", "2", "n + 1", "1"])
        inner = replace(ctx, depth=ctx.depth + 1, loop_vars=ctx.loop_vars + ((var, count),),
                        outermost_loop=ctx.outermost_loop or var)
        pre, opts, body = [], [], []
        modes = ["plain", "grad", "halt", "halt"] + ([] if self.no_arrays else ["share", "index"])
        mode = r.choice(modes)
        if mode == "share":
            arr = self.fresh("arr")
            strategy = r.choice(["cycle", "sequence"])
            pre.append(f"layer {arr}[k] = {self.array_kind(inner, arr)}")
            opts.append(f"share {arr} as {strategy}")
            body.append(f"{x} = {x} + {arr}({x})" if not self._is_block(arr) else f"{x} = {arr}({x})")
        elif mode == "index":
            arr = self.fresh("arr")
            pre.append(f"layer {arr}[k] = {self.array_kind(inner, arr)}")
            body.append(f"{x} = {x} + {arr}[{var} % k]({x})" if not self._is_block(arr) else f"{x} = {arr}[{var} % k]({x})")
        elif mode == "grad":
            opts.append(f"grad last {r.choice(['1', count])}")
        elif mode == "halt":
            if r.random() < 0.5:
                p, stop = self.fresh("p"), self.fresh("stop")
                pre += [f"layer {stop} = Linear(d, 1)", f"{p} = zeros([B])"]
                body_tail = [f"{p} = sigmoid(mean({stop}({x})[:, :, 0], axis = 1))"]
                opts.append(f"halt when {p} > 0.5")
            else:
                body_tail = []
                opts.append(f"halt when mean({x}, axis = -1)[:, 0] > {r.choice(['0.0', '0.3'])}")
            body = self.body(inner) + body + body_tail
            return pre + [f"repeat {var} in {count} {' '.join(opts)} {{"] + _indent(body) + ["}"]
        body = self.body(inner) + body
        return pre + [f"repeat {var} in {count}{''.join(' ' + o for o in opts)} {{"] + _indent(body) + ["}"]

    def _is_block(self, arr: str) -> bool:
        return arr in self._array_blocks

    def array_kind(self, ctx: Ctx, arr: str) -> str:
        r = self.rng
        choice = r.choice(["Linear(d, d)", "MLP(d, hidden)", "attention", "block"])
        if choice == "attention":
            ctor, kv = self.attention_ctor()
            self.note_site(arr, ctx, kv, array=True)
            return ctor
        if choice == "block" and len(self.blocks) < 4:
            self.no_arrays += 1           # arrays cannot be declared inside an arrayed block
            name = self.block(ctx, simple=True)
            self.no_arrays -= 1
            self._array_blocks.add(arr)
            for rel, kv, _ in self.block_sites[name]:
                self.note_site(f"{arr}.{rel}", ctx, kv, array=True)
            return f"{name}({', '.join(PARAMS)})"
        return choice if choice != "block" else "Linear(d, d)"

    def s_route_topk(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        router, s = self.fresh("router"), self.fresh("s")
        cap = r.choice(["0.5", "1.0", "0.25", "0.75"])
        if ctx.loop_vars and r.random() < 0.5:
            var, count = ctx.loop_vars[-1]
            cap = f"({count} - {var}) / ({count})"
        lines = [f"layer {router} = Linear(d, 1)", f"{s} = {router}({x})[:, :, 0]"]
        opts = ""
        among = None
        if ctx.length is not None and r.random() < 0.5:
            among = self.fresh("act")
            lines.append(f"{among} = full([B, {ctx.length}], 1, dtype = \"bool\")")
            opts = f", among = {among}"
        sel = f"route {x} by topk({s}, capacity = {cap}{opts})"
        if r.random() < 0.6:
            sel += f" weight {r.choice(['sigmoid', 'tanh'])}({s})"
        if among is not None and r.random() < 0.7:
            sel += f" as {among}"
            if ctx.depth == 0 and not ctx.in_block and r.random() < 0.5:
                self.extra_outputs.append(among)
        inner = replace(ctx, depth=ctx.depth + 1, in_route=True, length=None)
        return lines + [sel + " {"] + _indent(self.body(inner)) + ["}"]

    def s_route_where(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        mask = r.choice([f"mean({x}, axis = -1) > 0.0", f"sum({x}, axis = -1) < 0.5"])
        lines = []
        if not ctx.in_block and ctx.depth == 0 and ctx.length == "T" and r.random() < 0.4:
            mask = f"tokens > {r.choice([0, 1, 2])}"
        sel = f"route {x} by where({mask})"
        if r.random() < 0.5:
            g = self.fresh("g")
            lines.append(f"layer {g} = Linear(d, 1)")
            sel += f" weight sigmoid({g}({x})[:, :, 0])"
        inner = replace(ctx, depth=ctx.depth + 1, in_route=True, length=None)
        return lines + [sel + " {"] + _indent(self.body(inner)) + ["}"]

    def s_scan(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        s, u, h, y = self.fresh("s"), self.fresh("u"), self.fresh("h"), self.fresh("y")
        seg = r.choice(["seg", "1", "2"])
        self.segs.append(seg)
        inner = replace(ctx, var=u, length=seg, depth=ctx.depth + 1)
        lines = []
        body = [f"{u} = {s}"]
        stacked = r.random() < 0.5
        if stacked:
            cell = self.fresh("hl")
            lines += [f"layer {cell} = Linear(d, d)", f"{h} = zeros([B, d])"]
        body += self.body(inner)
        if stacked:
            body.append(f"{h} = tanh({cell}(mean({u}, axis = 1)) + {h})")
            z = self.fresh("z")
            if ctx.depth == 0 and not ctx.in_block:
                self.extra_outputs.append(z)
            return lines + [f"{y}, {z} = scan {s} in segments({x}, {seg}) {{"] + _indent(body + [f"yield {u}, {h}"]) + \
                ["}", f"{x} = {y}"]
        return lines + [f"{y} = scan {s} in segments({x}, {seg}) {{"] + _indent(body + [f"yield {u}"]) + ["}", f"{x} = {y}"]

    def s_memory(self, ctx: Ctx) -> list[str]:
        r, x = self.rng, ctx.var
        kind = r.choice(["NeuralMemory", "LinearMemory", "Bank"])
        m = self.fresh("mem")
        if kind == "NeuralMemory":
            layers = r.choice([1, 2])
            decl = f"memory {m} = NeuralMemory(d, hidden = hidden, layers = {layers}, act = \"{r.choice(['gelu', 'silu', 'tanh'])}\"" \
                   f", loss = \"{r.choice(['mse', 'l1', 'huber'])}\")"
            body = [f"{m}.write(l2_normalize({x}), {x}, lr = {r.choice(['0.1', '0.5'])}, momentum = {r.choice(['0.0', '0.9'])}, "
                    f"forget = {r.choice(['0.0', '0.1'])})",
                    f"{x} = {x} + {m}.read(l2_normalize({x}))"]
            if r.random() < 0.5:
                body = body[::-1]
        elif kind == "LinearMemory":
            decl = f"memory {m} = LinearMemory(d, d)"
            body = [f"{x} = {x} + 0.5 * {m}.step(l2_normalize({x}), l2_normalize({x}), {x})"]
            if r.random() < 0.5:
                body.append(f"{x} = {x} + {m}.read({x}) * 0.1")
        else:
            slots = r.choice([1, 2, 3])
            decl = f"memory {m} = Bank(slots = {slots}, shape = [d])"
            t = self.fresh("t")
            body = [f"{t} = einsum(\"bnd,btd->btn\", {m}.items(), {x})",
                    f"{t} = where(unsqueeze({m}.valid(), 1), {t}, -1e9)",
                    f"{x} = {x} + einsum(\"btn,bnd->btd\", softmax({t}, axis = -1), {m}.items())",
                    f"{m}.push(mean({x}, axis = 1))"]
        self.memory_decls.append(decl)
        return body

    def s_tokens(self, ctx: Ctx) -> list[str]:
        tbl = self.fresh("table")
        return [f"param {tbl}: f32[vocab, d] = normal(std = 0.5)", f"{ctx.var} = {ctx.var} + lookup({tbl}, tokens)"]

    def s_block(self, ctx: Ctx) -> list[str]:
        x = ctx.var
        if len(self.blocks) >= 4:
            return self.s_layer(ctx)
        name = self.block(ctx)
        inst = self.fresh("b")
        for rel, kv, in_region in self.block_sites[name]:
            self.note_site(f"{inst}.{rel}", ctx, kv, in_region=in_region)
        two = self._block_inputs[name]
        call = f"{inst}({x}, {x} * 0.5)" if two else f"{inst}({x})"
        if self._block_tuple[name]:
            t = self.fresh("t")
            return [f"layer {inst} = {name}({', '.join(PARAMS)})", f"{x}, {t} = {call}", f"{x} = {x} + {t}"]
        return [f"layer {inst} = {name}({', '.join(PARAMS)})", f"{x} = {call}"]

    def block(self, ctx: Ctx, simple: bool = False) -> str:
        """A new block definition; `simple`: one input and one result (arrays apply it as `arr(x)`)."""
        r = self.rng
        name = self.fresh("Blk")
        saved, saved_depth = self._block_sites, self._block_depth
        self._block_sites = []
        inner = Ctx(var="x", length="T", depth=ctx.depth + 1, in_block=True)
        self._block_depth = inner.depth
        two = not simple and r.random() < 0.3
        body = self.body(inner)
        lines = [f"block {name}({', '.join(p + ': int' for p in PARAMS)}) {{", "  input x: f32[B, T, d]"]
        if two:
            lines.append("  input e: f32[B, T, d]")
            body.append("x = x + e")
        tup = not simple and r.random() < 0.2
        lines += _indent(body)
        lines.append("  return x, x * 0.5" if tup else "  return x")
        lines.append("}")
        self.blocks.append("\n".join(lines))
        self.block_sites[name] = self._block_sites
        self._block_inputs[name] = two
        self._block_tuple[name] = tup
        self._block_sites, self._block_depth = saved, saved_depth
        return name

    # the whole program ------------------------------------------------------------------------------
    def program(self, name: str = "P") -> str:
        r = self.rng
        self._block_sites: list = []
        self._block_depth = 0
        self._array_blocks: set[str] = set()
        self._block_inputs: dict[str, bool] = {}
        self._block_tuple: dict[str, bool] = {}
        self.memory_decls: list[str] = []
        extra_input = r.random() < 0.15
        body = self.body(Ctx(), r.randint(2, self.max_stmts))
        sz = self.sizes
        header = (f"arch {name}(vocab: int = {sz['vocab']}, d: int = {sz['d']}, heads: int = {sz['heads']}, "
                  f"kvh: int = {sz['kvh']}, hidden: int = {sz['hidden']}, n: int = {sz['n']}, k: int = {sz['k']}, "
                  f"seg: int = {sz['seg']}) {{")
        lines = [header, "  input tokens: i64[B, T]"]
        if extra_input:
            lines.append("  input flags: bool[B, T]")
        lines += ["  layer embed = Embedding(vocab, d)", "  layer head = Linear(d, vocab)"]
        if r.random() < 0.3:
            lines.append('  require d % heads == 0, "heads must divide d"')
        lines += _indent(self.memory_decls)
        lines.append("  x = embed(tokens)")
        if extra_input:
            lines.append("  x = where(unsqueeze(flags, 2), x, -x)")
        lines += _indent(body)
        lines.append("  output logits = head(x)")
        for extra in self.extra_outputs:
            lines.append(f"  output {extra}")
        lines += _indent(self.policies())
        lines.append("}")
        doc = ["# A random architecture written by archc.fuzz.programs."]
        text = "\n".join(doc + self.blocks + lines) + "\n"
        if self.rewrites and _kv_decodable(text):      # rewrite_kv needs the K/V decode path (SPEC §11.1)
            blocks = [b for b, _, _ in self.rewrites]
            lines[-1:] = _indent([x for _, layer, _ in self.rewrites for x in layer] +
                                 [policy for _, _, policy in self.rewrites]) + ["}"]
            text = "\n".join(doc + self.blocks + blocks + lines) + "\n"
        return text

    def policies(self) -> list[str]:
        r = self.rng
        out: list[str] = []
        used: set[str] = set()
        looped = [s for s in self.sites if s.loop is not None]
        if looped and r.random() < 0.5:
            s = r.choice(looped)
            out.append(f"cache share_kv({s.path}, across = \"recursion\")")
            used.add(s.path)
        top = [s for s in self.sites if s.top_level and not s.array and s.path not in used]
        pairs = [(a, b) for a in top for b in top if a.order < b.order and a.kv == b.kv]
        if pairs and r.random() < 0.6:
            src, dst = r.choice(pairs)
            if r.random() < 0.5:
                out.append(f"cache share_kv({dst.path}, source = {src.path})")
            else:
                out.append(f"cache stochastic_share({dst.path}, source = {src.path}, p = {r.choice(['0.25', '0.5'])})")
            used.add(dst.path)
        rest = [s for s in self.sites if s.path not in used]
        for s in rest:
            if r.random() < 0.25:
                kind = r.choice(["recursion_wise", "prune", "topk", "rewrite"])
                if kind == "recursion_wise":
                    out.append(f"cache recursion_wise({s.path})")
                elif kind == "prune":
                    ratio = r.choice(["0.0", "0.0", "0.5"])
                    self.lossy_decode |= ratio != "0.0"
                    out.append(f"cache prune_key_channels({s.path}, ratio = {ratio}, recent = 2, observe = 2)")
                elif kind == "topk":
                    out.append(f"cache topk_decode({s.path}, k = 64, dense_heads = 1)")
                else:
                    self.rewrites.append(self._rewrite(s))
                used.add(s.path)
        return out

    def _rewrite(self, s: Site) -> tuple[str, list[str], str]:
        """A rewrite_kv policy on site `s`: (its processor block, the layer line, the policy line). The
        processor's output starts at zero (the identity), so decoding stays exact and comparable."""
        r = self.rng
        block, layer = self.fresh("Rw"), self.fresh("rw")
        lines = [f"block {block}(nh: int, hd: int) {{",
                 "  input k: f32[B, N, nh, hd]",
                 "  input v: f32[B, N, nh, hd]",
                 '  layer mix = Linear(hd, hd, init = "zeros")',
                 "  return k + mix(k), v + mix(v)",
                 "}",
                 ""]
        policy = (f"cache rewrite_kv({s.path}, processor = {layer}, delimiter = {r.choice([0, 1, 2])}, "
                  f"top = {r.choice([0, 1, 2])})")
        return "\n".join(lines), [f"layer {layer} = {block}({s.kv}, d / heads)"], policy


def _indent(lines: list[str]) -> list[str]:
    return ["  " + line for line in lines]


def _kv_decodable(text: str) -> bool:
    """Whether a checked program decodes from a per-site K/V cache (a program that does not check
    is left as it is, for the harness to report)."""
    from archc.api import lower
    from archc.errors import ArchError
    from archc.ir.analysis import kv_decode_blocker
    try:
        return all(kv_decode_blocker(g) is None for g in lower(text))
    except ArchError:
        return False


def random_program(seed: int, max_stmts: int = 6, max_depth: int = 2) -> str:
    """The .arch text of random program number `seed` (deterministic)."""
    return Gen(random.Random(seed), max_stmts, max_depth).program(f"P{seed}")
