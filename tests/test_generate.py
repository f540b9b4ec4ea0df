"""`generate` on generated language models (SPEC §17) and examples/onnx_generate.py's sampling (§21.4)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import archc.api as api
import archc.stdlib as stdlib
from archc.backends import torch_runtime as rt
from archc.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"d": 32, "heads": 2, "vocab": 64}
THINK = SMALL | {"n_layers": 2, "ratio": 0.0}       # nothing pruned: the K/V path is exact


@pytest.fixture(scope="module")
def think():
    torch.manual_seed(0)
    return stdlib.load("think", **THINK).eval()


@pytest.fixture(scope="module")
def mor():
    """MoRKVShare (expert-choice routing over the sequence, no inference rule): decodes by recomputing
    over the token history."""
    torch.manual_seed(1)
    return api.load(stdlib.path("mor"), arch="MoRKVShare")(**SMALL).eval()


def _model(request, name):
    return request.getfixturevalue(name)


def reference_greedy(model, prompt, n):
    """Greedy decoding the slow way: the full forward on the whole sequence, argmax of the last position."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            out = model(seq)
            logits = out["logits"] if isinstance(out, dict) else out
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


class Calls:
    """Records the token shapes `generate` feeds to prefill and decode, and the grad mode."""

    def __init__(self, model):
        self.model, self.prefill, self.decode, self.grad = model, [], [], set()

    def __enter__(self):
        prefill, decode = self.model.prefill, self.model.decode

        def rec_prefill(tokens):
            self.prefill.append(tuple(tokens.shape))
            self.grad.add(torch.is_grad_enabled())
            return prefill(tokens)

        def rec_decode(tokens, cache):
            self.decode.append(tuple(tokens.shape))
            self.grad.add(torch.is_grad_enabled())
            return decode(tokens, cache)
        self.model.prefill, self.model.decode = rec_prefill, rec_decode
        return self

    def __exit__(self, *exc):
        del self.model.prefill, self.model.decode


@pytest.mark.parametrize("name", ["think", "mor"])
def test_greedy_generate_equals_the_full_forward_recomputed(request, name):
    m = _model(request, name)
    _, cache = m.prefill(torch.zeros(1, 2, dtype=torch.long))
    assert type(cache).__name__ == ("KVCache" if name == "think" else "TokenCache")    # both decode paths
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with Calls(m) as calls:
        out = m.generate(prompt, 6, temperature=0)
    assert out.dtype == torch.long and out.shape == (2, 11)
    assert torch.equal(out, reference_greedy(m, prompt, 6))
    assert calls.prefill == [(2, 5)] and calls.decode == [(2, 1)] * 5      # streamed, one token per step
    assert calls.grad == {False}                                            # under torch.no_grad()


def test_seeded_sampling_is_reproducible_and_degenerates_to_greedy(think):
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(3))

    def sample(seed, **kw):
        return think.generate(prompt, 8, generator=torch.Generator().manual_seed(seed), **kw)
    a, b = sample(5, temperature=0.9, top_k=20, top_p=0.9), sample(5, temperature=0.9, top_k=20, top_p=0.9)
    assert torch.equal(a, b) and torch.equal(a[:, :4], prompt)
    assert not torch.equal(sample(5, temperature=1.5), sample(6, temperature=1.5))
    greedy = think.generate(prompt, 8, temperature=0)
    assert torch.equal(sample(7, top_k=1), greedy)
    assert torch.equal(sample(7, top_p=1e-6), greedy)
    assert torch.equal(sample(7, temperature=2.0, top_k=1, top_p=0.5), greedy)


def _independent_probs(row, temperature, top_k, top_p):
    """The filtered distribution of one row, by plain Python over the sorted vocabulary."""
    z = [x / temperature for x in row]
    e = [torch.tensor(x - max(z), dtype=torch.float64).exp().item() for x in z]
    p = [x / sum(e) for x in e]
    ranked = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k is not None:
        ranked = ranked[:top_k]
    mass = sum(p[i] for i in ranked)
    kept, acc = [], 0.0
    for i in ranked:
        if top_p is not None and kept and acc >= top_p:
            break
        kept.append(i)
        acc += p[i] / mass
    out = [0.0] * len(p)
    total = sum(p[i] for i in kept)
    for i in kept:
        out[i] = p[i] / total
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.0, 3, None),
                                                     (0.7, None, 0.8), (1.3, 4, 0.75), (1.0, 10, 0.5),
                                                     (1.0, None, 1e-9)])
