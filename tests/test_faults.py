"""Faults a long run must survive (issue 13), each reproduced and its handling asserted: non-finite steps, damaged
checkpoints, two trainers on one workdir, a changed config on resume, bad input, failed saves, signals, kill -9, a
read-only run directory for eval, and the router gradient at top_k=1. docs/reliability.md maps each guarantee here.

The in-process runs share one uninterrupted reference run (`reference`: 8 smoke steps, a checkpoint every 2); the
damage tests resume copies of it. Subprocess tests run `python -m moe_jax.train` on configs/smoke.py.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.config import schema as config_lib
from moe_jax import eval as eval_lib
from moe_jax.train import restore as inference
from moe_jax.train import metrics as metrics_lib
from moe_jax.model import transformer as model_lib
from moe_jax.model import moe as moe_lib
from moe_jax.train import loop as trainer
from moe_jax.train import workdir as workdir_lib
from moe_jax.cli import load_config_file
from smoke_helpers import run_config, smoke_config, smoke_run_config, train_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
REF = dict(steps=8, checkpoint_every=2, log_every=1, eval_every=8, keep_checkpoints=10, plots=False)


@pytest.fixture(scope="module")
def cache_dir(data_cache):
    return data_cache




@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted 8-step run with checkpoints at 2, 4, 6, 8: (workdir, {step: loss})."""
    workdir = str(tmp_path_factory.mktemp("faults") / "reference")
    trainer.train(smoke_run_config(cache_dir, **REF), workdir)
    return workdir, train_losses(workdir)


def _copy(reference, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(reference[0], dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Nothing non-finite is ever saved


@pytest.mark.slow
def test_nan_gradients_with_finite_loss_are_never_saved(tmp_path, cache_dir):
    """The table's first row: a finite loss with NaN gradients, a checkpoint every step."""
    workdir = str(tmp_path / "nan")
    c = smoke_run_config(cache_dir, steps=10, checkpoint_every=1, eval_every=100, log_every=1, inject_nan_at_step=5,
                         inject_nan_mode="grads", plots=False)
    with pytest.raises(trainer.NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 5.*step 4"):
        trainer.train(c, workdir)
    assert all(np.isfinite(loss) for loss in train_losses(workdir).values())  # the loss never showed it
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == 4
    _, state, step = inference.restore_train_state(workdir, c, inference.inference_mesh(c.mesh))
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((state["params"], state["opt_state"])))


@pytest.mark.slow
def test_skip_drops_the_nonfinite_update_and_goes_on(tmp_path, cache_dir):
    workdir = str(tmp_path / "skip")
    c = smoke_run_config(cache_dir, steps=5, checkpoint_every=100, eval_every=100, log_every=1, inject_nan_at_step=3,
                         on_nonfinite="skip", max_skipped_steps=2, plots=False)
    summary = trainer.train(c, workdir)
    assert summary["finished"] and summary["skipped_steps"] == 1
    records = metrics_lib.read(workdir)
    assert [r["step"] for r in records if r["kind"] == "skipped"] == [3]
    losses = train_losses(workdir)
    assert np.isnan(losses[3]) and all(np.isfinite(losses[s]) for s in (1, 2, 4, 5))
    _, state, step = inference.restore_train_state(workdir, c, inference.inference_mesh(c.mesh))
    assert step == 5 and int(state["step"]) == 5  # the skipped step is counted
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, cache_dir):
    workdir = str(tmp_path / "skip_in_a_row")
    c = smoke_run_config(cache_dir, steps=8, checkpoint_every=2, eval_every=100, log_every=1, inject_nan_at_step=4,
                         inject_nan_mode="grads_from", on_nonfinite="skip", max_skipped_steps=3, plots=False)
    with pytest.raises(trainer.NonFiniteError, match=r"3 steps in a row skipped \(train.max_skipped_steps\)"):
        trainer.train(c, workdir)
    records = metrics_lib.read(workdir)
    assert [(r["step"], r["in_row"]) for r in records if r["kind"] == "skipped"] == [(4, 1), (5, 2), (6, 3)]
    _, state, step = inference.restore_train_state(workdir, c, inference.inference_mesh(c.mesh))
    assert step == 4  # skipped steps keep the last finite state (saved at 4); the run stopped at 6 before its save
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_all_finite_sees_one_bad_element():
    from moe_jax.train import step as train_step
    tree = {"a": jnp.ones((3, 4)), "b": (jnp.zeros(2), jnp.arange(3))}
    assert bool(train_step.all_finite(tree))
    tree["a"] = tree["a"].at[2, 1].set(jnp.inf)
    assert not bool(train_step.all_finite(tree))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint integrity: damage falls back to the previous step, and the resumed run is exact


def _largest_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite_4k(step_dir):
    path = _largest_file(step_dir)
    size = os.path.getsize(path)
    assert size > 3 * 4096
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "bytes"), (_overwrite_4k, "sha256"), (_delete_metadata, "state/_METADATA is missing"),
    (_delete_state, "is missing"),
])
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, cache_dir, capsys, damage,
                                                                  reason):
    workdir = _copy(reference, tmp_path)
    step_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, "8")
    damage(step_dir)
    if damage is _overwrite_4k:  # eval (and generate, through the same restore) fall back too, moving nothing
        result = eval_lib.evaluate_workdir(workdir, write=False)
        assert result["step"] == 6
        assert os.path.isdir(step_dir)
        assert f"checkpoint {os.path.abspath(step_dir)} is unusable" in capsys.readouterr().err
    summary = trainer.train(smoke_run_config(cache_dir, **REF), workdir)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "is unusable" in x]
    assert len(lines) == 1 and os.path.abspath(step_dir) in lines[0] and reason in lines[0], out
    assert "resumed from step 6" in out
    assert summary["step"] == 8
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 9))
    for s in (7, 8):
        assert losses[s] == reference[1][s], (s, losses[s], reference[1][s])  # bit for bit
    assert len(os.listdir(os.path.join(workdir, ckpt_lib.SET_ASIDE_DIR))) == 1
    assert ckpt_lib.check_fingerprint(step_dir) is None  # step 8 saved again, intact


