"""scripts/seed_timing.py (the seeds' own PyTorch training step, timed) on a stand-in seed source tree written here:
a tiny llm-moe/llm-same-flops-data.py with the seed's names (configs, MinimalLLM, MoEMinimalLLM, Muon,
setup_muon_optimizer) that logs every forward pass and optimizer step. Checks that one timed step is one optimizer
step over `grad_accum` micro-batches, that the figures are consistent, that the sources run are hashed, and that bad
input is one line with status 2. The script needs PyTorch, which moe_jax does not: the tests run it with
$MOE_JAX_TORCH_PYTHON (default: this interpreter) and are skipped, saying so, where that has no torch."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "seed_timing.py")
PYTHON = os.environ.get("MOE_JAX_TORCH_PYTHON") or sys.executable


def _has_torch() -> bool:
    return subprocess.run([PYTHON, "-c", "import torch"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _has_torch(), reason=f"torch is not importable by {PYTHON}; set "
                                "MOE_JAX_TORCH_PYTHON to a Python that has it")

STAND_IN = '''
import os
from dataclasses import dataclass
import torch
from torch import nn

LOG = os.environ["STAND_IN_LOG"]


def note(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n")


@dataclass
class ModelConfig:
    d_model: int = 384
    n_heads: int = 8
    n_layers: int = 6
    d_ff: int = 1536
    batch_size: int = 24
    max_steps: int = 3000
    gradient_accumulation_steps: int = 4
    muon_lr: float = 0.01
    max_seq_len: int = 512
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    use_amp: bool = True
    vocab_size: int = None


@dataclass
class MoEModelConfig(ModelConfig):
    num_experts: int = 8
    expert_top_k: int = 2
    moe_layers: str = "alternate"


class Block(nn.Module):
    def __init__(self, d, use_moe):
        super().__init__()
        self.use_moe = use_moe
        self.lin = nn.Linear(d, d, bias=False)


class MinimalLLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.transformer_blocks = nn.ModuleList(Block(cfg.d_model, False) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x):
        note(f"forward {tuple(x.shape)}")
        h = self.token_embedding(x)
        for b in self.transformer_blocks:
            h = h + torch.tanh(b.lin(h))
        return self.head(h)


class MoEMinimalLLM(MinimalLLM):
    def forward(self, x, return_aux_loss=True):
        logits = super().forward(x)
        return (logits, 0.01 * logits.float().pow(2).mean()) if return_aux_loss else logits


class Muon(torch.optim.SGD):
    def step(self, closure=None):
        note("muon step")
        return super().step(closure)


def setup_muon_optimizer(model, config):
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "token_embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "token_embedding" not in n)]
    return [Muon(matrices, lr=config.muon_lr), torch.optim.AdamW(rest, lr=config.muon_lr * 0.1)]
'''


def _stand_in(tmp_path):
    repos = tmp_path / "seedrepos"
    (repos / "llm-moe").mkdir(parents=True)
    path = repos / "llm-moe" / "llm-same-flops-data.py"
    path.write_text(textwrap.dedent(STAND_IN))
    return repos, hashlib.sha256(path.read_bytes()).hexdigest()


def _run(tmp_path, *args):
    env = dict(os.environ, STAND_IN_LOG=str(tmp_path / "calls.log"))
    return subprocess.run([PYTHON, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_one_timed_step_is_one_optimizer_step_over_the_accumulated_micro_batches(tmp_path):
    repos, sha = _stand_in(tmp_path)
    out = _run(tmp_path, "--seedrepos", str(repos), "--models", "seed002_dense,seed002_moe", "--device", "cpu",
               "--steps", "3", "--warmup", "1", "--d_model", "16", "--n_layers", "2", "--vocab", "64", "--seq",
               "8", "--batch", "2", "--grad_accum", "3", "--set", "max_steps=40", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout is the JSON alone (the seeds' prints go to stderr)
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["device"] == "cpu" and result["steps"] == 3 and result["warmup"] == 1
    assert result["seed_files_sha256"] == {"llm-moe/llm-same-flops-data.py": sha}
    calls = (tmp_path / "calls.log").read_text().splitlines()
    # 2 models x 4 steps (1 warm-up + 3 timed) x 3 micro-batches of [2, 8] tokens; one Muon step per model step
    assert calls.count("forward (2, 8)") == 2 * 4 * 3 and calls.count("muon step") == 2 * 4
    for name in ("seed002_dense", "seed002_moe"):
        r = result["results"][name]
        assert r["tokens_per_step"] == 2 * 8 * 3
        assert r["ms_per_step_min"] <= r["ms_per_step_median"] <= r["ms_per_step_max"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["ms_per_step_median"] / 1e3), rel=1e-12)
        assert len(r["ce_losses"]) == 3 and all(3.0 < loss < 5.5 for loss in r["ce_losses"])  # ~ln 64 = 4.16
        assert r["shape"]["vocab_size"] == 64 and r["shape"]["d_ff"] == 1536  # unset flags keep the seed's value
        assert r["amp"] == "float32"


@pytest.mark.parametrize("args, message", [
    (["--models", "seed002_dense,nope"], "error: --models seed002_dense,nope: unknown ['nope']; choose from "
                                         "seed002_dense,seed002_moe,exp5_moe,seed004_baseline"),
    (["--models", "exp5_moe"], "error: --seedrepos {repos}: bb_c1b4a78/ is missing (needed by exp5_moe); extract the "
                               "seed repositories there as scripts/seed_fidelity_fixture.py describes"),
    (["--models", "seed002_dense", "--steps", "0"], "error: --steps=0: must be a positive integer"),
    (["--models", "seed002_dense", "--set", "colour"], "error: --set colour: give FIELD=VALUE, FIELD a field of the "
                                                       "seed's config class"),
    (["--models", "seed002_dense", "--device", "tpu"], "error: --device tpu: choose auto, cpu or cuda"),
    (["--stepz", "3"], "error: unrecognized arguments: --stepz 3 (python scripts/seed_timing.py --help)"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    repos, _ = _stand_in(tmp_path)
    out = _run(tmp_path, "--seedrepos", str(repos), *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [message.format(repos=repos)]


def test_an_unknown_config_field_is_one_line_and_status_2(tmp_path):
    repos, _ = _stand_in(tmp_path)
    out = _run(tmp_path, "--seedrepos", str(repos), "--models", "seed002_dense", "--device", "cpu", "--set",
               "colour=3", "--vocab", "64")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "error: --set: ModelConfig.__init__() got an unexpected keyword argument 'colour'"], out.stderr[-3000:]
