"""The configuration schema: defaults, derived values and validation.

Every config file in `configs/` starts from `base_config()` and overrides fields. `validate(config)` runs before
anything heavy (data preparation, compilation) and raises `ConfigError` naming the field and the fix.

Sections:
  model  - transformer shape and numerics (vocab_size is the tokenizer's size).
  moe    - the sparse feed-forward: experts, routing, capacity, auxiliary losses. `num_experts == 0` means dense.
  optim  - Muon + AdamW (or plain AdamW), schedules, clipping.
  train  - steps (optimizer steps, not micro-batches), batch (global micro-batch), accumulation, cadence.
  data   - source, tokenizer, packing.
  mesh   - device mesh shape over axes ('data', 'expert', 'model'); one -1 fills the remaining devices.
"""

from __future__ import annotations

import math

import ml_collections

MESH_AXES = ("data", "expert", "model")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: precision.COMPUTE_DTYPE per backend
MLP_TYPES = ("gelu", "gelu_exact", "swiglu", "silu")
ROPE_LAYOUTS = ("halves", "adjacent")
FLOAT32_EPS = 1.1920928955078125e-07  # numpy.finfo(float32).eps: torch.nn.RMSNorm's eps when eps=None (the seeds)
DATA_SOURCES = ("bible", "tfds", "files")
PACKING = ("concat", "segments")
ATTENTION = ("auto", "blocked", "xla", "cudnn")  # auto: precision.ATTENTION per backend
MOE_DISPATCH = ("capacity", "dropless")
GROUPED_MATMULS = ("ragged_dot", "megablox")


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field and how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.name = "moe"

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 8192
    c.model.d_model = 384
    c.model.n_layers = 6
    c.model.n_heads = 8
    c.model.d_ff = 1536
    c.model.mlp = "gelu"  # dense FFN and experts: 'gelu' (tanh approx.) | 'gelu_exact' (erf) | 'silu' | 'swiglu'
    c.model.dropout = 0.1
    c.model.tie_embeddings = True
    c.model.embed_scale = False  # multiply embeddings by sqrt(d_model) (seed 002)
    c.model.rope_base = 10000.0
    c.model.rope_layout = "halves"  # RoPE pairs: 'halves' (i, i + D/2; seed exp5) | 'adjacent' (2i, 2i + 1; seed 002)
    c.model.norm_eps = 1e-6  # RMSNorm eps (the seeds' torch.nn.RMSNorm(eps=None) uses FLOAT32_EPS)
    c.model.init_std = 0.02
    c.model.dtype = "auto"  # compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params always float32
    c.model.remat = False  # rematerialise each block in the backward pass
    c.model.attention = "auto"  # 'auto' (CPU: blocked, GPU: cudnn, TPU: xla), 'blocked' (skips key blocks above
    #   the diagonal), 'xla' (jax.nn.dot_product_attention) or 'cudnn' (cuDNN fused flash attention; GPU only)
    c.model.attention_block = 128  # queries per block for 'blocked' (0: one block)

    c.moe = ml_collections.ConfigDict()
    c.moe.num_experts = 8  # 0: dense model
    c.moe.top_k = 2
    c.moe.every = 1  # layer i is MoE when i % every == every - 1 (every=1: all; every=2: layers 1, 3, 5)
    c.moe.d_ff = 1536  # hidden width of each expert
    c.moe.dispatch = "capacity"  # 'capacity' (einsum dispatch into C slots per expert; drops) | 'dropless' (sorted
    #   assignments, grouped matmuls: moe_jax/dropless.py). Same parameters: switching is a config change.
    c.moe.grouped_matmul = "ragged_dot"  # dropless only: 'ragged_dot' (jax.lax.ragged_dot) | 'megablox' (Pallas TPU)
    c.moe.capacity_factor = 1.25
    c.moe.eval_capacity_factor = 2.0
    c.moe.min_capacity = 4
    c.moe.group_size = 256  # tokens per routing group: dispatch/combine einsums cost 2*k*T*cf*M FLOPs per token each
    c.moe.renormalize = True  # renormalise the k routing weights to sum to 1 (top_k > 1 only: at top_k = 1 the gate
    #   is the raw probability, as in Switch, so the router keeps its gradient from the LM loss)
    c.moe.load_balance_weight = 0.01
    c.moe.z_loss_weight = 0.001
    c.moe.router_noise_std = 0.0  # Gaussian noise on router logits in training (seed 002 used 0.1)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "muon"  # 'muon' (Muon for hidden matrices + AdamW for the rest) | 'adamw' (AdamW for all)
    c.optim.muon_lr = 0.01
    c.optim.adamw_lr = 1e-3
    c.optim.momentum = 0.95
    c.optim.nesterov = True
    c.optim.ns_steps = 5
    c.optim.muon_impl = "batched"  # 'batched' (moe_jax/muon.py: one Newton-Schulz per shape group) | 'optax'
    c.optim.ns_dtype = "auto"  # Newton-Schulz dtype: 'auto' (precision.NS_DTYPE per backend) | 'float32' | 'bfloat16'
    c.optim.ns_stack = "auto"  # 'layers' (one chain per weight across layers) | 'none' (one per parameter) | 'auto'
    c.optim.ns_method = "auto"  # 'gram' (float32 Gram-space NS for wide matrices) | 'standard' | 'auto' (per backend)
    c.optim.muon_scale = "keller"  # 'keller': sqrt(max(1, fan_out/fan_in)); 'moonlight': 0.2*sqrt(max(fan_in, fan_out))
    c.optim.muon_weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0  # 0 disables clipping
    c.optim.warmup_fraction = 0.05  # used when warmup_steps < 0
    c.optim.warmup_steps = -1
    c.optim.min_lr_ratio = 0.1  # cosine decays to this fraction of the peak
    c.optim.router_muon = False  # route the MoE router through Muon instead of AdamW

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20000  # optimizer steps
    c.train.batch_size = 24  # global sequences per micro-batch
    c.train.grad_accum = 4  # micro-batches per optimizer step
    c.train.seq_len = 512
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_batches = 16  # 0: the whole validation set
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.peak_tflops = 0.0  # 0: look up the device in flops.PEAK_TFLOPS (CPU: measured)
    c.train.plots = True
    c.train.progress_bar = True
    c.train.inject_nan_at_step = -1  # test hook: poison this step (numbered from 1; -1: off)
    c.train.inject_nan_mode = "all"  # 'all': the loss and the gradients; 'grads': the gradients only (loss finite);
    #   'grads_from': the gradients of that step and of every later one
    c.train.on_nonfinite = "stop"  # a step whose loss, grad norm or new state is not finite: 'stop' before any save,
    #   or 'skip' its update (the step is counted and logged) and stop after train.max_skipped_steps in a row
    c.train.max_skipped_steps = 10

    c.data = ml_collections.ConfigDict()
    c.data.source = "bible"  # 'bible' (shipped), 'tfds' (any TFDS text dataset), 'files' (local .txt/.jsonl)
    c.data.tfds_name = ""
    c.data.tfds_data_dir = ""
    c.data.text_feature = "text"
    c.data.tfds_val_split = ""  # source='tfds': '' hash-splits 'train' by document; a split name (e.g.
    #   'validation') validates on that whole TFDS split instead (needed when 'train' is one document)
    c.data.files = ""  # glob for source='files'
    c.data.tokenizer_path = ""  # a sentencepiece .model; empty: train one on the training split
    c.data.cache_dir = ""  # empty: $MOE_JAX_CACHE or ~/.cache/moe_jax
    c.data.val_fraction = 0.05
    c.data.packing = "concat"
    c.data.shuffle_seed = 0
    c.data.worker_count = 0
    c.data.max_val_windows = 256
    c.data.shards = 0  # training-data shards (0: one per JAX process). Fixes the global batch's rows whatever the
    #   process count: process p of N reads shards [p * shards / N, (p + 1) * shards / N); see data/pipeline.py
    c.data.test_fraction = 0.0  # > 0: a hash-chosen test split of whole documents (moe_jax/studies reports on it)
    c.data.val_window_sampling = "first"  # 'first' max_val_windows windows, or 'even': spread evenly over the split

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)
    c.mesh.dcn_shape = (1, 1, 1)  # slices/hosts per axis over the slow links (DCN); mesh = shape * dcn_shape per
    #   axis, shape then being one slice's (ICI) shape. Only 'data' may be > 1 (sharding.DCN_MESH_AXES)
    c.mesh.axes = MESH_AXES
    return c


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config.{field}: {msg}")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise _err(field, msg)