@pytest.mark.slow
def test_restore_step_picks_an_older_step_and_sets_newer_ones_aside(reference, tmp_path, cache_dir):
    workdir = _copy(reference, tmp_path)
    trainer.train(smoke_run_config(cache_dir, **REF), workdir, restore_step=4)
    losses = train_losses(workdir)
    for s in range(5, 9):
        assert losses[s] == reference[1][s], s
    aside = sorted(int(n.split(".")[0]) for n in os.listdir(os.path.join(workdir, ckpt_lib.SET_ASIDE_DIR)))
    assert aside == [6, 8]
    with pytest.raises(config_lib.ConfigError, match="--restore_step 5: no such checkpoint"):
        trainer.train(smoke_run_config(cache_dir, **REF), workdir, restore_step=5)


def test_a_step_without_fingerprint_is_unverified_only_in_a_legacy_run(tmp_path):
    step_dir = tmp_path / "3"
    (step_dir / "state").mkdir(parents=True)
    (step_dir / "state" / "x").write_bytes(b"abc")
    assert ckpt_lib.check_fingerprint(str(step_dir), required=False) is None
    assert "no fingerprint.json" in ckpt_lib.check_fingerprint(str(step_dir), required=True)
    ckpt_lib.write_fingerprint(str(step_dir))
    assert ckpt_lib.check_fingerprint(str(step_dir)) is None
    (step_dir / "state" / "x").write_bytes(b"abd")
    assert "state/x differs" in ckpt_lib.check_fingerprint(str(step_dir))


def _remove_fingerprints(workdir):
    for name in os.listdir(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)):
        path = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, name, ckpt_lib.FINGERPRINT_FILE)
        if os.path.exists(path):
            os.remove(path)


