"""The model's typed, frozen configuration: the `model` and `moe` sections of a ConfigDict, read once.

The nnx modules (layers.py, moe.py, model.py) receive a `ModelConfig`, never the ConfigDict: it is immutable and
hashable, so a model's GraphDef is hashable too and can be a static argument of `jax.jit` (decode.py), and two
equal configs give equal GraphDefs. Fields and their meaning are those of config_lib.base_config() (`model.*` and
`moe.*`, same names); `ModelConfig.from_config` reads every one of them, so a field added to the schema must be
added here too (tests/test_model_config.py checks the two agree).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """`config.moe`: the sparse feed-forward (num_experts == 0: a dense model)."""
    num_experts: int
    top_k: int
    every: int
    d_ff: int
    dispatch: str  # 'capacity' | 'dropless'
    grouped_matmul: str  # dropless: 'ragged_dot' | 'megablox'
    capacity_factor: float
    eval_capacity_factor: float
    min_capacity: int
    group_size: int
    renormalize: bool
    load_balance_weight: float
    z_loss_weight: float
    router_noise_std: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`config.model` plus `config.moe` (as `.moe`)."""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    mlp: str
    dropout: float
    tie_embeddings: bool
    embed_scale: bool
    rope_base: float
    rope_layout: str
    norm_eps: float
    init_std: float
    dtype: str
    remat: bool
    attention: str
    attention_block: int
    moe: MoEConfig

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        """Read `config.model` and `config.moe` of a (validated) ConfigDict. A ModelConfig is returned as is."""
        if isinstance(config, cls):
            return config
        moe = MoEConfig(**{f.name: _frozen(config.moe[f.name]) for f in dataclasses.fields(MoEConfig)})
        model = {f.name: _frozen(config.model[f.name]) for f in dataclasses.fields(cls) if f.name != "moe"}
        return cls(moe=moe, **model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether transformer layer `layer` (0-based) uses the MoE feed-forward: i % every == every - 1."""
        return self.moe.num_experts > 0 and layer % self.moe.every == self.moe.every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))


def _frozen(value):
    """Lists (e.g. from a JSON config) become tuples, so the config stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value
