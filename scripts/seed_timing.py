#!/usr/bin/env python3
"""Time the seeds' OWN PyTorch training step: their model, their optimizers (Muon + AdamW), their learning-rate
schedule, on random tokens, on this machine's CPU or CUDA GPU; tokens/s and ms per optimizer step as JSON.

Runs in a PyTorch-only environment: it imports no moe_jax and no JAX.

    python scripts/seed_timing.py --seedrepos SEEDREPOS [--models seed002_dense,seed002_moe,exp5_moe,seed004_baseline]
        [--device auto|cpu|cuda] [--steps 10] [--warmup 3] [--json OUT.json]
        [--d_model 384 --n_heads 8 --n_layers 6 --d_ff 1536 --experts 8 --top_k 2 --vocab 49152 --seq 512
         --batch 24 --grad_accum 4] [--set moe_layers=all ...]

SEEDREPOS is laid out as for scripts/seed_fidelity_fixture.py (the seeds' public repositories extracted at the commits
it names: llm-moe/, bb_c1b4a78/, bb_f6354a9/; only the folders of the chosen models are needed); the models are built
by that script's builders, and the sha256 of every seed file imported is recorded in the output. Nothing of the seeds
is copied into this repository.

One timed step is one optimizer step of the seed's training loop: `gradient_accumulation_steps` micro-batches of
forward + cross-entropy (+ the MoE auxiliary loss) + backward, then gradient clipping, Muon + AdamW, zero_grad and the
scheduler step; with the seeds' mixed precision on CUDA (float16 autocast with a GradScaler: their `use_amp=True`)
and float32 on CPU (`--amp none`: float32 everywhere). seed004_baseline runs its own trainer functions
(training/trainer.py `_training_step`, `_optimizer_step`: the NaN checks and per-parameter norms included) with its own
optimizer factory and schedule; the other seeds train inside one long function with their data loaders, so the step is
their loop's lines, reproduced here (llm-same-flops-data.py `train_model` / `train_moe_model`; exp5 run_experiment.py
`train`, `setup_optimizers`, `create_lr_schedule`), calling their model and optimizer classes.

Shapes: by default each seed's published configuration (seed 002 and exp5: 384d 6L 8H d_ff 1536, 8 experts top-2,
batch 24 x 4 accumulated, sequence 512; seed004: 512d 8L 16H d_ff 2048, 16 experts top-2, batch 16 x 2, sequence 256),
vocabulary 49152 (the SmolLM tokenizer they use); each flag overrides it for every chosen model, and `--set FIELD=VALUE`
sets any other field of the seeds' config classes. On CPU exp5's Muon runs Newton-Schulz in float16, which is slow on
CPUs: use a small shape there. Models are timed interleaved (one step of each in turn) so that a noisy machine slows
them alike; the first `--warmup` steps (torch.compile of the seeds' Newton-Schulz, allocator warm-up) are not timed.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import math
import os
import platform
import statistics
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

MODELS = ("seed002_dense", "seed002_moe", "exp5_moe", "seed004_baseline")
_SEED002 = dict(d_model=384, n_heads=8, n_layers=6, d_ff=1536, num_experts=8, top_k=2, vocab_size=49152,
                max_seq_len=512, batch_size=24, gradient_accumulation_steps=4)
SEED_SHAPES = {"seed002_dense": _SEED002, "seed002_moe": _SEED002, "exp5_moe": _SEED002,
               "seed004_baseline": dict(d_model=512, n_heads=16, n_layers=8, d_ff=2048, num_experts=16, top_k=2,
                                        vocab_size=49152, max_seq_len=256, batch_size=16,
                                        gradient_accumulation_steps=2)}
# flag -> the shape key it sets
SHAPE_FLAGS = {"d_model": "d_model", "n_heads": "n_heads", "n_layers": "n_layers", "d_ff": "d_ff",
               "experts": "num_experts", "top_k": "top_k", "vocab": "vocab_size", "seq": "max_seq_len",
               "batch": "batch_size", "grad_accum": "gradient_accumulation_steps"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block and message, as one line
        fail(f"{message} (python scripts/seed_timing.py --help)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seedrepos", required=True, help="folder with llm-moe/, bb_c1b4a78/, bb_f6354a9/")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--amp", default="seed", choices=["seed", "none"],
                    help="seed: the seeds' float16 autocast + GradScaler on CUDA (float32 on CPU); none: float32")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default="", help="also write the result to this file")
    for flag in SHAPE_FLAGS:
        ap.add_argument(f"--{flag}", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other field of the seeds' config classes (Python literal or string), repeatable")
    return ap.parse_args(argv)


def check_args(args) -> tuple[list[str], dict]:
    """The chosen models and the --set fields; a bad value ends the script with one `error:` line, status 2."""
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        fail(f"--models {args.models}: unknown {unknown or 'empty'}; choose from {','.join(MODELS)}")
    from seed_fidelity_fixture import FOLDERS
    for m in models:
        if not os.path.isdir(os.path.join(args.seedrepos, FOLDERS[m])):
            fail(f"--seedrepos {args.seedrepos}: {FOLDERS[m]}/ is missing (needed by {m}); extract the seed "
                 "repositories there as scripts/seed_fidelity_fixture.py describes")
    for name in ("steps", "warmup", "threads", *SHAPE_FLAGS):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name not in ("warmup", "threads"))):
            fail(f"--{name}={value}: must be a positive integer")
    fields = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            fail(f"--set {item}: give FIELD=VALUE, FIELD a field of the seed's config class")
        try:
            fields[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[key] = text
    return models, fields


def pick_device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        fail(f"--device {name}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here (torch " + torch.__version__ + "); use --device cpu")
    return torch.device(name)


def seed_schedule(optimizer, cfg):
    """The seeds' schedule (llm-same-flops-data.py train_model; exp5 run_experiment.py create_lr_schedule): linear
    warm-up over max_steps // 20 steps, then cosine to 0.1 of the rate."""
    import torch
    warmup = cfg.max_steps // 20

    def lr_lambda(step):
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / (cfg.max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def exp5_optimizers(root: str, model, cfg):
    """exp5 run_experiment.py setup_optimizers: Muon (its optimizers/muon.py) on 2-D weights but the embedding and
    norms, AdamW on the rest."""
    import torch
    from seed_fidelity_fixture import load_file
    muon = load_file("bb_c1b4a78_muon", f"{root}/bb_c1b4a78/optimizers/muon.py", root)
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrices if p.ndim == 2 and "token_embedding" not in name and "norm" not in name else rest).append(p)
    return [muon.Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum),
            torch.optim.AdamW(rest, lr=cfg.adamw_lr, weight_decay=cfg.weight_decay)]