def test_fingerprints_are_required_once_the_run_wrote_one(reference, tmp_path, capsys):
    """The run's first fingerprinted save writes the marker; then deleting every fingerprint.json does not make the
    run restore unverified: each step is named damaged in one line and none is used."""
    workdir = _copy(reference, tmp_path)
    assert json.load(open(os.path.join(workdir, ckpt_lib.FINGERPRINTS_MARKER))) == {"since_step": 2}
    _remove_fingerprints(workdir)
    _overwrite_4k(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR, "8"))
    with pytest.raises(ckpt_lib.CheckpointError, match="no usable checkpoint"):
        eval_lib.evaluate_workdir(workdir, write=False)
    lines = [x for x in capsys.readouterr().err.splitlines() if "is unusable" in x]
    assert len(lines) == 4 and all("no fingerprint.json" in x for x in lines), lines


def test_a_run_without_fingerprints_restores_unverified_with_one_warning(reference, tmp_path, capsys):
    """A run from before fingerprints (none, and no marker) restores as before, but says so in one line."""
    workdir = _copy(reference, tmp_path)
    os.remove(os.path.join(workdir, ckpt_lib.FINGERPRINTS_MARKER))
    _remove_fingerprints(workdir)
    assert eval_lib.evaluate_workdir(workdir, write=False)["step"] == 8
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "unverified" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint ") and "/8 has no fingerprint.json" in lines[0]


def test_steps_saved_before_the_marker_stay_usable_unverified(reference, tmp_path, capsys):
    """A legacy run resumed with fingerprints: its older steps (below the marker's step) restore unverified."""
    workdir = _copy(reference, tmp_path)
    _remove_fingerprints(workdir)
    with open(os.path.join(workdir, ckpt_lib.FINGERPRINTS_MARKER), "w") as f:
        json.dump({"since_step": 8}, f)
    with pytest.raises(ckpt_lib.CheckpointError, match="no fingerprint.json"):
        eval_lib.evaluate_workdir(workdir, step=8, write=False)
    assert eval_lib.evaluate_workdir(workdir, write=False)["step"] == 6
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if "/8 is unusable: no fingerprint.json" in x]) == 1
    assert len([x for x in err.splitlines() if "/6 has no fingerprint.json" in x]) == 1


# ---------------------------------------------------------------------------------------------------------------
# Resume checks the config


def test_changed_d_model_is_refused_and_the_run_still_evaluates(reference, cache_dir):
    workdir = reference[0]
    before = open(os.path.join(workdir, ckpt_lib.CONFIG_FILE)).read()
    c = run_config(smoke_config(cache_dir, **REF), **{"model.d_model": 128})
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.d_model: 64 -> 128"):
        trainer.train(c, workdir)
    assert open(os.path.join(workdir, ckpt_lib.CONFIG_FILE)).read() == before
    assert eval_lib.evaluate_workdir(workdir, write=False)["step"] == 8


@pytest.mark.slow
def test_learning_rate_change_needs_the_flag(reference, tmp_path, cache_dir, capsys):
    workdir = _copy(reference, tmp_path)
    c = run_config(smoke_config(cache_dir, **dict(REF, steps=9)), **{"optim.muon_lr": 0.02})
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.muon_lr: 0\.03 -> 0\.02.*"
                                                     r"--allow_config_change=optim\.muon_lr"):
        trainer.train(c, workdir)
    summary = trainer.train(c, workdir, allow_config_change=["optim.muon_lr"])
    assert summary["step"] == 9
    out = capsys.readouterr().out
    assert "config.optim.muon_lr: 0.03 -> 0.02" in out and "config.train.steps: 8 -> 9" in out
    history = [json.loads(x) for x in open(os.path.join(workdir, ckpt_lib.CONFIG_HISTORY_FILE))]
    assert [(h["start_step"], h["config"]["optim"]["muon_lr"]) for h in history] == [(0, 0.03), (8, 0.02)]
    assert ckpt_lib.load_config(workdir).optim.muon_lr == 0.02


