"""The decoder-only transformer (Flax NNX) and the loss.

    tokens [B, S] -> embed (x sqrt(M) if model.embed_scale) -> dropout
      -> n_layers x [ x + drop(attn(norm(x))) ; x + drop(ffn(norm(x))) ]   (ffn: dense MLP or MoE, per config)
      -> norm -> head (tied to the embedding or its own [M, V]) -> logits [B, S, V] float32

Randomness is explicit: `rng` (a key) drives dropout and router noise; `None` means deterministic. So a train step
is a pure function of (params, batch, step), and an exact resume needs no RNG state beyond the seed and the step.

For speed, callers split the module once (`nnx.split`), jit a function over the pure parameter dict and rebuild the
module inside with `nnx.merge(graphdef, params)` (see `apply`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model.layers import MLP, Attention, Embed, RMSNorm, dropout, dtype_of, param, project
from moe_jax.config.typed import ModelConfig
from moe_jax.model.moe import MoEBlock
from moe_jax.sharding import constrain


class Block(nnx.Module):
    """Pre-norm transformer block: attention then feed-forward (dense MLP or MoE), each residual."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.layer = layer
        self.dropout_rate = cfg.dropout
        self.is_moe = cfg.is_moe_layer(layer)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt, rngs)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt, rngs)
        self.ffn = MoEBlock(cfg, rngs) if self.is_moe else MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, rng, *, train: bool, cache, cache_index, no_drop: bool,
                 token_mask=None, routes: bool = False):
        """x [B, S, M] -> (x [B, S, M], MoE metrics or None, new cache or None). token_mask [B, S], routes: see
        MoEBlock."""
        k_attn, k_ffn, k_router = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        h, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_index)
        x = x + dropout(h, self.dropout_rate, k_attn)
        metrics = None
        if self.is_moe:
            h, metrics = self.ffn(self.ffn_norm(x), train=train, rng=k_router, no_drop=no_drop,
                                  token_mask=token_mask, routes=routes)
        else:
            h = self.ffn(self.ffn_norm(x))
        x = constrain(x + dropout(h, self.dropout_rate, k_ffn), ("batch", "length", "embed"))
        return x, metrics, new_cache


