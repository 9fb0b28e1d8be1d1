"""Routing diagnostics of a trained MoE: where tokens go, what is dropped, how sure the router is, what experts learn.

    python -m moe_jax.routing --workdir runs/cpu [--step N] [--text FILE] [--batches K] [--noise_std 0.01]

Restores the checkpoint (latest or --step) on one device, runs the model over the validation windows (or over
--text, tokenized with the run's tokenizer and cut into windows of train.seq_len) in batches of train.batch_size
rows, and reads every MoE layer's routes and routing metrics from the model's own forward pass (`routes=True`:
moe.route_record and moe.routing_metrics with detail; no router is re-applied here), with padding passed as the
token_mask exactly as the train and eval steps pass it. The model is run twice, once at the eval capacity
(moe.eval_capacity_factor, what evaluation uses) and once at the train capacity (moe.capacity_factor, train=True
without dropout or router noise), so the later layers see what each setting gives them. Routes are the float32 router
logits [G, T, E] over routing groups of T tokens (dropless: one group of all tokens, nothing dropped), the top-k
choices and which of them got a capacity slot; per layer:

  tokens_per_expert_demanded [E]  top-k assignments made to each expert, before capacity
  tokens_per_expert_kept     [E]  assignments that got a slot (the rest are dropped)
  dropped_fraction                1 - kept / demanded;  tokens_fully_dropped: tokens all of whose k choices dropped
  load_cv, load_max_over_mean     std / mean and max / mean of the demanded counts (moe.routing_metrics' *_demand)
  router_entropy                  mean over tokens of -sum_e p_e ln p_e (nats), and divided by ln E
  top1_prob, topk_prob            mean probability of the first choice, and of the k choices together (before the
                                  renormalisation of the gates)
  noise_flip_fraction             fraction of tokens whose set of k experts changes when N(0, noise_std^2) noise is
                                  added to the model's logits (one draw per token; default noise_std 1e-2)

Specialisation (eval-capacity pass, demanded assignments, i.e. the router's choices): for each layer and expert the
token ids it is sent most often relative to their frequency in the analysed text, lift(e, v) = P(v | e) / P(v) =
(n(e, v) / n(e)) / (f(v) / N): 1 for a router that ignores the token, at most N / n(e) for an id always sent to e
(ties ranked by count; only ids with n(e, v) >= --min_count are ranked); and the share of the expert's assignments
that go to its single most common id (seed 003's test checks the same share) next to that id's share of the text.
Only real tokens count (validation padding has weight 0).

Writes <workdir>/routing/: routing.json (everything above), load_heatmap.png (layers x experts, share of demanded
assignments), drops_by_layer.png (eval vs train capacity), entropy_by_layer.png (normalised entropy, top-1 and top-k
probability), specialisation.txt (the table). Flags, errors and exit codes follow moe_jax/cli.py: a bad flag or value
is one `error:` line naming it, status 2.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.model import transformer as model_lib
from moe_jax.train.restore import load_for_inference

OUT_DIR = "routing"
FILES = ("routing.json", "load_heatmap.png", "drops_by_layer.png", "entropy_by_layer.png", "specialisation.txt")
MODES = ("eval", "train")


# ---------------------------------------------------------------------------------------------------------------
# The routes and metrics the model reports


def moe_layers(model) -> list[int]:
    """Indices of the model's MoE blocks."""
    return [i for i, b in enumerate(model.blocks) if b.is_moe]


def forward_routes(graphdef, params, batch: dict, *, train: bool) -> dict:
    """The model's forward pass over `batch` ('inputs' [B, S]; optional 'weights' (0 = padding: passed as the
    token_mask, as the train and eval steps do), 'positions', 'segment_ids') with routes=True, no rng (no dropout,
    no router noise); train=True uses the train capacity. Returns the model's aux: the routing metrics (detail
    included) stacked over MoE layers and aux['routes'] (moe.route_record per layer, stacked)."""
    weights = batch.get("weights")
    _, aux, _ = model_lib.apply(graphdef, params, batch["inputs"], positions=batch.get("positions"),
                                segment_ids=batch.get("segment_ids"), train=train,
                                token_mask=None if weights is None else weights > 0, routes=True)
    return aux