def test_safe_changes_pass_and_are_listed():
    old = load_config_file(SMOKE)
    new = load_config_file(SMOKE)
    new.train.steps, new.train.log_every, new.train.progress_bar = 100, 3, False
    lines = workdir_lib.check_resume_config(old, new, log=lambda _: None)
    assert lines == ["config.train.log_every: 10 -> 3", "config.train.progress_bar: True -> False",
                     "config.train.steps: 60 -> 100"]
    new.optim.ns_stack = "layers"  # how Newton-Schulz chains are batched: safe; their dtype is not
    lines = workdir_lib.check_resume_config(old, new, log=lambda _: None)
    assert lines[0] == "config.optim.ns_stack: 'auto' -> 'layers'"
    new.optim.ns_dtype = "bfloat16"
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.ns_dtype: 'auto' -> 'bfloat16'.*"
                       r"--allow_config_change=optim\.ns_dtype"):
        workdir_lib.check_resume_config(old, new)
    new.optim.ns_dtype = "auto"
    new.data.shuffle_seed = 5
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.shuffle_seed: 0 -> 5"):
        workdir_lib.check_resume_config(old, new)
    assert workdir_lib.check_resume_config(old, new, allow=["data"], log=lambda _: None)[0].startswith("config.data")


# ---------------------------------------------------------------------------------------------------------------
# Failed saves, bad input, read-only run directories


@pytest.mark.slow
def test_failed_async_save_is_reported_at_the_next_step(tmp_path, cache_dir, monkeypatch):
    """A save whose background write fails (disk full) is reported by the next step's poll, naming the step."""
    failing = {"step": None}
    real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished

    def save(self, step, *a, **kw):
        out = real_save(self, step, *a, **kw)
        if step == 4:
            real_wait(self)
            failing["step"] = step
        return out

    def wait(self):
        if failing["step"] is not None:
            failing["step"] = None
            raise OSError(28, "No space left on device")
        real_wait(self)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    monkeypatch.setattr(ocp.CheckpointManager, "is_saving_in_progress", lambda self: False)
    workdir = str(tmp_path / "full")
    c = smoke_run_config(cache_dir, steps=8, checkpoint_every=2, eval_every=100, log_every=1, plots=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"saving step 4 .* failed \(OSError: \[Errno 28\] No space "
                                                       r"left on device; noticed at step 5\).*resume from step 2"):
        trainer.train(c, workdir)
    assert max(train_losses(workdir)) == 4


