"""config/runs.py: the one comparison of a run's saved config.json with a new RunConfig. Resuming (check_resume): a
safe change passes and is reported, a structural one is refused whatever is allowed, any other change needs
--allow_config_change (a field or its section); re-running a study (check_rerun): only RERUN_IGNORED may change.
The messages are the ones the trainer and the studies runner print."""

import json

import pytest

from moe_jax.config import runs
from moe_jax.config.schema import ConfigError
from smoke_helpers import run_config


def saved(**overrides) -> dict:
    """config.json of a smoke run (resolved for CPU, as a run on this machine writes it)."""
    return json.loads(run_config("smoke", backend="cpu", **overrides).config_json())


def new(**overrides):
    return run_config("smoke", backend="cpu", **overrides)


def test_field_lists_name_real_fields_and_do_not_overlap():
    fields = set(runs.comparable(new()))
    for name in runs.SAFE_FIELDS + runs.STRUCTURAL_FIELDS + runs.RERUN_IGNORED:
        assert name in fields, name
    assert not set(runs.SAFE_FIELDS) & set(runs.STRUCTURAL_FIELDS)
    assert set(runs.RERUN_IGNORED) <= set(runs.SAFE_FIELDS)  # what a re-run ignores, a resume accepts


def test_same_config_is_no_change():
    logged = []
    assert runs.check_resume(saved(), new(), log=logged.append) == [] and logged == []
    runs.check_rerun(saved(), new(), "runs/x/seed0")
    assert runs.changes(saved(), new()) == []


def test_safe_changes_pass_and_are_reported():
    logged = []
    lines = runs.check_resume(saved(), new(**{"train.steps": 100, "train.log_every": 3, "train.progress_bar": False,
                                              "optim.ns_stack": "layers"}), log=logged.append)
    assert lines == ["config.optim.ns_stack: 'none' -> 'layers'", "config.train.log_every: 10 -> 3",
                     "config.train.progress_bar: True -> False", "config.train.steps: 60 -> 100"]
    assert logged == ["resuming with config changes: " + "; ".join(lines)]


def test_structural_change_is_refused_even_when_allowed():
    for allow in ((), ("model",), ("model.d_model",)):
        with pytest.raises(ConfigError) as err:
            runs.check_resume(saved(), new(**{"model.d_model": 128}), allow=allow, log=pytest.fail)
        assert str(err.value) == ("resuming with a changed model: config.model.d_model: 64 -> 128 changes the shapes "
                                  "of the saved state; undo the change or start a new --workdir")
    with pytest.raises(ConfigError, match=r"^resuming with a changed model: config\.moe\.num_experts: 4 -> 0; "
                                          r"config\.optim\.name: 'muon' -> 'adamw' changes the shapes"):
        runs.check_resume(saved(), new(**{"moe.num_experts": 0, "optim.name": "adamw"}))


def test_other_changes_need_the_flag_by_field_or_section():
    changed = new(**{"optim.muon_lr": 0.02, "train.steps": 61})
    with pytest.raises(ConfigError) as err:
        runs.check_resume(saved(), changed, log=pytest.fail)
    assert str(err.value) == (
        "resuming with a changed config: config.optim.muon_lr: 0.03 -> 0.02 changes the data stream or the meaning "
        "of the saved state; undo it, start a new --workdir, or allow it deliberately with "
        "--allow_config_change=optim.muon_lr")
    want = ["config.optim.muon_lr: 0.03 -> 0.02", "config.train.steps: 60 -> 61"]
    for allow in (["optim.muon_lr"], ["optim"]):
        logged = []
        assert runs.check_resume(saved(), changed, allow=allow, log=logged.append) == want
        assert logged == ["resuming with config changes: " + "; ".join(want)]
    assert not runs.allowed("optim.muon_lr", ["optim.muon"])  # a prefix of a name is not its section
    with pytest.raises(ConfigError, match=r"config\.data\.shuffle_seed: 0 -> 5; config\.optim\.muon_lr: 0\.03 -> "
                                          r"0\.02 .*--allow_config_change=data\.shuffle_seed,optim\.muon_lr$"):
        runs.check_resume(saved(), new(**{"optim.muon_lr": 0.02, "data.shuffle_seed": 5}))


def test_a_field_missing_from_an_older_config_json_shows_as_absent():
    old = saved()
    del old["optim"]["muon_weight_decay"]
    with pytest.raises(ConfigError, match=r"config\.optim\.muon_weight_decay: '<absent>' -> 0\.0 "):
        runs.check_resume(old, new())


def test_rerun_ignores_presentation_only_and_refuses_the_rest():
    runs.check_rerun(saved(), new(**{"train.progress_bar": False, "train.plots": False, "train.peak_tflops": 1.0,
                                     "data.cache_dir": "/elsewhere", "data.worker_count": 2}), "runs/x/seed0")
    with pytest.raises(ConfigError) as err:
        runs.check_rerun(saved(), new(**{"optim.adamw_lr": 5e-3}), "runs/x/seed0")
    assert str(err.value) == ("runs/x/seed0 was started with a different config (optim.adamw_lr: 0.01 -> 0.005); "
                              "use a new --workdir or delete that run")
    many = new(**{"train.steps": 61, "train.log_every": 1, "train.eval_every": 7, "seed": 3, "optim.b1": 0.8,
                  "optim.b2": 0.9, "optim.eps": 1e-7})  # even safe resume changes: a study run is one experiment
    with pytest.raises(ConfigError, match=r"\(optim\.b1: 0\.9 -> 0\.8, optim\.b2: 0\.95 -> 0\.9, optim\.eps: 1e-08 -> "
                                          r"1e-07, seed: 0 -> 3, train\.eval_every: 30 -> 7, train\.log_every: 10 -> "
                                          r"1, \.\.\.\); use a new --workdir"):
        runs.check_rerun(saved(), many, "runs/x/seed0")
