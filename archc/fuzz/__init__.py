"""Fuzzing and random differential testing of archc (SPEC.md §23).

* `frontend`: one input through every front-end stage, classified accepted / diagnosed / failed.
* `mutate`: grammar-aware mutations of .arch sources and hostile inputs from scratch.
* `worker`: a sandboxed child process (time and memory limits) to check inputs in.
* `programs`: random well-formed architectures (Csmith-style).
* `differential`: a program through the interpreter, every -O preset and every backend, compared.
* `shrink`: delta debugging to a minimal failing input.
* `campaign`: the loops behind `archc fuzz`, the corpus, and regression files.
"""
