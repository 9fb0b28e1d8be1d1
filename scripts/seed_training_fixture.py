#!/usr/bin/env python3
"""Write the seed training fixture: a few optimizer steps of each seed's OWN training function (its model, optimizer
construction, loss, gradient accumulation, clipping and LambdaLR, in PyTorch) from recorded weights and batches, for
tests/test_seed_training.py to reproduce with moe_jax's compiled train step and configs/seeds/*.py.

Runs in a PyTorch-only environment: it imports no moe_jax and no JAX.

    python scripts/seed_training_fixture.py --seedrepos SEEDREPOS [--out tests/fixtures/seed_training]

SEEDREPOS is scripts/seed_fidelity_fixture.py's (the seeds' repositories extracted at the commits named there); this
script loads the same sources and, by their own imports, the seeds' trainers and optimizers:
  seed002_dense / seed002_moe  llm-moe/llm-same-flops-data.py: train_model / train_moe_model (MinimalLLM /
                               MoEMinimalLLM, moe_layers='alternate'; Muon + AdamW, LambdaLR)
  exp5_moe                     bb_c1b4a78/experiments/exp5_simple_transformer_moe/run_experiment.py: train
                               (SimpleTransformerMoE; optimizers/muon.py)
  seed004_baseline             bb_f6354a9: training.train_model on models.create_model(config, 'moe') with
                               experiments/architectural_study's baseline settings (MuonWithWarmup + AdamW)
Nothing of the seeds is copied into this repository; only the numbers their code computes.

What is held fixed so two frameworks can agree (everything else is the seed's code as it is):
  - shape SHAPE (d_model 64, 2 layers, 4 heads, d_ff 128, 4 experts top-2, vocab 128, seq 64), batch 4 x the seed's
    own accumulation (4; seed 004: 2), STEPS optimizer steps, i.e. the seed's max_steps = STEPS x accumulation
    micro-batches (so its schedule is laid out over micro-batches, as in the seeds' runs);
  - float32 on CPU (use_amp False), dropout 0, router noise 0 (the seeds' TopKRouter.noise_std set to 0);
  - weights: every matrix and the embedding N(0, 0.02) rounded to a multiple of 2^-10 (stored as int8), norm scales
    1 + N(0, 0.05) rounded to 2^-7, loaded into the seed's model after its own init;
  - batches: STEPS x accumulation micro-batches of Markov-chain tokens (each token has 4 likely successors), so the
    loss falls;
  - Newton-Schulz in float32: the seeds' own zeropower_via_newtonschulz5 (uncompiled) with its .bfloat16() / .half()
    made float32 while it runs; its arithmetic otherwise (eps 1e-7, transposes) is theirs.

Written to OUT/<name>.npz: `q/<param>` int8 weights (value q * 2^exp, exp in fixtures.json), `tokens` uint8
[STEPS * A, B, S + 1] (micro-batch i: inputs [:, :-1], targets [:, 1:]), `losses` float64 [STEPS] (the mean over the
step's micro-batches of the seed's cross-entropy, before the step's update), `micro_losses` [STEPS, A], and per
parameter the update of optimizer step 2 (step 1 runs at lr 0 in every seed: its update is 0, recorded as
`update1_absmax`) at up to SAMPLE positions: `u2/<param>` float32 and `u2i/<param>` uint16 flat positions (the
seed's tensor layout). fixtures.json: commits, sha256 of every seed file imported, torch version, shapes, per fixture
the parameter names / shapes / scale exponents, step-2 update norms, the learning rates and Muon momentum of every
step. OUT/newton_schulz.npz: each seed optimizer's own zeropower_via_newtonschulz5 on three matrices, in its own
dtype (bfloat16 / float16) and in float32 (for optim.ns_rounding and optim.ns_eps).

Deterministic: torch.set_num_threads(1); re-running it (torch 2.13 CPU) rewrote every file byte for byte.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import types

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_fidelity_fixture as sff  # noqa: E402  (the seeds' commits, the stubs, the loader that records hashes)

SHAPE = dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, vocab_size=128, seq_len=64, num_experts=4, top_k=2,
             batch=4)
STEPS = 20
ACCUM = {"seed002_dense": 4, "seed002_moe": 4, "exp5_moe": 4, "seed004_baseline": 2}
SAMPLE = 256  # step-2 update entries kept per parameter
MATRIX_EXP, NORM_EXP = -10, -7  # weight = int8 q * 2^exp
SUCCESSORS = (0.55, 0.25, 0.15, 0.05)


def quantised_weights(spec: list, rng: np.random.Generator) -> dict:
    """{name: (int8 q, exp)} for [(name, shape)]: matrices N(0, 0.02), norm scales 1 + N(0, 0.05), both on a grid."""
    out = {}
    for name, shape in spec:
        if "norm" in name:
            q = np.rint((1.0 + 0.05 * rng.standard_normal(shape)) * 2 ** -NORM_EXP)
            out[name] = (np.clip(q, -127, 127).astype(np.int8), NORM_EXP)
        else:
            q = np.rint(0.02 * rng.standard_normal(shape) * 2 ** -MATRIX_EXP)
            out[name] = (np.clip(q, -127, 127).astype(np.int8), MATRIX_EXP)
    return out


def markov_tokens(n_micro: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_micro, B, S + 1]: sequences of a random Markov chain with 4 successors per token."""
    v, b, s = SHAPE["vocab_size"], SHAPE["batch"], SHAPE["seq_len"]
    succ = np.stack([rng.permutation(v)[:len(SUCCESSORS)] for _ in range(v)])
    out = np.empty((n_micro, b, s + 1), np.uint8)
    out[:, :, 0] = rng.integers(0, v, (n_micro, b))
    for t in range(1, s + 1):
        pick = rng.choice(len(SUCCESSORS), size=(n_micro, b), p=SUCCESSORS)
        out[:, :, t] = succ[out[:, :, t - 1], pick]
    return out


