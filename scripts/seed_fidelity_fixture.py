#!/usr/bin/env python3
"""Write the seed-fidelity fixtures: tiny random-weight models built with the seeds' OWN PyTorch classes, their
weights, a token batch, the logits and the routing choices, for tests/test_seed_fidelity.py to match with moe_jax.

Runs in a PyTorch-only environment: it imports no moe_jax and no JAX.

    python scripts/seed_fidelity_fixture.py --seedrepos SEEDREPOS [--out tests/fixtures/seed_fidelity]

SEEDREPOS holds the seeds' public repositories extracted at the commits below (`git archive <commit> | tar -x`):
  llm-moe/      vukrosic/llm-moe @ 0987b88 (seed 002: llm-same-flops-data.py, unchanged since c03e7e5)
  bb_c1b4a78/   Open-Superintelligence-Lab/blueberry-llm @ c1b4a78 (seed 000: experiments/exp5_simple_transformer_moe)
  bb_f6354a9/   Open-Superintelligence-Lab/blueberry-llm @ f6354a9 (seed 004: experiments/architectural_study, whose
                baseline builds models.AdaptiveMoEMinimalLLM)
Nothing of the seeds is copied into this repository; only the arrays their code computes.

Each fixture `<name>.npz` holds float32 weights under `w/<the seed's parameter name>` (PyTorch layout: Linear weights
[out, in]; tied head stored once, as the embedding), `tokens` [B, S] int32, `logits` [B, S, V] float32 and, per MoE
layer i, `route/<i>` [B, S, K] int32 (the top-k expert indices in the seed's order, highest first). Models run in
eval mode (no dropout, no router noise) in float32 on CPU. `fixtures.json` names the commits, the sha256 of every
seed file loaded, the torch version and each fixture's shape.

Inits: 'seed' is the seed's own initialisation (torch.manual_seed(0)); 'wide' redraws every matrix N(0, 0.3) and
every norm scale 1 + N(0, 0.2), which makes activations large and routing decisive, so a wrong option (RoPE pairs,
GELU form, embedding scale, eps) shows as a large logit difference.

Deterministic: re-running it (torch 2.13 CPU, 2026-11-26) rewrote every file byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COMMITS = {
    "llm-moe": ("vukrosic/llm-moe", "0987b88"),
    "bb_c1b4a78": ("Open-Superintelligence-Lab/blueberry-llm", "c1b4a78"),
    "bb_f6354a9": ("Open-Superintelligence-Lab/blueberry-llm", "f6354a9"),
}
# Tiny shape shared by every fixture (the seeds' classes take these as their own config fields).
SHAPE = dict(d_model=32, n_heads=4, n_layers=2, d_ff=64, vocab_size=128, max_seq_len=32, num_experts=4, top_k=2)
BATCH = 2
WIDE_STD, WIDE_NORM_STD = 0.3, 0.2


class _RotaryStandIn(nn.Module):
    """torchtune.modules.RotaryPositionalEmbeddings (0.6.1) for environments without torchtune: adjacent pairs
    (x[2i], x[2i+1]) rotated by pos * base^(-2i/D), computed in float32 like torchtune's cache. Used only when
    `import torchtune.modules` fails; fixtures.json records which one ran."""

    def __init__(self, dim: int, max_seq_len: int = 4096, base: int = 10_000):
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=theta.dtype), theta).float()
        self.register_buffer("cache", torch.stack([angles.cos(), angles.sin()], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos=None) -> torch.Tensor:
        rc = self.cache[: x.size(1)] if input_pos is None else self.cache[input_pos]
        xp = x.float().reshape(*x.shape[:-1], -1, 2)
        rc = rc.view(-1, xp.size(1), 1, xp.size(3), 2)
        out = torch.stack([xp[..., 0] * rc[..., 0] - xp[..., 1] * rc[..., 1],
                           xp[..., 1] * rc[..., 0] + xp[..., 0] * rc[..., 1]], dim=-1)
        return out.flatten(3).type_as(x)


def install_stubs() -> str:
    """The seed files import HF `datasets` (and llm-moe `transformers`) for data loading this script never calls."""
    for name in ("datasets", "transformers"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(load_dataset=None, AutoTokenizer=None)
    try:
        import torchtune.modules  # noqa: F401
        return "torchtune " + getattr(sys.modules.get("torchtune"), "__version__", "?")
    except Exception:
        pkg, mods = types.ModuleType("torchtune"), types.ModuleType("torchtune.modules")
        mods.RotaryPositionalEmbeddings = _RotaryStandIn
        pkg.modules = mods
        sys.modules["torchtune"], sys.modules["torchtune.modules"] = pkg, mods
        return "stand-in (scripts/seed_fidelity_fixture.py:_RotaryStandIn)"


LOADED: dict[str, str] = {}


def load_file(name: str, path: str, root: str):
    """Import the file `path` as module `name`, recording its sha256 under its path relative to `root`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    with open(path, "rb") as f:
        LOADED[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return mod


def topk_recorder(routes: dict, layer: int, k: int, from_logits_probs: bool):
    """Forward hook that stores a router's top-k expert indices [B, S, K] for layer `layer`."""
    def hook(module, inputs, output):
        if from_logits_probs:  # exp5: the hook sits on the router Linear; its module takes top-k of softmax(logits)
            idx = torch.topk(F.softmax(output, dim=-1), k, dim=-1).indices
            routes[layer] = idx.reshape(BATCH, SHAPE["max_seq_len"], k)
        else:  # TopKRouter returns (weights, indices, probs)
            routes[layer] = output[1]
    return hook


# Each builder: (root: SEEDREPOS, shape: a dict like SHAPE, **fields: more of the seed config's own fields, which
# override the fixture's choices) -> (model, routers [(layer, router module, hook on logits?)], the seed's config).
def build_seed002(root: str, shape: dict, moe: bool, **fields):
    m = load_file("seed002", f"{root}/llm-moe/llm-same-flops-data.py", root)
    s = shape
    common = dict(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], d_ff=s["d_ff"],
                  max_seq_len=s["max_seq_len"], vocab_size=s["vocab_size"], use_amp=False)
    if not moe:
        cfg = m.ModelConfig(**{**common, **fields})
        return m.MinimalLLM(cfg), [], cfg
    cfg = m.MoEModelConfig(**{**common, "num_experts": s["num_experts"], "expert_top_k": s["top_k"],
                              "moe_layers": "alternate", **fields})
    model = m.MoEMinimalLLM(cfg)
    routers = [(i, b.feed_forward.router, False) for i, b in enumerate(model.transformer_blocks) if b.use_moe]
    return model, routers, cfg