class Run:
    """One seed model ready to train: model, optimizers, schedulers, scaler and its step function."""

    def __init__(self, name: str, args, fields: dict, device):
        import torch
        from seed_fidelity_fixture import BUILDERS
        self.name, self.device = name, device
        shape = dict(SEED_SHAPES[name])
        shape.update({key: getattr(args, flag) for flag, key in SHAPE_FLAGS.items() if getattr(args, flag)})
        self.shape = shape
        amp = args.amp == "seed" and device.type == "cuda"
        cfg_fields = {"batch_size": shape["batch_size"],
                      "gradient_accumulation_steps": shape["gradient_accumulation_steps"], "use_amp": amp, **fields}
        torch.manual_seed(42)  # the seeds' set_seed(42)
        self.model, _, self.cfg = BUILDERS[name](args.seedrepos, shape, **cfg_fields)
        self.model.to(device).train()
        self.moe = name != "seed002_dense"
        self.tokens_per_step = shape["batch_size"] * shape["max_seq_len"] * shape["gradient_accumulation_steps"]
        if name == "seed004_baseline":
            self._seed004(args.seedrepos, amp)
            return
        if name.startswith("seed002"):
            self.optimizers = sys.modules["seed002"].setup_muon_optimizer(self.model, self.cfg)
        else:
            self.optimizers = exp5_optimizers(args.seedrepos, self.model, self.cfg)
        self.schedulers = [seed_schedule(o, self.cfg) for o in self.optimizers]
        self.scaler = torch.amp.GradScaler("cuda") if amp else None

    def _seed004(self, root: str, amp: bool) -> None:
        path = os.path.join(root, "bb_f6354a9")
        sys.path.insert(0, path)
        try:
            from optimizers import get_lr_scheduler, setup_optimizers
            from training import trainer
        finally:
            sys.path.remove(path)
        import torch
        optimizers = setup_optimizers(self.model, self.cfg, use_warmup=True)
        schedulers = [get_lr_scheduler(o, self.cfg, "cosine_warmup") for o in optimizers]
        scaler = torch.amp.GradScaler("cuda") if amp else None
        self.trainer = trainer
        self.state = trainer.TrainingState(model=self.model, optimizers=optimizers, schedulers=schedulers,
                                           scaler=scaler, config=self.cfg, device=self.device)

    def step(self, batches) -> float:
        """One optimizer step over the micro-batches `batches` [(x, y)]; returns the last micro-batch's CE loss."""
        if hasattr(self, "trainer"):  # seed004: its own trainer's functions
            for x, y in batches:
                out = self.trainer._training_step(self.state, x, y)
            self.trainer._optimizer_step(self.state)
            return out["ce_loss"]
        return self._replicated_step(batches)

    def _replicated_step(self, batches) -> float:
        """llm-same-flops-data.py train_model / train_moe_model and exp5 run_experiment.py train, one optimizer step."""
        import torch
        import torch.nn.functional as F
        cfg, scaler = self.cfg, self.scaler
        for x, y in batches:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=scaler is not None):
                logits, aux = self.model(x, return_aux_loss=True) if self.moe else (self.model(x), None)
                ce = F.cross_entropy(logits.view(-1, cfg.vocab_size), y.view(-1))
                loss = (ce if aux is None else ce + aux) / cfg.gradient_accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            for o in self.optimizers:
                scaler.unscale_(o)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for o in self.optimizers:
            scaler.step(o) if scaler is not None else o.step()
            o.zero_grad()
        for s in self.schedulers:
            s.step()
        if scaler is not None:
            scaler.update()
        return ce.item()