@contextlib.contextmanager
def float32_casts():
    """Tensor.bfloat16() and .half() return float32 while active (the seeds' Newton-Schulz then runs in float32)."""
    saved = torch.Tensor.bfloat16, torch.Tensor.half
    torch.Tensor.bfloat16 = torch.Tensor.half = lambda self, *a, **k: self.float()
    try:
        yield
    finally:
        torch.Tensor.bfloat16, torch.Tensor.half = saved


def float32_newton_schulz(compiled):
    """The seed's torch.compile'd zeropower_via_newtonschulz5, uncompiled, in float32."""
    orig = compiled._torchdynamo_orig_callable

    def ns(g, steps=5):
        with float32_casts():
            return orig(g, steps)
    return ns


class Recorder:
    """What a seed's training run is observed by: its cross-entropy per micro-batch (through the trainer module's
    F.cross_entropy, with gradients on), every optimizer's learning rate / momentum before and its parameters after
    each step (torch's global optimizer step hooks)."""

    def __init__(self):
        self.ce, self.after, self.lrs, self.momenta, self.model = [], {}, {}, {}, None

    def functional(self, functional):
        rec = self

        class RecordingF(types.ModuleType):
            def __getattr__(self, name):
                return getattr(functional, name)

            def cross_entropy(self, *args, **kwargs):
                out = functional.cross_entropy(*args, **kwargs)
                if torch.is_grad_enabled():
                    rec.ce.append(float(out))
                return out
        return RecordingF("F")

    def pre(self, opt, args, kwargs):
        kind = "muon" if "momentum" in opt.param_groups[0] and "betas" not in opt.param_groups[0] else "adamw"
        self.lrs.setdefault(kind, []).append(float(opt.param_groups[0]["lr"]))
        if kind == "muon" and hasattr(opt, "step_count"):  # MuonWithWarmup sets the group momentum in step()
            frac = min(opt.step_count / opt.momentum_warmup_steps, 1.0)
            self.momenta.setdefault(kind, []).append((1 - frac) * opt.initial_momentum + frac * opt.target_momentum)

    def post(self, opt, args, kwargs):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in self.model.named_parameters():
            if id(p) in ids:
                self.after.setdefault(name, []).append(p.detach().clone().numpy())