def build_exp5(root: str, shape: dict, **fields):
    exp = f"{root}/bb_c1b4a78/experiments/exp5_simple_transformer_moe"
    cfgmod = load_file("config", f"{exp}/config.py", root)  # models.py does `from config import ...`
    mods = load_file("exp5_models", f"{exp}/models.py", root)
    s = shape
    cfg = cfgmod.SimpleTransformerConfig(**{**dict(d_model=s["d_model"], n_heads=s["n_heads"],
                                                   n_layers=s["n_layers"], d_ff=s["d_ff"],
                                                   max_seq_len=s["max_seq_len"], vocab_size=s["vocab_size"],
                                                   num_experts=s["num_experts"], expert_top_k=s["top_k"],
                                                   use_amp=False), **fields})
    model = mods.SimpleTransformerMoE(cfg)
    return model, [(i, b.moe.router, True) for i, b in enumerate(model.blocks)], cfg


def build_seed004(root: str, shape: dict, **fields):
    root = f"{root}/bb_f6354a9"
    sys.path.insert(0, root)
    try:
        from configs import AdaptiveMoEModelConfig
        from models.adaptive_llm import AdaptiveMoEMinimalLLM
        from system import SYSTEM_CONFIG  # noqa: F401 (its GPU detection decides init, scale and matmul dtype)
    finally:
        sys.path.remove(root)
    for rel in ("configs/adaptive_moe_config.py", "models/adaptive_llm.py", "models/components.py",
                "models/layers.py", "ops/matmul/__init__.py", "ops/matmul/_fallback_impl.py", "system/__init__.py"):
        with open(f"{root}/{rel}", "rb") as f:
            LOADED[f"bb_f6354a9/{rel}"] = hashlib.sha256(f.read()).hexdigest()
    s = shape
    # The study's baseline (architectural_experiments.py: get_baseline_config), shrunk to the fixture's shape.
    cfg = AdaptiveMoEModelConfig(**{**dict(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                                           d_ff=s["d_ff"], max_seq_len=s["max_seq_len"], vocab_size=s["vocab_size"],
                                           num_experts=s["num_experts"], expert_top_k=s["top_k"],
                                           load_balancing_weight=0.01, use_amp=True, use_fp8=False, dropout=0.1,
                                           use_adaptive_matmul=True, use_megatron=False), **fields})
    model = AdaptiveMoEMinimalLLM(cfg)
    return model, [(i, b.feed_forward.router, False) for i, b in enumerate(model.transformer_blocks)], cfg


