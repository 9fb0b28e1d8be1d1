"""Autoregressive decoding with a KV cache: sampling filters and `generate`.

One call of `generate` runs two compiled programs:
  1. prefill: the prompt (right-padded to a length bucket) goes through the model in one pass, filling the cache
     {'k','v': [B, L, H, D]} for positions [0, bucket); the logits at the last real prompt position give token 1.
  2. decode: a `jax.lax.while_loop` feeds one token per step at cache position P + i - 1 and samples token i + 1.
     It stops after `max_new_tokens` tokens or as soon as every row has emitted EOS.
Both are jitted; the compile key is (model graph, batch, prompt bucket, cache length, max_new_tokens, top-k bucket).
The prompt length and every sampling value (temperature, top_k, top_p, repetition_penalty, eos id, seed) are traced
arguments, so changing them, the prompt length within its bucket or top_k within its bucket (0 | 1 | 2 | 3-4 | 5-8
| ... | 33-64 | ...), never recompiles. The top-k bucket exists for speed: top_k > 0 selects that many candidates
with `lax.top_k` instead of sorting the vocabulary (a stable sort of the whole vocabulary costs far more per step
than selecting k candidates; measured in docs/benchmarks.md).

Padding is safe: pad positions P..bucket-1 are written to the cache by the prefill but are never attended to, since a
query at position t attends to cache positions <= t, and the decode step for position t overwrites slot t first.
MoE layers run with `no_drop=True` (capacity = group size), so each token's expert output is the same however many
other tokens (pads included) share its routing group, and no decode token is ever dropped.

Context: the model saw at most `config.train.seq_len` positions in training, so the cache is never longer than that
(RoPE would extrapolate, but quality beyond the trained length is unknown). `max_new_tokens` must be smaller than the
context. A prompt with P + max_new_tokens > seq_len is LEFT-TRUNCATED: its first tokens are dropped and the last
seq_len - max_new_tokens kept (`GenerateResult.truncated` says how many were dropped).

Next-token rule, applied per row to the float32 logits of the last position, in this order (as Hugging Face does):
  1. repetition penalty (CTRL, Keskar et al. 2019; Hugging Face's rule): for every token already in the row (prompt
     or generated, counted once however often it occurs), a logit x becomes x / penalty if x > 0 and x * penalty if
     x < 0. With penalty > 1 this always lowers the logit (dividing a negative logit, as seed 003 did, raises it).
  2. temperature == 0: greedy, argmax of the penalised logits (ties: lowest token id). Otherwise logits / temperature,
  3. top-k (k > 0): keep the k largest logits (ties broken by lowest token id, so top_k = 1 is exactly greedy),
  4. top-p (p < 1): keep the smallest set of most likely tokens whose probability (after steps 1-3) reaches p; the
     most likely token is always kept,
  5. sample from the softmax of what is kept. Row r at step i uses key fold_in(fold_in(seed_key, r), i).
A row that has emitted EOS is finished: later positions hold EOS (never sampled) and its length stops growing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16


class SamplingError(ValueError):
    """An invalid generation setting. `flag` is the setting's name (the CLI flag without '--')."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   max_new_tokens: int = 1, num_samples: int = 1) -> None:
    """Raise SamplingError naming the first invalid setting."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise SamplingError("temperature", f"must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_k, numbers.Integral) and top_k >= 0):
        raise SamplingError("top_k", f"must be an integer >= 0 (0 = no top-k filter), got {top_k}")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise SamplingError("top_p", f"must be in (0, 1] (1 = no nucleus filter), got {top_p}")
    if not (isinstance(repetition_penalty, numbers.Real) and math.isfinite(repetition_penalty)
            and repetition_penalty > 0):
        raise SamplingError("repetition_penalty", "must be a finite number > 0 (1 = none, > 1 discourages repeats), "
                                                  f"got {repetition_penalty}")
    if not (isinstance(max_new_tokens, numbers.Integral) and max_new_tokens >= 1):
        raise SamplingError("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens}")
    if not (isinstance(num_samples, numbers.Integral) and num_samples >= 1):
        raise SamplingError("num_samples", f"must be an integer >= 1, got {num_samples}")


# ----------------------------------------------------------------------------------------------------------------
# Sampling filters: pure, jittable, over logits [B, V] float32. Scalars may be traced.

def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL / Hugging Face rule: where `seen` [B, V] is true, x -> x / penalty if x > 0 else x * penalty."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _nucleus(sorted_logits: jax.Array, top_k, top_p) -> jax.Array:
    """Keep mask over logits sorted in descending order [B, N]: rank < top_k (when k > 0), then the top-p nucleus
    of what remains (the most likely token always stays)."""
    rank = jnp.arange(sorted_logits.shape[-1])[None, :]
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    return keep & ((top_p >= 1.0) | (mass_before < top_p) | (rank == 0))


def top_k_top_p_filter(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Set the logits of tokens outside top-k (k > 0), then outside the top-p nucleus (p < 1), to -inf. Over the
    whole vocabulary with one stable sort (ties: lower id first); a no-op when neither filter is active."""
    def filt(x):
        b, v = x.shape
        order = jnp.argsort(-x, axis=-1, stable=True)
        keep_sorted = _nucleus(jnp.take_along_axis(x, order, axis=-1), top_k, top_p)
        keep = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(keep_sorted)
        return jnp.where(keep, x, -jnp.inf)
    return jax.lax.cond((top_k > 0) | (top_p < 1.0), filt, lambda x: x, logits)


