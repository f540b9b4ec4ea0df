"""Statement lowering: declarations, assignments, and the region statements (repeat, route, scan)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import sympy

from archc.dsl import ast as A
from archc.dsl.exprs import as_tensor, lower_expr
from archc.dsl.lower import shown
from archc.dsl.values import LayerInst, MemInst, Static
from archc.errors import Span
from archc.ir.core import Region, Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, TensorType, as_expr, dims_equal, expr_str, substitute, sym

SHARE_STRATEGIES = ("cycle", "sequence")
MAX_STMT_NESTING = 64


class StmtLowering:
    def __init__(self, al):
        self.al = al
        self.b = al.b

    def err(self, *a, **k):
        return self.al.err(*a, **k)

    # -- types -------------------------------------------------------------------------------------

    def type_of(self, t: A.TypeExpr, scope, frame, free_dims: dict | None) -> TensorType:
        from archc.dsl.lower import DTYPES
        if t.dtype not in DTYPES:
            raise self.err(f"unknown dtype `{t.dtype}`", t.span, hint="dtypes are f32, i64 and bool")
        dims = []
        for d in t.dims:
            if isinstance(d, A.Name) and scope.lookup(d.id) is None and free_dims is not None:
                if not d.id[0].isupper():
                    from archc.dsl.lower import suggest
                    raise self.err(f"unknown name `{d.id}` in a type", d.span,
                                   hint=suggest(d.id, scope.names()) or
                                   "new dimension names (batch, sequence) start with an upper-case letter: B, T, N")
                dims.append(free_dims.setdefault(d.id, sym(d.id)))
                continue
            v = self.al.static(d, scope, frame, "a dimension")
            if v.kind != "int":
                raise self.err(f"a dimension must be an integer, got {expr_str(v.expr)}", d.span)
            val = substitute(v.expr, self.al.defaults)
            if val.is_number and val < 1:
                raise self.err(f"a dimension must be positive, got {shown(v.expr, val)}", d.span)
            dims.append(v.expr)
        return TensorType(DTYPES[t.dtype], tuple(dims))

    def arch_input(self, st: A.Input, scope) -> Value:
        if st.name in scope.vars:
            raise self.err(f"`{st.name}` is already defined", st.span)
        free: dict[str, sympy.Symbol] = {}
        t = self.type_of(st.type, scope, _F(), free)
        for name in free:
            if name not in self.al.dims:
                self.al.dims.append(name)
                scope.vars[name] = Static(sym(name), "int")
        v = self.b.value(st.name, t)
        scope.vars[st.name] = v
        if self.al.batch is None and t.rank > 0:
            self.al.batch = t.shape[0]
        return v

    # -- statement lists ---------------------------------------------------------------------------

    def lower_block(self, stmts: list[A.Stmt], scope, frame, kind: str) -> list[Value] | None:
        """Lower a statement list; returns a block's `return` values (blocks only)."""
        returned = None
        for st in stmts:
            if returned is not None:
                raise self.err("statement after `return`", st.span)
            if isinstance(st, A.Return):
                if kind != "block":
                    raise self.err("`return` is only allowed in a block", st.span,
                                   hint="architectures declare results with `output name = ...`")
                returned = [as_tensor(self.al, lower_expr(self.al, v, scope, frame), v.span, "returned value")
                            for v in st.values]
                continue
            if isinstance(st, A.Yield):
                raise self.err("`yield` is only allowed as the last statement of a scan body", st.span)
            self.stmt(st, scope, frame, kind)
        return returned

    def stmt(self, st: A.Stmt, scope, frame, kind: str):
        handler = getattr(self, "s_" + type(st).__name__.lower())
        depth = getattr(self.al, "stmt_depth", 0)      # loops, routes, scans and inlined blocks nest
        if depth >= MAX_STMT_NESTING:
            raise self.err(f"statements nested more than {MAX_STMT_NESTING} deep (loops, routes, scans and blocks)",
                           st.span, hint="flatten the nesting: fewer nested loops or blocks")
        self.al.stmt_depth = depth + 1
        self.al.lw.last_stmt_span = st.span          # where a RecursionError is reported
        try:
            handler(st, scope, frame, kind)
        finally:
            self.al.stmt_depth = depth

    def s_input(self, st: A.Input, scope, frame, kind):
        if kind == "arch":
            return  # bound up front by ArchLowering.run
        if kind == "block":
            return  # bound by apply_block
        raise self.err("`input` is only allowed at the top of an arch or block body", st.span)

    def s_layerdecl(self, st: A.LayerDecl, scope, frame, kind):
        from archc.dsl.layers import PRIMITIVES, bind_ctor
        from archc.dsl.lower import suggest
        self._check_new(st.name, scope, st.span)
        copies = None
        if st.count is not None:
            copies = self.al.static_int(st.count, scope, frame, "the number of copies", minimum=1)
            if frame.copies is not None:
                raise self.err("layer arrays cannot be declared inside an arrayed block", st.span)
        path = f"{frame.path}.{st.name}" if frame.path else st.name
        if st.kind in PRIMITIVES:
            args = bind_ctor(self.al, st.kind, st, scope, frame)
            inst = LayerInst(st.name, st.kind, path, args, copies, None, st.span,
                             outer_copies=frame.copies, outer_index=frame.index)
        elif st.kind in self.al.lw.blocks:
            bdef = self.al.lw.blocks[st.kind]
            args = self._bind_block_args(bdef, st, scope, frame)
            inst = LayerInst(st.name, st.kind, path, args, copies, None, st.span, block=bdef,
                             outer_copies=frame.copies, outer_index=frame.index)
        else:
            from archc.dsl.memories import MEMORIES
            if st.kind in MEMORIES:
                raise self.err(f"`{st.kind}` is a memory kind", st.kind_span, hint=f"write `memory {st.name} = {st.kind}(...)`")
            raise self.err(f"unknown layer kind `{st.kind}`", st.kind_span,
                           hint=suggest(st.kind, list(PRIMITIVES) + list(self.al.lw.blocks)))
        scope.vars[st.name] = inst

    def _bind_block_args(self, bdef: A.BlockDef, st: A.LayerDecl, scope, frame) -> dict[str, Any]:
        names = [p.name for p in bdef.params]
        if len(st.args) > len(names):
            raise self.err(f"block `{bdef.name}` takes {len(names)} argument(s), got {len(st.args)}",
                           st.args[len(names)].span)
        given: dict[str, Any] = {}
        for p, a in zip(bdef.params, st.args):
            given[p.name] = self.al.static(a, scope, frame, f"argument `{p.name}` of `{bdef.name}`")
        for kw in st.kwargs:
            if kw.name not in names:
                from archc.dsl.lower import suggest
                raise self.err(f"block `{bdef.name}` has no parameter `{kw.name}`", kw.span, hint=suggest(kw.name, names))
            if kw.name in given:
                raise self.err(f"argument `{kw.name}` is given twice", kw.span)
            given[kw.name] = self.al.static(kw.value, scope, frame, f"argument `{kw.name}` of `{bdef.name}`")
        from archc.dsl.lower import Scope
        tmp = Scope()
        self.al.bind_params(bdef.params, tmp, arch_level=False, given=given, call_span=st.span)
        return dict(tmp.vars)

    def s_paramdecl(self, st: A.ParamDecl, scope, frame, kind):
        self._check_new(st.name, scope, st.span)
        t = self.type_of(st.type, scope, frame, None)
        inits = {"normal": ("std",), "trunc_normal": ("std",), "zeros": (), "ones": (), "const": ("value",),
                 "uniform": ("bound",)}
        if st.init not in inits:
            raise self.err(f"unknown initializer `{st.init}`", st.span, hint=f"initializers: {', '.join(inits)}")
        args: dict[str, Any] = {}
        allowed = inits[st.init]
        for i, a in enumerate(st.args):
            if i >= len(allowed):
                raise self.err(f"`{st.init}` takes {len(allowed)} argument(s)", a.span)
            args[allowed[i]] = self.al.static(a, scope, frame, "an initializer argument").expr
        for kw in st.kwargs:
            if kw.name not in allowed:
                raise self.err(f"`{st.init}` has no argument `{kw.name}`", kw.span)
            args[kw.name] = self.al.static(kw.value, scope, frame, "an initializer argument").expr
        defaults = {"std": sympy.Float(0.02), "value": sympy.Float(0.0), "bound": sympy.Float(0.02)}
        for k in allowed:
            args.setdefault(k, defaults[k])
        if t.dtype is not F32:
            raise self.err("parameters are f32 tensors", st.type.span)
        from archc.dsl.lower import _attr_value
        scope.vars[st.name] = self.al.param(frame, st.name, t.shape, st.init, st.span,
                                            **{k: _attr_value(v) for k, v in args.items()})

    def s_memorydecl(self, st: A.MemoryDecl, scope, frame, kind):
        from archc.dsl.memories import declare_memory
        self._check_new(st.name, scope, st.span)
        scope.vars[st.name] = declare_memory(self.al, st, scope, frame)

    def _check_new(self, name: str, scope, span: Span):
        prev = scope.lookup(name)
        if prev is not None:
            raise self.err(f"`{name}` is already defined", span,
                           hint="layers, parameters and memories are declared once; pick another name")

    def s_assign(self, st: A.Assign, scope, frame, kind):
        hint = st.targets[0] if len(st.targets) == 1 else None
        v = lower_expr(self.al, st.value, scope, frame, hint=hint)
        if len(st.targets) == 1:
            if isinstance(v, tuple):
                raise self.err(f"this produces {len(v)} values; assign them to {len(v)} names", st.span)
            self._bind(st.targets[0], v, scope, st.span)
            return
        if not isinstance(v, tuple) or len(v) != len(st.targets):
            n = len(v) if isinstance(v, tuple) else 1
            raise self.err(f"{len(st.targets)} names on the left but the right side gives {n} value(s)", st.span)
        for t, x in zip(st.targets, v):
            self._bind(t, x, scope, st.span)

    def _bind(self, name: str, v, scope, span: Span):
        prev = scope.lookup(name)
        if isinstance(prev, (LayerInst, MemInst)):
            raise self.err(f"`{name}` is a {'layer' if isinstance(prev, LayerInst) else 'memory'} and cannot be reassigned",
                           span)
        if isinstance(prev, Static) and scope.owner(name) is not scope and scope.in_region:
            raise self.err(f"`{name}` is a compile-time value of an enclosing scope and cannot be reassigned here", span)
        if isinstance(v, (LayerInst, MemInst)):
            raise self.err("layers and memories cannot be aliased; use the declared name", span)
        owner = scope.owner(name)
        if isinstance(prev, Value) and isinstance(v, Value) and owner is not None and name in owner.carried:
            want = owner.carried[name]
            if v.type.dtype != want.dtype or len(v.type.shape) != len(want.shape) or any(
                    dims_equal(a, b, self.al.defaults) is False for a, b in zip(v.type.shape, want.shape)):
                raise self.err(f"`{name}` changes type inside the loop: {want} before, {v.type} here", span,
                               hint="a carried value keeps its shape across iterations")
        scope.set(name, v, span)

    def s_exprstmt(self, st: A.ExprStmt, scope, frame, kind):
        e = st.expr
        if not (isinstance(e, A.Call) and isinstance(e.func, A.Attr)):
            raise self.err("this expression has no effect", st.span, hint="assign it: `y = ...`")
        lower_expr(self.al, e, scope, frame)

    def s_output(self, st: A.Output, scope, frame, kind):
        if kind != "arch" or scope.parent is not None:
            raise self.err("`output` is only allowed at the top level of an arch", st.span)
        if any(v.name.split(".")[0] == st.name for v in self.al.outputs):
            raise self.err(f"output `{st.name}` is declared twice", st.span)
        if st.value is None:
            v = lower_expr(self.al, A.Name(id=st.name, span=st.span), scope, frame)
        else:
            v = lower_expr(self.al, st.value, scope, frame, hint=st.name)
        v = as_tensor(self.al, v, st.span, "an output")
        if v.name.split(".")[0] != st.name:
            v = self.b.emit1(Op.CAST, [v], {"dtype": v.type.dtype.value}, st.span, name=st.name)
        self.al.outputs.append(v)

    def s_cachedecl(self, st: A.CacheDecl, scope, frame, kind):
        if kind != "arch" or scope.parent is not None:
            raise self.err("`cache` policies are declared at the top level of an arch", st.span)
        self.al.cache_decls.append((st, scope, frame))

    def s_scheduledecl(self, st: A.ScheduleDecl, scope, frame, kind):
        if kind != "arch" or scope.parent is not None:
            raise self.err("`schedule` is declared at the top level of an arch", st.span)
        from archc.dsl.schedules import lower_schedule
        self.al.schedules.append(lower_schedule(self.al, st, scope))

    def s_noncausal(self, st: A.NonCausal, scope, frame, kind):
        if kind != "arch" or scope.parent is not None:
            raise self.err("`noncausal` declares a property of an architecture: put it at the top level of an "
                           "`arch` body", st.span)
        if self.al.noncausal is not None:
            raise self.err("`noncausal` is declared twice", st.span)
        self.al.noncausal = st.reason or ""

    def s_require(self, st: A.Require, scope, frame, kind):
        v = self.al.static(st.cond, scope, frame, "a requirement")
        if v.kind != "bool":
            raise self.err("`require` needs a condition", st.cond.span)
        val = substitute(sympy.sympify(v.expr), self.al.defaults)
        if val not in (sympy.true, sympy.false):
            names = ", ".join(sorted(s.name for s in sympy.sympify(val).free_symbols))
            raise self.err(f"`require` cannot be decided at compile time: it depends on {names}", st.cond.span,
                           hint="requirements are checked once, on the architecture parameters")
        if val == sympy.false:
            raise self.err(st.message or "requirement failed", st.cond.span)

    # -- blocks ------------------------------------------------------------------------------------

    def apply_block(self, inst: LayerInst, e: A.Call, scope, frame, inner, hint):
        from archc.dsl.lower import Scope
        bdef: A.BlockDef = inst.block
        if bdef.name in frame.block_stack:
            raise self.err(f"block `{bdef.name}` applies itself", e.span)
        inputs = [s for s in bdef.body if isinstance(s, A.Input)]
        if e.kwargs:
            raise self.err(f"block `{bdef.name}` takes its inputs positionally", e.kwargs[0].span)
        if len(e.args) != len(inputs):
            raise self.err(f"`{inst.name}` ({bdef.name}) takes {len(inputs)} input(s), got {len(e.args)}", e.span,
                           hint="inputs: " + ", ".join(i.name for i in inputs))
        bscope = Scope(vars=dict(inst.args))
        free: dict[str, sympy.Basic] = {}
        for decl, arg in zip(inputs, e.args):
            v = as_tensor(self.al, lower_expr(self.al, arg, scope, frame), arg.span, f"input `{decl.name}`")
            declared = self._block_input_type(decl, bscope, free, v)
            bad = v.type.dtype != declared.dtype or v.type.rank != declared.rank or any(
                dims_equal(a, b, self.al.defaults) is False for a, b in zip(v.type.shape, declared.shape))
            if bad:
                raise self.err(f"input `{decl.name}` of block `{bdef.name}` expects {declared}, got {v.type}", arg.span,
                               hint=f"declared at line {decl.span.line}: input {decl.name}: {declared}")
            bscope.vars[decl.name] = v
        for name, val in free.items():
            bscope.vars.setdefault(name, Static(val, "int"))
        bframe = replace(inner, block_stack=frame.block_stack + (bdef.name,), loop_vars=dict(frame.loop_vars))
        ret = self.lower_block(bdef.body, bscope, bframe, kind="block")
        if ret is None:
            raise self.err(f"block `{bdef.name}` has no `return`", bdef.name_span, hint="end the block with `return x`")
        return ret[0] if len(ret) == 1 else tuple(ret)

    def _block_input_type(self, decl: A.Input, bscope, free, actual: Value) -> TensorType:
        """Declared type with free dimension names bound to the actual argument's dims."""
        from archc.dsl.lower import DTYPES
        if decl.type.dtype not in DTYPES:
            raise self.err(f"unknown dtype `{decl.type.dtype}`", decl.type.span)
        dims = []
        for i, d in enumerate(decl.type.dims):
            if isinstance(d, A.Name) and bscope.lookup(d.id) is None:
                if d.id not in free:
                    free[d.id] = actual.type.shape[i] if i < actual.type.rank else sym(d.id)
                dims.append(free[d.id])
                continue
            if isinstance(d, A.Name) and d.id in free:
                dims.append(free[d.id])
                continue
            v = self.al.static(d, bscope, _F(), "a dimension")
            if v.kind != "int":
                raise self.err(f"a dimension must be an integer, got {expr_str(v.expr)}", d.span)
            dims.append(v.expr)
        return TensorType(DTYPES[decl.type.dtype], tuple(dims))

    # -- repeat ------------------------------------------------------------------------------------

    def s_repeat(self, st: A.Repeat, scope, frame, kind):
        from archc.dsl.lower import _assigned_names, _attr_value
        al = self.al
        trips = al.static_int(st.count, scope, frame, "the repeat count", minimum=1)
        if st.var in frame.loop_vars or scope.lookup(st.var) is not None:
            raise self.err(f"loop variable `{st.var}` shadows an existing name", st.span)
        body_frame = replace(frame, loop_vars={**frame.loop_vars, st.var: (sympy.Integer(0), trips - 1)})
        shared: dict[str, LayerInst] = {}
        for sh in st.shares:
            inst = scope.lookup(sh.layer)
            if not isinstance(inst, LayerInst):
                raise self.err(f"`share {sh.layer}` names no layer", sh.span)
            if inst.copies is None:
                raise self.err(f"`{sh.layer}` is a single layer; its weights are already shared by every step", sh.span,
                               hint=f"declare `layer {sh.layer}[k] = ...` to cycle k copies")
            if sh.strategy not in SHARE_STRATEGIES:
                raise self.err(f"unknown sharing strategy `{sh.strategy}`", sh.span,
                               hint="strategies: cycle (step i uses copy i mod k), sequence (copy floor(i*k/n))")
            r = sym(st.var)
            k = as_expr(inst.copies)
            idx = sympy.Mod(r, k) if sh.strategy == "cycle" else sympy.floor(r * k / trips)
            shared[sh.layer] = replace(inst, index=idx)
        grad_last = None
        if st.grad_last is not None:
            grad_last = al.static_int(st.grad_last, scope, frame, "`grad last`", minimum=1)
            gl, tv = substitute(grad_last, al.defaults), substitute(trips, al.defaults)
            if gl.is_number and tv.is_number and gl > tv:
                raise self.err(f"`grad last {gl}` exceeds the repeat count {tv}", st.grad_last.span)
            if st.halt is not None:
                raise self.err("`grad last` and `halt when` cannot be combined on one repeat", st.grad_last.span,
                               hint="truncate gradients in an inner repeat instead")
        carried = self._carried(st.body, scope, st.span)
        extra = {"var": st.var}

        def body(bscope, bframe):
            bscope.vars[st.var] = Static(sym(st.var), "int")
            for name, inst in shared.items():
                bscope.vars[name] = inst
            self.lower_block(st.body, bscope, bframe, kind="loop")
            if st.halt is None:
                return []
            h = as_tensor(al, lower_expr(al, st.halt, bscope, bframe), st.halt.span, "the halt condition")
            if h.type.dtype is not BOOL or h.type.rank != 1 or dims_equal(h.type.shape[0], al.batch, al.defaults) is False:
                raise self.err(f"`halt when` needs one bool per sample (bool[{expr_str(al.batch)}]), got {h.type}",
                               st.halt.span, hint="e.g. `halt when q[:, 0] > q[:, 1]`")
            return [h]

        attrs = {"trips": _attr_value(trips), **extra}
        if grad_last is not None:
            attrs["grad_last"] = _attr_value(grad_last)
        op = Op.LOOP if st.halt is None else Op.HALT_LOOP
        self._region_op(op, attrs, carried, [], scope, body_frame, body, st.span, prefix_yields=st.halt is not None)

    def _carried(self, stmts, scope, span) -> list[str]:
        """Outer names the body reassigns (tensors) or mutates (memories): the loop-carried state."""
        from archc.dsl.lower import _assigned_names
        from archc.dsl.memories import MUTATING
        out = []
        for name, aspan in _assigned_names(stmts).items():
            if name.startswith("@"):
                mem_name, method = name[1:].split(".", 1)
                m = scope.lookup(mem_name)
                if isinstance(m, MemInst) and (m.kind, method) in MUTATING and mem_name not in out:
                    out.append(mem_name)
                continue
            v = scope.lookup(name)
            if isinstance(v, Value):
                out.append(name)
            elif isinstance(v, Static):
                raise self.err(f"`{name}` is a compile-time value and cannot be reassigned in a loop body", aspan)
        return out

    def _region_op(self, op: Op, attrs, carried: list[str], operands: list[Value], scope, bframe, body_fn,
                   span: Span, prefix_yields=False, region_args: list[Value] | None = None,
                   extra_outputs: list[TensorType] | None = None, extra_names: list[str] | None = None):
        """Build a region op whose carries are `carried` outer names; rebinds them to the op's results."""
        from archc.dsl.lower import Scope
        al = self.al
        bscope = Scope(parent=scope)
        bscope.in_region = True
        carry_vals: list[Value] = []
        layout: list[tuple[str, int]] = []   # (name, number of values)
        args: list[Value] = list(region_args or [])
        for name in carried:
            v = scope.lookup(name)
            if isinstance(v, MemInst):
                new_state = tuple(self.b.value(s.name.split(".")[0], s.type) for s in v.state)
                bscope.vars[name] = replace(v, state=new_state)
                carry_vals.extend(v.state)
                args.extend(new_state)
                layout.append((name, len(v.state)))
            else:
                a = self.b.value(name, v.type)
                bscope.vars[name] = a
                bscope.carried[name] = v.type
                carry_vals.append(v)
                args.append(a)
                layout.append((name, 1))
        with self.b.region() as nodes:
            extra_yields = body_fn(bscope, bframe)
            yields: list[Value] = []
            for name, n in layout:
                v = bscope.vars[name]
                if not isinstance(v, (Value, MemInst)):
                    what = "a list" if isinstance(v, (list, tuple)) else "a compile-time value"
                    raise self.err(f"`{name}` is a tensor carried by this loop ({carry_vals[len(yields)].type}), but "
                                   f"the loop body makes it {what}", span,
                                   hint=f"give it a tensor value, e.g. `{name} = full(shape, value)`, or use "
                                        f"another name for {what}")
                yields.extend(v.state if isinstance(v, MemInst) else [v])
        scope.loop_locals = {**scope.loop_locals,
                              **{k: s for k, s in bscope.local_defs.items() if k not in carried}}
        if prefix_yields:
            results = [v.name for v in extra_yields] + [v.name for v in yields]
        else:
            results = [v.name for v in yields] + [v.name for v in (extra_yields or [])]
        region = Region(tuple(args), tuple(nodes), tuple(results))
        if callable(extra_outputs):
            extra_outputs, extra_names, more_attrs = extra_outputs(extra_yields)
            attrs = {**attrs, **more_attrs}
        out_types = [v.type for v in carry_vals] + list(extra_outputs or [])
        names = [v.name.split(".")[0] for v in carry_vals] + list(extra_names or [])
        if op is Op.HALT_LOOP:
            out_types.append(TensorType(I64, (al.batch,)))
            names.append("steps")
        outs = self.b.emit(op, list(operands) + carry_vals, attrs, span, names=names, out_types=out_types,
                           regions=(region,))
        i = 0
        for name, n in layout:
            v = scope.lookup(name)
            if isinstance(v, MemInst):
                scope.set(name, replace(v, state=tuple(outs[i:i + n])))
            else:
                scope.set(name, outs[i])
            i += n
        return outs[i:]

    # -- route ---------------------------------------------------------------------------------------

    def s_route(self, st: A.Route, scope, frame, kind):
        from archc.dsl.builtins import bind_args, Sig, _REQ, S
        from archc.dsl.lower import _assigned_names, _attr_value
        al = self.al
        x = scope.lookup(st.var)
        if not isinstance(x, Value):
            raise self.err(f"`route {st.var}` needs a tensor variable", st.span)
        if x.type.rank < 2:
            raise self.err(f"routed tensor must be [B, T, ...], got {x.type}", st.span)
        for name, aspan in _assigned_names(st.body).items():
            if name.startswith("@"):
                continue
            if name != st.var and isinstance(scope.lookup(name), Value):
                raise self.err(f"only `{st.var}` may be updated inside `route {st.var}`; `{name}` is an outer value",
                               aspan, hint="compute it after the route")
        B, T = x.type.shape[0], x.type.shape[1]
        operands = [x]
        attrs: dict[str, Any] = {}
        if isinstance(st.selector, A.TopK):
            call = A.Call(func=A.Name(id="topk", span=st.selector.span), args=st.selector.args,
                          kwargs=st.selector.kwargs, span=st.selector.span)
            a = bind_args(al, "topk", Sig((("score", _REQ), ("capacity", _REQ), ("among", S(False)), ("infer", S(False)))),
                          call, scope, frame)
            score = self._bt(a["score"], B, T, "router score", F32)
            cap_v, cap_span = a["capacity"]
            if not isinstance(cap_v, Static) or cap_v.kind == "bool":
                raise self.err("capacity must be a compile-time number (it may use loop variables)", cap_span)
            for val in al.sample_values(cap_v.expr, frame):
                if val.is_number and not (0 < val <= 1):
                    raise self.err(f"capacity must be in (0, 1], got {shown(cap_v.expr, val)}", cap_span,
                                   hint="capacity is the fraction of tokens routed through the body")
            operands.append(score)
            attrs["capacity"] = _attr_value(cap_v.expr)
            among_v, _ = a["among"]
            if not (isinstance(among_v, Static) and among_v.kind == "bool"):
                operands.append(self._bt(a["among"], B, T, "`among` mask", BOOL))
                attrs["has_among"] = True
            k = sympy.Max(1, sympy.floor(as_expr(cap_v.expr) * T))
            op = Op.ROUTE_TOPK
        else:
            operands.append(self._bt((lower_expr(al, st.selector.mask, scope, frame), st.selector.mask.span), B, T,
                                     "route mask", BOOL))
            k = T
            op = Op.ROUTE_MASK
            # the body runs per sample on that sample's tokens: these symbols are rebound to (1, count)
            attrs["dims"] = [d.name if isinstance(d, sympy.Symbol) else "" for d in (B, T)]
        if st.weight is not None:
            operands.append(self._bt((lower_expr(al, st.weight, scope, frame), st.weight.span), B, T, "route weight", F32))
            attrs["has_weight"] = True
        if op is Op.ROUTE_TOPK:
            infer_v, infer_span = a["infer"]
            if not (isinstance(infer_v, Static) and infer_v.kind == "bool" and not infer_v.expr):
                # the inference rule (MoR's causal router): outside training, each token is routed by
                # its own mask (and `among`) instead of the top-k over the sequence
                operands.append(self._bt(a["infer"], B, T, "`infer` mask", BOOL))
                attrs["has_infer"] = True
        xs = self.b.value(st.var, x.type.with_shape((B, k) + x.type.shape[2:]))
        pos = self.b.value("pos", TensorType(I64, (B, k)))
        bframe = replace(frame, positions=pos, in_route=True)

        def body(bscope, bf):
            bscope.vars[st.var] = xs
            bscope.carried = {st.var: xs.type}
            bscope.no_mutation = True
            self.lower_block(st.body, bscope, bf, kind="route")
            y = bscope.vars[st.var]
            return [y]

        extra_types = [x.type] + ([TensorType(BOOL, (B, T))] if op is Op.ROUTE_TOPK else [])
        extra_names = [st.var] + ([st.as_name or "sel"] if op is Op.ROUTE_TOPK else [])
        if st.as_name and op is not Op.ROUTE_TOPK:
            raise self.err("`as NAME` binds the selection of a topk route; a where-route's selection is its mask",
                           st.span)
        outs = self._region_op(op, attrs, [], operands, scope, bframe, body, st.span, region_args=[xs, pos],
                               extra_outputs=extra_types, extra_names=extra_names)
        scope.set(st.var, outs[0], st.span)
        if st.as_name:
            prev = scope.lookup(st.as_name)
            if prev is not None and not isinstance(prev, Value):
                raise self.err(f"`{st.as_name}` is already defined", st.span)
            scope.set(st.as_name, outs[1], st.span)

    def _bt(self, a, B, T, what, dtype) -> Value:
        v, span = a
        t = as_tensor(self.al, v, span, what)
        if t.type.rank == 3 and t.type.shape[2] == 1:
            t = self.b.emit1(Op.SELECT, [t], {"axis": 2, "index": 0}, span, name="score")
        ok = t.type.rank == 2 and all(dims_equal(a_, b_, self.al.defaults) is not False
                                     for a_, b_ in zip(t.type.shape, (B, T)))
        if not ok or t.type.dtype is not dtype:
            raise self.err(f"{what} must be {dtype.value}[{expr_str(B)}, {expr_str(T)}], got {t.type}", span)
        return t

    # -- scan ----------------------------------------------------------------------------------------

    def s_scan(self, st: A.Scan, scope, frame, kind):
        from archc.dsl.lower import _attr_value
        al = self.al
        x = as_tensor(al, lower_expr(al, st.seq, scope, frame), st.seq.span, "the scanned sequence")
        if x.type.rank < 2:
            raise self.err(f"segments() needs a [B, T, ...] tensor, got {x.type}", st.seq.span)
        size = al.static_int(st.size, scope, frame, "the segment length", minimum=1)
        if not st.body or not isinstance(st.body[-1], A.Yield):
            raise self.err("a scan body must end with `yield` of its per-segment results", st.span)
        yld = st.body[-1]
        if len(yld.values) != len(st.targets):
            raise self.err(f"`yield` gives {len(yld.values)} value(s) for {len(st.targets)} target(s)", yld.span)
        if st.var in frame.loop_vars or scope.lookup(st.var) is not None:
            raise self.err(f"segment variable `{st.var}` shadows an existing name", st.span)
        carried = self._carried(st.body[:-1], scope, st.span)
        seg = self.b.value(st.var, x.type.with_shape(x.type.shape[:1] + (size,) + x.type.shape[2:]))
        T = x.type.shape[1]
        nseg = T if size == 1 else sympy.ceiling(T / size)      # a per-step scan stacks to length T itself

        def body(bscope, bf):
            bscope.vars[st.var] = seg
            self.lower_block(st.body[:-1], bscope, bf, kind="scan")
            return [as_tensor(al, lower_expr(al, v, bscope, bf), v.span, "a yielded value") for v in yld.values]

        def outputs(ys: list[Value]):
            """Per-segment results of length `size` concatenate to [B, T, ...]; others stack per segment."""
            stacked, types = [], []
            for y in ys:
                if y.type.rank >= 2 and dims_equal(y.type.shape[1], size) is True:
                    stacked.append(False)
                    types.append(y.type.with_shape((y.type.shape[0], T) + y.type.shape[2:]))
                elif y.type.rank >= 1:
                    stacked.append(True)
                    types.append(y.type.with_shape((y.type.shape[0], nseg) + y.type.shape[1:]))
                else:
                    raise self.err("a scan yields per-sample tensors [B, ...]", yld.span)
            return types, list(st.targets), {"stacked": stacked}

        outs = self._region_op(Op.SCAN, {"size": _attr_value(size)}, carried, [x], scope, frame, body, st.span,
                               region_args=[seg], extra_outputs=outputs)
        for t, v in zip(st.targets, outs):
            self._bind(t, v, scope, st.span)


class _F:
    """A neutral frame for evaluating types outside any loop."""

    loop_vars: dict = {}
    positions = None
    copies = None
    index = None
    path = ""