BUILDERS = {
    "seed002_dense": lambda root, shape, **fields: build_seed002(root, shape, False, **fields),
    "seed002_moe": lambda root, shape, **fields: build_seed002(root, shape, True, **fields),
    "exp5_moe": build_exp5,
    "seed004_baseline": build_seed004,
}
# The folder under SEEDREPOS each builder reads
FOLDERS = {"seed002_dense": "llm-moe", "seed002_moe": "llm-moe", "exp5_moe": "bb_c1b4a78",
           "seed004_baseline": "bb_f6354a9"}


def widen(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + WIDE_NORM_STD * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(WIDE_STD * torch.randn(p.shape, generator=gen))


def make_fixture(name: str, init: str) -> dict:
    torch.manual_seed(0)
    model, routers, _ = BUILDERS[name](ARGS.seedrepos, SHAPE)
    if name == "seed004_baseline":
        assert sys.modules["system"].SYSTEM_CONFIG.architecture == "cpu", \
            "run on CPU: the seed's GPU paths change init, scale and matmul dtype"
    gen = torch.Generator().manual_seed(1)
    if init == "wide":
        widen(model, gen)
    model.eval()
    routes: dict[int, torch.Tensor] = {}
    handles = [r.register_forward_hook(topk_recorder(routes, i, SHAPE["top_k"], from_probs))
               for i, r, from_probs in routers]
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["max_seq_len"]), generator=gen)
    with torch.no_grad():
        out = model(tokens)
    for h in handles:
        h.remove()
    logits = out[0] if isinstance(out, tuple) else out
    arrays = {f"w/{n}": p.detach().numpy().astype(np.float32) for n, p in model.named_parameters()}
    arrays["tokens"] = tokens.numpy().astype(np.int32)
    arrays["logits"] = logits.numpy().astype(np.float32)
    for i, idx in routes.items():
        arrays[f"route/{i}"] = idx.numpy().astype(np.int32)
    path = os.path.join(ARGS.out, f"{name}_{init}.npz")
    np.savez_compressed(path, **arrays)
    return dict(file=os.path.basename(path), seed_model=name, init=init, bytes=os.path.getsize(path),
                logit_absmax=float(np.abs(arrays["logits"]).max()), moe_layers=sorted(routes))


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seedrepos", required=True, help="folder with llm-moe/, bb_c1b4a78/, bb_f6354a9/")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                   "seed_fidelity"))
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BUILDERS))
    ARGS = ap.parse_args()
    for d in COMMITS:
        if not os.path.isdir(os.path.join(ARGS.seedrepos, d)):
            sys.exit(f"--seedrepos: {ARGS.seedrepos}/{d} is missing; extract {COMMITS[d][0]} @ {COMMITS[d][1]} there")
    os.makedirs(ARGS.out, exist_ok=True)
    torch.set_default_dtype(torch.float32)
    rope = install_stubs()
    names = [n for n in ARGS.only.split(",") if n] or list(BUILDERS)
    fixtures = [make_fixture(n, init) for n in names for init in ("seed", "wide")]
    meta = dict(
        repositories={d: dict(repo=r, commit=c) for d, (r, c) in COMMITS.items()},
        seed_files_sha256=dict(sorted(LOADED.items())), torch=torch.__version__, rope=rope,
        shape=dict(SHAPE, batch=BATCH), wide_init=dict(std=WIDE_STD, norm_std=WIDE_NORM_STD),
        fixtures=fixtures, command="python scripts/seed_fidelity_fixture.py --seedrepos SEEDREPOS")
    with open(os.path.join(ARGS.out, "fixtures.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for fx in fixtures:
        print(f"{fx['file']}: {fx['bytes'] / 1e3:.0f} kB, |logits| <= {fx['logit_absmax']:.2f}, "
              f"MoE layers {fx['moe_layers']}")


if __name__ == "__main__":
    main()
