"""Tests for moe_jax/checkpoint.py's run files (save/restore itself is exercised end to end in test_trainer.py)."""

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
