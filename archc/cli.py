"""The `archc` command line: check, ir, graph, compile, cost, passes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from functools import wraps
from pathlib import Path

import click

from archc.errors import ArchError


def _diagnostics(fn):
    """User errors print as diagnostics (exit 1); nothing reaches the user as a traceback."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ArchError as err:
            click.echo(err.render(), err=True)
            sys.exit(1)
        except click.exceptions.Exit:
            raise
        except (KeyboardInterrupt, click.ClickException):
            raise
        except RecursionError:
            click.echo("error: input is nested too deeply", err=True)
            sys.exit(1)
        except Exception as err:  # an archc bug: say so plainly, without a traceback
            click.echo(f"archc: internal error: {type(err).__name__}: {err}\n"
                       "  this is a bug in archc, not in your file; please report it with the input", err=True)
            sys.exit(2)
    return wrapper


def _read(path: str) -> tuple[bytes, str]:
    p = Path(path)
    if not p.exists():
        raise ArchError(f"no such file: {path}")
    if p.is_dir():
        raise ArchError(f"{path} is a directory")
    return p.read_bytes(), path


def _graphs(path: str, verify: bool = True):
    from archc.dsl.lower import lower_module
    from archc.dsl.parse import parse
    src, name = _read(path)
    graphs = lower_module(parse(src, name))
    if verify:
        from archc.ir.interpret import resolve_bindings
        from archc.ir.verify import verify as run_verify
        for g in graphs:
            run_verify(g, resolve_bindings(g))
    return graphs


def _select(graphs, arch: str | None):
    if arch is None:
        return graphs
    chosen = [g for g in graphs if g.name == arch]
    if not chosen:
        raise ArchError(f"no architecture named `{arch}`; this file defines " + ", ".join(g.name for g in graphs))
    return chosen