def layer_sums(metrics: dict, routes: dict, tokens: jax.Array, vocab_size: int,
               noise: jax.Array | None = None) -> dict:
    """Accumulable statistics of one layer over one batch, from what the model reported: metrics (its
    moe.routing_metrics, detail included; means over real tokens, turned back into sums), routes (moe.route_record:
    logits [G, T, E], expert_index [G, T, K], mask [G, T]), tokens [G, T] ids; noise [G, T, E] (scaled normals added
    to the model's logits for the flip count, or None). token_expert [E, V] counts the demanded assignments of each
    token id to each expert, token_freq [V] the id counts (real tokens only)."""
    idx, w = routes["expert_index"], routes["mask"].astype(jnp.float32)
    e, k = routes["logits"].shape[-1], idx.shape[-1]
    n = metrics["real_tokens"]
    flips = jnp.zeros((), jnp.float32)
    if noise is not None:
        _, noisy_idx = jax.lax.top_k(routes["logits"] + noise, k)
        changed = jnp.any(jnp.sort(noisy_idx, axis=-1) != jnp.sort(idx, axis=-1), axis=-1)
        flips = jnp.sum(w * changed)
    flat = (idx * vocab_size + tokens[..., None]).reshape(-1)
    token_expert = jnp.zeros((e * vocab_size,), jnp.float32).at[flat].add(
        jnp.broadcast_to(w[..., None], idx.shape).reshape(-1)).reshape(e, vocab_size)
    token_freq = jnp.zeros((vocab_size,), jnp.float32).at[tokens.reshape(-1)].add(w.reshape(-1))
    return dict(tokens=n, demanded=metrics["tokens_per_expert_demand"], kept=metrics["tokens_per_expert"],
                fully_dropped=n * metrics["tokens_fully_dropped_fraction"], entropy=n * metrics["router_entropy"],
                top1=n * metrics["router_confidence"], topk=n * metrics["router_topk_prob"], flips=flips,
                token_expert=token_expert, token_freq=token_freq)


def summarize_layer(sums: dict, num_experts: int) -> dict:
    """Per-layer metrics from accumulated sums (numpy)."""
    n = max(float(sums["tokens"]), 1.0)
    demanded = np.asarray(sums["demanded"], np.float64)
    kept = np.asarray(sums["kept"], np.float64)
    mean = max(demanded.mean(), 1e-12)
    entropy = float(sums["entropy"]) / n
    return dict(
        tokens=int(round(float(sums["tokens"]))),
        tokens_per_expert_demanded=[int(round(x)) for x in demanded],
        tokens_per_expert_kept=[int(round(x)) for x in kept],
        dropped_fraction=float(1.0 - kept.sum() / max(demanded.sum(), 1e-12)),
        tokens_fully_dropped_fraction=float(sums["fully_dropped"]) / n,
        load_cv=float(demanded.std() / mean),
        load_max_over_mean=float(demanded.max() / mean),
        router_entropy=entropy,
        router_entropy_normalized=entropy / math.log(num_experts),
        top1_prob=float(sums["top1"]) / n,
        topk_prob=float(sums["topk"]) / n,
        noise_flip_fraction=float(sums["flips"]) / n,
    )


def specialisation(token_expert: np.ndarray, token_freq: np.ndarray, min_count: int = 5, top: int = 5) -> list[dict]:
    """Per expert: its share of the assignments, its most common token id and that id's share of the expert's
    assignments (and of the text), and the `top` ids by lift P(v | e) / P(v) among ids with n(e, v) >= min_count.
    token_expert [E, V] assignment counts; token_freq [V] token counts."""
    token_expert = np.asarray(token_expert, np.float64)
    token_freq = np.asarray(token_freq, np.float64)
    total_tokens = max(token_freq.sum(), 1.0)
    total_assign = max(token_expert.sum(), 1.0)
    out = []
    for e, row in enumerate(token_expert):
        n_e = row.sum()
        entry = dict(expert=e, share=float(n_e / total_assign), assignments=int(round(n_e)))
        if n_e > 0:
            v = int(np.argmax(row))
            entry.update(top_token=v, top_token_share=float(row[v] / n_e),
                         top_token_text_share=float(token_freq[v] / total_tokens))
            ok = (row >= min_count) & (token_freq > 0)
            lift = np.where(ok, (row / n_e) / np.maximum(token_freq / total_tokens, 1e-30), -np.inf)
            ranked = np.lexsort((-row, -np.round(lift, 6)))  # by lift, ties (e.g. ids always sent here) by count
            order = [int(i) for i in ranked[:top] if np.isfinite(lift[i])]
            entry["top_lift"] = [dict(token=i, count=int(round(row[i])), lift=float(lift[i])) for i in order]
        else:
            entry.update(top_token=None, top_token_share=0.0, top_token_text_share=0.0, top_lift=[])
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Over batches


