"""`--mode decode`: decoding speed (KV cache, moe_jax/model/decode.py) of a config's shapes with random parameters.

    python -m moe_jax.bench --mode decode --config configs/moe.py [--batch 1,3 --config.x.y=value]

Per batch size: one compiling run of `decode.generate`, then --repeats timed runs (the median is reported) with EOS
disabled, so every run decodes exactly --max_new_tokens tokens (capped by the context, train.seq_len, less the
prompt) after a random --prompt_len-token prompt; sampling at temperature 0.8, top-k 50, top-p 0.95, repetition
penalty 1.2 (speed does not depend on the parameters' values). "decode" = tokens produced by the decode loop (all
rows) per second of the loop, prefill excluded; "incl. prefill" = all generated tokens per second of prefill +
decode; compilation is timed apart.
"""

from __future__ import annotations

import jax
import numpy as np

from moe_jax.config import resolve as resolve_lib
from moe_jax.config import schema as config_lib
from moe_jax.model import decode as decode_lib
from moe_jax.model import transformer as model_lib
from moe_jax.tools.bench import common

FLAGS_READ = ("config", "batch", "prompt_len", "max_new_tokens", "repeats")
BATCHES = (1, 3)


def benchmark(config, batch: int, prompt_len: int, max_new_tokens: int, repeats: int = 3, seed: int = 0) -> dict:
    """Decode speed of randomly initialised parameters of `config`'s shapes (speed does not depend on the values:
    EOS is disabled, so every run decodes exactly max_new_tokens). Median of `repeats` runs after one compiling run."""
    graphdef, params = model_lib.init_params(config.model, config.seed)
    prompt = np.random.default_rng(seed).integers(0, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
    kw = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, eos_id=-1)
    first = decode_lib.generate(graphdef, params, config, prompt, max_new_tokens, **kw)
    runs = [decode_lib.generate(graphdef, params, config, prompt, max_new_tokens, seed=seed + i + 1, **kw)
            for i in range(repeats)]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return dict(batch=batch, prompt_len=first.prompt_len, max_new_tokens=max_new_tokens, compile_s=first.compile_s,
                prefill_s=med([r.prefill_s for r in runs]), decode_s=med([r.decode_s for r in runs]),
                decode_tokens_per_s=med([r.decode_tokens_per_s for r in runs]),
                total_tokens_per_s=med([r.total_tokens_per_s for r in runs]))


def run(config, label: str, batches, prompt_len: int = 16, max_new_tokens: int = 200, repeats: int = 3,
        out=print) -> dict:
    """Parse `config` (a ConfigDict: common.prepare), then `benchmark` it at each batch size; prints a line per batch.
    Returns {'config', 'policy', 'device', 'context', 'runs': [benchmark's dicts]}."""
    config = common.prepare(config)
    policy = resolve_lib.describe(config.precision())
    out(policy)
    context = decode_lib.context_length(config)
    new = min(max_new_tokens, context - prompt_len)
    if new < 1:
        raise config_lib.ConfigError(f"--prompt_len {prompt_len} leaves no room for new tokens in the context of "
                                     f"{context} tokens (train.seq_len); use at most {context - 1}")
    device = f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    out(f"{label}: {device}, dtype {config.model.dtype}, context {context}")
    result = {"config": label, "policy": policy, "device": device, "context": context, "runs": []}
    for b in batches:
        r = benchmark(config, b, prompt_len, new, repeats)
        out(f"batch {b}: prompt {r['prompt_len']} + {r['max_new_tokens']} new tokens | decode "
            f"{r['decode_tokens_per_s']:.1f} tokens/s (prefill excluded) | {r['total_tokens_per_s']:.1f} tokens/s "
            f"incl. prefill ({r['prefill_s'] * 1e3:.1f} ms) | compile {r['compile_s']:.1f} s")
        result["runs"].append(r)
    return result


def from_flags() -> dict:
    """`--mode decode` from the command line."""
    from absl import flags

    from moe_jax import cli

    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        raise cli.UsageError("--config: --mode decode needs a config file, e.g. --config configs/moe.py")
    batches = common.int_list("batch", FLAGS.batch, BATCHES)
    for name, value in (("prompt_len", FLAGS.prompt_len), ("max_new_tokens", FLAGS.max_new_tokens),
                        ("repeats", FLAGS.repeats), *(("batch", b) for b in batches)):
        if value < 1:
            raise cli.UsageError(f"--{name} {value}: must be >= 1")
    return run(cli.config_value("config"), cli.config_path("config"), batches, FLAGS.prompt_len,
               FLAGS.max_new_tokens, FLAGS.repeats, out=lambda s: print(s, flush=True))
