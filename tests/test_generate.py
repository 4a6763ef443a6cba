"""Generation equivalences: cached == full recompute, batched == alone, window == reference.

The `jaxgpt generate` CLI tests at the end check its output against the Python API.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import generation as G
from jaxgpt.cli import main
from jaxgpt.config import Config, ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.model import create_model, init_cache
from jaxgpt.generation.sampling import SamplingFlags, SamplingParams

# vocab 67 is not a multiple of 64: the padded ids must never be produced.
CFG = ModelConfig(vocab_size=67, block_size=32, n_layer=2, n_head=2, n_embd=32)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=3)


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, CFG.vocab_size, n).tolist() for n in lengths]


def _reference_greedy(model, prompt, n):
    """Greedy decoding by full recompute over the last block_size tokens (nanoGPT's loop)."""
    seq, out, all_logits = list(prompt), [], []
    for _ in range(n):
        # Right-pad to one fixed shape (one compile): causal attention makes the padding inert.
        window = seq[-CFG.block_size:]
        padded = window + [0] * (CFG.block_size - len(window))
        lg = np.asarray(G.logits(model, [padded])[0, len(window) - 1])
        all_logits.append(lg)
        out.append(int(lg.argmax()))
        seq.append(out[-1])
    return out, np.stack(all_logits)


def _start(model, prompts, max_new, eos=-1):
    """Drive the public building blocks the way an advanced user would (greedy).

    Shapes are bucketed exactly as `generate` buckets them (batch, T = 16, S = block_size), so
    these programs are shared with the generate() calls below: compilation is most of the
    test time.
    """
    graphdef, params = nnx.split(model)
    n, B, T, S = len(prompts), G.batch_bucket(len(prompts)), G.bucket(max(map(len, prompts))), CFG.block_size
    assert max(map(len, prompts)) + max_new <= S
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
    max_new_B = np.where(np.arange(B) < n, max_new, 0)  # dummy rows start done
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    logits0, cache = G.prefill(graphdef, params, tokens, lengths, init_cache(CFG, B, S))
    state, token_B = G.init_decode_state(
        logits0, cache, tokens, lengths, jnp.asarray(max_new_B), jnp.full((B,), eos), jnp.arange(B),
        jax.random.key(0), SamplingParams.make(B, 0.0), flags=SamplingFlags(sample=False),
        windowed=False, history_len=1)
    return graphdef, params, logits0, state, token_B


def test_cached_decode_logits_equal_full_recompute(model):
    prompts = _prompts([7, 16, 5, 10])
    n = 12
    graphdef, params, logits0, state, tok0 = _start(model, prompts, n)
    state, toks, step_logits = G.decode(graphdef, params, state, n - 1, return_logits=True)
    toks = np.concatenate([np.asarray(tok0)[:, None], np.asarray(toks)], 1)
    logits_all = np.concatenate([np.asarray(logits0)[:, None], np.asarray(step_logits)], 1)
    for b, p in enumerate(prompts):
        want_toks, want_logits = _reference_greedy(model, p, n)
        assert toks[b].tolist() == want_toks
        np.testing.assert_allclose(logits_all[b], want_logits, atol=ATOL, rtol=0)
    assert logits_all.shape[-1] == CFG.vocab_size  # the real vocabulary, not the padded table


def test_chunked_prefill_equals_one_pass(model):
    # prefill on a partly filled cache continues each row at its own length and position.
    graphdef, params = nnx.split(model)
    prompts = _prompts([16, 11, 13, 7])
    tokens = np.zeros((4, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([16, 11, 13, 7])
    one, _ = G.prefill(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), init_cache(CFG, 4, 32))
    # First 5 tokens per row (the rest of the row is padding: written, then overwritten).
    _, cache = G.prefill(graphdef, params, jnp.asarray(tokens), jnp.full((4,), 5), init_cache(CFG, 4, 32))
    rest = np.zeros((4, 16), np.int32)  # each row continues from its own 6th token
    for i, p in enumerate(prompts):
        rest[i, :len(p) - 5] = p[5:]
    two, cache = G.prefill(graphdef, params, jnp.asarray(rest), jnp.asarray(lengths - 5), cache)
    np.testing.assert_allclose(np.asarray(two), np.asarray(one), atol=ATOL, rtol=0)
    assert np.asarray(cache["length"]).tolist() == lengths.tolist()


def test_batch_of_mixed_lengths_equals_each_prompt_alone(model):
    prompts = _prompts([5, 16, 9, 6, 12], seed=1)
    batched = G.generate(model, prompts, 12, temperature=0)
    for p, got in zip(prompts, batched):
        assert G.generate(model, [p], 12, temperature=0)[0] == got
    # ...and first-token logits agree to float32 precision whatever the batch/prompt bucket.
    _, _, logits_b, *_ = _start(model, prompts, 12)
    for b, p in enumerate(prompts):
        _, _, logits_1, *_ = _start(model, [p], 12)
        np.testing.assert_allclose(np.asarray(logits_b[b]), np.asarray(logits_1[0]), atol=ATOL, rtol=0)


def test_generate_matches_full_recompute_greedy(model):
    prompts = _prompts([5, 13, 8, 16], seed=4)
    got = G.generate(model, prompts, 12, temperature=0)
    for p, g in zip(prompts, got):
        assert g == _reference_greedy(model, p, 12)[0]


def test_cache_is_sized_to_the_request_and_donated(model):
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((1, 16), jnp.int32)
    cache = init_cache(CFG, 1, 32)
    k0 = cache["k"][0]
    G.prefill(graphdef, params, tokens, jnp.asarray([5]), cache)
    assert k0.is_deleted()  # donated: updated in place, the caller's buffer is gone
    # The cache holds prompt + new tokens (rounded up a little), not block_size.
    assert [G.bucket(n) for n in (5 + 3, 70, 300, 320, 321)] == [16, 80, 320, 320, 384]
    assert [G.batch_bucket(n) for n in (1, 3, 5, 9, 100)] == [1, 4, 8, 16, 112]


@pytest.mark.slow  # many prompt lengths compiled; batched == single stays
def test_few_compilations_for_many_prompt_lengths(model):
    rng = np.random.RandomState(0)
    G.STATS.clear()
    prompts = _prompts(rng.randint(1, 20, 100).tolist())
    out = G.generate(model, prompts, 12, temperature=0)
    assert len(out) == 100 and all(len(o) == 12 for o in out)
    for _ in range(6):  # random subsets: new batch sizes and prompt lengths every call
        idx = rng.choice(100, rng.randint(1, 5), replace=False)
        G.generate(model, [prompts[i] for i in idx], 12, temperature=0)
    # Buckets: batch {1, 2, 4, 112} x prompt {16, 32} x cache {16, 32}: a handful. Without
    # bucketing, every one of the 7 calls (and every distinct length) would recompile.
    assert G.STATS["trace:prefill"] <= 8, dict(G.STATS)
    assert G.STATS["trace:decode"] <= 8, dict(G.STATS)
    n_before = G.STATS["trace:decode"] + G.STATS["trace:prefill"] + G.STATS["trace:init_decode_state"]
    for n in range(5, 17):  # every prompt length of one (B=4, T=16, S=32) bucket
        G.generate(model, _prompts([n, 5, 3, 9]), 12, temperature=0)
    n_after = G.STATS["trace:decode"] + G.STATS["trace:prefill"] + G.STATS["trace:init_decode_state"]
    assert n_after - n_before <= 3  # at most one new program each


def test_mixed_sampling_settings_share_one_program(model):
    prompts = _prompts([5, 5, 5, 5])
    greedy = G.generate(model, prompts, 12, temperature=0)
    G.STATS.clear()
    mixed = G.generate(model, prompts, 12, temperature=[0.0, 1.0, 0.0, 2.0], top_k=[None, 5, 3, 1],
                       top_p=[1.0, 0.9, None, None], seed=3)
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]  # greedy rows unaffected by the others
    assert mixed[3] == greedy[3]  # top_k=1 leaves only the argmax, whatever the temperature
    assert G.STATS["trace:decode"] == 1
    mixed2 = G.generate(model, prompts, 12, temperature=[1.0, 0.0, 0.5, 0.7], top_k=[2, None, 7, 1],
                        top_p=[0.5, 1.0, 0.8, 0.3], seed=3)
    assert mixed2[1] == greedy[1] and mixed2[3] == greedy[3]
    assert G.STATS["trace:decode"] == 1  # new values, same program


def _hlo_computations(hlo: str) -> dict:
    """Compiled HLO text -> {computation name: its body lines}."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    return comps


def _reachable(comps: dict, root: str) -> set:
    """root and every computation it calls (fusions, reductions, loops, branches)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += [g.strip().lstrip("%") for g in group.split(",")]
    return seen


@pytest.mark.parametrize("n_rows", [4, 1])  # the one-row program has its own head and attention
def test_decode_updates_the_cache_in_place(model, n_rows):
    """The decode steps copy no cache buffer: each step writes one slot per row in place.
    (Reading the just-written cache made XLA:CPU copy every layer's cache ~4 times per token:
    correct output, a third of the decode time.) The only cache copies are the two transposes
    per buffer and call, (B, S, H, K) -> head-major (B, H, S, K) and back, outside the loop."""
    prompts = _prompts([7, 16, 5, 10])[:n_rows]
    graphdef, params, _, state, _ = _start(model, prompts, 4)
    weights = G.decode_weights(graphdef, params, n_rows)
    hlo = G.engine._decode_loop.lower(graphdef, params, weights, state, 4).compile().as_text()
    B, S = state.cache["k"][0].shape[:2]
    H, K = CFG.n_head, CFG.head_dim
    shapes = (f"f32[{B},{S},{H},{K}]", f"f32[{B},{H},{S},{K}]")

    def copies(lines):
        return [ln for ln in lines if any(f"= {s}" in ln for s in shapes)
                and (" copy(" in ln or " transpose(" in ln)]

    comps = _hlo_computations(hlo)
    bodies = [b for lines in comps.values() for ln in lines if " while(" in ln
              for b in re.findall(r"body=%?([\w.\-]+)", ln)]
    assert len(bodies) == 1, bodies
    in_loop = [ln for name in _reachable(comps, bodies[0]) for ln in copies(comps[name])]
    assert hlo.count(shapes[1]) > 0 and not in_loop, in_loop[:3]
    n_buffers = 2 * CFG.n_layer
    assert len(copies(hlo.splitlines())) <= 2 * n_buffers, copies(hlo.splitlines())[:3]


def test_eos_ends_row_and_finished_rows_stop_changing(model):
    prompts = _prompts([6, 9, 5, 12], seed=5)
    free = G.generate(model, prompts, 12, temperature=0)
    eos = free[0][3]  # row 0 produces this at step 3 (maybe earlier too)
    got = G.generate(model, prompts, 12, temperature=0, eos_id=eos)
    for f, g in zip(free, got):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert g == f[:cut]
    assert got[0][-1] == eos
    # Inside decode: a done row emits PAD, and its state (length, cache length, token) freezes.
    graphdef, params, _, state, tok0 = _start(model, prompts, 12, eos=eos)
    state, toks = G.decode(graphdef, params, state, 4)
    done = np.asarray(state.done_B)
    frozen = (np.asarray(state.n_B).copy(), np.asarray(state.cache["length"]).copy(),
              np.asarray(state.token_B).copy())
    state, toks2 = G.decode(graphdef, params, state, 4)
    assert done[0] and (np.asarray(toks2)[done] == G.PAD).all()
    for before, after in zip(frozen, (state.n_B, state.cache["length"], state.token_B)):
        np.testing.assert_array_equal(np.asarray(after)[done], before[done])


def test_early_exit_when_all_rows_are_done(model):
    prompt = _prompts([5], seed=2)[0]
    free = G.generate(model, [prompt] * 4, 12, temperature=0)[0]
    eos = free[1]  # all rows (same prompt) end by their second token
    G.STATS.clear()
    out = G.generate(model, [prompt] * 4, 24, temperature=0, eos_id=eos, chunk=4)
    assert out == [free[:free.index(eos) + 1]] * 4
    assert G.STATS["decode_calls"] <= 1  # not the 6 chunks that 24 tokens take
    G.STATS.clear()
    G.generate(model, [prompt] * 4, 24, temperature=0, chunk=4)
    assert G.STATS["decode_calls"] == 6  # ceil(23 / 4)


def test_stream_yields_the_same_tokens_chunk_by_chunk(model):
    prompts = _prompts([6, 7, 5, 9])
    full = G.generate(model, prompts, 12, temperature=0.8, seed=4)
    pieces = list(G.generate(model, prompts, 12, temperature=0.8, seed=4, stream=True, chunk=4))
    assert len(pieces) == 1 + 3  # first token from prefill, then ceil(11 / 4) chunks
    assert [sum((p[i] for p in pieces), []) for i in range(4)] == full
    assert [len(p[0]) for p in pieces] == [1, 4, 4, 3]


def test_past_the_window_matches_sliding_recompute(model):
    # prompt + new > block_size: each step past the window recomputes the last 32 tokens.
    prompts = _prompts([20, 5, 31, 12])
    got = G.generate(model, prompts, 30, temperature=0)
    for p, g in zip(prompts, got):
        assert g == _reference_greedy(model, p, 30)[0]
    # A prompt longer than block_size keeps its last block_size tokens.
    long = _prompts([50])[0]
    assert G.generate(model, [long], 8, temperature=0) == G.generate(model, [long[-32:]], 8, temperature=0)
    assert G.generate(model, [long], 8, temperature=0)[0] == _reference_greedy(model, long, 8)[0]


def test_past_the_window_logits_match_reference(model):
    prompts = _prompts([30, 3])
    n = 8
    graphdef, params = nnx.split(model)
    tokens = np.zeros((2, 32), np.int32)
    tokens[0, :30], tokens[1, :3] = prompts[0], prompts[1]
    lengths = jnp.asarray([30, 3])
    logits0, cache = G.prefill(graphdef, params, jnp.asarray(tokens), lengths, init_cache(CFG, 2, 32))
    state, tok0 = G.init_decode_state(
        logits0, cache, jnp.asarray(tokens), lengths, jnp.full((2,), n), jnp.full((2,), -1),
        jnp.arange(2), jax.random.key(0), SamplingParams.make(2, 0.0),
        flags=SamplingFlags(sample=False), windowed=True, history_len=48)
    state, toks, step_logits = G.decode(graphdef, params, state, n - 1, return_logits=True)
    for b, p in enumerate(prompts):
        want_toks, want_logits = _reference_greedy(model, p, n)
        assert [int(tok0[b])] + np.asarray(toks[b]).tolist() == want_toks
        np.testing.assert_allclose(np.asarray(step_logits[b]), want_logits[1:], atol=ATOL, rtol=0)


def test_seeded_sampling_is_reproducible_and_rows_differ(model):
    prompt = _prompts([5])[0]
    a = G.generate(model, [prompt] * 4, 12, temperature=1.0, seed=11, chunk=4)
    b = G.generate(model, [prompt] * 4, 12, temperature=1.0, seed=11, chunk=4)
    c = G.generate(model, [prompt] * 4, 12, temperature=1.0, seed=12, chunk=4)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) == 4  # num-samples: same prompt, different rows
    # A row's samples do not depend on the other rows of its batch.
    others = _prompts([9, 7, 12], seed=8)
    assert G.generate(model, [prompt] + others, 12, temperature=1.0, seed=11, chunk=4)[0] == a[0]
    hot = G.generate(model, [prompt] * 4, 12, temperature=5.0, seed=1, chunk=4)
    assert all(0 <= t < CFG.vocab_size for row in hot for t in row)  # never a padded id


