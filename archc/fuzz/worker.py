"""Run a check on one input at a time in a child process, under a wall-clock and a memory limit.

A hang inside C code (a huge integer power, a regular expression) cannot be interrupted from
Python, and a runaway allocation can take the machine with it, so the front-end fuzzer checks
every input in a forked child. The parent waits `time_limit` seconds for the answer; on a timeout
it kills the child and starts a fresh one, and a child that dies (a segfault, an `os._exit`) is
reported as such. The child's address space is capped (`memory_mb` above what it had at fork)
so an allocation blow-up becomes a `MemoryError`, which the check reports as a crash.

`InProcess` has the same interface without a child (a SIGALRM time limit, no memory cap): for
debugging, and for platforms without `fork`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from typing import Any, Callable

from archc.fuzz.frontend import FAILED, Outcome


class Timeout(BaseException):
    """Raised in the checked code when the SIGALRM time limit expires (in-process mode).

    A BaseException, like KeyboardInterrupt, so the `except Exception` clauses of the code under
    test do not swallow it."""


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _serve(conn, fn: Callable[[Any], Outcome], memory_mb: int | None) -> None:
    if memory_mb:
        try:
            import resource
            base = _vm_bytes()
            if base is not None:
                limit = base + memory_mb * 1024 * 1024
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    while True:
        try:
            arg = conn.recv()
        except EOFError:
            return
        if arg is None:
            return
        conn.send(fn(arg))


class Sandbox:
    """`sandbox(arg)` is `fn(arg)` computed in a child process, or a timeout / died Outcome."""

    def __init__(self, fn: Callable[[Any], Outcome], time_limit: float = 20.0, memory_mb: int | None = 4096):
        self.fn = fn
        self.time_limit = time_limit
        self.memory_mb = memory_mb
        self.ctx = mp.get_context("fork")
        self.proc = None
        self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.fn, self.memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def __call__(self, arg) -> Outcome:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(arg)
        if self.conn.poll(self.time_limit):
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                code = self.proc.exitcode
                self._stop()
                self.restarts += 1
                return Outcome(FAILED, "unknown", "died", f"the checking process died (exit code {code})")
        self._stop()
        self.restarts += 1
        return Outcome(FAILED, "unknown", "timeout", f"no answer within {self.time_limit:g} s")

    def close(self) -> None:
        if self.conn is not None and self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcess:
    """The same call in this process: a SIGALRM limit (main thread only), no memory cap."""

    def __init__(self, fn: Callable[[Any], Outcome], time_limit: float = 20.0, memory_mb: int | None = None):
        self.fn = fn
        self.time_limit = time_limit
        self.restarts = 0

    def __call__(self, arg) -> Outcome:
        return call_with_time_limit(self.fn, arg, self.time_limit)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def call_with_time_limit(fn: Callable[[Any], Any], arg, seconds: float, on_timeout=None):
    """`fn(arg)`, interrupted by `Timeout` after `seconds` (Python code only; main thread, else unlimited)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn(arg)

    def _alarm(signum, frame):
        raise Timeout(f"no answer within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(arg)
    except Timeout as err:
        if on_timeout is not None:
            return on_timeout(err)
        return Outcome(FAILED, "unknown", "timeout", str(err))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fork_available() -> bool:
    return "fork" in mp.get_all_start_methods() and os.name == "posix"
