"""End-to-end tests of the generate command on a checkpoint of the smoke config (the shared 4-step run), and of each
bad flag exiting non-zero with its name."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_jax.model import decode
from moe_jax.train import restore as inference
from moe_jax import generate as generate_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(smoke_run):
    """The session's shared smoke run (tests/conftest.py): trained 4 steps, checkpoint at step 4, with its
    config.json and tokenizer.model."""
    return smoke_run["workdir"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "moe_jax.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # generate subprocesses that compile and decode
def test_cli_prints_samples_and_speed(workdir):
    r = run_cli("--workdir", workdir, "--prompt", "In the beginning", "--max_new_tokens", "20",
                "--num_samples", "2", "--seed", "0")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"step 4: \d+ prompt tokens, 2 samples", out)
    samples = re.findall(r"--- sample (\d)/2 \((\d+) new tokens", out)
    assert [s[0] for s in samples] == ["1", "2"] and all(0 <= int(s[1]) <= 20 for s in samples)
    assert out.count("In the beginning") == 2  # each sample starts with the prompt text
    assert re.search(r"# decode: 2 x \d+ tokens in [\d.]+ s = [\d.]+ tokens/s \(prefill excluded\)", out)
    again = run_cli("--workdir", workdir, "--prompt", "In the beginning", "--max_new_tokens", "20",
                    "--num_samples", "2", "--seed", "0")
    strip = lambda s: re.sub(r"\n# decode:.*", "", s)  # noqa: E731  (timings differ)
    assert strip(again.stdout) == strip(out), "a fixed seed must reproduce the samples"


@pytest.mark.slow  # generate subprocesses that compile and decode
def test_cli_empty_prompt_and_step_and_truncation(workdir):
    r = run_cli("--workdir", workdir, "--prompt", "", "--max_new_tokens", "8", "--num_samples", "1",
                "--temperature", "0", "--step", "4")
    assert r.returncode == 0, r.stderr
    assert "step 4: 1 prompt tokens" in r.stdout  # just the document-start token
    long_prompt = "And God said, Let there be light: and there was light. " * 20
    r = run_cli("--workdir", workdir, "--prompt", long_prompt, "--max_new_tokens", "16", "--num_samples", "1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"step 4: 48 prompt tokens", r.stdout)  # context 64 - 16 new tokens
    assert re.search(r"left-truncated by \d+ tokens", r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", [
    ("temperature", "-0.5"),
    ("top_p", "0"),
    ("top_p", "1.5"),
    ("top_k", "-1"),
    ("repetition_penalty", "0"),
    ("max_new_tokens", "0"),
    ("max_new_tokens", "64"),  # the smoke context is 64: no room for the prompt
    ("num_samples", "0"),
    ("step", "-1"),
    ("step", "999"),  # no such checkpoint
])
def test_bad_flag_is_one_line_and_status_2(workdir, flag, value):
    """Every bad input exits 2 with one `error:` line naming the flag (as moe_jax.eval), before any decoding."""
    r = run_cli("--workdir", workdir, "--prompt", "x", f"--{flag}={value}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: --{flag}"), r.stderr
    if (flag, value) == ("max_new_tokens", "64"):
        assert "use at most 63" in r.stderr  # the limit is named
    if (flag, value) == ("step", "999"):
        assert "[4]" in r.stderr  # the steps that exist


def test_missing_workdir_is_one_line_and_status_2(tmp_path):
    r = run_cli("--workdir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: --workdir") and "config.json not found" in r.stderr


@pytest.mark.parametrize("context, prompt_len, want", [
    (64, 2, 62),     # the room after the prompt
    (128, 5, 123),   # the quickstart model (train.seq_len 128)
    (1024, 5, 200),  # capped
    (64, 60, 16),    # a long prompt: a quarter of the context (the prompt is left-truncated)
    (64, 200, 16),
    (2, 1, 1),       # never less than one, never the whole context
])
def test_default_max_new_tokens_fits_the_context(context, prompt_len, want):
    got = generate_lib.default_max_new_tokens(context, prompt_len)
    assert got == want and 1 <= got < context


@pytest.mark.slow  # a generate subprocess that compiles and decodes
def test_default_max_new_tokens_works_on_the_model(workdir):
    r = run_cli("--workdir", workdir, "--prompt", "In the beginning", "--num_samples", "1", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "left-truncated" not in r.stdout


def test_library_generate_on_the_checkpoint(workdir):
    """The restored parameters decode with the cache exactly as an uncached greedy recomputation would."""
    from moe_jax.model import transformer as model

    config, graphdef, params, tokenizer, step = inference.load_for_inference(workdir)
    assert step == 4 and tokenizer.vocab_size == config.model.vocab_size
    ids = np.asarray([generate_lib.prompt_ids(tokenizer, "In the beginning")], np.int32)
    assert ids[0, 0] == tokenizer.eos_id
    got = decode.generate(graphdef, params, config, ids, 10, temperature=0.0)
    context = config.train.seq_len
    forward = jax.jit(lambda p, t: model.apply(graphdef, p, t, no_drop=True)[0])  # whole sequence, no cache
    seq = ids
    for _ in range(10):
        padded = np.zeros((1, context), np.int32)
        padded[:, :seq.shape[1]] = seq  # causal: what follows the last real token does not matter
        last = np.asarray(forward(params, padded)[:, seq.shape[1] - 1])
        seq = np.concatenate([seq, np.argmax(last, axis=-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(got.tokens, seq)
