"""The train and eval steps: pure functions of (state, batch), compiled once with explicit shardings.

State is a plain pytree: {'params': pure dict, 'opt_state': optax state, 'step': int32 [], 'rng': uint32 key data}.
A batch is {'inputs', 'targets': int32 [A*b, S], 'weights': float32 [A*b, S], optional 'segment_ids', 'positions'}
with A = train.grad_accum micro-batches of b = train.batch_size sequences (global). The step scans over the
micro-batches (rows a, a+A, a+2A, ... form micro-batch a, so each device's rows feed every micro-batch and the split
needs no communication), averages the gradients, and applies one optimizer update. Dropout/router-noise keys are
fold_in(rng, step, micro) — so a resumed run draws exactly the same randomness.

Positions with weight 0 (padding; the last token of a packed document) are passed to the model as its token_mask:
they take no MoE capacity and stay out of the auxiliary losses and routing metrics.

Loss = mean token cross-entropy (float32) + the MoE auxiliary loss (load balance + z-loss, already weighted).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.config import schema as config_lib
from moe_jax.model import transformer as model_lib
from moe_jax import sharding as sharding_lib

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
DOC_KEY = "doc_index"  # evaluation windows: each target's document (data.pipeline.tile_windows)


def init_state(seed: int, params, optimizer) -> dict:
    """A fresh train state from initial parameters (`seed`: the run's, for dropout and router noise)."""
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _apply(graphdef, params, micro, rng, train: bool):
    return model_lib.apply(graphdef, params, micro["inputs"], positions=micro.get("positions"),
                           segment_ids=micro.get("segment_ids"), train=train, rng=rng, token_mask=micro["weights"] > 0)


def _loss(graphdef, params, micro, rng, train: bool):
    logits, aux, _ = _apply(graphdef, params, micro, rng, train)
    loss_sum, correct, weight = model_lib.cross_entropy(logits, micro["targets"], micro["weights"])
    ce = loss_sum / jnp.maximum(weight, 1.0)
    return ce + aux["moe_loss"], (ce, correct, weight, aux)


def all_finite(tree) -> jax.Array:
    """bool []: every floating-point element of `tree` is finite (one reduction per leaf, fused into the step)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(train, graphdef, optimizer: optax.GradientTransformation, param_sharding=None) -> Callable:
    """(state, batch) -> (new state, metrics) for a config.typed.TrainConfig `train`. metrics['finite'] (bool [])
    says whether the loss, the gradient norm and the updated params and optimizer state are all finite; with
    train.on_nonfinite='skip' a non-finite step keeps the previous params and optimizer state (the step counter still
    advances). `param_sharding` (the params' tree of shardings): each micro-batch's gradients and their sum are
    pinned to it, so under FSDP they are reduce-scattered to the parameter's shards, not all-reduced."""
    accum = train.grad_accum
    nan_step = train.inject_nan_at_step
    nan_mode = train.inject_nan_mode
    skip_nonfinite = train.on_nonfinite == "skip"

    def step_fn(state, batch):
        step = state["step"]
        base = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

        def split(x):  # [A*b, ...] -> [A, b, ...], micro-batch a = rows a::A
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micros = {k: split(v) for k, v in batch.items()}
        grad_fn = jax.value_and_grad(lambda p, mb, r: _loss(graphdef, p, mb, r, True), has_aux=True)

        def body(carry, xs):
            grads_acc, sums = carry
            micro, idx = xs
            micro = {k: sharding_lib.constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in micro.items()}
            (_, (ce, correct, weight, aux)), grads = grad_fn(state["params"], micro, jax.random.fold_in(base, idx))
            if param_sharding is not None:
                grads = jax.lax.with_sharding_constraint(grads, param_sharding)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            sums = jax.tree.map(jnp.add, sums, {"ce": ce, "correct": correct, "weight": weight, "aux": aux})
            return (grads_acc, sums), None

        zeros_g = jax.tree.map(jnp.zeros_like, state["params"])
        aux_shape = jax.eval_shape(lambda: _loss(graphdef, state["params"], jax.tree.map(lambda v: v[0], micros),
                                                 base, True)[1][3])
        zeros_s = {"ce": jnp.zeros(()), "correct": jnp.zeros(()), "weight": jnp.zeros(()),
                   "aux": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)}
        (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micros, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = sums["ce"] / accum
        if nan_step >= 0:  # test hook: poison the gradients (and the loss unless inject_nan_mode='grads') at one step,
            # or at every step from it on ('grads_from')
            hit = step + 1 >= nan_step if nan_mode == "grads_from" else step + 1 == nan_step
            poison = jnp.where(hit, jnp.nan, 1.0)  # steps are numbered from 1 in logs
            if nan_mode == "all":
                loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
        if skip_nonfinite:  # drop the update of a non-finite step: the state stays the last finite one
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state["params"], state["opt_state"]))
        aux = jax.tree.map(lambda v: v / accum, sums["aux"])
        metrics = {"loss": loss, "accuracy": sums["correct"] / jnp.maximum(sums["weight"], 1.0),
                   "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
                   "tokens": sums["weight"], "finite": finite, **{f"moe/{k}": v for k, v in aux.items()}}
        new_state = {"params": params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
        return new_state, metrics

    return step_fn


def make_eval_step(graphdef) -> Callable:
    """(params, batch) -> sums {'loss', 'correct', 'weight'} over the batch, deterministic (no dropout/noise)."""

    def eval_fn(params, batch):
        _, (ce, correct, weight, _) = _loss(graphdef, params, batch, None, False)
        return {"loss": ce * weight, "correct": correct, "weight": weight}

    return eval_fn


def make_token_eval_step(graphdef) -> Callable:
    """(params, batch) -> per token [B, S]: {'loss' (cross-entropy x weight), 'correct', 'weight', 'doc_index' (the
    batch's own)}: the eval step before its sums, for per-document results; deterministic."""

    def eval_fn(params, batch):
        logits, _, _ = _apply(graphdef, params, batch, None, False)
        loss, correct, weight = model_lib.token_cross_entropy(logits, batch["targets"], batch["weights"])
        return {"loss": loss, "correct": correct, "weight": weight, "doc_index": batch[DOC_KEY]}

    return eval_fn


# ---------------------------------------------------------------------------------------------------------------
# Shardings


def _spec_by_suffix(param_specs: dict, leaf_path: tuple, shape: tuple) -> P:
    """Optimizer-state leaves mirror a parameter (same path suffix and shape): give them its spec."""
    keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in leaf_path)
    for n in range(len(keys), 0, -1):
        hit = param_specs.get(keys[-n:])
        if hit is not None and hit[1] == tuple(shape):
            return hit[0]
    return P()