def test_next_token_probs_match_an_independent_computation(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.4, 0.45, -1.0, 3.0, 0.0, -2.0],
                           [0.3, 0.3, 0.3, 1.2, 1.2, -0.5, 2.5, 0.1]])
    got = rt.next_token_probs(logits, temperature, top_k, top_p)
    want = torch.tensor([_independent_probs(r, temperature, top_k, top_p) for r in logits.tolist()])
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)


def test_sample_next_draws_from_the_filtered_distribution():
    logits = torch.tensor([[1.0, 1.0, 0.0, 2.0, -3.0]]).expand(4000, 5)
    assert rt.sample_next(logits[:2], 0.0).tolist() == [3, 3]
    assert rt.sample_next(torch.tensor([[1.0, 2.0, 2.0]]), 0).tolist() == [1]             # ties: the lowest index
    assert rt.sample_next(torch.tensor([[1.0, 2.0, 2.0]]), 1.0, top_k=1).tolist() == [1]
    draws = rt.sample_next(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    want = rt.next_token_probs(logits[:1], 1.0, top_k=3)[0]
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2] == 0 and freq[4] == 0                                 # outside the top 3
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="top_k"):
        rt.next_token_probs(logits, 1.0, top_k=0)


def test_eos_pads_finished_samples_and_stops_when_all_have(think):
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(4))
    free = think.generate(prompt, 8, temperature=0)[:, 4:]
    eos = int(free[0, 2])
    first = free[0].tolist().index(eos)                        # 2 unless it also came earlier
    out = think.generate(prompt, 8, temperature=0, eos_token_id=eos)[:, 4:]
    for row, ref in zip(out.tolist(), free.tolist()):
        stop = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row[:stop] == ref[:stop] and all(t == eos for t in row[stop:])
    with Calls(think) as calls:
        alone = think.generate(prompt[:1], 8, temperature=0, eos_token_id=eos)
    assert alone[0, 4:].tolist() == free[0, :first + 1].tolist() and calls.decode == [(1, 1)] * first   # stopped early


@pytest.mark.parametrize("name", ["think", "mor"])
def test_left_padded_prompts_give_what_each_row_gives_alone(request, name):
    m = _model(request, name)
    g = torch.Generator().manual_seed(5)
    lengths = [3, 6, 3, 5]
    prompt = torch.randint(0, 64, (4, 6), generator=g)
    mask = (torch.arange(6)[None] >= 6 - torch.tensor(lengths)[:, None]).long()
    with Calls(m) as calls:
        out = m.generate(prompt, 5, temperature=0, attention_mask=mask)
    assert torch.equal(out[:, :6], prompt)                      # the prompt as given, pads included
    assert sorted(calls.prefill) == [(1, 5), (1, 6), (2, 3)]    # one batch per prompt length, no pads fed
    for b, n in enumerate(lengths):
        alone = m.generate(prompt[b:b + 1, 6 - n:], 5, temperature=0)
        assert out[b, 6:].tolist() == alone[0, n:].tolist()
    # a mask of ones is no mask; eos pads a group that stopped early
    assert torch.equal(m.generate(prompt, 3, temperature=0, attention_mask=torch.ones_like(prompt)),
                       m.generate(prompt, 3, temperature=0))
    eos = int(out[1, 6])
    ended = m.generate(prompt, 5, temperature=0, attention_mask=mask, eos_token_id=eos)
    assert ended[1, 6:].tolist() == [eos] * (ended.shape[1] - 6)