def candidate_count(top_k: int, vocab: int) -> int:
    """Static size of the candidate set for `top_k`: 0 when top_k == 0 (filter the whole vocabulary), else the next
    power of two >= top_k, at most the vocabulary. Part of the compile key, so top_k values sharing it (e.g. 33..64)
    share one program."""
    if top_k <= 0:
        return 0
    return min(vocab, 1 << (top_k - 1).bit_length())


def top_k_candidates(logits: jax.Array, top_k, top_p, candidates: int) -> tuple[jax.Array, jax.Array]:
    """The same filter as `top_k_top_p_filter` for 1 <= top_k <= candidates, without sorting the vocabulary:
    `lax.top_k` takes the `candidates` largest (descending; ties: lower id first), then rank < top_k and the nucleus
    are applied to them. Returns (logits [B, candidates] with dropped ones at -inf, their token ids [B, candidates])."""
    values, ids = jax.lax.top_k(logits, candidates)
    return jnp.where(_nucleus(values, top_k, top_p), values, -jnp.inf), ids


def next_token(logits: jax.Array, seen: jax.Array, keys: jax.Array, temperature, top_k, top_p,
               repetition_penalty, candidates: int = 0) -> jax.Array:
    """The next token [B] int32 from logits [B, V], the seen-token mask [B, V] and one key per row [B].
    `candidates` (static) must be `candidate_count(top_k, V)`: with top_k > 0 only that many tokens are considered
    (a top-k selection is much cheaper than sorting the vocabulary; docs/benchmarks.md); with top_k == 0 the whole
    vocabulary."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, repetition_penalty)

    def greedy(x):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sample(x):
        x = x / temperature
        if candidates:
            x, ids = top_k_candidates(x, top_k, top_p, candidates)
            choice = jax.vmap(jax.random.categorical)(keys, x)
            return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        x = top_k_top_p_filter(x, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, sample, logits)


# ----------------------------------------------------------------------------------------------------------------
# The two compiled programs.

def _row_keys(rng: jax.Array, batch: int, step) -> jax.Array:
    rows = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(rows)


def _mark(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """seen [B, V] with tokens [B] set (ids outside [0, V) are ignored)."""
    return seen.at[jnp.arange(seen.shape[0]), tokens].set(True, mode="drop")


def _prefill(graphdef, params, prompt, prompt_len, rng, temperature, top_k, top_p, repetition_penalty,
             cache_len: int, candidates: int):
    """prompt [B, bucket] (right-padded), prompt_len scalar -> (cache, first token [B], seen [B, V])."""
    model = nnx.merge(graphdef, params)
    b, bucket = prompt.shape
    cache = model.init_cache(b, cache_len)
    logits, _, cache = model(prompt, cache=cache, cache_index=0, no_drop=True)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # [B, V]
    vocab = last.shape[-1]
    real = jnp.where(jnp.arange(bucket)[None, :] < prompt_len, prompt, vocab)  # pads -> out of range: not seen
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], real].set(True, mode="drop")
    token = next_token(last, seen, _row_keys(rng, b, 0), temperature, top_k, top_p, repetition_penalty, candidates)
    return cache, token, _mark(seen, token)


def _decode(graphdef, params, cache, first, seen, prompt_len, rng, temperature, top_k, top_p, repetition_penalty,
            eos_id, max_new_tokens: int, candidates: int):
    """The decode loop. Returns (new tokens [B, max_new_tokens], new tokens per row up to and including EOS [B],
    steps: tokens generated per row before the loop stopped = loop iterations + 1)."""
    b = first.shape[0]
    fill = jnp.maximum(eos_id, 0).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    finished = first == eos_id

    def cond(state):
        i, _, _, finished, _ = state
        return (i < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        i, cache, out, finished, seen = state
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=True)  # [B, 1]
        logits, _, cache = nnx.merge(graphdef, params)(prev, cache=cache, cache_index=prompt_len + i - 1,
                                                        no_drop=True)
        token = next_token(logits[:, -1], seen, _row_keys(rng, b, i), temperature, top_k, top_p,
                           repetition_penalty, candidates)
        token = jnp.where(finished, fill, token)
        out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
        return i + 1, cache, out, finished | (token == eos_id), _mark(seen, token)

    i, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, finished, seen))
    is_eos = out == eos_id
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, i).astype(jnp.int32)
    return out, lengths, i


# The model's GraphDef is hashable (its ModelConfig is frozen), so it is a static argument: jit keeps one executable
# per (graph, batch, prompt bucket, cache length, max_new_tokens, top-k bucket), shared by every call.
prefill_program = jax.jit(_prefill, static_argnames=("graphdef", "cache_len", "candidates"))
decode_program = jax.jit(_decode, static_argnames=("graphdef", "max_new_tokens", "candidates"))


# ----------------------------------------------------------------------------------------------------------------
# Host side.

@dataclasses.dataclass
class GenerateResult:
    tokens: np.ndarray  # [B, P + max_new_tokens] int32: the (possibly truncated) prompt then the new tokens
    lengths: np.ndarray  # [B]: valid tokens per row = P + new tokens up to and including EOS
    prompt_len: int  # P, after left-truncation
    truncated: int  # prompt tokens dropped from the left to fit the context
    steps: int  # tokens generated per row by the loop before it stopped (<= max_new_tokens)
    compile_s: float  # compiling both programs (0 when cached)
    prefill_s: float
    decode_s: float

    def new_tokens(self, row: int, strip_eos: bool = True, eos_id: int = -1) -> list[int]:
        """The generated ids of `row` (without the final EOS when strip_eos)."""
        ids = self.tokens[row, self.prompt_len:self.lengths[row]].tolist()
        if strip_eos and ids and ids[-1] == eos_id:
            ids = ids[:-1]
        return ids

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (all rows, prefill excluded) per second of the loop."""
        b = self.tokens.shape[0]
        return b * (self.steps - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def total_tokens_per_s(self) -> float:
        """All generated tokens (all rows) per second of prefill + decode (compilation excluded)."""
        b = self.tokens.shape[0]
        return b * self.steps / (self.prefill_s + self.decode_s)


def context_length(config) -> int:
    return int(config.train.seq_len)


def prompt_bucket(length: int, limit: int) -> int:
    """Padded prompt length: the next power of two >= length (at least MIN_BUCKET), at most `limit`."""
    return min(max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()), limit)


