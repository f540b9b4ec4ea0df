"""Greedy generation with onnxruntime alone, from an archc decode-step graph.

    archc compile stdlib/think.arch --target onnx -o think.onnx    # writes think.onnx and think.decode.onnx
    python examples/onnx_generate.py think.decode.onnx --prompt 3,1,4,1,5 --tokens 20

The decode-step graph takes the new tokens and the caches: `past.<site>.key/value` per attention
site (K/V-cached models) or `past_tokens` (models that recompute over the history: scans,
routing, halting). It returns the outputs at the new positions and the extended caches
(`present.*`), which are fed back as the next step's `past.*`. This script imports neither archc
nor torch: the .onnx file is the whole deployment. onnxruntime-gpu's CUDA provider is used when
it is installed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort


def empty_caches(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length caches: `P` (the cached length) is 0 before the prompt."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "past_tokens":
            feeds[i.name] = np.zeros((batch, 0), np.int64)
        elif i.name.startswith("past."):
            shape = [batch if d == "B" else 0 if d == "P" else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return feeds


def generate(sess: ort.InferenceSession, prompt: np.ndarray, steps: int, logits: str = "logits") -> np.ndarray:
    """Greedy decoding: the prompt in one step, then one token per step; returns [B, steps] ids."""
    names = [o.name for o in sess.get_outputs()]
    feeds = empty_caches(sess, prompt.shape[0])
    feeds["tokens"] = prompt
    out = []
    for _ in range(steps):
        result = dict(zip(names, sess.run(None, feeds)))
        nxt = result[logits][:, -1].argmax(-1).astype(np.int64)[:, None]
        out.append(nxt)
        for name, value in result.items():
            if name.startswith("present"):
                feeds["past" + name[len("present"):]] = value
        feeds["tokens"] = nxt
    return np.concatenate(out, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a .decode.onnx file written by `archc compile --target onnx`")
    ap.add_argument("--prompt", default="1,2,3", help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=16, help="how many tokens to generate")
    args = ap.parse_args()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(args.model, providers=providers)
    prompt = np.array([[int(t) for t in args.prompt.split(",")]], dtype=np.int64)
    start = time.perf_counter()
    ids = generate(sess, prompt, args.tokens)
    took = time.perf_counter() - start
    print(f"prompt: {' '.join(map(str, prompt[0]))}")
    print(f"generated: {' '.join(map(str, ids[0]))}")
    print(f"{args.tokens} tokens in {took:.3f} s on {sess.get_providers()[0]}")


if __name__ == "__main__":
    main()