def _pass_options(default: str):
    """-O0/-O1/-O2, --passes, --disable-pass, --print-after(-all), --time-passes, --verify (SPEC.md §16)."""
    options = [
        click.option("-O", "opt_level", type=click.Choice(["0", "1", "2"]), default=default[1:], show_default=True,
                     help="Optimization level: -O0 no passes, -O1 clean-ups, -O2 everything."),
        click.option("--passes", "pass_list", metavar="A,B,...", help="Run exactly these passes, in order (instead of -O)."),
        click.option("--disable-pass", "disabled", multiple=True, metavar="PASS", help="Leave PASS out (repeatable)."),
        click.option("--print-after-all", is_flag=True, help="Print the IR after every pass."),
        click.option("--print-after", "print_after", multiple=True, metavar="PASS", help="Print the IR after PASS (repeatable)."),
        click.option("--time-passes", is_flag=True, help="Print how long each pass took."),
        click.option("--verify", "verify_each", is_flag=True, help="Verify the IR after every pass."),
        click.option("--recur-blocks", "recur_blocks", type=int, metavar="K",
                     help="Re-express each stack of L distinct layers as K blocks applied recurrently (changes the model)."),
        click.option("--recur-order", "recur_order", type=click.Choice(["sequence", "cycle"]), default="sequence",
                     show_default=True, help="With --recur-blocks: layer i uses block floor(i*K/L) or i mod K."),
        click.option("--remarks", is_flag=True, help="Print what each pass decided and why (KV sharing, depth schedules)."),
    ]

    def deco(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return deco


def _optimizer(out, opt_level, pass_list, disabled, print_after_all, print_after, time_passes, verify_each,
               remarks=False, recur_blocks=None, recur_order="sequence"):
    """The Graph -> Graph pipeline the pass options ask for; pass names are checked before anything runs."""
    from archc.passes import get_pass, parse_entry, preset, run_pipeline, split_entries
    if pass_list is not None:
        names = split_entries(pass_list)
    else:
        names = list(preset(f"O{opt_level}"))
    if recur_blocks is not None:        # the model change comes first; the optimizations follow
        names = [f"recur-blocks{{k={recur_blocks},order={recur_order}}}", *names]
    for name in [*names, *disabled, *print_after]:
        get_pass(name)
    disabled = {parse_entry(d)[0] for d in disabled}
    names = [n for n in names if parse_entry(n)[0] not in disabled]

    def optimize(g):
        try:
            return run_pipeline(g, names, verify=verify_each, print_after=print_after,
                                print_after_all=print_after_all, time_passes=time_passes, remarks=remarks,
                                out=out)
        except ArchError as err:       # a pass's diagnostic points into the .arch file: show that line
            if err.source is None and err.span is not None and Path(err.span.file).is_file():
                err.with_source(Path(err.span.file).read_text(errors="replace"))
            raise
    return optimize


def _bindings(pairs: tuple[str, ...]) -> dict[str, float | int]:
    from archc.ir.shapes import ExprSyntaxError, parse_expr
    out: dict[str, float | int] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ArchError(f"--set expects NAME=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            e = parse_expr(v)
        except ExprSyntaxError as err:
            raise ArchError(f"--set {k}: {err}") from None
        if not e.is_number:
            raise ArchError(f"--set {k}: value must be a number, got {v!r}")
        out[k.strip()] = int(e) if e.is_Integer else float(e)
    return out


@click.group()
@click.version_option(package_name="archc")
def main():
    """archc: compile neural architectures written in the .arch language."""


@main.command()
@click.argument("files", nargs=-1, required=True)
@_diagnostics
def check(files):
    """Parse, type- and shape-check FILES; a language model must be causal or declare `noncausal`."""
    from archc.ir.causality import require_causal
    for f in files:
        graphs = _graphs(f)
        for g in graphs:
            require_causal(g, Path(f).read_text(errors="replace"))
        click.echo(f"{f}: ok ({', '.join(g.name for g in graphs)})")


@main.command()
@click.argument("file")
@click.option("--arch", help="Only this architecture of the file.")
@_pass_options("O0")
@_diagnostics
def ir(file, arch, **pass_opts):
    """Print the IR of FILE in its textual form (after the passes asked for; none by default)."""
    from archc.ir.printer import print_module
    optimize = _optimizer(sys.stdout, **pass_opts)
    click.echo(print_module([optimize(g) for g in _select(_graphs(file), arch)]), nl=False)


@main.command()
@click.argument("file")
@click.option("-o", "--output", required=True, help="Where to write the DOT graph (an .svg is written beside it when Graphviz is installed).")
@click.option("--arch", help="Only this architecture of the file.")
@_diagnostics
def graph(file, output, arch):
    """Write FILE's IR as a Graphviz DOT graph (regions as clusters)."""
    from archc.ir.dot import to_dot
    graphs = _select(_graphs(file), arch)
    text = to_dot(graphs)
    Path(output).write_text(text)
    click.echo(f"wrote {output}")
    dot = shutil.which("dot")
    if dot:
        svg = str(Path(output).with_suffix(".svg"))
        subprocess.run([dot, "-Tsvg", output, "-o", svg], check=True)
        click.echo(f"wrote {svg}")


@main.command(name="compile")
@click.argument("file")
@click.option("--target", type=click.Choice(["torch", "triton", "onnx", "mlir"]), default="torch", show_default=True,
              help="What to generate: a PyTorch module; one whose fusion regions and kernel families call "
                   "generated Triton kernels; ONNX models; or MLIR through torch-mlir.")
@click.option("-o", "--output", help="Where to write the result (default: standard output; required for onnx).")
@click.option("--arch", help="onnx, mlir: only this architecture of the file.")
@click.option("--weights", metavar="FILE", help="onnx, mlir: a torch.save'd state_dict (default: the module's init under --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="onnx, mlir: the seed of the default weights.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="onnx, mlir: bind a parameter or dimension.")
@click.option("--static", is_flag=True, help="onnx: fold loop trip counts into the graph (no count inputs).")
@click.option("--dialect", type=click.Choice(["torch", "linalg", "stablehlo"]), default="torch", show_default=True,
              help="mlir: the dialect torch-mlir lowers to.")
@_pass_options("O1")
@_diagnostics
def compile_cmd(file, target, output, arch, weights, seed, sets, static, dialect, **pass_opts):
    """Compile FILE for TARGET (after the -O1 clean-up passes by default): a PyTorch module, ONNX
    models (plus a decode-step graph for language models), or MLIR through torch-mlir."""
    _read(file)
    optimize = _optimizer(sys.stderr, **pass_opts)
    if target == "onnx":
        _compile_onnx(file, output, arch, weights, seed, _bindings(sets), static, optimize)
        return
    if target == "mlir":
        from archc.backends.mlir import export_mlir
        code = export_mlir(file, dialect=dialect, arch=arch, weights=weights, bindings=_bindings(sets), seed=seed,
                           optimize=optimize)
    else:
        for flag, value in (("--arch", arch), ("--weights", weights), ("--set", sets), ("--static", static)):
            if value:
                raise ArchError(f"{flag} applies to --target onnx or mlir",
                                hint="a generated PyTorch module takes parameters in its constructor")
        from archc.api import compile as compile_source
        code = compile_source(file, target=target, optimize=optimize).source
    if output:
        Path(output).write_text(code)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(code, nl=False)


def _compile_onnx(file, output, arch, weights, seed, bindings, static, optimize):
    """Write one .onnx per architecture (and a .decode.onnx per language model), each checked."""
    import onnx

    from archc.api import export_onnx
    if not output:
        raise ArchError("--target onnx writes binary files: give the path with -o model.onnx")
    exports = export_onnx(file, arch=arch, weights=weights, bindings=bindings, seed=seed, static=static,
                          optimize=optimize)
    out = Path(output)
    for e in exports:
        stem = out.with_suffix("") if len(exports) == 1 else out.with_suffix("").with_name(f"{out.stem}.{e.graph.name}")
        pairs = [(e.forward, Path(f"{stem}.onnx") if len(exports) > 1 else out)]
        if e.decode is not None:
            pairs.append((e.decode, Path(f"{stem}.decode.onnx")))
        for exported, path in pairs:
            if exported.model.ByteSize() < 1_800_000_000:
                onnx.checker.check_model(exported.model, full_check=True)
                onnx.save_model(exported.model, str(path))
            else:           # protobuf's 2 GB limit: weights go to a side file, the checker reads the path
                onnx.save_model(exported.model, str(path), save_as_external_data=True, location=f"{path.name}.data")
                onnx.checker.check_model(str(path), full_check=True)
            extra = f"; count inputs: {', '.join(exported.runtime_symbols)}" if exported.runtime_symbols else ""
            click.echo(f"wrote {path} ({e.graph.name}, {exported.kind.replace('_', ' ')}{extra})", err=True)
            for note in exported.notes:
                click.echo(f"  note: {note}", err=True)


@main.command()
@click.argument("file")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Bind a symbol (T=4096, B=1, n_r=3).")
@click.option("--arch", help="Only this architecture of the file.")
@_pass_options("O0")
@_diagnostics
def cost(file, sets, arch, **pass_opts):
    """Print parameters, FLOPs, activation, KV-cache and decode-cache bytes as formulas and values (of the IR after the passes asked for)."""
    from archc.ir.causality import causality
    from archc.ir.cost import cost as cost_of, decode_state_bytes
    bindings = _bindings(sets)
    optimize = _optimizer(sys.stdout, **pass_opts)
    for g in [optimize(g) for g in _select(_graphs(file), arch)]:
        known = {s.name for s in g.symbols}
        unknown = sorted(set(bindings) - known)
        if unknown:
            raise ArchError(f"`{g.name}` has no symbol {', '.join(unknown)}; symbols: " + ", ".join(sorted(known)))
        click.echo(f"== {g.name}")
        click.echo(causality(g).line())
        state = decode_state_bytes(g)
        click.echo(cost_of(g).table(bindings, extra={"decode_state_bytes": state} if state is not None else None))


@main.command()
@click.argument("file", required=False)
@click.option("--arch", help="Only this architecture of the file.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Bind an architecture parameter or a dim (d=1024, B=8, T=2048) for the shapes tuned.")
@click.option("--show", is_flag=True, help="Print the cached configurations and exit.")
@click.option("--clear", is_flag=True, help="Delete the autotuning cache files and exit.")
@click.option("--backward/--no-backward", default=True, show_default=True, help="Also tune the backward kernels.")
@_diagnostics
def autotune(file, arch, sets, show, clear, backward):
    """Benchmark every generated kernel's configurations on this GPU; cache the best per shape bucket."""
    from archc.backends.triton import autotune as tune
    if show:
        tune.show(click.echo)
        return
    if clear:
        d = tune.cache_dir()
        files = sorted(d.glob("*.json")) if d.exists() else []
        for f in files:
            f.unlink()
        click.echo(f"removed {len(files)} cache file(s) from {d}")
        return
    if file is None:
        raise ArchError("archc autotune needs a FILE (or --show / --clear)")
    _read(file)
    from archc.backends.triton.tuning import tune_file
    tune_file(file, arch, _bindings(sets), backward, click.echo)


@main.command(name="fuzz")
@click.option("--frontend", "frontend", is_flag=True, help="Fuzz the front end with mutated and hostile inputs.")
@click.option("--programs", "programs", is_flag=True, help="Run random programs through every stage and compare.")
@click.option("--count", default=200, show_default=True, help="How many inputs (or programs) per mode.")
@click.option("--seed", default=0, show_default=True, help="First seed (runs are deterministic per seed).")
@click.option("--time-limit", default=30.0, show_default=True,
              help="Seconds one input may take (programs: 4x this) before it counts as a hang.")
@click.option("--corpus", default="fuzz-corpus", show_default=True, help="Where failing inputs are written.")
@click.option("--save-regressions", metavar="DIR", help="Also write each shrunk failing program here (tests replay them).")
@click.option("--no-shrink", is_flag=True, help="Save failing inputs as found, without minimizing them.")
@click.option("--max-seconds", type=float, help="Stop each mode after this long (the counts say how far it got).")
def fuzz_cmd(frontend, programs, count, seed, time_limit, corpus, save_regressions, no_shrink, max_seconds):
    """Fuzz the compiler: exit status 1 when any input fails (SPEC.md §23)."""
    from archc.fuzz.campaign import fuzz_frontend, fuzz_programs, main_summary
    if not frontend and not programs:
        frontend = programs = True
    reports = []
    log = sys.stderr
    if frontend:
        reports.append(fuzz_frontend(count, seed, time_limit, Path(corpus), shrink=not no_shrink, out=log,
                                     max_seconds=max_seconds))
    if programs:
        reports.append(fuzz_programs(count, seed, 4 * time_limit, Path(corpus), shrink=not no_shrink,
                                     regressions=Path(save_regressions) if save_regressions else None, out=log,
                                     max_seconds=max_seconds))
    sys.exit(main_summary(reports))


@main.command(name="passes")
def passes_cmd():
    """List the registered passes and what each -O level runs."""
    from archc.passes import PASSES, PRESETS, summary
    width = max(len(name) for name in PASSES)
    for name in PASSES:
        click.echo(f"{name:<{width}}  {summary(name)}")
    for level, names in PRESETS.items():
        click.echo(f"-{level}: {', '.join(names) or '(no passes)'}")


@main.command(name="bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_cmd(ctx):
    """Run the CPU benchmark suite (python -m bench; --smoke, --only, --out, --repeat)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "suite.py").is_file():
        click.echo("error: the benchmark suite lives in the archc source checkout (bench/), which this "
                   "installation does not have\n  hint: clone the repository and `pip install -e .`, then "
                   "run `archc bench` there", err=True)
        sys.exit(1)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.suite import main as bench_main
    sys.exit(bench_main(list(ctx.args)))


@main.group(name="stdlib")
def stdlib_cmd():
    """The seed papers and their stdlib entries (status computed from test results)."""


@stdlib_cmd.command(name="list")
@click.argument("keys", nargs=-1)
@click.option("--run", "run_tests", is_flag=True,
              help="Run the papers' tests now (a source checkout) and report from that run, not the recorded one.")
@click.option("--markdown", is_flag=True, help="Print the table of stdlib/README.md.")
@_diagnostics
def stdlib_list(keys, run_tests, markdown):
    """One row per seed paper: number, key, title, category, variants, status (SPEC.md §24)."""
    from archc.stdlib import catalog
    chosen = [catalog.find(k) for k in keys] or catalog.papers()
    results = _run_paper_tests(chosen) if run_tests else catalog.load_results()
    if markdown:
        click.echo(catalog.markdown(results), nl=False)
        return
    rows = []
    for p in chosen:
        st, why = catalog.status(p, results)
        rows.append((str(p.n), p.key + (f" (+{len(p.keys) - 1})" if len(p.keys) > 1 else ""), p.title[:44],
                     p.category.split(" ")[0][:22], ", ".join(catalog.variants(p)) or "-", st, why))
    widths = [max(len(r[i]) for r in rows + [("N", "key", "title", "category", "variants", "status", "")])
              for i in range(6)]
    head = ("N", "key", "title", "category", "variants", "status")
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  why")
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + (r[6] if len(r[6]) <= 72 else r[6][:71] + "…"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[5]] = counts.get(r[5], 0) + 1
    source = "this run" if run_tests else "the recorded run (stdlib/status.json)"
    click.echo(f"{len(rows)} papers: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; from {source}")


def _run_paper_tests(chosen) -> dict:
    """Run the chosen papers' tests with pytest in the source checkout; their recorded outcomes."""
    import tempfile
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "conftest.py").is_file():
        raise ArchError("`--run` needs the archc source checkout (its tests/), which this installation lacks",
                        hint="clone the repository and `pip install -e \".[test]\"`, or drop --run to show the "
                             "recorded results")
    from archc.stdlib import catalog
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "status.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--record-stdlib-status={out}"]
        cmd += [f"--paper={p.key}" for p in chosen if p.files]
        if not any(p.files for p in chosen):
            return {}
        click.echo("running: " + " ".join(cmd[1:]), err=True)
        subprocess.run(cmd, cwd=root, stdout=sys.stderr, check=False)
        return catalog.load_results(out)


@stdlib_cmd.command(name="show")
@click.argument("key")
@click.option("--no-source", is_flag=True, help="Only the card, not the .arch source.")
@_diagnostics
def stdlib_show(key, no_source):
    """A paper's card (title, category, status, what is implemented and simplified, its tests) and source."""
    from archc import stdlib
    from archc.stdlib import catalog
    p = catalog.find(key)
    st, why = catalog.status(p, catalog.load_results())
    click.echo(f"{p.n}. {p.title}")
    click.echo(f"keys:     {', '.join(p.keys)}")
    click.echo(f"category: {p.category}")
    click.echo(f"files:    {', '.join(f'stdlib/{f}.arch' for f in p.files) or '(none)'}")
    click.echo(f"variants: {', '.join(catalog.variants(p)) or '(none)'}")
    click.echo(f"status:   {st} ({why})")
    click.echo(f"card:     {p.card}")
    click.echo(f"tests:    {', '.join(p.tests) or '(no mechanism tests)'}")
    if not no_source:
        for f in p.files:
            click.echo(f"\n# ---- stdlib/{f}.arch " + "-" * 40)
            click.echo(stdlib.source(f), nl=False)


if __name__ == "__main__":
    main()