def state_shardings(abstract_state: dict, abstract_nnx_state, mesh, fsdp: bool = False) -> dict:
    """NamedShardings for the whole train state: params by their logical axes (`fsdp`: config.mesh.fsdp's rules),
    optimizer moments like their parameter, scalars replicated."""
    pspecs = sharding_lib.param_specs(abstract_nnx_state, mesh, fsdp)
    flat = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(pspecs, is_leaf=lambda x: isinstance(x, P))[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        leaf = abstract_state["params"]
        for k in path:
            leaf = leaf[k.key]
        flat[keys] = (spec, tuple(leaf.shape))

    def for_leaf(path, leaf):
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _spec_by_suffix(flat, path, leaf.shape))

    return jax.tree_util.tree_map_with_path(for_leaf, abstract_state)


def batch_shardings(batch_like: dict, mesh) -> dict:
    return {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in batch_like.items()}


def abstract_train_state(abstract_nnx_state, optimizer, mesh, fsdp: bool = False) -> dict:
    """The train state as ShapeDtypeStructs carrying their NamedShardings on `mesh` (no memory allocated; `fsdp`:
    config.mesh.fsdp, parameters and optimizer state split over the data-parallel devices)."""
    params_abs = nnx.to_pure_dict(abstract_nnx_state)
    state_abs = jax.eval_shape(lambda p: init_state(0, p, optimizer), params_abs)  # shapes: any seed
    shardings = state_shardings(state_abs, abstract_nnx_state, mesh, fsdp)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_abs, shardings)


