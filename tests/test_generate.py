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
def test_bad_flag_exits_nonzero_naming_it(workdir, flag, value):
    room = [] if flag == "max_new_tokens" else ["--max_new_tokens=8"]  # the default 200 exceeds the smoke context
    r = run_cli("--workdir", workdir, "--prompt", "x", *room, f"--{flag}={value}")
    assert r.returncode != 0
    assert f"--{flag}" in r.stderr, r.stderr


def test_missing_workdir_is_named(tmp_path):
    r = run_cli("--workdir", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "--workdir" in r.stderr


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
