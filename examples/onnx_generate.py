"""Generation with onnxruntime alone, from an archc decode-step graph: greedy, or sampled.

    archc compile stdlib/think.arch --target onnx -o think.onnx    # writes think.onnx and think.decode.onnx
    python examples/onnx_generate.py think.decode.onnx --prompt 3,1,4,1,5 --tokens 20
    python examples/onnx_generate.py think.decode.onnx --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0

The decode-step graph takes the new tokens and the caches: `past.<site>.key/value` per attention
site (K/V-cached models); also `past.length` and, per segment scan, `past.<scan>.carry<i>` and
`past.<scan>.rest`, per linear recurrence `past.<node>.state` (models with recurrent state); or
`past_tokens` (models that recompute over the history: routing, halting). It returns the outputs
at the new positions and the updated caches (`present.*`), which are fed back as the next step's
`past.*`. This script imports neither archc nor torch: the .onnx file is the whole deployment.
onnxruntime-gpu's CUDA provider is used when it is installed.

Sampling follows the generated PyTorch modules' `generate` (SPEC §17): temperature 0 (the default)
is greedy (argmax, of equal logits the lowest id); otherwise softmax(logits / temperature), then
`--top-k` keeps the k most probable tokens and `--top-p` the smallest set of the most probable of
those (renormalised) whose probability sums to >= p (at least one); draws come from numpy's
generator seeded by `--seed`, so a seed reproduces the output. With `--eos`, a sample that produced
that id keeps emitting it and generation stops once every sample has.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

#: onnxruntime's element type names -> numpy
DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def empty_caches(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """The caches before the prompt: zeros of each `past*` input's declared shape and type, with `B`
    the batch size and every other named axis 0 (`P` the cached length, `R` a scan's open segment;
    `past.length`, a scalar, is 0, so the step graph starts every scan and recurrence from the
    model's own initial state)."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "past_tokens" or i.name.startswith("past."):
            shape = [batch if d == "B" else 0 if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, DTYPES[i.type])
    return feeds


def next_token_probs(logits: np.ndarray, temperature: float, top_k: int | None = None,
                     top_p: float | None = None) -> np.ndarray:
    """The sampling distribution [B, V] from logits [B, V]: softmax(logits / temperature), top-k,
    then the nucleus of what remains (renormalised), renormalised again."""
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0 (0 is greedy), got {temperature}")
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_k is None and top_p is None:
        return probs
    order = np.argsort(-probs, axis=-1, kind="stable")          # most probable first; ties: lower id first
    ranked = np.take_along_axis(probs, order, -1)
    keep = np.ones(ranked.shape, bool)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        keep &= np.arange(ranked.shape[-1]) < top_k
        ranked = np.where(keep, ranked, 0.0)
        ranked /= ranked.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1:
        before = ranked.cumsum(-1) - ranked                        # the mass of the more probable tokens
        keep &= before < top_p
        keep[..., 0] = True
    out = np.zeros_like(probs)
    np.put_along_axis(out, order, np.where(keep, ranked, 0.0), -1)
    return out / out.sum(-1, keepdims=True)


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Next ids [B] from logits [B, V]: greedy at temperature 0, else one draw per row."""
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    rng = np.random.default_rng() if rng is None else rng
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return np.array([rng.choice(p.shape[0], p=p) for p in probs], np.int64)


def generate(sess: ort.InferenceSession, prompt: np.ndarray, steps: int, logits: str = "logits",
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """The prompt in one step, then one token per step; returns the new ids [B, n <= steps]
    (fewer when every sample has produced `eos`). Greedy unless temperature > 0."""
    names = [o.name for o in sess.get_outputs()]
    model_outputs = [n for n in names if not n.startswith("present")]
    if logits not in names and len(model_outputs) == 1:
        logits = model_outputs[0]                      # the model's one output
    if logits not in names:
        raise ValueError(f"the graph has no output `{logits}`; its outputs are {', '.join(model_outputs)}")
    feeds = empty_caches(sess, prompt.shape[0])
    feeds["tokens"] = prompt
    done = np.zeros(prompt.shape[0], bool)
    out = []
    for i in range(steps):
        result = dict(zip(names, sess.run(None, feeds)))
        last = result[logits][:, -1] if result[logits].ndim == 3 else result[logits]
        nxt = sample_next(last, temperature, top_k, top_p, rng)
        if eos is not None:
            nxt = np.where(done, eos, nxt)
            done |= nxt == eos
        out.append(nxt[:, None])
        if i == steps - 1 or (eos is not None and done.all()):
            break
        for name, value in result.items():
            if name.startswith("present"):
                feeds["past" + name[len("present"):]] = value
        feeds["tokens"] = nxt[:, None]
    return np.concatenate(out, axis=1) if out else np.zeros((prompt.shape[0], 0), np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a .decode.onnx file written by `archc compile --target onnx`")
    ap.add_argument("--prompt", default="1,2,3", help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=16, help="how many tokens to generate (at most, with --eos)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy; > 0: sample")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most probable tokens")
    ap.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of probability p")
    ap.add_argument("--seed", type=int, default=None, help="seed numpy's generator (reproducible samples)")
    ap.add_argument("--eos", type=int, default=None, help="end-of-sequence id: stop once it is produced")
    args = ap.parse_args()
    if args.temperature < 0:
        ap.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        ap.error("--top-k must be >= 1")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(args.model, providers=providers)
    prompt = np.array([[int(t) for t in args.prompt.split(",")]], dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    ids = generate(sess, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos=args.eos, rng=rng)
    took = time.perf_counter() - start
    print(f"prompt: {' '.join(map(str, prompt[0]))}")
    print(f"generated: {' '.join(map(str, ids[0]))}")
    print(f"{ids.shape[1]} tokens in {took:.3f} s on {sess.get_providers()[0]}")


if __name__ == "__main__":
    main()