@dataclasses.dataclass
class Compiled:
    """The compiled train and eval steps with their shardings."""
    train: Any
    eval: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings: the restore target
    state_sharding: Any
    batch_sharding: Any
    memory: dict


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends have no memory analysis
        return {}
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def format_bytes(n: float) -> str:
    """'17.2 MiB', '2.30 GiB'."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def memory_needed(memory: dict) -> int:
    """Bytes one device needs to run a compiled step, from its memory analysis (`Compiled.memory`): arguments +
    outputs - aliased (the donated state's buffers are reused for the new state) + temporaries."""
    return (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
            - memory.get("alias_size_in_bytes", 0) + memory.get("temp_size_in_bytes", 0))


def _host_available_bytes() -> int | None:
    """The host's available memory: MemAvailable of /proc/meminfo (Linux), else free pages (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_limit(device) -> tuple[int | None, str]:
    """(bytes one device may use, what they are): on GPU/TPU the device's memory_stats()['bytes_limit']; on CPU the
    host's available memory shared by the process's CPU devices. (None, ...) when unknown."""
    if device.platform != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # a backend without memory statistics
            limit = None
        return (int(limit) if limit else None), f"{device.platform} device {device.id}'s memory"
    available = _host_available_bytes()
    n = max(1, len([d for d in jax.local_devices() if d.platform == "cpu"]))
    share = "" if n == 1 else f" shared by {n} CPU devices"
    return (None if available is None else available // n), f"the host's available memory{share}"


def check_memory(memory: dict, device) -> None:
    """Refuse (ConfigError: one line naming the fields to change) a compiled step (`Compiled.memory`) needing more
    than `device_memory_limit(device)`."""
    needed = memory_needed(memory) if memory else 0
    available, what = device_memory_limit(device)
    if available is None or needed <= available:
        return
    raise config_lib.ConfigError(
        f"the compiled train step needs {format_bytes(needed)} per device but {what} is {format_bytes(available)}: "
        "lower config.train.batch_size (raise train.grad_accum to keep the tokens per step), set "
        "config.model.remat=True, or use a machine with more memory")


def fresh_state(model, seed: int, optimizer) -> dict:
    """A fresh train state: model.create(model, seed)'s parameters and `optimizer.init` of them (model: a ModelConfig).
    Pure (jit it with out_shardings to build it in place on a mesh: `init_sharded_state`)."""
    params = nnx.to_pure_dict(nnx.split(model_lib.create(model, seed))[1])
    return init_state(seed, params, optimizer)


def init_sharded_state(model, seed: int, optimizer, state_sharding) -> dict:
    """`fresh_state` built directly in `state_sharding` (a tree of NamedShardings; no host copy, no replication)."""
    return jax.jit(lambda: fresh_state(model, seed, optimizer), out_shardings=state_sharding)()


def _abstract_batch(batch_like: dict, shardings: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch_like.items()}


def compile_train_step(train, graphdef, optimizer, abstract_state, mesh, batch_like: dict):
    """The train step (train: a config.typed.TrainConfig) lowered and compiled for `abstract_state`
    (ShapeDtypeStructs with shardings) and batches shaped
    like `batch_like` (anything with .shape/.dtype), the state donated. Returns (executable, batch shardings)."""
    s_shard = jax.tree.map(lambda s: s.sharding, abstract_state)
    b_shard = batch_shardings(batch_like, mesh)
    with jax.set_mesh(mesh):
        step_fn = make_train_step(train, graphdef, optimizer, s_shard["params"])
        train = jax.jit(step_fn, in_shardings=(s_shard, b_shard), out_shardings=(s_shard, NamedSharding(mesh, P())),
                        donate_argnums=(0,))
        return train.lower(abstract_state, _abstract_batch(batch_like, b_shard)).compile(), b_shard


def compile_eval_step(graphdef, abstract_params, mesh, eval_batch_like: dict, per_token: bool = False):
    """The eval step lowered and compiled for parameters like `abstract_params` (anything with .shape, .dtype and
    .sharding: ShapeDtypeStructs or the arrays themselves) and batches like `eval_batch_like`; per_token: the
    per-token step (make_token_eval_step; eval_batch_like with DOC_KEY), its outputs replicated on every process.
    Returns (executable, batch shardings)."""
    p_shard = jax.tree.map(lambda s: s.sharding, abstract_params)
    e_shard = batch_shardings(eval_batch_like, mesh)
    abs_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params,
                              p_shard)
    with jax.set_mesh(mesh):
        step_fn = make_token_eval_step(graphdef) if per_token else make_eval_step(graphdef)
        ev = jax.jit(step_fn, in_shardings=(p_shard, e_shard),
                     out_shardings=NamedSharding(mesh, P()))
        return ev.lower(abs_params, _abstract_batch(eval_batch_like, e_shard)).compile(), e_shard


def compile_steps(train, graphdef, abstract_nnx_state, optimizer, mesh, batch_like: dict,
                  eval_batch_like: dict, fsdp: bool = False) -> Compiled:
    """Lower and compile both steps ahead of time (so an out-of-memory config fails before step 1, with numbers);
    `fsdp`: config.mesh.fsdp (abstract_train_state)."""
    abs_in = abstract_train_state(abstract_nnx_state, optimizer, mesh, fsdp)
    s_shard = jax.tree.map(lambda s: s.sharding, abs_in)
    train_c, b_shard = compile_train_step(train, graphdef, optimizer, abs_in, mesh, batch_like)
    eval_c, _ = compile_eval_step(graphdef, abs_in["params"], mesh, eval_batch_like)
    return Compiled(train_c, eval_c, abs_in, s_shard, b_shard, _memory(train_c))


# ---------------------------------------------------------------------------------------------------------------
# Batches and evaluation


def batch_like(batch: dict, rows: int, keys: tuple = BATCH_KEYS) -> dict:
    """Global ShapeDtypeStructs for a batch of `rows` sequences, from one process-local example batch (its `keys`)."""
    return {k: jax.ShapeDtypeStruct((rows,) + np.asarray(v).shape[1:], np.asarray(v).dtype) for k, v in batch.items()
            if k in keys}


def to_global(batch: dict, shardings: dict) -> dict:
    """A process-local batch as global arrays in `shardings` (keys without a sharding are left out)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()
            if k in shardings}