def make_batch_fn(config, graphdef):
    """jit-compiled (params, batch, key, noise_std) -> {mode: [layer sums]} for both capacities."""
    vocab_size = config.model.vocab_size

    def fn(params, batch, key, noise_std):
        out = {}
        for mode in MODES:
            aux = forward_routes(graphdef, params, batch, train=mode == "train")
            layers = []
            for li in range(aux["capacity"].shape[0]):
                metrics = {name: v[li] for name, v in aux.items() if name not in ("moe_loss", "routes")}
                routes = {name: v[li] for name, v in aux["routes"].items()}
                g, t, e = routes["logits"].shape
                noise = noise_std * jax.random.normal(jax.random.fold_in(key, li), (g, t, e), jnp.float32)
                sums = layer_sums(metrics, routes, batch["inputs"].reshape(g, t), vocab_size, noise)
                sums["capacity"] = metrics["capacity"]
                sums["group_size"] = jnp.asarray(t, jnp.float32)
                layers.append(sums)
            out[mode] = layers
        return out

    return jax.jit(fn)


def analyse(config, graphdef, params, batches: list[dict], *, noise_std: float = 1e-2, seed: int = 0,
            min_count: int = 5, top: int = 5) -> dict:
    """Routing statistics of `params` over `batches` (dicts with 'inputs' [B, S] and optionally 'weights',
    'positions', 'segment_ids'). Returns the routing.json content (without run metadata)."""
    if not config.moe.num_experts:
        raise ValueError("the model is dense (moe.num_experts=0): it has no router to analyse")
    fn = make_batch_fn(config, graphdef)
    totals = None
    key = jax.random.key(seed)
    for i, b in enumerate(batches):
        b = {k: jnp.asarray(v) for k, v in b.items() if k in ("inputs", "weights", "positions", "segment_ids")}
        got = jax.device_get(fn(params, b, jax.random.fold_in(key, i), jnp.float32(noise_std)))
        if totals is None:
            totals = {m: [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in got[m]]
                      for m in MODES}
        else:
            for m in MODES:
                for acc, layer in zip(totals[m], got[m]):
                    for k, v in layer.items():
                        if k not in ("capacity", "group_size"):
                            acc[k] = acc[k] + np.asarray(v, np.float64)
    if totals is None:
        raise ValueError("no batches to analyse")
    from flax import nnx
    layer_ids = moe_layers(nnx.merge(graphdef, params))
    e = config.moe.num_experts
    layers = []
    for j, layer in enumerate(layer_ids):
        entry = dict(layer=layer)
        for m in MODES:
            s = totals[m][j]
            entry[m] = summarize_layer(s, e)
            entry[m].update(capacity=int(s["capacity"]), group_size=int(s["group_size"]))
        entry["specialisation"] = specialisation(totals["eval"][j]["token_expert"], totals["eval"][j]["token_freq"],
                                                 min_count, top)
        layers.append(entry)
    freq = totals["eval"][0]["token_freq"]
    return dict(num_experts=e, top_k=config.moe.top_k, capacity_factor=dict(eval=config.moe.eval_capacity_factor,
                train=config.moe.capacity_factor), noise_std=noise_std, batches=len(batches),
                tokens=int(round(float(freq.sum()))), most_common_token_share=float(freq.max() / max(freq.sum(), 1)),
                layers=layers)


# ---------------------------------------------------------------------------------------------------------------
# Data


def text_batches(ids: np.ndarray, seq_len: int, batch_size: int, pad_id: int) -> list[dict]:
    """Token ids [N] -> batches of [batch_size, seq_len] windows (inputs, weights); the last window and the last
    batch are padded with weight-0 positions/rows."""
    ids = np.asarray(ids, np.int32)
    n_windows = max(1, math.ceil(len(ids) / seq_len))
    n_rows = math.ceil(n_windows / batch_size) * batch_size
    inputs = np.full((n_rows * seq_len,), pad_id, np.int32)
    weights = np.zeros((n_rows * seq_len,), np.float32)
    inputs[:len(ids)], weights[:len(ids)] = ids, 1.0
    inputs, weights = inputs.reshape(n_rows, seq_len), weights.reshape(n_rows, seq_len)
    return [dict(inputs=inputs[r:r + batch_size], weights=weights[r:r + batch_size])
            for r in range(0, n_rows, batch_size)]