def fit_prompt(prompt_ids: np.ndarray, max_new_tokens: int, context: int) -> tuple[np.ndarray, int]:
    """Left-truncate [B, P] so that P + max_new_tokens <= context. Returns (prompt, tokens dropped)."""
    if max_new_tokens >= context:
        raise SamplingError("max_new_tokens", f"{max_new_tokens} leaves no room for the prompt in the model's "
                                              f"context of {context} tokens (train.seq_len); use at most {context - 1}")
    keep = context - max_new_tokens
    dropped = max(0, prompt_ids.shape[1] - keep)
    return prompt_ids[:, dropped:], dropped


def generate(graphdef, params, config, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
             eos_id: int = -1, bucket: bool = True) -> GenerateResult:
    """Generate `max_new_tokens` after equal-length prompts `prompt_ids` [B, P], P >= 1 (for no text, pass a
    document-start token alone: the CLI uses [EOS], see moe_jax/generate.py).

    `eos_id < 0` means no EOS (every row runs to max_new_tokens). `bucket=False` compiles for the exact prompt
    length instead of padding it to `prompt_bucket`. See the module docstring for the sampling rule and context.
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [batch, length >= 1] (for an empty prompt pass a start token), "
                         f"got shape {prompt.shape}")
    vocab = config.model.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}), got min {prompt.min()} max {prompt.max()}")
    context = context_length(config)
    prompt, dropped = fit_prompt(prompt, max_new_tokens, context)
    b, p = prompt.shape
    padded_len = prompt_bucket(p, context) if bucket else p
    cache_len = min(context, padded_len + max_new_tokens)
    padded = np.zeros((b, padded_len), np.int32)
    padded[:, :p] = prompt

    rng = jax.random.key(seed)
    scalars = (np.float32(temperature), np.int32(top_k), np.float32(top_p), np.float32(repetition_penalty))
    plen = np.int32(p)
    t0 = time.perf_counter()
    candidates = candidate_count(top_k, vocab)
    prefill = prefill_program.lower(graphdef, params, padded, plen, rng, *scalars, cache_len=cache_len,
                                    candidates=candidates).compile()
    decode = decode_program.lower(graphdef, params, *prefill.out_info, plen, rng, *scalars, np.int32(eos_id),
                                  max_new_tokens=max_new_tokens, candidates=candidates).compile()
    t1 = time.perf_counter()
    cache, first, seen = jax.block_until_ready(prefill(params, padded, plen, rng, *scalars))
    t2 = time.perf_counter()
    out, lengths, steps = jax.block_until_ready(
        decode(params, cache, first, seen, plen, rng, *scalars, np.int32(eos_id)))
    t3 = time.perf_counter()
    tokens = np.concatenate([prompt, np.asarray(out)], axis=1)
    return GenerateResult(tokens=tokens, lengths=p + np.asarray(lengths), prompt_len=p, truncated=dropped,
                          steps=int(steps), compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=t3 - t2)