def _eval_result(loss_sum: float, correct: float, weight: float) -> dict:
    w = max(weight, 1.0)
    loss = loss_sum / w
    return {"val_loss": loss, "val_accuracy": correct / w, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_tokens": weight}


def evaluate(eval_fn, params, val_batches: list, eval_shardings: dict) -> dict:
    """Validation loss, accuracy and perplexity over the fixed validation windows (eval_fn: (params, batch) -> sums)."""
    total = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
    for b in val_batches:
        sums = jax.device_get(eval_fn(params, to_global(b, eval_shardings)))
        for k in total:
            total[k] += float(sums[k])
    return _eval_result(total["loss"], total["correct"], total["weight"])


def evaluate_documents(eval_fn, params, batches: list, eval_shardings: dict, num_docs: int) -> tuple[dict, dict]:
    """`evaluate` through the per-token step (compile_eval_step(per_token=True)), summed in float64 on the host,
    and per document: returns (the `evaluate` dict, val_tokens an int, {'tokens': int64 [num_docs], 'loss_sum':
    float64 [num_docs] (nats)}), documents indexed by the batches' doc_index ordinals. The totals are the sums of
    the per-document arrays."""
    tokens = np.zeros(num_docs, dtype=np.int64)
    loss = np.zeros(num_docs, dtype=np.float64)
    correct = 0.0
    for b in batches:
        out = jax.device_get(eval_fn(params, to_global(b, eval_shardings)))
        scored = np.asarray(out["weight"]) > 0
        doc = np.asarray(out["doc_index"])[scored]
        if doc.size and (doc.min() < 0 or doc.max() >= num_docs):
            raise ValueError(f"a scored target's doc_index lies outside [0, {num_docs}): the windows are not this "
                             "split's")
        tokens += np.bincount(doc, minlength=num_docs)
        loss += np.bincount(doc, weights=np.asarray(out["loss"], dtype=np.float64)[scored], minlength=num_docs)
        correct += float(np.asarray(out["correct"], dtype=np.float64)[scored].sum())
    total = int(tokens.sum())
    return _eval_result(float(loss.sum()), correct, total), {"tokens": tokens, "loss_sum": loss}