def validation_batches(config, workdir: str) -> list[dict]:
    from moe_jax.train import checkpoint as ckpt_lib
    from moe_jax import data
    config = config.replace(data={"tokenizer_path": os.path.join(workdir, ckpt_lib.TOKENIZER_FILE)})
    return list(data.build(config).val_batches(config.train.batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def _piece(tokenizer, i) -> str:
    if tokenizer is None or i is None:
        return str(i)
    return repr(tokenizer.id_to_piece(int(i)))


def specialisation_table(result: dict, tokenizer=None) -> str:
    lines = [f"# expert specialisation ({result['source']}, {result['tokens']:,} tokens, eval capacity; demanded "
             f"assignments). lift = P(token | expert) / P(token); ids with fewer than {result['min_count']} "
             f"assignments to the expert are not ranked. The most common token of the text is "
             f"{100 * result['most_common_token_share']:.1f}% of it.", ""]
    for layer in result["layers"]:
        lines.append(f"layer {layer['layer']}")
        lines.append(f"  {'expert':>6} {'share':>6}  {'top token (share of expert / of text)':<44} top tokens by lift")
        for s in layer["specialisation"]:
            top = (f"{_piece(tokenizer, s['top_token'])} ({100 * s['top_token_share']:.1f}% / "
                   f"{100 * s['top_token_text_share']:.1f}%)")
            lifts = ", ".join(f"{_piece(tokenizer, t['token'])} x{t['lift']:.1f} ({t['count']})" for t in s["top_lift"])
            lines.append(f"  {s['expert']:>6} {100 * s['share']:>5.1f}%  {top:<44} {lifts}")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str, tokenizer=None) -> list[str]:
    """routing.json, the three plots and specialisation.txt in out_dir. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in FILES]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    layers = result["layers"]
    names = [f"layer {layer['layer']}" for layer in layers]  # transformer index, as the training plots name them
    e = result["num_experts"]

    share = np.array([100 * np.asarray(layer["eval"]["tokens_per_expert_demanded"], np.float64)
                      / max(1, sum(layer["eval"]["tokens_per_expert_demanded"])) for layer in layers])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * e, 1.0 + 0.45 * len(layers)), dpi=80)
    im = ax.imshow(share, cmap="viridis", aspect="auto")
    ax.set_xticks(range(e))
    ax.set_yticks(range(len(layers)), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("transformer layer (MoE)")
    for (i, j), val in np.ndenumerate(share):
        dark = val < (share.min() + share.max()) / 2
        ax.text(j, i, f"{val:.1f}", ha="center", va="center", color="w" if dark else "k", fontsize=7)
    ax.set_title(f"share of top-{result['top_k']} assignments (%)\nuniform = {100 / e:.1f}%", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)

    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=80)
    for off, m in ((-0.2, "eval"), (0.2, "train")):
        cf = result["capacity_factor"][m]
        ax.bar(x + off, [100 * layer[m]["dropped_fraction"] for layer in layers], width=0.4,
               label=f"{m} capacity (factor {cf:g}, C={layers[0][m]['capacity']})")
    ax.set_xticks(x, names)
    ax.set_xlabel("transformer layer (MoE)")
    ax.set_ylabel("dropped assignments (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=80)
    ax.plot(x, [layer["eval"]["router_entropy_normalized"] for layer in layers], "o-", label="entropy / ln E")
    ax.plot(x, [layer["eval"]["top1_prob"] for layer in layers], "s-", label="mean top-1 prob")
    ax.plot(x, [layer["eval"]["topk_prob"] for layer in layers], "^-", label=f"mean top-{result['top_k']} prob")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("transformer layer (MoE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[3])
    plt.close(fig)

    with open(paths[4], "w") as f:
        f.write(specialisation_table(result, tokenizer))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run(workdir: str, step: int | None = None, text: str | None = None, batches: int | None = None,
        noise_std: float = 1e-2, min_count: int = 5, top: int = 5) -> dict:
    """The command: restore, analyse, write <workdir>/routing/. Returns the result dict."""
    from moe_jax import sharding as sharding_lib

    mesh = sharding_lib.build_mesh((1, 1, 1), jax.devices()[:1])
    config, graphdef, params, tokenizer, step = load_for_inference(workdir, step, mesh)
    if not config.moe.num_experts:
        raise ValueError(f"--workdir {workdir}: the run is dense (moe.num_experts=0): no router to analyse")
    if text is not None:
        with open(text) as f:
            ids = np.asarray(tokenizer.encode(f.read()), np.int32)
        if len(ids) == 0:
            raise ValueError(f"--text {text}: no tokens")
        data = text_batches(ids, config.train.seq_len, config.train.batch_size, tokenizer.pad_id)
        source = f"text {text}"
    else:
        data = validation_batches(config, workdir)
        source = "validation split"
    n = config.train.eval_batches if batches is None else batches
    if n:
        data = data[:n]
    result = analyse(config, graphdef, params, data, noise_std=noise_std, min_count=min_count, top=top)
    result.update(workdir=workdir, step=step, source=source, min_count=min_count)
    out_dir = os.path.join(workdir, OUT_DIR)
    result["files"] = write_outputs(result, out_dir, tokenizer)
    with open(os.path.join(out_dir, FILES[0]), "w") as f:  # again, now with its file list
        json.dump(result, f, indent=1)
    return result


def summary_table(result: dict) -> str:
    lines = [f"routing of {result['workdir']} step {result['step']} over {result['tokens']:,} tokens "
             f"({result['source']}, {result['batches']} batches); {result['num_experts']} experts top-"
             f"{result['top_k']}; flips under N(0, {result['noise_std']:g}^2) logit noise",
             f"{'layer':>5} {'C eval/train':>12} {'drop eval':>9} {'drop train':>10} {'load CV':>7} {'max/mean':>8} "
             f"{'H/lnE':>6} {'top1 p':>6} {'topk p':>6} {'flips':>6} {'top-token share':>15}"]
    for layer in result["layers"]:
        ev, tr = layer["eval"], layer["train"]
        spec = max(s["top_token_share"] for s in layer["specialisation"])
        lines.append(f"{layer['layer']:>5} {ev['capacity']:>5}/{tr['capacity']:<6} "
                     f"{100 * ev['dropped_fraction']:>8.2f}% "
                     f"{100 * tr['dropped_fraction']:>9.2f}% {ev['load_cv']:>7.3f} {ev['load_max_over_mean']:>8.2f} "
                     f"{ev['router_entropy_normalized']:>6.3f} {ev['top1_prob']:>6.3f} {ev['topk_prob']:>6.3f} "
                     f"{100 * ev['noise_flip_fraction']:>5.2f}% {100 * spec:>14.1f}%")
    lines.append("(load CV, max/mean, entropy, probabilities and flips at the eval capacity; top-token share: the "
                 "largest share of one expert's assignments going to one token id)")
    return "\n".join(lines)


def define_flags() -> None:
    """The command's flags (defined only when it runs as a program; see moe_jax/cli.py)."""
    from absl import flags
    flags.DEFINE_string("workdir", None, "Run directory written by moe_jax.train.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("text", None, "Analyse this text file instead of the validation split.")
    flags.DEFINE_integer("batches", None, "Batches of train.batch_size rows (default: the run's train.eval_batches; "
                         "0 = all).")
    flags.DEFINE_float("noise_std", 1e-2, "Std of the logit noise for the flip count.")
    flags.DEFINE_integer("min_count", 5, "Assignments a token id needs to be ranked by lift.")
    flags.DEFINE_integer("top", 5, "Token ids listed per expert.")
    flags.mark_flags_as_required(["workdir"])


def command(workdir: str, step: int | None = None, text: str | None = None, batches: int | None = None,
            noise_std: float = 1e-2, min_count: int = 5, top: int = 5) -> dict:
    """The command: check the flags (cli.UsageError naming a bad one), analyse, print the summary table."""
    from moe_jax import cli
    checks = [
        (os.path.isfile(os.path.join(workdir, "config.json")),
         f"--workdir {workdir}: no config.json there; give a directory written by moe_jax.train"),
        (step is None or step >= 0, f"--step {step}: must be >= 0"),
        (text is None or os.path.isfile(text), f"--text {text}: no such file"),
        (batches is None or batches >= 0, f"--batches {batches}: must be >= 0 (0 = all)"),
        (noise_std >= 0, f"--noise_std {noise_std}: must be >= 0"),
        (min_count >= 1, f"--min_count {min_count}: must be >= 1"),
        (top >= 1, f"--top {top}: must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise cli.UsageError(msg)
    try:
        result = run(workdir, step, text, batches, noise_std, min_count, top)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        if "no checkpoint" in msg and step is not None:
            msg = f"--step {step}: {msg}"
        raise cli.UsageError(msg) from None
    print(summary_table(result))
    print("wrote " + ", ".join(result["files"]))
    return result


def main(argv) -> None:
    from absl import flags, logging

    from moe_jax import cli
    cli.no_arguments(argv)
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every restore
    command(f.workdir, f.step, f.text, f.batches, f.noise_std, f.min_count, f.top)


if __name__ == "__main__":
    from moe_jax import cli
    cli.run(main, define_flags)