def load_weights(model, weights: dict) -> None:
    """The fixture's weights into a seed model (after its own init); router noise off."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            q, e = weights[name]
            p.copy_(torch.from_numpy(q.astype(np.float32) * np.float32(2.0 ** e)))
    for m in model.modules():
        if hasattr(m, "noise_std"):
            m.noise_std = 0.0


def seeded(cls, weights: dict, rec: Recorder):
    """The seed's model class, built by the seed's trainer, with the fixture's weights."""
    class Seeded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            load_weights(self, weights)
            rec.model = self
    return Seeded


def micro_batches(tokens: np.ndarray) -> list:
    t = torch.from_numpy(tokens.astype(np.int64))
    return [(t[i, :, :-1].contiguous(), t[i, :, 1:].contiguous()) for i in range(t.shape[0])]


def common_fields(accum: int) -> dict:
    s = SHAPE
    return dict(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], d_ff=s["d_ff"],
                batch_size=s["batch"], max_steps=STEPS * accum, gradient_accumulation_steps=accum, muon_lr=0.01,
                max_seq_len=s["seq_len"], eval_every=10 ** 9, eval_steps=1, weight_decay=0.1, dropout=0.0,
                grad_clip=1.0, use_amp=False, vocab_size=s["vocab_size"], log_milestones=())


def run_seed002(moe: bool, make_weights, batches: list, rec: Recorder):
    m = sff.load_file("seed002", f"{ARGS.seedrepos}/llm-moe/llm-same-flops-data.py")
    m.zeropower_via_newtonschulz5 = float32_newton_schulz(m.zeropower_via_newtonschulz5)
    m.F = rec.functional(m.F)
    fields = common_fields(ACCUM["seed002_moe" if moe else "seed002_dense"])
    if moe:
        cfg = m.MoEModelConfig(**fields, num_experts=SHAPE["num_experts"], expert_top_k=SHAPE["top_k"],
                               moe_layers="alternate", load_balancing_weight=0.01)
        cls, train = "MoEMinimalLLM", m.train_moe_model
    else:
        cfg, cls, train = m.ModelConfig(**fields), "MinimalLLM", m.train_model
    weights = make_weights(getattr(m, cls)(cfg))
    setattr(m, cls, seeded(getattr(m, cls), weights, rec))
    train(cfg, batches, batches[:1])
    return weights


def run_exp5(make_weights, batches: list, rec: Recorder):
    root = f"{ARGS.seedrepos}/bb_c1b4a78"
    exp = f"{root}/experiments/exp5_simple_transformer_moe"
    sys.path[:0] = [root, exp]
    cfgmod = sff.load_file("config", f"{exp}/config.py")
    # run_experiment.py puts the repository root first on sys.path, where `models` is a package without
    # SimpleTransformerMoE; its `from models import` means the experiment's own models.py, loaded here as `models`
    sff.load_file("models", f"{exp}/models.py")
    run = sff.load_file("exp5_run", f"{exp}/run_experiment.py")  # imports optimizers.muon, data, utils
    muon_mod = sys.modules["optimizers.muon"]
    muon_mod.zeropower_via_newtonschulz5 = float32_newton_schulz(muon_mod.zeropower_via_newtonschulz5)
    run.F = rec.functional(run.F)
    fields = common_fields(ACCUM["exp5_moe"])
    fields.pop("muon_lr")
    cfg = cfgmod.SimpleTransformerConfig(**fields, num_experts=SHAPE["num_experts"], expert_top_k=SHAPE["top_k"],
                                         load_balancing_weight=0.01, muon_lr=0.01, muon_momentum=0.95,
                                         adamw_lr=0.001)
    weights = make_weights(run.SimpleTransformerMoE(cfg))
    run.SimpleTransformerMoE = seeded(run.SimpleTransformerMoE, weights, rec)
    run.train(cfg, batches, batches[:1], torch.device("cpu"))
    return weights