def time_runs(runs: list[Run], args) -> dict:
    """Interleaved: every step draws one set of random micro-batches and runs each model's step on it in turn."""
    import torch
    gen = torch.Generator().manual_seed(0)
    shapes = {(r.shape["batch_size"], r.shape["max_seq_len"], r.shape["vocab_size"],
               r.shape["gradient_accumulation_steps"]) for r in runs}
    times = {r.name: [] for r in runs}
    losses = {r.name: [] for r in runs}
    warmup_s = {r.name: 0.0 for r in runs}
    for it in range(args.warmup + args.steps):
        data = {}
        for b, s, v, a in sorted(shapes):
            tokens = torch.randint(0, v, (a, b, s + 1), generator=gen)
            data[(b, s, v, a)] = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
        for r in runs:
            key = (r.shape["batch_size"], r.shape["max_seq_len"], r.shape["vocab_size"],
                   r.shape["gradient_accumulation_steps"])
            batches = [(x.to(r.device), y.to(r.device)) for x, y in data[key]]
            sync(r.device)
            t0 = time.perf_counter()
            loss = r.step(batches)
            sync(r.device)
            dt = time.perf_counter() - t0
            if it < args.warmup:
                warmup_s[r.name] += dt
            else:
                times[r.name].append(dt)
                losses[r.name].append(loss)
            print(f"[{r.name}] {'warm-up' if it < args.warmup else 'timed'} step {it}: {dt * 1e3:.1f} ms, "
                  f"ce {loss:.4f}", file=sys.stderr, flush=True)
    return {r.name: summarise(r, times[r.name], losses[r.name], warmup_s[r.name]) for r in runs}


def sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def summarise(run: Run, times: list[float], losses: list[float], warmup_s: float) -> dict:
    median = statistics.median(times)
    return {"shape": run.shape, "tokens_per_step": run.tokens_per_step,
            "params": sum(p.numel() for p in run.model.parameters()),
            "ms_per_step_median": median * 1e3, "ms_per_step_min": min(times) * 1e3,
            "ms_per_step_max": max(times) * 1e3, "tokens_per_s": run.tokens_per_step / median,
            "tokens_per_s_mean": run.tokens_per_step * len(times) / sum(times), "warmup_s": warmup_s,
            "ce_losses": losses, "amp": "float16 autocast + GradScaler" if run.cfg.use_amp else "float32"}


def seed_files(root: str) -> dict[str, str]:
    """sha256 of every imported module file under `root` (the seed sources this run executed)."""
    root = os.path.realpath(root)
    out = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if path and os.path.realpath(path).startswith(root + os.sep):
            with open(path, "rb") as f:
                out[os.path.relpath(os.path.realpath(path), root)] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(out.items()))


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            return f"{names[0]} ({len(names)} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        fail(f"torch is not importable ({e}): run this script in an environment with PyTorch")
    import json

    models, fields = check_args(args)

    from seed_fidelity_fixture import install_stubs
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    rope = install_stubs()
    with contextlib.redirect_stdout(sys.stderr):  # the seeds print as they build and train: stdout is the JSON
        try:
            runs = [Run(m, args, fields, device) for m in models]
        except TypeError as e:  # a --set field the seed's config class does not have
            fail(f"--set: {e}")
        results = time_runs(runs, args)
    result = {"script": "scripts/seed_timing.py", "argv": sys.argv[1:] if argv is None else list(argv),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "device": device.type, "device_name": device_name(device),
              "threads": torch.get_num_threads(), "rope": rope, "steps": args.steps, "warmup": args.warmup,
              "results": results, "seed_files_sha256": seed_files(args.seedrepos)}
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
