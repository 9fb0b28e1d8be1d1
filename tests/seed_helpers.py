"""Helpers common to the seed-fidelity tests (tests/test_seed_fidelity.py: forward functions;
tests/test_seed_training.py: training steps): a configs/seeds/*.py config shrunk to a fixture's shape, and the
seeds' named PyTorch weights as moe_jax's parameter dict (`to_params`) and back (`seed_layout`)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from moe_jax.cli import load_config_file
from moe_jax.config import schema as config_lib
from smoke_helpers import run_config

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The seeds' parameter names: (embedding, block prefix, attention out projection, norm weight suffix, FFN module,
# first/second FFN Linear, router Linear, final norm).
SEED_NAMES = {
    "seed002": dict(embed="token_embedding.weight", block="transformer_blocks", out="w_o", norm="{}.weight",
                    ffn="feed_forward", lin1="linear1", lin2="linear2", router="router.gate", final="norm.weight"),
    "exp5": dict(embed="token_embedding.weight", block="blocks", out="output_proj", norm="{}.weight",
                 ffn="moe", lin1="w1", lin2="w2", router="router", final="norm.weight"),
    "seed004": dict(embed="token_embedding.embedding.weight", block="transformer_blocks", out="w_o",
                    norm="{}.norm.weight", ffn="feed_forward", lin1="linear1", lin2="linear2", router="router.gate",
                    final="norm.norm.weight"),
}


def seed_config(seed_model: str, shape: dict, seq_len: int, **overrides):
    """configs/seeds/<seed_model>.py shrunk to `shape` (d_model, n_layers, n_heads, d_ff, vocab_size, num_experts,
    top_k) and `seq_len`, float32, parsed; every numerics option left as the config sets it, except
    'section.field'=value `overrides`."""
    c = load_config_file(ROOT / "configs" / "seeds" / f"{seed_model}.py")
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size = (shape["d_model"], shape["n_layers"], shape["n_heads"],
                                                              shape["d_ff"], shape["vocab_size"])
    m.dtype = "float32"
    if c.moe.num_experts:
        c.moe.num_experts, c.moe.top_k, c.moe.d_ff = shape["num_experts"], shape["top_k"], shape["d_ff"]
    c.train.seq_len = seq_len
    return run_config(c, **overrides)


def to_params(weights: dict, seed_model: str, config) -> dict:
    """The seed's named PyTorch weights (`weights['w/<name>']`) as moe_jax's pure parameter dict. torch Linear weights
    are [out, in] (y = x W^T), so every one is transposed; the fused qkv [3M, M] splits into q, k, v with outputs laid
    out (3, H, D); w_o [M, H*D] becomes [H, D, M]; experts stack into [E, ...]; the tied head is the embedding."""
    n = SEED_NAMES[seed_model.split("_")[0]]
    m = config.model
    h, d = m.n_heads, m.d_model // m.n_heads
    w = lambda name: np.asarray(weights[f"w/{name}"], np.float32)  # noqa: E731
    blocks = {}
    for i in range(m.n_layers):
        b = f"{n['block']}.{i}"
        qkv = w(f"{b}.attention.qkv.weight").T.reshape(m.d_model, 3, h, d)
        block = {
            "attn": {"wq": qkv[:, 0], "wk": qkv[:, 1], "wv": qkv[:, 2],
                     "wo": w(f"{b}.attention.{n['out']}.weight").T.reshape(h, d, m.d_model)},
            "attn_norm": {"scale": w(f"{b}.{n['norm'].format('norm1')}")},
            "ffn_norm": {"scale": w(f"{b}.{n['norm'].format('norm2')}")},
        }
        f = f"{b}.{n['ffn']}"
        if config_lib.is_moe_layer(config, i):
            experts = range(config.moe.num_experts)
            block["ffn"] = {"w_router": w(f"{f}.{n['router']}.weight").T,
                            "w_in": np.stack([w(f"{f}.experts.{e}.{n['lin1']}.weight").T for e in experts]),
                            "w_out": np.stack([w(f"{f}.experts.{e}.{n['lin2']}.weight").T for e in experts])}
        else:
            block["ffn"] = {"w_in": w(f"{f}.{n['lin1']}.weight").T, "w_out": w(f"{f}.{n['lin2']}.weight").T}
        blocks[i] = block
    return {"embed": {"embedding": w(n["embed"])}, "blocks": blocks, "final_norm": {"scale": w(n["final"])}}


def seed_layout(tree, shapes: dict, seed_model: str, config) -> dict:
    """The inverse of `to_params`: a moe_jax parameter tree (e.g. an update) as {seed name: array of the seed's
    shape}, for `shapes` = {seed name: shape}. Found by sending each seed tensor's flat positions and its number
    through to_params itself, so the two layouts cannot disagree."""
    names = sorted(shapes)
    positions = to_params({f"w/{k}": np.arange(np.prod(shapes[k])).reshape(shapes[k]) for k in names},
                          seed_model, config)
    owners = to_params({f"w/{k}": np.full(shapes[k], i) for i, k in enumerate(names)}, seed_model, config)
    out = {k: np.full(int(np.prod(shapes[k])), np.nan, np.float32) for k in names}
    for leaf, pos, owner in zip(*(jax.tree_util.tree_leaves(t) for t in (tree, positions, owners))):
        leaf, pos, owner = (np.asarray(a).reshape(-1) for a in (leaf, pos, owner))
        for i in np.unique(owner).astype(int):
            sel = owner == i
            out[names[i]][pos[sel].astype(np.int64)] = leaf[sel]
    assert not any(np.isnan(v).any() for v in out.values()), "a seed position has no moe_jax parameter"
    return {k: v.reshape(shapes[k]) for k, v in out.items()}