class Transformer(nnx.Module):
    """The whole model, configured by a ModelConfig (`self.cfg`, hashable: part of the GraphDef)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m = cfg
        self.cfg = cfg
        self.dtype = dtype_of(m.dtype)
        self.embed = Embed(m.vocab_size, m.d_model, m.init_std, self.dtype, rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(m.n_layers)])
        self.final_norm = RMSNorm(m.d_model, m.norm_eps, self.dtype, rngs)
        if not m.tie_embeddings:
            self.head = param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std)

    def __call__(self, tokens, positions=None, segment_ids=None, *, train: bool = False, rng=None, cache=None,
                 cache_index=None, no_drop: bool = False, token_mask=None, routes: bool = False):
        """tokens [B, S] int32 -> (logits [B, S, V] float32, aux, new cache).

        positions [B, S] (default arange; with a cache, cache_index + arange); segment_ids [B, S] restrict attention
        to the same packed document; cache: list of {'k','v': [B, L, H, D]} from `init_cache`; cache_index: scalar
        position where `tokens` start. token_mask [B, S] (bool or 0/1, None = all real): positions that are padding
        (the train/eval steps pass `weights > 0`) take no expert capacity, get no MoE output and are left out of the
        auxiliary losses and routing metrics; their hidden states still enter attention, so mask only positions no
        scored position attends to (padding, the last token of a packed document).
        aux: {'moe_loss': weighted auxiliary loss (summed over MoE layers), and each metric of moe.routing_metrics
        (carried load `tokens_per_expert`, demanded `tokens_per_expert_demand`, ...) plus 'capacity' stacked over MoE
        layers ([n_moe] or [n_moe, E])}. routes=True (routing diagnostics; the train and eval steps never ask, so
        their programs do not change) adds aux['routes']: each MoE layer's routes as taken (moe.route_record:
        'logits', 'probs' [n_moe, G, T, E], 'expert_index', 'gates', 'kept' [n_moe, G, T, K], 'mask' [n_moe, G, T])
        and the detail metrics of moe.routing_metrics (real_tokens, tokens_fully_dropped_fraction, router_topk_prob).
        """
        m = self.cfg
        b, s = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed(tokens)
        if m.embed_scale:
            x = x * jnp.asarray(m.d_model ** 0.5, x.dtype)
        if rng is not None:
            rng, k_embed = jax.random.split(rng)
            x = dropout(x, m.dropout, k_embed)
        x = constrain(x, ("batch", "length", "embed"))

        layer_metrics, new_cache = [], []
        for i, block in enumerate(self.blocks):
            layer_rng = jax.random.fold_in(rng, i) if rng is not None else None
            layer_cache = cache[i] if cache is not None else None
            if m.remat and cache is None:
                x, metrics, c = _remat_block(block, x, positions, segment_ids, layer_rng, token_mask, train=train,
                                             no_drop=no_drop, routes=routes)
            else:
                x, metrics, c = block(x, positions, segment_ids, layer_rng, train=train, cache=layer_cache,
                                      cache_index=cache_index, no_drop=no_drop, token_mask=token_mask, routes=routes)
            new_cache.append(c)
            if metrics is not None:
                layer_metrics.append(metrics)

        x = self.final_norm(x)
        if m.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = project(x.astype(self.dtype), self.head[...].astype(self.dtype), out_dtype=jnp.float32)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return logits, self._aux(layer_metrics), (new_cache if cache is not None else None)

    def _aux(self, layer_metrics: list[dict]) -> dict:
        moe = self.cfg.moe
        if not layer_metrics:
            return {"moe_loss": jnp.zeros((), jnp.float32)}
        aux = {k: jax.tree.map(lambda *xs: jnp.stack(xs), *(lm[k] for lm in layer_metrics)) for k in layer_metrics[0]}
        aux["moe_loss"] = (moe.load_balance_weight * jnp.sum(aux["load_balance_loss"])
                           + moe.z_loss_weight * jnp.sum(aux["z_loss"]))
        return aux

    def init_cache(self, batch: int, length: int, dtype=None) -> list[dict]:
        """Empty KV cache: one {'k','v': [batch, length, H, D]} per layer."""
        m = self.cfg
        shape = (batch, length, m.n_heads, m.head_dim)
        dt = dtype or self.dtype
        return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(m.n_layers)]


def _remat_block(block: Block, x, positions, segment_ids, rng, token_mask, *, train: bool, no_drop: bool,
                 routes: bool = False):
    """`block` without a cache, rematerialised in the backward pass. The Python flags are bound by closure (static
    for nnx.remat) rather than named by position, so the call cannot silently break when Block's signature changes."""
    def call(blk, x, positions, segment_ids, rng, token_mask):
        return blk(x, positions, segment_ids, rng, train=train, cache=None, cache_index=None, no_drop=no_drop,
                   token_mask=token_mask, routes=routes)
    return nnx.remat(call)(block, x, positions, segment_ids, rng, token_mask)


def create(cfg: ModelConfig, seed: int) -> Transformer:
    """A freshly initialised model (parameters float32, N(0, init_std), norms at 1) from `seed` (a run's
    RunConfig.seed)."""
    return Transformer(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig):
    """(graphdef, abstract nnx.State) without allocating parameters (shapes do not depend on the seed)."""
    return nnx.split(nnx.eval_shape(lambda: create(cfg, 0)))


def init_params(cfg: ModelConfig, seed: int):
    """(graphdef, params as a pure dict of float32 arrays)."""
    graphdef, state = nnx.split(create(cfg, seed))
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef, params, tokens, **kwargs):
    """Functional forward: rebuild the module from the pure parameter dict and call it."""
    return nnx.merge(graphdef, params)(tokens, **kwargs)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
    """Per-token cross-entropy in float32. logits [B, S, V], targets [B, S], weights [B, S] (1 = score).
    Returns (loss, correct, weight) [B, S], loss and correct already multiplied by the weight."""
    logits = logits.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (logz - target_logit) * weights
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
    return nll, correct, weights


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
    """Token cross-entropy in float32. logits [B, S, V], targets [B, S], weights [B, S] (1 = score).
    Returns sums (loss, correct, weight) so callers can average over micro-batches and hosts exactly."""
    nll, correct, weights = token_cross_entropy(logits, targets, weights)
    return jnp.sum(nll), jnp.sum(correct), jnp.sum(weights)