def test_repetition_penalty_reduces_repeats(model):
    prompts = _prompts([5, 5, 5, 5], seed=9)
    plain = G.generate(model, prompts, 12, temperature=0)
    pen = G.generate(model, prompts, 12, temperature=0, repetition_penalty=[1.0, 50.0, 50.0, 50.0])
    assert pen[0] == plain[0]  # penalty 1 is a no-op, even when compiled in for another row
    # greedy + heavy penalty cycles through more distinct tokens
    assert sum(len(set(r)) for r in pen[1:]) > sum(len(set(r)) for r in plain[1:])


@pytest.mark.parametrize("kwargs, msg", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"temperature": [1.0]}, "temperature"),  # one value for two prompts
    ({"eos_id": 67}, "eos"),
    ({"prompts": [[1], []]}, "empty"),
    ({"prompts": [[1], [67]]}, "vocabulary"),
    ({"prompts": []}, "at least one"),
    ({"seed": -1}, "seed"),
])
def test_bad_values_raise_user_error(model, kwargs, msg):
    args = {"prompts": [[1, 2], [3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(UserError, match=msg):
        G.generate(model, args.pop("prompts"), args.pop("max_new_tokens"), stream=True, **args)


# ----------------------------------------------------------------------------- CLI
CLI_CFG = ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from jaxgpt.checkpoint import save_model_checkpoint
    from jaxgpt.model import create_model

    d = str(tmp_path_factory.mktemp("ckpt") / "run")
    save_model_checkpoint(d, create_model(CLI_CFG, seed=1), Config(model=CLI_CFG), meta={"tokenizer": "byte"})
    return d


@pytest.fixture(scope="module")
def loaded(ckpt):
    from jaxgpt.checkpoint import load_model
    from jaxgpt.tokenizer import get_tokenizer

    model, _, meta = load_model(ckpt)
    return model, get_tokenizer(meta["tokenizer"])


def _json_lines(capsys):
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_output_matches_python_api(ckpt, loaded, capsys):
    model, tok = loaded
    rc = main(["generate", "--ckpt", ckpt, "--prompt", "hello", "--prompt", "", "--max-new-tokens", "12",
               "--temperature", "0", "--json"])
    assert rc == 0
    rows = _json_lines(capsys)
    want = G.generate(model, [tok.encode("hello"), [tok.eot_id]], 12, temperature=0)
    assert [r["prompt"] for r in rows] == ["hello", ""]
    assert [r["completion"] for r in rows] == [tok.decode(w) for w in want]
    assert [r["prompt_tokens"] for r in rows] == [5, 1]  # the empty prompt starts from EOT
    assert [r["new_tokens"] for r in rows] == [12, 12]
    assert all(r["seconds"] > 0 for r in rows)


def test_a_float32_checkpoint_serves_in_bfloat16(ckpt, capsys):
    """--dtype / jaxgpt.load(dtype=): bf16 compute and a bf16 KV cache over the float32 params."""
    import jaxgpt
    model, tok = jaxgpt.load(ckpt, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16 and model.wte[...].dtype == jnp.float32
    want = G.generate(model, [tok.encode("hello")], 8, temperature=0)
    rc = main(["generate", "--ckpt", ckpt, "--prompt", "hello", "--max-new-tokens", "8",
               "--temperature", "0", "--json", "--dtype", "bfloat16"])
    assert rc == 0 and _json_lines(capsys)[0]["completion"] == tok.decode(want[0])
    rc = main(["eval", "--ckpt", ckpt, "--dtype", "float16"])
    assert rc == 2 and "invalid choice" in capsys.readouterr().err


def test_num_samples_differ_and_stream_reproduces_batch(ckpt, capsys):
    args = ["generate", "--ckpt", ckpt, "--prompt", "ab", "--num-samples", "3", "--max-new-tokens", "12",
            "--temperature", "1.0", "--seed", "5", "--json"]
    assert main(args) == 0
    batch = _json_lines(capsys)
    assert len(batch) == 3 and len({r["completion"] for r in batch}) == 3
    assert main(args + ["--stream"]) == 0
    streamed = _json_lines(capsys)
    assert [r["completion"] for r in streamed] == [r["completion"] for r in batch]


def test_text_and_stream_output(ckpt, loaded, capsys):
    model, tok = loaded
    want = "xy" + tok.decode(G.generate(model, [tok.encode("xy")], 12, temperature=0)[0])
    base = ["generate", "--ckpt", ckpt, "--prompt", "xy", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert main(base + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert text == want + "\n" + "-" * 40 + "\n"
    assert streamed == text


def test_prompt_file_lines_and_jsonl(ckpt, tmp_path, capsys):
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "first"}) + "\n" + json.dumps({"prompt": "second", "id": 2}) + "\n")
    outs = []
    for f in (lines, jsonl):
        assert main(["generate", "--ckpt", ckpt, "--prompt-file", str(f), "--max-new-tokens", "12",
                     "--temperature", "0", "--json"]) == 0
        outs.append(_json_lines(capsys))
    assert [r["prompt"] for r in outs[0]] == ["first", "second"]
    assert outs[0] == [dict(r, seconds=o["seconds"]) for r, o in zip(outs[1], outs[0])]


def test_stop_at_eot_ends_the_completion(ckpt, loaded, capsys):
    model, tok = loaded
    # A scorching temperature makes every byte (and EOT) about equally likely: find a seed whose
    # 12 tokens contain EOT, then check the CLI stops there and hides it from the text.
    for seed in range(400):
        want = G.generate(model, [tok.encode("ab")], 12, temperature=50.0, seed=seed, eos_id=tok.eot_id)[0]
        if want[-1] == tok.eot_id:
            break
    assert want[-1] == tok.eot_id and len(want) < 12
    assert main(["generate", "--ckpt", ckpt, "--prompt", "ab", "--max-new-tokens", "12", "--temperature",
                 "50", "--stop-at-eot", "--seed", str(seed), "--json"]) == 0
    (row,) = _json_lines(capsys)
    assert row["new_tokens"] == len(want)
    assert row["completion"] == tok.decode(want[:-1])


@pytest.mark.parametrize("extra, msg", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--min-p", "2"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_bad_values_are_one_line_errors(ckpt, capsys, extra, msg):
    assert main(["generate", "--ckpt", ckpt, "--prompt", "x"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1


def test_bad_checkpoint_and_prompt_file(ckpt, tmp_path, capsys):
    cases = []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 16)
    cases.append(["--ckpt", str(tmp_path / "missing"), "--prompt", "x"])
    cases.append(["--ckpt", str(foreign), "--prompt", "x"])
    for name, content in [("empty.txt", "\n\n"), ("bad.jsonl", '{"prompt": "a"}\n{oops\n'),
                          ("nofield.jsonl", '{"text": "a"}\n'), ("nonstr.jsonl", '{"prompt": 3}\n')]:
        (tmp_path / name).write_text(content)
        cases.append(["--ckpt", ckpt, "--prompt-file", str(tmp_path / name)])
    cases.append(["--ckpt", ckpt, "--prompt-file", str(tmp_path / "nope.txt")])
    cases.append(["--ckpt", ckpt])  # neither --prompt nor --prompt-file
    for extra in cases:
        assert main(["generate"] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (extra, err)
