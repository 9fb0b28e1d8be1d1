"""Tests for moe_jax/model/decode.py (its speed: python -m moe_jax.bench --mode decode): cached decoding against
uncached recomputation (dense and MoE), determinism and reproducibility, the sampling filters and the
repetition-penalty rule, EOS, left-truncation, no recompilation.
Random-init smoke-shaped models (2 layers, width 64, vocab 512, context 64): each program compiles in a second or two.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from moe_jax.model import decode
from moe_jax.model import transformer as model
from moe_jax.cli import load_config_file
from moe_jax.config.typed import parse

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
VOCAB, CONTEXT = 512, 64


def smoke_config(kind: str):
    """configs/smoke.py ('moe') or its dense twin, parsed."""
    c = load_config_file(CONFIGS / "smoke.py")
    if kind == "dense":
        c.moe.num_experts = 0
    return parse(c)


@functools.lru_cache(maxsize=None)
def setup(kind: str):
    config = smoke_config(kind)
    graphdef, params = model.init_params(config.model, config.seed)
    return config, graphdef, params


def prompt(length: int, rows: int = 2, seed: int = 0) -> np.ndarray:
    """`rows` different prompts of the same length."""
    return np.random.default_rng(seed).integers(4, VOCAB, size=(rows, length)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def full_forward(kind: str):
    """Logits of a whole [B, CONTEXT] sequence, no cache (MoE: no_drop, so capacity never drops a token)."""
    _, graphdef, _ = setup(kind)
    return jax.jit(lambda params, tokens: model.apply(graphdef, params, tokens, no_drop=True)[0])


def reference_greedy(kind, prompt_ids, max_new_tokens, repetition_penalty=1.0):
    """Greedy decoding the slow way: every step recomputes the whole sequence from scratch without a cache, applies
    the penalty rule in numpy over the tokens seen so far and takes the argmax. The sequence is right-padded to the
    context so one compiled forward serves every step; attention is causal, so the logits at position n - 1 do not
    depend on what follows n - 1 (the model tests check this)."""
    _, _, params = setup(kind)
    seq = np.asarray(prompt_ids)
    for _ in range(max_new_tokens):
        n = seq.shape[1]
        padded = np.zeros((seq.shape[0], CONTEXT), np.int32)
        padded[:, :n] = seq
        last = np.asarray(full_forward(kind)(params, padded)[:, n - 1], np.float64)
        for row in range(seq.shape[0]):
            seen = np.unique(seq[row])
            x = last[row, seen]
            last[row, seen] = np.where(x > 0, x / repetition_penalty, x * repetition_penalty)
        seq = np.concatenate([seq, np.argmax(last, axis=-1)[:, None].astype(np.int32)], axis=1)
    return seq


# ------------------------------------------------------------------------------------ cached == uncached (greedy)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cached_greedy_equals_uncached_recomputation(kind):
    config, graphdef, params = setup(kind)
    p = prompt(5)
    want = reference_greedy(kind, p, 12)
    for bucket in (True, False):  # padded to 16 and exact length: the pad slots must never be attended to
        got = decode.generate(graphdef, params, config, p, 12, temperature=0.0, bucket=bucket)
        assert got.prompt_len == 5 and got.truncated == 0 and got.steps == 12
        assert_array_equal(got.tokens, want)
        assert_array_equal(got.lengths, [17, 17])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cached_greedy_with_repetition_penalty_equals_uncached(kind):
    """The seen-token mask covers the prompt and every generated token, and no padding."""
    config, graphdef, params = setup(kind)
    p = prompt(5, seed=1)
    # At random init each position's own token dominates the next logit (tied embedding), so greedy repeats the
    # last token forever; a penalty of 4 is strong enough to break that and exercise the seen mask.
    want = reference_greedy(kind, p, 12, repetition_penalty=4.0)
    got = decode.generate(graphdef, params, config, p, 12, temperature=0.0, repetition_penalty=4.0)
    assert_array_equal(got.tokens, want)
    plain = reference_greedy(kind, p, 12)
    assert not np.array_equal(plain, want), "the penalty should change this greedy continuation"


def test_full_context_cache_equals_uncached():
    """Prompt + new tokens fill the whole context (cache length = seq_len)."""
    config, graphdef, params = setup("moe")
    p = prompt(CONTEXT - 6, seed=2)
    got = decode.generate(graphdef, params, config, p, 6, temperature=0.0)
    assert got.tokens.shape == (2, CONTEXT)
    assert_array_equal(got.tokens, reference_greedy("moe", p, 6))


@pytest.mark.slow  # quick tier under 3 min: a full compile per case; the full suite runs it
def test_rows_are_independent():
    """A batch of different prompts gives each row what it gets alone (MoE routing drops nothing at decode)."""
    config, graphdef, params = setup("moe")
    p = prompt(7, rows=3, seed=3)
    batch = decode.generate(graphdef, params, config, p, 10, temperature=0.0)
    for r in range(3):
        alone = decode.generate(graphdef, params, config, p[r:r + 1], 10, temperature=0.0)
        assert_array_equal(alone.tokens[0], batch.tokens[r])


# ------------------------------------------------------------------------------- determinism and reproducibility


@pytest.mark.slow  # quick tier under 3 min: a full compile per case; the full suite runs it
def test_greedy_is_deterministic_and_sampling_reproducible():
    config, graphdef, params = setup("moe")
    p = np.tile(prompt(6, rows=1, seed=4), (3, 1))  # the CLI's case: one prompt, several samples
    g1 = decode.generate(graphdef, params, config, p, 16, temperature=0.0)
    g2 = decode.generate(graphdef, params, config, p, 16, temperature=0.0)
    assert_array_equal(g1.tokens, g2.tokens)
    assert all(np.array_equal(g1.tokens[0], g1.tokens[r]) for r in range(3))

    kw = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
    s1 = decode.generate(graphdef, params, config, p, 16, seed=7, **kw)
    s2 = decode.generate(graphdef, params, config, p, 16, seed=7, **kw)
    s3 = decode.generate(graphdef, params, config, p, 16, seed=8, **kw)
    assert_array_equal(s1.tokens, s2.tokens)
    assert not np.array_equal(s1.tokens, s3.tokens)
    assert not np.array_equal(s1.tokens[0], s1.tokens[1]), "samples of one prompt should differ"
    assert not np.array_equal(s1.tokens[0], g1.tokens[0])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_top_k_one_equals_greedy(kind):
    config, graphdef, params = setup(kind)
    p = prompt(6, seed=5)
    greedy = decode.generate(graphdef, params, config, p, 16, temperature=0.0, repetition_penalty=1.3)
    for seed in (0, 1):
        top1 = decode.generate(graphdef, params, config, p, 16, temperature=2.0, top_k=1, top_p=0.9,
                               repetition_penalty=1.3, seed=seed)
        assert_array_equal(top1.tokens, greedy.tokens)


# -------------------------------------------------------------------------------------------- sampling filters


def test_repetition_penalty_rule_ctrl_hf():
    """Seen tokens: positive logits are divided by the penalty, negative ones multiplied (both get lower); unseen
    tokens are unchanged. Seed 003 divided both, which RAISES a negative logit (-2 / 2 = -1)."""
    logits = jnp.array([[2.0, -2.0, 0.0, 3.0, -1.0]])
    seen = jnp.array([[True, True, True, False, False]])
    out = np.asarray(decode.apply_repetition_penalty(logits, seen, 2.0))
    assert_allclose(out, [[1.0, -4.0, 0.0, 3.0, -1.0]])
    assert np.all(out[0, :2] < np.asarray(logits)[0, :2])
    assert_allclose(decode.apply_repetition_penalty(logits, seen, 1.0), logits)


def keep_mask(logits, top_k, top_p):
    return np.isfinite(np.asarray(decode.top_k_top_p_filter(jnp.asarray(logits, jnp.float32), top_k, top_p)))


def test_top_k_keeps_the_k_largest_ties_to_lowest_id():
    logits = [[0.1, 3.0, 2.0, 2.0, -1.0]]
    assert_array_equal(keep_mask(logits, 1, 1.0), [[False, True, False, False, False]])
    assert_array_equal(keep_mask(logits, 2, 1.0), [[False, True, True, False, False]])
    assert_array_equal(keep_mask(logits, 0, 1.0), [[True] * 5])
    assert_array_equal(keep_mask(logits, 99, 1.0), [[True] * 5])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log([[0.05, 0.5, 0.15, 0.3]])
    assert_array_equal(keep_mask(logits, 0, 0.5), [[False, True, False, False]])
    assert_array_equal(keep_mask(logits, 0, 0.79), [[False, True, False, True]])
    assert_array_equal(keep_mask(logits, 0, 0.81), [[False, True, True, True]])
    assert_array_equal(keep_mask(logits, 0, 1e-6), [[False, True, False, False]])
    assert_array_equal(keep_mask(logits, 0, 1.0), [[True] * 4])
    # top-k first, then top-p on the renormalised survivors: {0.5, 0.3} -> {0.625, 0.375}
    assert_array_equal(keep_mask(logits, 2, 0.6), [[False, True, False, False]])
    assert_array_equal(keep_mask(logits, 2, 0.7), [[False, True, False, True]])


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (3, 1.0), (5, 0.5), (8, 0.9), (50, 0.95), (64, 0.3), (512, 0.99)])
def test_top_k_candidates_equal_the_whole_vocabulary_filter(top_k, top_p):
    """The fast path (lax.top_k over a power-of-two candidate set) keeps exactly the tokens that the sort-based
    filter over the whole vocabulary keeps, with the same logits."""
    rng = np.random.default_rng(top_k)
    logits = jnp.asarray(rng.normal(size=(3, VOCAB)) * 2, jnp.float32)
    logits = logits.at[1, :8].set(1.5)  # ties
    want = np.asarray(decode.top_k_top_p_filter(logits, top_k, top_p))
    candidates = decode.candidate_count(top_k, VOCAB)
    assert candidates >= top_k
    values, ids = decode.top_k_candidates(logits, top_k, top_p, candidates)
    got = np.full(want.shape, -np.inf, np.float32)
    np.put_along_axis(got, np.asarray(ids), np.asarray(values), axis=-1)
    assert_array_equal(got, want)


def test_candidate_count():
    assert [decode.candidate_count(k, 512) for k in (0, 1, 2, 3, 5, 50, 64, 65, 600)] == [0, 1, 2, 4, 8, 64, 64,
                                                                                          128, 512]


def test_temperature_sampling_frequencies():
    """20,000 draws of a 4-way distribution at temperature 0.5 match softmax(logits / 0.5)."""
    n = 20000
    logits = jnp.tile(jnp.array([[1.0, 0.5, 0.0, -1.0]]), (n, 1))
    keys = jax.random.split(jax.random.key(0), n)
    seen = jnp.zeros(logits.shape, bool)
    want = np.asarray(jax.nn.softmax(logits[0] / 0.5))
    for top_k, candidates in ((0, 0), (4, 4)):  # whole vocabulary, and the top-k candidate path keeping all 4
        tokens = decode.next_token(logits, seen, keys, 0.5, top_k, 1.0, 1.0, candidates)
        assert_allclose(np.bincount(np.asarray(tokens), minlength=4) / n, want, atol=0.015)
    # top_k = 2 renormalises over the two most likely tokens
    tokens = decode.next_token(logits, seen, keys, 0.5, 2, 1.0, 1.0, 2)
    assert_allclose(np.bincount(np.asarray(tokens), minlength=4) / n, list(want[:2] / want[:2].sum()) + [0, 0],
                    atol=0.015)
    greedy = decode.next_token(logits[:4], seen[:4], keys[:4], 0.0, 0, 1.0, 1.0)
    assert_array_equal(greedy, [0, 0, 0, 0])


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
])
def test_invalid_sampling_values_name_the_flag(kwargs, flag):
    with pytest.raises(decode.SamplingError, match=f"--{flag}") as e:
        decode.check_sampling(**kwargs)
    assert e.value.flag == flag


# ----------------------------------------------------------------------------------------- EOS, context, compiles


def test_eos_stops_a_sample_and_the_loop():
    config, graphdef, params = setup("moe")
    p = prompt(5, seed=6)
    kw = dict(temperature=0.0, repetition_penalty=4.0)  # the penalty keeps random-init greedy from looping
    free = decode.generate(graphdef, params, config, p, 20, **kw)
    new = free.tokens[:, 5:]
    # An EOS id that row 0 first emits at step k: row 0 must stop there (EOS counted in its length, EOS after it).
    k = 3
    eos = int(new[0, k])
    first = [int(np.argmax(new[r] == eos)) if np.any(new[r] == eos) else None for r in range(2)]
    assert first[0] == k
    got = decode.generate(graphdef, params, config, p, 20, eos_id=eos, **kw)
    for r in range(2):
        if first[r] is None:
            assert got.lengths[r] == 25
            assert_array_equal(got.tokens[r], free.tokens[r])
        else:
            stop = 5 + first[r] + 1
            assert got.lengths[r] == stop
            assert_array_equal(got.tokens[r, :stop], free.tokens[r, :stop])
            assert np.all(got.tokens[r, stop:] == eos)
    assert got.new_tokens(0, eos_id=eos) == new[0, :first[0]].tolist()
    # A batch where every row stops early ends the loop early.
    same = np.tile(p[:1], (2, 1))
    both = decode.generate(graphdef, params, config, same, 20, eos_id=eos, **kw)
    assert both.steps == first[0] + 1 < 20
    assert_array_equal(both.lengths, [5 + first[0] + 1] * 2)


def test_long_prompt_is_left_truncated():
    config, graphdef, params = setup("dense")
    long = prompt(CONTEXT + 10, seed=7)
    got = decode.generate(graphdef, params, config, long, 8, temperature=0.0)
    keep = CONTEXT - 8
    assert got.truncated == long.shape[1] - keep and got.prompt_len == keep
    assert_array_equal(got.tokens[:, :keep], long[:, -keep:])
    assert_array_equal(got.tokens, decode.generate(graphdef, params, config, long[:, -keep:], 8,
                                                   temperature=0.0).tokens)
    with pytest.raises(decode.SamplingError, match="--max_new_tokens"):
        decode.generate(graphdef, params, config, prompt(3), CONTEXT, temperature=0.0)


def test_prompt_validation():
    config, graphdef, params = setup("dense")
    with pytest.raises(ValueError, match="start token"):
        decode.generate(graphdef, params, config, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(ValueError, match="prompt ids"):
        decode.generate(graphdef, params, config, np.full((1, 3), VOCAB), 4)


def test_prompt_bucket():
    assert [decode.prompt_bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert decode.prompt_bucket(300, 256) == 256


def test_no_recompilation_within_a_bucket_or_for_new_sampling_values():
    config, graphdef, params = setup("dense")
    decode.generate(graphdef, params, config, prompt(9), 10, temperature=0.0)  # prompt bucket 16, top-k bucket 0
    decode.generate(graphdef, params, config, prompt(9), 10, top_k=8)  # top-k bucket 8
    compiles = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for length, kw in [(3, dict(temperature=0.7, top_k=5)), (16, dict(temperature=1.3, top_p=0.5, seed=3)),
                           (12, dict(temperature=0.0, repetition_penalty=1.4, eos_id=5)),
                           (1, dict(top_k=7, top_p=0.8, seed=9))]:
            r = decode.generate(graphdef, params, config, prompt(length), 10, **kw)
            assert r.compile_s < 1.0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
