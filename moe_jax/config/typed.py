"""The configuration as frozen typed pieces, built ONCE from a ConfigDict by `parse`.

    run = parse(config_dict, backend=None)   # validate, resolve every 'auto' for the backend, build the pieces
    run.model: ModelConfig (with .moe: MoEConfig)   run.optim: OptimConfig (with .ns: NewtonSchulz)
    run.train: TrainConfig   run.data: DataConfig   run.mesh: MeshConfig   run.seed, run.name
    run.to_dict() / run.config_json()        # what config.json records: the ConfigDict's nested keys, resolved values

The command line (and each library-level entry: the studies runner, eval/generate reading a run's config.json) calls
`parse`; everything below takes the pieces it needs. They are immutable and hashable: a model's GraphDef holds its
ModelConfig, so it can be a static argument of `jax.jit` (model/decode.py), and equal configs give equal GraphDefs.
Field names and meanings are those of schema.base_config() (same names, same sections; `moe` hangs off the model
and `run.moe` is `run.model.moe`); tests/test_model_config.py checks that every schema field lands in a piece. A
ModelConfig is built here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json

from moe_jax.config import resolve as resolve_lib
from moe_jax.config.schema import moe_layer, schedule_length, warmup_steps
from moe_jax.config.validate import validate


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
    load_balance_form: str  # 'switch' | 'prob_squares'
    z_loss_weight: float
    router_noise_std: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`config.model` plus `config.moe` (as `.moe`); dtype and attention resolved for the backend."""
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
    dtype: str  # 'float32' | 'bfloat16' | 'float16'
    remat: bool
    attention: str  # 'blocked' | 'xla' | 'cudnn'
    attention_block: int
    moe: MoEConfig

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether transformer layer `layer` (0-based) uses the MoE feed-forward: i % every == every - 1."""
        return moe_layer(self.moe.num_experts, self.moe.every, layer)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))


@dataclasses.dataclass(frozen=True)
class NewtonSchulz:
    """What Muon's Newton-Schulz runs as (optim.ns_dtype / ns_stack / ns_method, resolved for the backend)."""
    dtype: str  # 'float32' | 'bfloat16': the iterations' matmul operands
    stack: str  # 'layers' (one chain per weight across layers) | 'none' (one per parameter)
    method: str  # 'standard' | 'gram'


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`config.optim`, with the Newton-Schulz settings resolved into `ns` (config.json keeps them as ns_*)."""
    name: str
    muon_lr: float
    adamw_lr: float
    momentum: float
    nesterov: bool
    ns_steps: int
    muon_impl: str
    ns: NewtonSchulz
    ns_rounding: str  # 'operands' | 'every_op'
    ns_eps: float
    muon_fused_qkv: bool
    muon_bias_correction: bool
    momentum_warmup_steps: int
    momentum_warmup_start: float
    muon_scale: str
    muon_weight_decay: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decay_norms: bool
    clip_norm: float
    warmup_fraction: float
    warmup_steps: int
    min_lr_ratio: float
    schedule_steps: int
    warmup_from_zero: bool
    router_muon: bool

    def horizon(self, steps: int) -> int:
        """Optimizer steps the schedule is laid out over, for a run of `steps` (schedule_steps, or the run)."""
        return schedule_length(self.schedule_steps, steps)

    def warmup(self, steps: int) -> int:
        """Warmup length for a run of `steps` optimizer steps (warmup_steps, or warmup_fraction of the schedule's
        horizon)."""
        return warmup_steps(self.warmup_steps, self.warmup_fraction, self.horizon(steps))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`config.train`."""
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    log_every: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoint: bool
    peak_tflops: float
    plots: bool
    progress_bar: bool
    inject_nan_at_step: int
    inject_nan_mode: str
    on_nonfinite: str
    max_skipped_steps: int

    @property
    def rows_per_step(self) -> int:
        """Sequences per optimizer step: batch_size x grad_accum."""
        return self.batch_size * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`."""
    source: str
    tfds_name: str
    tfds_data_dir: str
    text_feature: str
    tfds_val_split: str
    files: str
    tokenizer_path: str
    cache_dir: str
    val_fraction: float
    packing: str
    shuffle_seed: int
    worker_count: int
    max_val_windows: int
    shards: int
    test_fraction: float
    val_window_sampling: str


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: ICI shape (one -1 fills the devices), DCN shape, axis names, FSDP (sharding.py)."""
    shape: tuple
    dcn_shape: tuple
    axes: tuple
    fsdp: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run's configuration. `backend` and `requested` (the values before 'auto' was resolved) describe the
    resolution; they are not part of the config (not compared, not in config.json)."""
    seed: int
    name: str
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    mesh: MeshConfig
    backend: str = dataclasses.field(default="", compare=False)
    requested: tuple = dataclasses.field(default=(), compare=False)

    @property
    def moe(self) -> MoEConfig:
        return self.model.moe

    @property
    def warmup_steps(self) -> int:
        return self.optim.warmup(self.train.steps)

    def replace(self, **sections) -> "RunConfig":
        """A copy with whole pieces or `train=dict(...)`-style field changes of a piece (no re-validation: for
        changes a caller knows to be valid, e.g. a calibration run's length)."""
        new = {k: dataclasses.replace(getattr(self, k), **v) if isinstance(v, dict) else v
               for k, v in sections.items()}
        return dataclasses.replace(self, **new)

    def precision(self) -> dict:
        """resolve.resolve's record of this run's resolution (for resolve.describe)."""
        return {"backend": self.backend, **{k: (req, got) for k, req, got in self.requested}}

    def to_dict(self) -> dict:
        """The ConfigDict's nested layout (seed, name, model, moe, optim, train, data, mesh) with resolved values."""
        model = _fields(self.model)
        moe = model.pop("moe")
        optim = _fields(self.optim)
        ns = optim.pop("ns")
        optim.update(ns_dtype=ns["dtype"], ns_stack=ns["stack"], ns_method=ns["method"])
        return {"seed": self.seed, "name": self.name, "model": model, "moe": moe, "optim": optim,
                "train": _fields(self.train), "data": _fields(self.data), "mesh": _fields(self.mesh)}

    def config_json(self) -> str:
        """config.json's text (sorted keys, tuples as lists)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _fields(piece) -> dict:
    return {f.name: _plain(getattr(piece, f.name)) for f in dataclasses.fields(piece)}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _fields(value)
    return list(_plain(v) for v in value) if isinstance(value, tuple) else value


def _frozen(value):
    """Lists (e.g. from a JSON config) become tuples, so the config stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _piece(cls, section, **given):
    """cls from the same-named fields of a ConfigDict section (those in `given` passed as they are)."""
    return cls(**{f.name: given[f.name] if f.name in given else _frozen(section[f.name])
                  for f in dataclasses.fields(cls)}, )


def parse(config, backend: str | None = None, check_backend: bool = True) -> RunConfig:
    """Validate a ConfigDict (ConfigError naming the first bad field), resolve its 'auto' choices for `backend`
    (default jax.default_backend(); ConfigError for an implementation that cannot run there) and build the typed
    pieces. The one place a ConfigDict becomes a RunConfig; the ConfigDict is not changed. `check_backend=False`
    (a saved run's config.json read on another backend) keeps an implementation this backend cannot run."""
    validate(config)
    info = resolve_lib.resolve(config, backend, check_backend)
    moe = _piece(MoEConfig, config.moe)
    model = _piece(ModelConfig, config.model, moe=moe, dtype=info["model.dtype"][1],
                   attention=info["model.attention"][1])
    ns = NewtonSchulz(dtype=info["ns_dtype"][1], stack=info["ns_stack"][1], method=info["ns_method"][1])
    mesh = config.mesh
    return RunConfig(
        seed=int(config.seed), name=str(config.name), model=model, optim=_piece(OptimConfig, config.optim, ns=ns),
        train=_piece(TrainConfig, config.train), data=_piece(DataConfig, config.data),
        mesh=MeshConfig(shape=_frozen(mesh.shape), dcn_shape=_frozen(mesh.get("dcn_shape", (1, 1, 1))),
                        axes=_frozen(mesh.axes), fsdp=bool(mesh.get("fsdp", False))),
        backend=info["backend"], requested=tuple((k, v[0], v[1]) for k, v in info.items() if k != "backend"))