def is_moe_layer(config, layer: int) -> bool:
    """Whether transformer layer `layer` (0-based) uses the MoE feed-forward."""
    from moe_jax.config.typed import ModelConfig

    return ModelConfig.from_config(config).is_moe_layer(layer)


def warmup_steps(config) -> int:
    o = config.optim
    if o.warmup_steps >= 0:
        return int(o.warmup_steps)
    return int(round(o.warmup_fraction * config.train.steps))


NONFINITE_ACTIONS = ("stop", "skip")
INJECT_NAN_MODES = ("all", "grads", "grads_from")


def _check_finite(node, prefix: str = "") -> None:
    """Every float anywhere in the config (lists and tuples included) must be finite: an `inf` learning rate
    passes `> 0` checks and only dies in training."""
    items = node.items() if isinstance(node, (ml_collections.ConfigDict, dict)) else enumerate(node)
    for k, v in items:
        name = f"{prefix}{k}" if isinstance(k, str) else f"{prefix[:-1]}[{k}]"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            _check_finite(v, name + ".")
        elif isinstance(v, (list, tuple)):
            _check_finite(v, name + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise _err(name, f"must be a finite number, got {v}")


def validate(config) -> ml_collections.ConfigDict:
    """Check every field a run depends on; raise ConfigError naming the first bad one. Returns the config."""
    _check_finite(config)
    m, moe, o, t, d = config.model, config.moe, config.optim, config.train, config.data
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
        _check(isinstance(m[f], int) and m[f] > 0, f"model.{f}", f"must be a positive integer, got {m[f]!r}")
    _check(m.d_model % m.n_heads == 0, "model.d_model",
           f"d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; choose d_model = n_heads * head_dim")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
           f"head_dim={m.d_model // m.n_heads} must be even for rotary embeddings")
    _check(m.mlp in MLP_TYPES, "model.mlp", f"unknown {m.mlp!r}; choose one of {MLP_TYPES}")
    _check(m.dtype in DTYPES, "model.dtype", f"unknown dtype {m.dtype!r}; choose one of {DTYPES}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.attention in ATTENTION, "model.attention", f"unknown {m.attention!r}; choose one of {ATTENTION}")
    _check(isinstance(m.attention_block, int) and m.attention_block >= 0, "model.attention_block",
           f"must be an integer >= 0 (0 = one block), got {m.attention_block!r}")
    _check(m.rope_base > 0, "model.rope_base", f"must be > 0, got {m.rope_base}")
    _check(m.rope_layout in ROPE_LAYOUTS, "model.rope_layout",
           f"unknown {m.rope_layout!r}; choose one of {ROPE_LAYOUTS} ('adjacent' = torchtune / seed 002)")
    _check(isinstance(m.norm_eps, (int, float)) and not isinstance(m.norm_eps, bool) and 0 < m.norm_eps < 1,
           "model.norm_eps", f"must be a float in (0, 1), got {m.norm_eps!r} (PyTorch RMSNorm's default is "
           f"config_lib.FLOAT32_EPS = {FLOAT32_EPS!r})")
    _check(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}")

    _check(isinstance(moe.num_experts, int) and moe.num_experts >= 0, "moe.num_experts",
           f"must be an integer >= 0 (0 = dense), got {moe.num_experts!r}")
    if moe.num_experts > 0:
        _check(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
               f"top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
        _check(moe.every >= 1, "moe.every", f"must be >= 1, got {moe.every}")
        _check(moe.every <= m.n_layers, "moe.every",
               f"every={moe.every} > model.n_layers={m.n_layers} leaves no MoE layer; lower it or set num_experts=0")
        _check(moe.d_ff > 0, "moe.d_ff", f"must be > 0, got {moe.d_ff}")
        _check(moe.dispatch in MOE_DISPATCH, "moe.dispatch", f"unknown {moe.dispatch!r}; choose one of {MOE_DISPATCH}")
        _check(moe.grouped_matmul in GROUPED_MATMULS, "moe.grouped_matmul",
               f"unknown {moe.grouped_matmul!r}; choose one of {GROUPED_MATMULS} ('megablox' runs only on TPU)")
        _check(moe.capacity_factor > 0, "moe.capacity_factor",
               f"must be > 0, got {moe.capacity_factor} (1.0 = exactly balanced; 1.25 is usual)")
        _check(moe.eval_capacity_factor > 0, "moe.eval_capacity_factor",
               f"must be > 0, got {moe.eval_capacity_factor}")
        _check(moe.min_capacity >= 1, "moe.min_capacity", f"must be >= 1, got {moe.min_capacity}")
        _check(moe.group_size >= 1, "moe.group_size", f"must be >= 1, got {moe.group_size}")
        _check(moe.group_size <= 8192, "moe.group_size",
               f"group_size={moe.group_size}: the dispatch mask grows with its square; keep it <= 8192")
        _check(moe.load_balance_weight >= 0, "moe.load_balance_weight", "must be >= 0")
        _check(moe.z_loss_weight >= 0, "moe.z_loss_weight", "must be >= 0")
        _check(moe.router_noise_std >= 0, "moe.router_noise_std", "must be >= 0")

    _check(o.name in ("muon", "adamw"), "optim.name", f"unknown optimizer {o.name!r}; choose 'muon' or 'adamw'")
    _check(o.muon_lr > 0, "optim.muon_lr", f"must be > 0, got {o.muon_lr}")
    _check(o.adamw_lr > 0, "optim.adamw_lr", f"must be > 0, got {o.adamw_lr}")
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.muon_scale in ("keller", "moonlight"), "optim.muon_scale",
           f"unknown {o.muon_scale!r}; choose 'keller' or 'moonlight'")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", f"betas must be in [0, 1), got b1={o.b1} b2={o.b2}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    _check(o.ns_steps >= 1, "optim.ns_steps", "must be >= 1")
    _check(o.muon_impl in ("batched", "optax"), "optim.muon_impl",
           f"unknown {o.muon_impl!r}; choose 'batched' or 'optax'")
    _check(o.ns_dtype in ("auto", "float32", "bfloat16"), "optim.ns_dtype",
           f"unknown {o.ns_dtype!r}; choose 'auto', 'float32' or 'bfloat16'")
    _check(o.ns_method in ("auto", "standard", "gram"), "optim.ns_method",
           f"unknown {o.ns_method!r}; choose 'auto', 'standard' or 'gram'")
    _check(o.ns_stack in ("auto", "layers", "none"), "optim.ns_stack",
           f"unknown {o.ns_stack!r}; choose 'auto', 'layers' or 'none'")
    _check(o.muon_impl == "batched" or o.ns_dtype != "bfloat16", "optim.ns_dtype",
           "bfloat16 Newton-Schulz needs optim.muon_impl='batched'; use ns_dtype='float32' with 'optax'")

    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(warmup_steps(config) < t.steps or t.steps == 1, "optim.warmup_steps",
           f"warmup ({warmup_steps(config)} steps) must be shorter than train.steps={t.steps}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _check(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    for f in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _check(t[f] >= 1, f"train.{f}", f"must be >= 1, got {t[f]}")
    _check(t.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0 = whole validation set)")
    _check(t.on_nonfinite in NONFINITE_ACTIONS, "train.on_nonfinite",
           f"unknown {t.on_nonfinite!r}; choose one of {NONFINITE_ACTIONS}")
    _check(isinstance(t.max_skipped_steps, int) and t.max_skipped_steps >= 1, "train.max_skipped_steps",
           f"must be an integer >= 1, got {t.max_skipped_steps!r}")
    _check(t.inject_nan_mode in INJECT_NAN_MODES, "train.inject_nan_mode",
           f"unknown {t.inject_nan_mode!r}; choose one of {INJECT_NAN_MODES}")

    _check(d.source in DATA_SOURCES, "data.source", f"unknown source {d.source!r}; choose one of {DATA_SOURCES}")
    if d.source == "tfds":
        _check(bool(d.tfds_name), "data.tfds_name", "source='tfds' needs a dataset name, e.g. 'lm1b' or 'c4/en'")
    if d.source == "files":
        _check(bool(d.files), "data.files", "source='files' needs a glob of .txt or .jsonl files")
    _check(d.packing in PACKING, "data.packing", f"unknown {d.packing!r}; choose one of {PACKING}")
    _check(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(not d.tfds_val_split or d.source == "tfds", "data.tfds_val_split",
           f"only applies to source='tfds' (got source={d.source!r}); leave it empty")
    _check(isinstance(d.worker_count, int) and d.worker_count >= 0, "data.worker_count",
           f"must be an integer >= 0 (0 = no worker processes), got {d.worker_count!r}")
    _check(0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1, "data.test_fraction",
           f"must be in [0, 1) with val_fraction + test_fraction < 1, got {d.test_fraction}")
    _check(d.val_window_sampling in ("first", "even"), "data.val_window_sampling",
           f"choose 'first' or 'even', got {d.val_window_sampling!r}")
    _check(isinstance(d.max_val_windows, int) and d.max_val_windows >= 0, "data.max_val_windows",
           f"must be an integer >= 0 (0 = every validation window), got {d.max_val_windows!r}")
    _check(isinstance(d.shards, int) and d.shards >= 0, "data.shards",
           f"must be an integer >= 0 (0 = one shard per JAX process), got {d.shards!r}")
    _check(d.shards == 0 or t.batch_size % d.shards == 0, "data.shards",
           f"{d.shards} shards cannot split train.batch_size={t.batch_size}; use a divisor of the batch size")
    _check(isinstance(d.shuffle_seed, int) and 0 <= d.shuffle_seed < 2**32, "data.shuffle_seed",
           f"must be an integer in [0, 2**32), got {d.shuffle_seed!r}")

    shape = tuple(config.mesh.shape)
    _check(tuple(config.mesh.axes) == MESH_AXES, "mesh.axes", f"must be {MESH_AXES}, got {tuple(config.mesh.axes)}")
    _check(len(shape) == 3, "mesh.shape", f"needs one size per axis {MESH_AXES}, got {shape}")
    _check(sum(1 for s in shape if s == -1) <= 1, "mesh.shape", f"at most one -1 is allowed, got {shape}")
    _check(all(s == -1 or s >= 1 for s in shape), "mesh.shape", f"sizes must be >= 1 or -1, got {shape}")
    dcn = tuple(config.mesh.get("dcn_shape", (1, 1, 1)))
    _check(len(dcn) == 3 and all(isinstance(s, int) and s >= 1 for s in dcn), "mesh.dcn_shape",
           f"needs one size >= 1 per axis {MESH_AXES} (slices/hosts over DCN; no -1), got {dcn}")
    if moe.num_experts > 0 and shape[1] > 1:
        _check(moe.num_experts % shape[1] == 0, "mesh.shape",
               f"the 'expert' axis ({shape[1]}) must divide moe.num_experts={moe.num_experts}")
    return config