def run_seed004(make_weights, batches: list, rec: Recorder):
    root = f"{ARGS.seedrepos}/bb_f6354a9"
    sys.path.insert(0, root)
    from configs import AdaptiveMoEModelConfig
    from models import create_model
    from system import SYSTEM_CONFIG
    import optimizers.muon
    import training
    import training.trainer
    assert SYSTEM_CONFIG.architecture == "cpu", "run on CPU: the seed's GPU paths change init, scale and matmul dtype"
    optimizers.muon.zeropower_via_newtonschulz5 = float32_newton_schulz(optimizers.muon.zeropower_via_newtonschulz5)
    training.trainer.F = rec.functional(training.trainer.F)
    # architectural_experiments.py's get_baseline_config, at the fixture's shape and length
    cfg = AdaptiveMoEModelConfig(**common_fields(ACCUM["seed004_baseline"]), num_experts=SHAPE["num_experts"],
                                 expert_top_k=SHAPE["top_k"], load_balancing_weight=0.01, use_fp8=False,
                                 use_adaptive_matmul=True, use_megatron=False)
    model = create_model(cfg, model_type="moe")
    weights = make_weights(model)
    load_weights(model, weights)
    rec.model = model
    training.train_model(model, batches, batches[:1], cfg)
    return weights


RUNNERS = {
    "seed002_dense": lambda *a: run_seed002(False, *a),
    "seed002_moe": lambda *a: run_seed002(True, *a),
    "exp5_moe": run_exp5,
    "seed004_baseline": run_seed004,
}


def purge_seed_modules() -> None:
    """Forget every module loaded from SEEDREPOS (the blueberry commits both have `models`, `optimizers`, `data`)."""
    root = os.path.realpath(ARGS.seedrepos)
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if os.path.realpath(path).startswith(root + os.sep):
            record_hash(path)
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not os.path.realpath(p).startswith(root)]


def record_hash(path: str) -> None:
    with open(path, "rb") as f:
        sff.LOADED[os.path.relpath(os.path.realpath(path), os.path.realpath(ARGS.seedrepos))] = \
            hashlib.sha256(f.read()).hexdigest()


def make_fixture(name: str) -> dict:
    """Run the seed's training for STEPS optimizer steps; write OUT/<name>.npz; return its fixtures.json entry."""
    accum = ACCUM[name]
    rng = np.random.default_rng(sorted(RUNNERS).index(name))
    tokens = markov_tokens(STEPS * accum, rng)
    rec, spec = Recorder(), {}

    def make_weights(model):
        spec.update((n, tuple(p.shape)) for n, p in model.named_parameters())
        return quantised_weights(list(spec.items()), rng)

    hooks = [register_optimizer_step_pre_hook(rec.pre), register_optimizer_step_post_hook(rec.post)]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # their logs, tqdm
        weights = RUNNERS[name](make_weights, micro_batches(tokens), rec)
    for h in hooks:
        h.remove()
    purge_seed_modules()
    assert len(rec.ce) == STEPS * accum and all(len(v) == STEPS for v in rec.after.values()), "steps not recorded"
    micro = np.asarray(rec.ce, np.float64).reshape(STEPS, accum)
    arrays = {"tokens": tokens, "losses": micro.mean(axis=1), "micro_losses": micro.astype(np.float32)}
    arrays.update({f"q/{n}": q for n, (q, _) in weights.items()})
    entry = dict(file=f"{name}.npz", seed_model=name, grad_accum=accum, params=[], update1_absmax=0.0)
    for n, (q, e) in weights.items():
        w0 = q.astype(np.float32) * np.float32(2.0 ** e)
        u1, u2 = rec.after[n][0] - w0, rec.after[n][1] - rec.after[n][0]
        entry["update1_absmax"] = max(entry["update1_absmax"], float(np.abs(u1).max()))
        pos = np.sort(rng.choice(u2.size, min(SAMPLE, u2.size), replace=False)).astype(np.uint16)
        arrays[f"u2/{n}"], arrays[f"u2i/{n}"] = u2.reshape(-1)[pos], pos
        entry["params"].append(dict(name=n, shape=list(q.shape), exp=e, update2_norm=float(np.linalg.norm(u2))))
    entry.update(lrs=rec.lrs, muon_momentum=rec.momenta.get("muon"), loss_first=float(arrays["losses"][0]),
                 loss_last=float(arrays["losses"][-1]))
    path = os.path.join(ARGS.out, entry["file"])
    np.savez_compressed(path, **arrays)
    entry["bytes"] = os.path.getsize(path)
    return entry