def test_generate_rejects_what_it_cannot_do(think):
    prompt = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        think.generate(prompt, 2, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real prompt token"):
        think.generate(prompt, 2, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        think.generate(prompt, 2, temperature=-1.0)
    assert torch.equal(think.generate(prompt, 0), prompt)
    two = api.load("""
arch Two(vocab: int = 16, d: int = 8) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  output scores = head(x)
  output hidden = x
}
""")()
    with pytest.raises(ValueError, match="`logits`.*hidden, scores"):
        two.generate(torch.zeros(1, 2, dtype=torch.long), 2)


def test_generate_is_in_the_standalone_compiled_file(tmp_path, think):
    path = tmp_path / "think_model.py"
    res = CliRunner().invoke(main, ["compile", str(ROOT / "stdlib" / "think.arch"), "--target", "torch", "-o", str(path)])
    assert res.exit_code == 0, res.output
    text = path.read_text()
    assert "    def generate(self, prompt, max_new_tokens," in text and "\ndef lm_generate(" in text
    assert "archc" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    spec = importlib.util.spec_from_file_location("think_model_standalone", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.ThinK(**THINK).eval()
    m.load_state_dict(think.state_dict())
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(6))
    assert torch.equal(m.generate(prompt, 4, temperature=0), think.generate(prompt, 4, temperature=0))
    assert torch.equal(m.generate(prompt, 4, generator=torch.Generator().manual_seed(1)),
                       think.generate(prompt, 4, generator=torch.Generator().manual_seed(1)))


# -- examples/onnx_generate.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("onnx_generate_example", ROOT / "examples" / "onnx_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decode_graph(model, file, arch, bindings, path):
    (e,) = api.export_onnx(stdlib.path(file), arch=arch, weights=model.state_dict(), bindings=bindings)
    path.write_bytes(e.decode.model.SerializeToString())
    return e.decode.kind


def _run_example(path, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_generate.py"), str(path), *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("generated:"))
    return [int(t) for t in line.split(":")[1].split()]


def test_onnx_example_greedy_equals_torch_and_seeded_sampling_repeats(tmp_path, think, example):
    path = tmp_path / "think.decode.onnx"
    assert _decode_graph(think, "think", "ThinK", THINK, path) == "kv_decode"
    greedy = think.generate(torch.tensor([[3, 1, 4, 1, 5]]), 6, temperature=0)[0, 5:].tolist()
    assert _run_example(path, "--prompt", "3,1,4,1,5", "--tokens", 6, "--temperature", 0) == greedy
    assert _run_example(path, "--prompt", "3,1,4,1,5", "--tokens", 6) == greedy          # greedy by default
    sampled = ("--prompt", "3,1,4", "--tokens", 12, "--temperature", 1.5, "--top-k", 30, "--top-p", 0.95)
    a = _run_example(path, *sampled, "--seed", 11)
    assert a == _run_example(path, *sampled, "--seed", 11) and len(a) == 12
    eos = greedy[2]
    assert _run_example(path, "--prompt", "3,1,4,1,5", "--tokens", 6, "--eos", eos) == greedy[:greedy.index(eos) + 1]


def test_onnx_example_recompute_graph_and_its_sampling_semantics(tmp_path, mor, example):
    import numpy as np
    import onnxruntime as ort
    path = tmp_path / "mor.decode.onnx"
    assert _decode_graph(mor, "mor", "MoRKVShare", SMALL, path) == "recompute_decode"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(8))
    got = example.generate(sess, prompt.numpy(), 5)
    assert got.tolist() == mor.generate(prompt, 5, temperature=0)[:, 4:].tolist()
    kw = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}
    a = example.generate(sess, prompt.numpy(), 5, rng=np.random.default_rng(3), **kw)
    assert a.tolist() == example.generate(sess, prompt.numpy(), 5, rng=np.random.default_rng(3), **kw).tolist()
    assert example.generate(sess, prompt.numpy(), 5, top_k=1, temperature=1.0,
                            rng=np.random.default_rng(0)).tolist() == got.tolist()
    # the numpy filter is the torch runtime's
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(9)) * 2
    for t, k, p in [(1.0, None, None), (0.6, 7, None), (1.2, None, 0.7), (0.9, 12, 0.6), (1.0, None, 1e-9)]:
        np.testing.assert_allclose(example.next_token_probs(logits.numpy(), t, k, p),
                                   rt.next_token_probs(logits, t, k, p).numpy(), atol=1e-6)
    assert example.sample_next(np.array([[0.5, 2.0, 2.0]]), 0.0).tolist() == [1]