# The train command with every Python-level file write into step 4's save failing with ENOSPC (orbax writes its
# metadata and the data iterator's JSON through `open`; tensorstore's array writes are C++ and cannot be reached).
_DISK_FULL_AT_STEP_4 = """
import builtins, errno, io, os, runpy, sys
real_open = builtins.open
def full(path, mode="r", *a, **kw):
    if (os.sep + "checkpoints" + os.sep + "4.") in str(path) and ("w" in mode or "a" in mode):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_open(path, mode, *a, **kw)
builtins.open = io.open = full
runpy.run_module("moe_jax.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # a training subprocess
def test_disk_full_during_a_save_is_one_line_without_tracebacks(tmp_path, cache_dir):
    """orbax logs a traceback from each of its background threads (100-300 lines); the command prints the one error
    line, status 1, and orbax's tracebacks go to checkpoint_errors.log. Step 2 stays the newest checkpoint."""
    workdir = str(tmp_path / "full")
    env = dict(os.environ, MOE_JAX_CACHE=cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = ["--config", "configs/smoke.py", "--workdir", workdir, "--config.train.steps=8",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=100", "--config.train.progress_bar=False"]
    r = subprocess.run([sys.executable, "-c", _DISK_FULL_AT_STEP_4, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: saving step 4 ") and "No space left on device" in r.stderr, r.stderr
    assert "resume from step 2" in r.stderr and ckpt_lib.ERRORS_FILE in r.stderr
    assert "Traceback" in open(os.path.join(workdir, ckpt_lib.ERRORS_FILE)).read()
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == 2


def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: os.open is made to fail instead (EACCES)."""
    workdir = str(tmp_path / "ro")
    os.makedirs(workdir)
    real_open = os.open

    def deny(path, *a, **kw):
        if str(path).startswith(workdir):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir .*ro: cannot write there \(Permission denied\)"):
        workdir_lib.lock(workdir)


def test_eval_on_a_read_only_run_prints_and_warns(reference, monkeypatch, capsys):
    real_open = builtins.open

    def deny(path, mode="r", *a, **kw):
        if "eval_step" in str(path) and "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", deny)
    result = eval_lib.evaluate_workdir(reference[0])
    assert result["step"] == 8 and np.isfinite(result["val_loss"])
    err = capsys.readouterr().err
    assert "warning: could not write" in err and "eval_step8.json" in err


def test_nonfinite_config_floats_are_refused():
    for field, value in (("optim.muon_lr", float("inf")), ("optim.adamw_lr", float("nan")),
                         ("model.rope_base", float("inf")), ("moe.capacity_factor", float("nan"))):
        with pytest.raises(config_lib.ConfigError, match=rf"config\.{field}: must be a finite number"):
            run_config("smoke", **{field: value})


def _run(module, args, cache_dir, extra_env=None, **kw):
    env = dict(os.environ, MOE_JAX_CACHE=cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/smoke.py", "--config.model.nope=1"], "--config.model.nope: model has no field 'nope'"),
    (["--config", "configs/smoke.py", "--config.nope.x=1"], "--config.nope.x: the --config file has no field 'nope'"),
    (["--config", "configs/missing.py"], "--config configs/missing.py: no such file"),
    (["--config", "configs/smoke.py", "--config.optim.muon_lr=inf"], "config.optim.muon_lr: must be a finite"),
    (["--config", "configs/smoke.py", "--workdir", "README.md"], "--workdir README.md: is a file"),
    (["--config", "configs/smoke.py", "--workdir="], "--workdir: empty; give a directory"),
    (["--config", "configs/smoke.py", "--allow_config_change=optim.muon_lrr"],
     "--allow_config_change: 'optim.muon_lrr' is not a config field or section; did you mean 'optim.muon_lr'?"),
    (["--config", "configs/smoke.py", "--allow_config_change=optim,trian"], "did you mean 'train'?"),
    # the compiled step needs ~2.3 TB (XLA's memory analysis): refused before step 1, not killed by the OOM killer
    pytest.param(["--config", "configs/smoke.py", "--config.train.batch_size=1048576"],
                 "GiB per device but the host's available memory", marks=pytest.mark.slow),  # compiles the step
])
def test_bad_input_is_one_line_and_status_2(tmp_path, cache_dir, args, needle):
    if not any(a.startswith("--workdir") for a in args):
        args = args + ["--workdir", str(tmp_path / "w")]
    p = _run("moe_jax.train", args, cache_dir)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and needle in err, err


def test_invalid_config_json_resumes_from_the_history_else_one_line(reference, tmp_path, cache_dir, capsys):
    """config.json truncated: train resumes with the last config of config_history.jsonl and one warning; with no
    usable history, train refuses (ConfigError: exit 2 through cli.run) and eval exits 2 in one line."""
    workdir = _copy(reference, tmp_path)
    path = os.path.join(workdir, ckpt_lib.CONFIG_FILE)
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])
    summary = trainer.train(smoke_run_config(cache_dir, **dict(REF, steps=9)), workdir)
    assert summary["step"] == 9
    warnings = [x for x in capsys.readouterr().err.splitlines() if "not valid JSON" in x]
    assert len(warnings) == 1 and "config_history.jsonl" in warnings[0]
    assert ckpt_lib.load_config(workdir).train.steps == 9  # rewritten on resume
    open(path, "w").write(text[:len(text) // 2])
    os.remove(os.path.join(workdir, ckpt_lib.CONFIG_HISTORY_FILE))
    with pytest.raises(config_lib.ConfigError, match="config.json is not valid JSON"):
        trainer.train(smoke_run_config(cache_dir, **dict(REF, steps=10)), workdir)
    p = _run("moe_jax.eval", ["--workdir", workdir], cache_dir)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error: ") and "config.json is not valid JSON" in err, err


def test_eval_negative_batches_is_one_line_and_status_2(tmp_path, cache_dir):
    p = _run("moe_jax.eval", ["--workdir", str(tmp_path), "--eval_batches", "-3"], cache_dir)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err.strip().startswith("error: --eval_batches: must be >= 0"), err


# ---------------------------------------------------------------------------------------------------------------
# One writer per workdir; a signal exits with status 3; kill -9 in a loop resumes exactly


def test_memory_check_refuses_a_step_over_the_limit_in_one_line(tmp_path, cache_dir, monkeypatch):
    """The compiled memory (arguments + outputs - aliased + temporaries) against a faked device limit."""
    from moe_jax.train import step as step_lib
    limits = []
    monkeypatch.setattr(step_lib, "device_memory_limit", lambda device: (limits[-1], "the test's limit"))
    run = smoke_run_config(cache_dir, steps=1)
    memory = {"argument_size_in_bytes": 3 << 20, "output_size_in_bytes": 2 << 20, "alias_size_in_bytes": 2 << 20,
              "temp_size_in_bytes": 5 << 20, "generated_code_size_in_bytes": 1}
    assert step_lib.memory_needed(memory) == 8 << 20
    limits.append(8 << 20)
    step_lib.check_memory(memory, jax.devices()[0])  # exactly fits
    limits.append((8 << 20) - 1)
    with pytest.raises(config_lib.ConfigError) as e:
        step_lib.check_memory(memory, jax.devices()[0])
    message = str(e.value)
    assert message.splitlines() == [message] and "needs 8.0 MiB per device but the test's limit is 8.0 MiB" in message
    assert "config.train.batch_size" in message and "config.model.remat=True" in message
    limits.append(1 << 20)  # the trainer checks its real compiled step before touching the state
    with pytest.raises(config_lib.ConfigError, match="compiled train step needs .* but the test's limit is 1.0 MiB:"):
        trainer.train(run, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / ckpt_lib.CONFIG_FILE)  # refused before anything was written


def test_host_memory_limit_is_the_available_memory():
    from moe_jax.train import step as step_lib
    limit, what = step_lib.device_memory_limit(jax.local_devices()[0])
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < limit * jax.local_device_count() <= total and "available memory" in what


def _run_until(args, cache_dir, line_start, extra_env=None):
    """Start `python -m moe_jax.train args`; return (process, stdout lines read) once a line starts with line_start."""
    p = _run("moe_jax.train", args, cache_dir, extra_env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(line_start):
            return p, lines
    raise AssertionError(f"no line {line_start!r}: " + "".join(lines) + p.communicate()[1][-2000:])


def _signal_and_wait(p, signum, timeout):
    """Send `signum` to the training subprocess and collect (stdout, stderr); kill it if it outlives `timeout`."""
    try:
        p.send_signal(signum)
        return p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()


def test_sigterm_while_compiling_exits_3_in_one_line(tmp_path, cache_dir):
    """Compiling is the long phase a preemption hits on real hardware: status 3 (resubmit), one line, at once."""
    workdir = str(tmp_path / "w")
    args = ["--config", "configs/smoke.py", "--workdir", workdir, "--config.train.progress_bar=False"]
    # without the persistent compilation cache the tests share, so the compile takes its real time
    p, lines = _run_until(args, cache_dir, "compiling the train step ...", {"JAX_ENABLE_COMPILATION_CACHE": "false"})
    out, err = _signal_and_wait(p, signal.SIGTERM, timeout=60)
    assert p.returncode == trainer.EXIT_PREEMPTED == 3, err
    assert err.strip().splitlines()[-1] == (
        "interrupted by SIGTERM while compiling the train step: nothing was being saved (the newest checkpoint, if "
        "any, is intact); exit status 3: run the same command to resume"), err
    assert "interrupted" not in out and not os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow  # a training subprocess with ~3 s steps
def test_sigint_during_a_long_step_is_acknowledged_before_it_ends(tmp_path, cache_dir):
    workdir = str(tmp_path / "w")
    args = ["--config", "configs/smoke.py", "--workdir", workdir, "--config.train.progress_bar=False",
            "--config.train.log_every=1", "--config.train.batch_size=64", "--config.train.seq_len=256",
            "--config.train.steps=1000", "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000"]
    p, lines = _run_until(args, cache_dir, "step 2:")
    out, err = _signal_and_wait(p, signal.SIGINT, timeout=300)
    assert p.returncode == 3, err
    out = out.splitlines()
    ack = [i for i, x in enumerate(out) if x.startswith("stop requested (SIGINT): saving after step ")]
    assert len(ack) == 1, out
    n = int(out[ack[0]].split("saving after step ")[1].split(",")[0])
    logged = [i for i, x in enumerate(out) if x.startswith(f"step {n}:")]
    assert logged and ack[0] < logged[0], out  # acknowledged while step n was still running
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == n


def _wait_for_steps(p, workdir, n, timeout=300):
    deadline = time.time() + timeout
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path) and len([r for r in metrics_lib.read(workdir) if r["kind"] == "train"]) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"no {n} steps: " + ("" if p.poll() is None else p.communicate()[1][-2000:]))


@pytest.mark.slow  # two training subprocesses
def test_second_trainer_fails_fast_and_sigterm_exits_3(tmp_path, cache_dir):
    workdir = str(tmp_path / "locked")
    args = ["--config", "configs/smoke.py", "--workdir", workdir, "--config.train.steps=100000",
            "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000",
            "--config.train.log_every=1", "--config.train.progress_bar=False"]
    first = _run("moe_jax.train", args, cache_dir)
    try:
        _wait_for_steps(first, workdir, 2)
        second = _run("moe_jax.train", args, cache_dir)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "another trainer" in err and f"pid {first.pid}" in err, err
        assert first.poll() is None
        n = len(metrics_lib.read(workdir))
        _wait_for_steps(first, workdir, n + 1)  # the first goes on undisturbed
        steps = [r["step"] for r in metrics_lib.read(workdir) if r["kind"] == "train"]
        assert steps == list(range(1, len(steps) + 1))  # every step once: the second wrote nothing
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == trainer.EXIT_PREEMPTED == 3, err
    assert "stop requested (signal SIGTERM)" in out
    assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() is not None


@pytest.mark.slow  # three training subprocesses and a reference run
def test_kill_9_in_a_loop_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    cfg = dict(steps=10, checkpoint_every=1, eval_every=10, log_every=1, keep_checkpoints=3, plots=False)
    reference = str(tmp_path / "uninterrupted")
    trainer.train(smoke_run_config(cache_dir, **cfg), reference)
    workdir = str(tmp_path / "killed")
    args = ["--config", "configs/smoke.py", "--workdir", workdir] + [f"--config.train.{k}={v}" for k, v in cfg.items()]
    args.append("--config.train.progress_bar=False")
    done = 0
    for target in (2, 5):  # each life is killed (SIGKILL, mid-save: a save every step) after a few more steps
        p = _run("moe_jax.train", args, cache_dir)
        _wait_for_steps(p, workdir, target)
        time.sleep(0.1 * target)
        p.kill()
        p.wait()
        done = max(train_losses(workdir))
    assert done < 10
    p = _run("moe_jax.train", args, cache_dir)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    a, b = train_losses(reference), train_losses(workdir)
    assert sorted(b) == list(range(1, 11))
    for s in a:
        assert a[s] == b[s], (s, a[s], b[s])  # bit for bit


# ---------------------------------------------------------------------------------------------------------------
# top_k = 1: the router keeps its gradient from the language-model loss


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_lm_loss_gradient(top_k):
    c = run_config("smoke", moe=dict(top_k=top_k, renormalize=True, load_balance_weight=0.0, z_loss_weight=0.0))
    graphdef, params = model_lib.init_params(c.model, c.seed)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, c.model.vocab_size)

    def lm_loss(p):
        logits, _, _ = model_lib.apply(graphdef, p, tokens[:, :-1])
        loss, _, weight = model_lib.cross_entropy(logits, tokens[:, 1:])
        return loss / weight

    grads = jax.grad(lm_loss)(params)
    router = [np.asarray(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
              if "w_router" in jax.tree_util.keystr(path)]
    assert len(router) == 2  # both layers are MoE
    for g in router:
        assert np.abs(g).max() > 1e-6, top_k
    if top_k == 1:  # the gate is the raw top-1 probability (Switch), not p/p = 1
        logits = jax.random.normal(jax.random.key(1), (1, 8, 4))
        _, _, info = moe_lib.route(logits, 1, 8, renormalize=True)
        np.testing.assert_allclose(info["gates"][..., 0], jax.nn.softmax(logits).max(-1), rtol=1e-6)