NS_SOURCES = {  # the three Muon implementations: file under SEEDREPOS, the dtype the seed iterates in
    "seed002": ("llm-moe/llm-same-flops-data.py", "bfloat16"),
    "exp5": ("bb_c1b4a78/optimizers/muon.py", "float16"),
    "seed004": ("bb_f6354a9/optimizers/muon.py", "bfloat16"),
}


def newton_schulz_fixture() -> dict:
    """OUT/newton_schulz.npz: inputs `in/<k>` (a wide matrix, a tall one, one of Frobenius norm ~3e-4 where the
    eps matters) and each seed's zeropower_via_newtonschulz5 of them, uncompiled, in the seed's dtype (`<seed>/<k>`,
    float32 holding bfloat16 / float16 values) and with its casts made float32 (`<seed>/f32/<k>`)."""
    rng = np.random.default_rng(7)
    inputs = {"wide": rng.standard_normal((32, 64)), "tall": rng.standard_normal((64, 32)),
              "tiny": 1e-5 * rng.standard_normal((16, 16))}
    arrays = {f"in/{k}": v.astype(np.float32) for k, v in inputs.items()}
    for seed, (rel, _) in NS_SOURCES.items():
        with contextlib.redirect_stdout(io.StringIO()):
            mod = sff.load_file(f"ns_{seed}", f"{ARGS.seedrepos}/{rel}")
        orig = mod.zeropower_via_newtonschulz5._torchdynamo_orig_callable
        for k in inputs:
            g = torch.from_numpy(arrays[f"in/{k}"])
            arrays[f"{seed}/{k}"] = orig(g, 5).float().numpy()
            with float32_casts():
                arrays[f"{seed}/f32/{k}"] = orig(g, 5).numpy()
    path = os.path.join(ARGS.out, "newton_schulz.npz")
    np.savez_compressed(path, **arrays)
    return dict(file="newton_schulz.npz", bytes=os.path.getsize(path),
                dtypes={s: d for s, (_, d) in NS_SOURCES.items()}, eps=1e-7, steps=5)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seedrepos", required=True, help="folder with llm-moe/, bb_c1b4a78/, bb_f6354a9/")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                   "seed_training"))
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(RUNNERS))
    ARGS = sff.ARGS = ap.parse_args()
    for d in sff.COMMITS:
        if not os.path.isdir(os.path.join(ARGS.seedrepos, d)):
            sys.exit(f"--seedrepos: {ARGS.seedrepos}/{d} is missing; extract {sff.COMMITS[d][0]} @ "
                     f"{sff.COMMITS[d][1]} there")
    os.makedirs(ARGS.out, exist_ok=True)
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    rope = sff.install_stubs()
    for name in ("matplotlib", "matplotlib.pyplot"):  # exp5's run_experiment.py plots; never called here
        sys.modules.setdefault(name, types.ModuleType(name))
    names = [n for n in ARGS.only.split(",") if n] or list(RUNNERS)
    fixtures = [make_fixture(n) for n in names]
    ns = newton_schulz_fixture()
    meta = dict(
        repositories={d: dict(repo=r, commit=c) for d, (r, c) in sff.COMMITS.items()},
        seed_files_sha256=dict(sorted(sff.LOADED.items())), torch=torch.__version__, rope=rope,
        shape=SHAPE, steps=STEPS, sample=SAMPLE, fixtures=fixtures, newton_schulz=ns,
        command="python scripts/seed_training_fixture.py --seedrepos SEEDREPOS")
    with open(os.path.join(ARGS.out, "fixtures.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for fx in fixtures:
        print(f"{fx['file']}: {fx['bytes'] / 1e3:.0f} kB, loss {fx['loss_first']:.4f} -> {fx['loss_last']:.4f}, "
              f"step-1 update |max| {fx['update1_absmax']:.1e}")
    print(f"{ns['file']}: {ns['bytes'] / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
