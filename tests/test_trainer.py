"""End-to-end tests of the train loop, checkpoints, resume, preemption, NaN guard and the eval command (CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.train import loop as trainer
from moe_jax import eval as eval_lib
from moe_jax.train import restore as inference
from moe_jax.train import metrics as metrics_lib
from smoke_helpers import run_config, smoke_config, smoke_run_config, train_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


@pytest.fixture(scope="module")
def cache_dir(data_cache):
    return data_cache




def unigram_entropy(workdir, cache_dir):
    """Entropy (nats) of the unigram distribution of the training tokens: the loss of a model that ignores context."""
    from moe_jax import data
    c = smoke_run_config(cache_dir)
    ds = data.build(c)
    counts = np.zeros(c.model.vocab_size)
    for _ in range(20):
        b = next(ds.train_iter)
        np.add.at(counts, b["targets"].ravel(), 1)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_smoke_trains_and_writes_outputs(tmp_path, cache_dir):
    workdir = str(tmp_path / "run")
    summary = trainer.train(smoke_run_config(cache_dir), workdir)
    assert summary["finished"] and summary["step"] == 60
    h = unigram_entropy(workdir, cache_dir)
    assert summary["val_loss"] < h - 0.5, (summary["val_loss"], h)
    records = metrics_lib.read(workdir)
    train = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "accuracy", "perplexity", "muon_lr", "adamw_lr", "grad_norm", "moe/load_balance_loss",
                "moe/z_loss", "moe/dropped_fraction", "moe/tokens_per_expert", "tokens_per_s", "tflops", "mfu",
                "step_time"):
        assert key in train[-1], key
    assert len(train[-1]["moe/tokens_per_expert"]) == 2  # two MoE layers
    assert [r["step"] for r in records if r["kind"] == "eval"] == [30, 60]
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == 60
    for png in ("loss.png", "throughput.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", png)) > 1000
    assert os.listdir(os.path.join(workdir, "tb"))
    assert ckpt_lib.load_config(workdir).model.d_model == 64
    assert os.path.exists(os.path.join(workdir, ckpt_lib.TOKENIZER_FILE))


@pytest.mark.slow
def test_resume_is_exact(tmp_path, cache_dir):
    cfg = dict(steps=12, log_every=1, eval_every=12, checkpoint_every=100)
    full = str(tmp_path / "full")
    trainer.train(smoke_run_config(cache_dir, **cfg), full)
    split = str(tmp_path / "split")
    first = trainer.train(smoke_run_config(cache_dir, **cfg), split, max_steps_this_run=5)
    assert first["step"] == 5 and not first["finished"]
    second = trainer.train(smoke_run_config(cache_dir, **cfg), split)
    assert second["step"] == 12
    a, b = train_losses(full), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert a[s] == b[s], (s, a[s], b[s])  # bit-for-bit
    assert second["val_loss"] == pytest.approx(
        [r for r in metrics_lib.read(full) if r["kind"] == "eval"][-1]["val_loss"], abs=0)


@pytest.mark.slow
def test_nan_guard_keeps_last_checkpoint(tmp_path, cache_dir):
    workdir = str(tmp_path / "nan")
    c = smoke_run_config(cache_dir, steps=20, checkpoint_every=5, eval_every=100, inject_nan_at_step=7)
    with pytest.raises(FloatingPointError, match="at step 7"):
        trainer.train(c, workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 5
    mesh = inference.inference_mesh(c.mesh)
    _, state, step = inference.restore_train_state(workdir, c, mesh)
    assert step == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_eval_restores_8_device_checkpoint_on_1_device(tmp_path, cache_dir):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    workdir = str(tmp_path / "mesh")
    c = run_config(smoke_config(cache_dir, steps=6, eval_every=6, checkpoint_every=6), **{"mesh.shape": (2, 2, 2)})
    summary = trainer.train(c, workdir)
    result = eval_lib.evaluate_workdir(workdir, devices=jax.devices()[:1])
    assert result["devices"] == 1 and result["step"] == 6
    np.testing.assert_allclose(result["val_loss"], summary["val_loss"], rtol=2e-5)
    assert os.path.exists(os.path.join(workdir, "eval_step6.json"))


def _cli(args, cache_dir, **kw):
    env = dict(os.environ, MOE_JAX_CACHE=cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.Popen([sys.executable, "-m", "moe_jax.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("override,field", [
    ("--config.mesh.shape=(3,3,1)", "config.mesh.shape"),
    ("--config.moe.top_k=9", "config.moe.top_k"),
])
def test_config_error_exits_before_compiling(tmp_path, cache_dir, override, field):
    t0 = time.time()
    p = _cli(["--config", "configs/smoke.py", "--workdir", str(tmp_path / "bad"), override], cache_dir)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert field in err, err
    assert "compiled" not in out
    assert time.time() - t0 < 60


def test_bucket_url_workdir_is_refused_with_the_fix(tmp_path, cache_dir):
    p = _cli(["--config", "configs/smoke.py", "--workdir", "gs://bucket/runs/smoke"], cache_dir)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "--workdir" in err and "gcsfuse" in err


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path, cache_dir):
    workdir = str(tmp_path / "preempt")
    args = ["--config", "configs/smoke.py", "--workdir", workdir, "--config.train.steps=100000",
            "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000",
            "--config.train.log_every=1", "--config.train.progress_bar=False"]
    p = _cli(args, cache_dir)
    deadline = time.time() + 240
    metrics_path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics_path) and len(metrics_lib.read(workdir)) >= 3:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == trainer.EXIT_PREEMPTED == 3, err
    assert "stop requested (signal SIGTERM)" in out
    saved = ckpt_lib.Checkpointer(workdir, read_only=True).latest_step()
    assert saved is not None and saved >= 3
    q = _cli(args[:4] + [f"--config.train.steps={saved + 2}", "--config.train.progress_bar=False"], cache_dir)
    out, err = q.communicate(timeout=240)
    assert q.returncode == 0, err
    assert f"resumed from step {saved}" in out
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == saved + 2


def test_summary_perplexity_matches_loss(smoke_run):
    """On the shared run (tests/conftest.py: 4 steps, evaluation and checkpoint at step 4)."""
    workdir, s = smoke_run["workdir"], smoke_run["summary"]
    assert s["val_perplexity"] == pytest.approx(math.exp(s["val_loss"]))
    with open(os.path.join(workdir, trainer.SUMMARY_FILE)) as f:
        assert json.load(f)["step"] == 4


@pytest.mark.slow
def test_throughput_counts_each_step_once(tmp_path, cache_dir):
    """A log point one step before the end: the last step was in flight (dispatched) at step 5's log point and its
    time was measured there, so step 6 reuses that rate instead of dividing ~0 s (the bug: 286,255 tok/s, MFU 191%)."""
    workdir = str(tmp_path / "tps")
    c = smoke_run_config(cache_dir, steps=6, log_every=5, eval_every=100, checkpoint_every=100, plots=False)
    trainer.train(c, workdir, devices=jax.devices()[:1])
    recs = [r for r in metrics_lib.read(workdir) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [5, 6]
    tokens_per_step = c.train.batch_size * c.train.seq_len
    for r in recs:
        assert r["tokens_per_s"] * r["step_time"] == pytest.approx(tokens_per_step)
    assert recs[1]["tokens_per_s"] == recs[0]["tokens_per_s"]


def _losses_and_params(workdir):
    _, _, params, _, step = inference.load_for_inference(workdir)
    return train_losses(workdir), step, jax.tree.map(np.asarray, params)


def _assert_same_bits(a, b):
    assert a[0] == b[0] and a[1] == b[1], (a[0], b[0])  # every step's loss, exactly
    jax.tree.map(np.testing.assert_array_equal, a[2], b[2])  # the final parameters, bit for bit


# The reruns of a study arm (docs/decisions.md, "Reproducibility"): an MoE with 1,024 tokens in a micro-batch on one
# device, enough for XLA:CPU to split its weight-gradient products across its threads (moe_jax/train/cpu_pool.py)
RERUN = dict(steps=5, log_every=1, eval_every=5, checkpoint_every=5, batch_size=16, plots=False)


@pytest.mark.slow  # two training runs
def test_two_runs_of_a_tiny_moe_arm_are_bit_identical(tmp_path, cache_dir):
    runs = []
    for name in ("a", "b"):
        workdir = str(tmp_path / name)
        trainer.train(smoke_run_config(cache_dir, **RERUN), workdir, devices=jax.devices()[:1])
        runs.append(_losses_and_params(workdir))
    assert sorted(runs[0][0]) == list(range(1, 6))
    _assert_same_bits(*runs)


@pytest.mark.slow  # two training subprocesses
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 CPUs to pin to fewer")
def test_a_run_pinned_to_one_cpu_equals_an_unpinned_run(tmp_path, cache_dir):
    """The committed studies ran pinned (`taskset`, one study per core) and a rerun unpinned drifted (an MoE's test
    loss in the 3rd digit) until the trainer sized XLA:CPU's pool for the machine (cpu_pool.start)."""
    env = dict(os.environ, MOE_JAX_CACHE=cache_dir, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device
    # pinned as `taskset -c N` would, by the child itself (forking a pinned child from pytest is unsafe)
    pinned = ("import os, runpy, sys; os.sched_setaffinity(0, {int(sys.argv.pop(1))}); sys.argv[0] = 'moe_jax.train'; "
              "runpy.run_module('moe_jax.train', run_name='__main__', alter_sys=True)")
    runs = []
    for name, start in (("free", ["-m", "moe_jax.train"]),
                        ("pinned", ["-c", pinned, str(sorted(os.sched_getaffinity(0))[0])])):
        workdir = str(tmp_path / name)
        cmd = [sys.executable, *start, "--config", SMOKE, "--workdir", workdir,
               *(f"--config.train.{k}={v}" for k, v in RERUN.items()), "--config.train.progress_bar=False"]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(_losses_and_params(workdir))
    _assert_same_bits(*runs)
