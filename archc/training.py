"""What the CPU training examples (examples/train_*.py) share: a text progress bar and their command line."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def progress(label: str, done: int, total: int, start: float, loss: float | None = None, label_width: int = 18) -> None:
    """A one-line text progress bar, redrawn in place with a carriage return."""
    width = 24
    filled = width * done // total
    msg = (f"\r{label[:label_width]:<{label_width}} [{'#' * filled}{'.' * (width - filled)}] {done:>4}/{total} "
           f"{time.time() - start:6.1f}s")
    if loss is not None:
        msg += f"  loss {loss:.4f}"
    print(msg, end="\n" if done == total else "", flush=True)


def example_cli(main: Callable[..., dict], doc: str, quick_help: str, options: dict[str, str] | None = None) -> None:
    """Parse the examples' flags (--quick, --seed, --threads, --iters and the integer `options`, flag -> help)
    and call `main(quick=, seed=, threads=, **the options given)`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these models are too small to gain from more)")
    parser.add_argument("--iters", type=int, help="training updates per model (overrides the preset)")
    for flag, text in (options or {}).items():
        parser.add_argument(flag, type=int, help=text)
    args = vars(parser.parse_args())
    quick, seed, threads = args.pop("quick"), args.pop("seed"), args.pop("threads")
    main(quick=quick, seed=seed, threads=threads, **{k: v for k, v in args.items() if v is not None})
