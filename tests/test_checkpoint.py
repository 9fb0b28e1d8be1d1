"""Tests for moe_jax/train/checkpoint.py's run files (save/restore itself is exercised end to end in test_trainer.py)."""

import json

import ml_collections
import pytest

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.config import schema as config_lib
from moe_jax.config.typed import parse


def test_config_round_trips_through_the_workdir(tmp_path):
    config = config_lib.base_config()
    config.mesh.shape = (2, -1, 1)
    run = parse(config)
    ckpt_lib.write_run_files(str(tmp_path), run, None)
    loaded = ckpt_lib.load_config(str(tmp_path))
    assert json.loads(loaded.to_json()) == run.to_dict()  # config.json: resolved values in the ConfigDict's layout
    assert isinstance(loaded.mesh.shape, tuple)
    assert ckpt_lib.load_run(str(tmp_path)) == run  # parses (validates) back into the same RunConfig


def test_a_run_written_before_a_field_existed_gets_its_default(tmp_path):
    """config.json of an older run lacks fields added since (here model.attention*): they take base defaults, the
    saved values are kept, and fields unknown to the schema survive."""
    saved = config_lib.base_config().to_dict()
    del saved["model"]["attention"], saved["model"]["attention_block"]
    saved["model"]["d_model"] = 128
    saved["legacy"] = {"note": "kept"}
    (tmp_path / ckpt_lib.CONFIG_FILE).write_text(json.dumps(saved))
    loaded = ckpt_lib.load_config(str(tmp_path))
    defaults = config_lib.base_config()
    assert loaded.model.attention == defaults.model.attention
    assert loaded.model.attention_block == defaults.model.attention_block
    assert loaded.model.d_model == 128
    assert loaded.legacy.note == "kept"
    assert isinstance(loaded, ml_collections.ConfigDict)


def test_missing_config_names_the_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="moe_jax.train"):
        ckpt_lib.load_config(str(tmp_path / "nowhere"))


def _write_run(tmp_path, config_text, history_lines):
    (tmp_path / ckpt_lib.CONFIG_FILE).write_text(config_text)
    (tmp_path / ckpt_lib.CONFIG_HISTORY_FILE).write_text("".join(x + "\n" for x in history_lines))


def test_invalid_config_json_falls_back_to_the_history_with_one_warning(tmp_path):
    first, last = config_lib.base_config(), config_lib.base_config()
    first.model.d_model, last.model.d_model = 96, 128
    history = [json.dumps({"start_step": s, "config": c.to_dict()}) for s, c in ((0, first), (40, last))]
    _write_run(tmp_path, last.to_json()[:200], history)  # truncated: not valid JSON
    warnings = []
    loaded = ckpt_lib.load_config(str(tmp_path), warn=warnings.append)
    assert loaded.model.d_model == 128  # the last start's config
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "config.json is not valid JSON" in \
        warnings[0] and "start at step 40" in warnings[0]


@pytest.mark.parametrize("history", [[], ["{not json"], ['{"start_step": 0}']])
def test_invalid_config_json_without_a_usable_history_is_one_config_error(tmp_path, history):
    _write_run(tmp_path, "{\"model\": ", history)
    with pytest.raises(config_lib.ConfigError) as e:
        ckpt_lib.load_config(str(tmp_path), warn=pytest.fail)
    message = str(e.value)
    assert "\n" not in message and "config.json is not valid JSON" in message and "restore config.json" in message


def test_a_json_array_as_config_is_invalid_too(tmp_path):
    _write_run(tmp_path, "[1, 2]", [])
    with pytest.raises(config_lib.ConfigError, match="not an object"):
        ckpt_lib.load_config(str(tmp_path))


def _state_on(run, mesh, fsdp: bool):
    """(abstract state with shardings, fresh state in it) of `run` on `mesh`, parameters FSDP or replicated."""
    import jax
    from moe_jax.model import transformer as model
    from moe_jax.optim import chain
    from moe_jax.train import step as step_lib
    tx = chain.build(run.optim, run.train.steps, distributed_muon=fsdp)
    abstract = step_lib.abstract_train_state(model.abstract(run.model)[1], tx, mesh, fsdp)
    state = step_lib.init_sharded_state(run.model, run.seed, tx, jax.tree.map(lambda s: s.sharding, abstract))
    return abstract, state


def test_checkpoint_restores_across_fsdp_and_device_counts(tmp_path):
    """A train state saved with FSDP on 8 devices restores into one device's replicated layout and back, value for
    value (orbax reads each array into the target's sharding): config.mesh.fsdp is a layout, not a format."""
    import jax
    import numpy as np
    from moe_jax import sharding
    from smoke_helpers import run_config
    run = run_config("smoke", **{"mesh.shape": (4, 2, 1), "mesh.fsdp": True})
    eight = sharding.build_mesh(run.mesh)
    one = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    abstract8, state8 = _state_on(run, eight, True)
    state8["opt_state"] = jax.tree.map(lambda x: x + 0.5 if np.issubdtype(x.dtype, np.floating) else x,
                                       state8["opt_state"])  # non-zero moments
    saver = ckpt_lib.Checkpointer(str(tmp_path / "a"), async_save=False)
    saver.save(1, state8)
    abstract1, _ = _state_on(run, one, False)
    restored1, _, step = ckpt_lib.restore_verified(saver, abstract1, log=lambda m: None)
    assert step == 1
    for a, b, target in zip(jax.tree.leaves(state8), jax.tree.leaves(restored1), jax.tree.leaves(abstract1)):
        assert b.sharding == target.sharding and len(b.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(jax.device_get(b)), np.asarray(jax.device_get(a)))
    back = ckpt_lib.Checkpointer(str(tmp_path / "b"), async_save=False)
    back.save(2, restored1)
    restored8, _, _ = ckpt_lib.restore_verified(back, abstract8, log=lambda m: None)
    w_in = restored8["params"]["blocks"][0]["ffn"]["w_in"]
    assert w_in.sharding.spec == jax.sharding.PartitionSpec("expert", "data", "model")  # model axis: size 1
    assert w_in.addressable_shards[0].data.size * 8 == w_in.size
    for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(restored8)):
        assert b.sharding == a.sharding
        np.testing.assert_array_equal(np.asarray(jax.device_get(b)), np.asarray(jax.device_get(a)))
