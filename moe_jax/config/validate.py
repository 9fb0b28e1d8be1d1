"""Validation of a ConfigDict: one function per section, each raising ConfigError naming the first bad field and
the fix. `validate(config)` runs them all; `config.typed.parse` calls it once, before anything heavy (data
preparation, compilation). The allowed values come from schema.py."""

from __future__ import annotations

import math

import ml_collections

from moe_jax.config.schema import (ATTENTION, DATA_SOURCES, DTYPES, FLOAT32_EPS, GROUPED_MATMULS, INJECT_NAN_MODES,
                                   LOAD_BALANCE_FORMS, MESH_AXES, MLP_TYPES, MOE_DISPATCH, MUON_IMPLS, MUON_SCALES,
                                   NONFINITE_ACTIONS, NS_DTYPES, NS_METHODS, NS_ROUNDINGS, NS_STACKS, OPTIMIZERS,
                                   PACKING, ROPE_LAYOUTS, VAL_WINDOW_SAMPLING, ConfigError, choices_text,
                                   schedule_length, warmup_steps)


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config.{field}: {msg}")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise _err(field, msg)


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


def check_model(m) -> None:
    """`config.model`."""
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


def check_moe(moe, m) -> None:
    """`config.moe` (its fields matter only when num_experts > 0); `m` is config.model."""
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
        _check(moe.load_balance_form in LOAD_BALANCE_FORMS, "moe.load_balance_form",
               f"unknown {moe.load_balance_form!r}; choose {choices_text(LOAD_BALANCE_FORMS)}")
        _check(moe.z_loss_weight >= 0, "moe.z_loss_weight", "must be >= 0")
        _check(moe.router_noise_std >= 0, "moe.router_noise_std", "must be >= 0")


def check_optim(o) -> None:
    """`config.optim`."""
    _check(o.name in OPTIMIZERS, "optim.name", f"unknown optimizer {o.name!r}; choose {choices_text(OPTIMIZERS)}")
    _check(o.muon_lr > 0, "optim.muon_lr", f"must be > 0, got {o.muon_lr}")
    _check(o.adamw_lr > 0, "optim.adamw_lr", f"must be > 0, got {o.adamw_lr}")
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.muon_scale in MUON_SCALES, "optim.muon_scale",
           f"unknown {o.muon_scale!r}; choose {choices_text(MUON_SCALES)}")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", f"betas must be in [0, 1), got b1={o.b1} b2={o.b2}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    _check(o.ns_steps >= 1, "optim.ns_steps", "must be >= 1")
    _check(o.muon_impl in MUON_IMPLS, "optim.muon_impl",
           f"unknown {o.muon_impl!r}; choose {choices_text(MUON_IMPLS)}")
    _check(o.ns_dtype in NS_DTYPES, "optim.ns_dtype",
           f"unknown {o.ns_dtype!r}; choose {choices_text(NS_DTYPES)}")
    _check(o.ns_method in NS_METHODS, "optim.ns_method",
           f"unknown {o.ns_method!r}; choose {choices_text(NS_METHODS)}")
    _check(o.ns_stack in NS_STACKS, "optim.ns_stack",
           f"unknown {o.ns_stack!r}; choose {choices_text(NS_STACKS)}")
    _check(o.muon_impl == "batched" or o.ns_dtype in ("auto", "float32"), "optim.ns_dtype",
           f"{o.ns_dtype} Newton-Schulz needs optim.muon_impl='batched'; use ns_dtype='float32' with 'optax'")
    check_seed_semantics(o)


def check_seed_semantics(o) -> None:
    """The options that reproduce the seeds' optimizer and schedule (`config.optim`; docs/decisions.md, "Seed
    fidelity"): Newton-Schulz rounding and eps, fused qkv, momentum without bias correction and its warmup, decay on
    norms, the schedule's length and count."""
    _check(o.ns_rounding in NS_ROUNDINGS, "optim.ns_rounding",
           f"unknown {o.ns_rounding!r}; choose {choices_text(NS_ROUNDINGS)}")
    _check(o.ns_rounding == "operands" or o.ns_method == "standard", "optim.ns_method",
           "ns_rounding='every_op' is the seeds' X-space iteration; set ns_method='standard'")
    _check(isinstance(o.ns_eps, float) and 0 < o.ns_eps < 1, "optim.ns_eps",
           f"must be a float in (0, 1), got {o.ns_eps!r} (optax's default 1e-8; the seeds' 1e-7)")
    for f in ("muon_fused_qkv", "muon_bias_correction", "decay_norms", "warmup_from_zero"):
        _check(isinstance(o[f], bool), f"optim.{f}", f"must be True or False, got {o[f]!r}")
    batched_only = {"ns_rounding": o.ns_rounding != "operands", "muon_fused_qkv": o.muon_fused_qkv,
                    "muon_bias_correction": not o.muon_bias_correction, "momentum_warmup_steps":
                    o.momentum_warmup_steps != 0}
    for f, used in batched_only.items():
        _check(not used or o.muon_impl == "batched", f"optim.{f}",
               "optax.contrib.muon has no such option; set optim.muon_impl='batched'")
    _check(isinstance(o.momentum_warmup_steps, int) and o.momentum_warmup_steps >= 0, "optim.momentum_warmup_steps",
           f"must be an integer >= 0 (0 = constant momentum), got {o.momentum_warmup_steps!r}")
    _check(0 <= o.momentum_warmup_start < 1, "optim.momentum_warmup_start",
           f"must be in [0, 1), got {o.momentum_warmup_start}")
    _check(o.momentum_warmup_steps == 0 or not o.muon_bias_correction, "optim.momentum_warmup_steps",
           "a changing momentum has no bias correction; set optim.muon_bias_correction=False (as seed 004) or 0")
    _check(isinstance(o.schedule_steps, int) and o.schedule_steps >= 0, "optim.schedule_steps",
           f"must be an integer >= 0 (0 = train.steps), got {o.schedule_steps!r}")


