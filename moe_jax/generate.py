"""Command line: generate text from a trained checkpoint.

    python -m moe_jax.generate --workdir runs/moe --prompt "In the beginning" \
        [--max_new_tokens N --temperature 0.8 --top_k 50 --top_p 0.95 --repetition_penalty 1.2 \
         --num_samples 3 --seed 0 --step N]

Restores the parameters of the latest checkpoint (or --step) of a run directory written by `moe_jax.train`, with
the run's saved config.json and tokenizer.model, then decodes --num_samples continuations of the prompt at once
(one batch) with a KV cache: see moe_jax/model/decode.py and docs/generation.md.

- The prompt is conditioned as the start of a document: its ids are [EOS] + encode(prompt). The training pipeline
  appends EOS to every document and adds no BOS, so EOS is the token every document follows in training; BOS is
  never an input there. An empty prompt is just [EOS]: the model starts a new document.
- A sample stops at EOS (or after --max_new_tokens). --temperature 0 is greedy decoding.
- Context: prompt + new tokens must fit in the model's trained length (train.seq_len). --max_new_tokens must be
  smaller than it; a longer prompt is left-truncated (its first tokens dropped), and a note says how many. Left out,
  --max_new_tokens is as many as fit after the prompt, at least a quarter of the context, at most 200
  (`default_max_new_tokens`), so the default works on any model.
- Bad input (a flag value, no run at --workdir, no such --step, a damaged run) exits with status 2 and one
  `error:` line naming the flag, as moe_jax.eval does.
Prints each sample (prompt text then continuation), then the decode speed: tokens/s of the decode loop alone (all
samples, prefill excluded) and including the prompt's prefill; compilation is timed apart.
"""

from __future__ import annotations

from absl import flags, logging

from moe_jax import cli

FLAGS = flags.FLAGS
MAX_NEW_TOKENS_CAP = 200  # the default --max_new_tokens never exceeds this


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (importing this module defines none, so
    several CLI modules can be imported in one process, e.g. by the tests)."""
    flags.DEFINE_string("workdir", None, "Run directory written by moe_jax.train (config.json, tokenizer.model, "
                        "checkpoints/).")
    flags.DEFINE_string("prompt", "", "Text to continue; empty: start a new document.")
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per sample (at most; EOS stops a sample); "
                         "must be smaller than the model's context (train.seq_len). Default: as many as fit after "
                         f"the prompt, at least a quarter of the context, at most {MAX_NEW_TOKENS_CAP}.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 50, "Keep only the k most likely tokens; 0 = off.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus: keep the smallest set of most likely tokens with this much "
                       "probability, in (0, 1]; 1 = off.")
    flags.DEFINE_float("repetition_penalty", 1.2, "CTRL/Hugging Face penalty on tokens already in the sample: a "
                       "positive logit is divided by it, a negative one multiplied; 1 = off.")
    flags.DEFINE_integer("num_samples", 3, "Samples of the prompt, decoded together as one batch.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (sample r at step i uses fold_in(fold_in(key(seed), r), i)).")
    flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the latest).")
    flags.mark_flags_as_required(["workdir"])


def fail(flag: str, message: str) -> None:
    cli.fail(f"--{flag}: {message}")


def default_max_new_tokens(context: int, prompt_len: int) -> int:
    """--max_new_tokens left out: the room after the prompt, at least a quarter of the context (a longer prompt is
    left-truncated), at most MAX_NEW_TOKENS_CAP and at most context - 1 (one prompt token must fit)."""
    return max(1, min(MAX_NEW_TOKENS_CAP, context - 1, max(context - prompt_len, context // 4)))


def prompt_ids(tokenizer, text: str) -> list[int]:
    """[EOS] + encode(text): the prompt as the start of a new document (see the module docstring)."""
    return [tokenizer.eos_id] + list(tokenizer.encode(text))


def main(argv):
    cli.no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every restore at INFO and read-only mode at WARNING
    from moe_jax.model import decode

    try:
        decode.check_sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.repetition_penalty,
                              1 if FLAGS.max_new_tokens is None else FLAGS.max_new_tokens, FLAGS.num_samples)
    except decode.SamplingError as e:
        cli.fail(str(e))
    if FLAGS.step is not None and FLAGS.step < 0:
        fail("step", f"must be >= 0, got {FLAGS.step}")

    from moe_jax.train import checkpoint as ckpt_lib
    from moe_jax.train import restore as inference

    try:
        run = ckpt_lib.load_run(FLAGS.workdir)
    except FileNotFoundError as e:
        fail("workdir", str(e))
    context = decode.context_length(run)
    if FLAGS.max_new_tokens is not None and FLAGS.max_new_tokens >= context:
        fail("max_new_tokens", f"{FLAGS.max_new_tokens} leaves no room for the prompt in this model's context of "
                               f"{context} tokens (train.seq_len); use at most {context - 1}, or leave the flag out")
    try:
        config, graphdef, params, tokenizer, step = inference.load_for_inference(FLAGS.workdir, FLAGS.step, run=run)
    except (FileNotFoundError, ckpt_lib.CheckpointError) as e:
        fail("step" if FLAGS.step is not None else "workdir", str(e))

    import numpy as np

    ids = prompt_ids(tokenizer, FLAGS.prompt)
    max_new_tokens = (default_max_new_tokens(context, len(ids)) if FLAGS.max_new_tokens is None
                      else FLAGS.max_new_tokens)
    prompt = np.tile(np.asarray(ids, np.int32)[None], (FLAGS.num_samples, 1))
    result = decode.generate(graphdef, params, config, prompt, max_new_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                             repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed,
                             eos_id=tokenizer.eos_id)
    print(f"# {FLAGS.workdir} step {step}: {result.prompt_len} prompt tokens, {FLAGS.num_samples} samples, "
          f"temperature {FLAGS.temperature} top_k {FLAGS.top_k} top_p {FLAGS.top_p} "
          f"repetition_penalty {FLAGS.repetition_penalty} seed {FLAGS.seed}")
    if result.truncated:
        print(f"# note: the prompt was left-truncated by {result.truncated} tokens to fit the context of {context} "
              f"with --max_new_tokens {max_new_tokens}")
    # The leading EOS is the document-start marker, not text: skip it (unless truncation already dropped it).
    skip = 1 if result.truncated == 0 else 0
    for r in range(FLAGS.num_samples):
        new = result.new_tokens(r, eos_id=tokenizer.eos_id)
        ended = result.lengths[r] - result.prompt_len > len(new)
        text = tokenizer.decode(result.tokens[r, skip:result.prompt_len].tolist() + new)
        print(f"\n--- sample {r + 1}/{FLAGS.num_samples} ({len(new)} new tokens"
              f"{', ended with EOS' if ended else ''}) ---")
        print(text)
    b = FLAGS.num_samples
    print(f"\n# decode: {b} x {result.steps - 1} tokens in {result.decode_s:.3f} s = "
          f"{result.decode_tokens_per_s:.1f} tokens/s (prefill excluded); "
          f"with the prefill of {result.prompt_len} prompt tokens ({result.prefill_s:.3f} s): "
          f"{result.total_tokens_per_s:.1f} tokens/s; compile {result.compile_s:.1f} s")


if __name__ == "__main__":
    cli.run(main, define_flags)
