"""configs/gpu_dense.py and configs/gpu_moe.py: valid, near 125 M active parameters, FLOP-equal, cuDNN-ready."""

import jax.numpy as jnp
import ml_collections
import pytest

from configs import gpu_dense, gpu_moe
from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from moe_jax.config import resolve
from moe_jax.config.typed import parse
from moe_jax.model import layers


@pytest.fixture(scope="module")
def configs():
    return config_lib.validate(gpu_dense.get_config()), config_lib.validate(gpu_moe.get_config())


def test_shapes_are_the_issue_s(configs):
    dense, moe = configs
    for c in configs:
        m = c.model
        assert (m.d_model, m.n_layers, m.n_heads, c.train.seq_len, m.vocab_size) == (768, 12, 12, 1024, 49152)
        assert m.dtype == "bfloat16" and m.attention == "auto"
    assert dense.moe.num_experts == 0
    assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.every) == (8, 2, 1)
    assert moe.moe.top_k * moe.moe.d_ff == dense.model.d_ff  # the dense model's active FFN
    assert (dense.train.batch_size, dense.train.grad_accum) == (moe.train.batch_size, moe.train.grad_accum) == (32, 1)


def test_near_125m_active_parameters_and_flop_equal(configs):
    dense, moe = configs
    dense, moe = parse(dense, "gpu"), parse(moe, "gpu")
    pd, pm = flops.param_counts(dense.model), flops.param_counts(moe.model)
    assert abs(pd["active"] - 125e6) / 125e6 < 0.03
    assert pm["active"] - pd["active"] == pm["router"] == 12 * 768 * 8
    assert pm["total"] > 2 * pd["total"]
    fd, fm = flops.run_flops_per_token(dense)["training"], flops.run_flops_per_token(moe)["training"]
    assert 1.0 <= fm / fd < 1.001


def test_auto_resolves_to_cudnn_bfloat16_on_gpu_with_a_head_size_cudnn_takes(configs):
    for c in configs:
        run = parse(c, "gpu")
        assert (run.model.dtype, run.model.attention) == ("bfloat16", "cudnn")
        q = jnp.zeros((1, 8, run.model.n_heads, run.model.head_dim), jnp.bfloat16)
        assert layers.cudnn_fallback_reason(q) is None
        saved = ml_collections.ConfigDict(run.to_dict())  # its config.json: 'cudnn' is explicit there
        with pytest.raises(config_lib.ConfigError, match="model.attention"):
            parse(saved, "cpu")  # refused on CPU, naming the fix
    assert resolve.resolve(configs[0], "cpu")["model.attention"] == ("auto", "blocked")