def check_train(t, o) -> None:
    """`config.train`; `o` is config.optim (the warmup must fit in the run)."""
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(o.schedule_steps == 0 or o.schedule_steps >= t.steps, "optim.schedule_steps",
           f"{o.schedule_steps} is shorter than train.steps={t.steps}; use 0 (the run's length) or more")
    horizon = schedule_length(o.schedule_steps, t.steps)
    warmup = warmup_steps(o.warmup_steps, o.warmup_fraction, horizon)
    _check(warmup < horizon or horizon == 1, "optim.warmup_steps",
           f"warmup ({warmup} steps) must be shorter than train.steps={t.steps}"
           + (f" (optim.schedule_steps={horizon})" if o.schedule_steps else ""))
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


def check_data(d, t) -> None:
    """`config.data`; `t` is config.train (shards must split the batch)."""
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
    _check(d.val_window_sampling in VAL_WINDOW_SAMPLING, "data.val_window_sampling",
           f"choose {choices_text(VAL_WINDOW_SAMPLING)}, got {d.val_window_sampling!r}")
    _check(isinstance(d.max_val_windows, int) and d.max_val_windows >= 0, "data.max_val_windows",
           f"must be an integer >= 0 (0 = every validation window), got {d.max_val_windows!r}")
    _check(isinstance(d.shards, int) and d.shards >= 0, "data.shards",
           f"must be an integer >= 0 (0 = one shard per JAX process), got {d.shards!r}")
    _check(d.shards == 0 or t.batch_size % d.shards == 0, "data.shards",
           f"{d.shards} shards cannot split train.batch_size={t.batch_size}; use a divisor of the batch size")
    _check(isinstance(d.shuffle_seed, int) and 0 <= d.shuffle_seed < 2**32, "data.shuffle_seed",
           f"must be an integer in [0, 2**32), got {d.shuffle_seed!r}")


def check_mesh(mh, moe) -> None:
    """`config.mesh`; `moe` is config.moe (the 'expert' axis must divide the experts)."""
    shape = tuple(mh.shape)
    _check(tuple(mh.axes) == MESH_AXES, "mesh.axes", f"must be {MESH_AXES}, got {tuple(mh.axes)}")
    _check(len(shape) == 3, "mesh.shape", f"needs one size per axis {MESH_AXES}, got {shape}")
    _check(sum(1 for s in shape if s == -1) <= 1, "mesh.shape", f"at most one -1 is allowed, got {shape}")
    _check(all(s == -1 or s >= 1 for s in shape), "mesh.shape", f"sizes must be >= 1 or -1, got {shape}")
    dcn = tuple(mh.get("dcn_shape", (1, 1, 1)))
    _check(len(dcn) == 3 and all(isinstance(s, int) and s >= 1 for s in dcn), "mesh.dcn_shape",
           f"needs one size >= 1 per axis {MESH_AXES} (slices/hosts over DCN; no -1), got {dcn}")
    _check(isinstance(mh.get("fsdp", False), bool), "mesh.fsdp",
           f"must be True or False (shard parameters and optimizer state over the data devices), got "
           f"{mh.get('fsdp')!r}")
    if moe.num_experts > 0 and shape[1] > 1:
        _check(moe.num_experts % shape[1] == 0, "mesh.shape",
               f"the 'expert' axis ({shape[1]}) must divide moe.num_experts={moe.num_experts}")


def validate(config) -> ml_collections.ConfigDict:
    """Check every field a run depends on; raise ConfigError naming the first bad one. Returns the config."""
    _check_finite(config)
    check_model(config.model)
    check_moe(config.moe, config.model)
    check_optim(config.optim)
    check_train(config.train, config.optim)
    check_data(config.data, config.train)
    check_mesh(config.mesh, config.moe)
    _check(not (config.mesh.get("fsdp", False) and config.optim.name == "muon" and config.optim.muon_impl == "optax"),
           "mesh.fsdp", "distributed Muon needs optim.muon_impl='batched' (optax.contrib.muon would orthogonalise "
           "every matrix on every device); set muon_impl='batched' or fsdp=False")
    return config
