"""Tests for moe_jax/model/flops.py: parameter and FLOP counts worked out by hand (the arithmetic is written out below, from
the shapes, not from the module's helpers), the counts against the real parameter trees of model.init_params, the
device peak table, and MFU.

Conventions checked (docs/decisions.md): one multiply-add = 2 FLOPs; training = 3 x forward; per layer and token causal
attention costs 2*2*S*M/2 (QK^T and AV over S keys, halved by the mask); the router 2*M*E per MoE layer; only the k
active experts count; capacity padding (unused expert slots and the dispatch/combine einsums) is reported apart and is
not part of `training`.
"""

import pathlib
import types

import jax
import pytest

from moe_jax.config.typed import parse
from moe_jax.model import flops
from moe_jax.model import transformer as model
from moe_jax.cli import load_config_file

SMOKE = pathlib.Path(__file__).resolve().parent.parent / "configs" / "smoke.py"

V, M, H, S, B = 512, 64, 4, 64, 8


def dense_config():
    """2 layers, width 64, 4 heads, GELU MLP (2 matrices) of width 128, tied head."""
    c = load_config_file(SMOKE)
    c.model.vocab_size, c.model.d_model, c.model.n_heads, c.model.n_layers = V, M, H, 2
    c.model.d_ff, c.model.mlp, c.model.tie_embeddings = 128, "gelu", True
    c.moe.num_experts = 0
    c.train.seq_len, c.train.batch_size, c.train.grad_accum = S, B, 3
    return c


def moe_config():
    """4 layers, MoE on alternate layers (1 and 3), 4 experts top-2, SwiGLU (3 matrices), dense d_ff 128,
    expert d_ff 96 (different on purpose), untied head."""
    c = load_config_file(SMOKE)
    c.model.vocab_size, c.model.d_model, c.model.n_heads, c.model.n_layers = V, M, H, 4
    c.model.d_ff, c.model.mlp, c.model.tie_embeddings = 128, "swiglu", False
    c.moe.num_experts, c.moe.top_k, c.moe.every, c.moe.d_ff = 4, 2, 2, 96
    c.moe.group_size, c.moe.capacity_factor, c.moe.min_capacity = 256, 1.25, 4
    c.train.seq_len, c.train.batch_size, c.train.grad_accum = S, B, 2
    return c


def per_token(c, **kw):
    """flops.flops_per_token of a ConfigDict's parsed model at its train.seq_len and train.batch_size."""
    run = parse(c)
    return flops.flops_per_token(run.model, run.train.seq_len, run.train.batch_size, **kw)


# ------------------------------------------------------------------------------------------------ parameter counts


def test_param_counts_dense_by_hand():
    p = flops.param_counts(parse(dense_config()).model)
    embedding = 512 * 64                   # 32,768 (the head reuses it: tied)
    attention = 2 * 4 * 64 * 64            # 2 layers x (wq, wk, wv, wo), each 64 x 64 = 32,768
    dense_ffn = 2 * 2 * 64 * 128           # 2 layers x (w_in 64x128 + w_out 128x64) = 32,768
    norms = (2 * 2 + 1) * 64               # 2 per layer + final = 320
    total = embedding + attention + dense_ffn + norms
    assert total == 98_624
    assert p == dict(embedding=embedding, head=0, attention=attention, dense_ffn=dense_ffn, experts_total=0,
                     experts_active=0, router=0, norms=norms, total=total, active=total)


def test_param_counts_moe_by_hand():
    p = flops.param_counts(parse(moe_config()).model)
    embedding = 512 * 64                   # 32,768
    head = 64 * 512                        # 32,768 (untied)
    attention = 4 * 4 * 64 * 64            # 4 layers: 65,536
    dense_ffn = 2 * 3 * 64 * 128           # layers 0, 2: SwiGLU w_in, w_gate, w_out: 49,152
    per_expert = 3 * 64 * 96               # 18,432
    experts_total = 2 * 4 * per_expert     # layers 1, 3 x 4 experts: 147,456
    experts_active = 2 * 2 * per_expert    # top-2: 73,728
    router = 2 * 64 * 4                    # 512
    norms = (2 * 4 + 1) * 64               # 576
    total = embedding + head + attention + dense_ffn + experts_total + router + norms
    assert total == 328_768
    active = total - experts_total + experts_active
    assert active == 255_040
    assert p == dict(embedding=embedding, head=head, attention=attention, dense_ffn=dense_ffn,
                     experts_total=experts_total, experts_active=experts_active, router=router, norms=norms,
                     total=total, active=active)


def _variants():
    out = []
    for kind in ("dense", "moe"):
        for tied in (True, False):
            for mlp in ("gelu", "swiglu"):
                out.append((kind, tied, mlp))
    return out


@pytest.mark.parametrize("kind,tied,mlp", _variants())
def test_param_counts_match_the_real_model(kind, tied, mlp):
    c = dense_config() if kind == "dense" else moe_config()
    c.model.tie_embeddings, c.model.mlp = tied, mlp
    _, params = model.init_params(parse(c).model, c.seed)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    real = sum(x.size for _, x in leaves)
    counts = flops.param_counts(parse(c).model)
    assert counts["total"] == real
    # active: every non-expert parameter, plus k/E of each stacked expert weight [E, ., .]
    expert_leaves = [x for p, x in leaves if x.ndim == 3 and x.shape[0] == c.moe.num_experts
                     and str(getattr(p[-1], "key", "")) in ("w_in", "w_gate", "w_out")]
    assert bool(expert_leaves) == (kind == "moe")
    expert = sum(x.size for x in expert_leaves)
    k_over_e = c.moe.top_k / c.moe.num_experts if kind == "moe" else 0
    assert counts["active"] == real - expert + expert * k_over_e
    assert counts["experts_total"] == expert
    assert ("head" in params) == (not tied) and counts["head"] == (0 if tied else params["head"].size)


# ------------------------------------------------------------------------------------------------ FLOPs


def test_flops_per_token_dense_by_hand():
    f = flops.run_flops_per_token(parse(dense_config()))
    # matmuls: 2 x (attention 32,768 + MLP 32,768 + output head 512*64 = 32,768, counted although tied)
    matmul = 2 * (2 * 4 * 64 * 64 + 2 * 2 * 64 * 128 + 64 * 512)
    assert matmul == 196_608
    # attention scores per layer and token: QK^T 2*S*M + AV 2*S*M, halved by the causal mask = 2*S*M = 8,192
    attention = 2 * (2 * 2 * 64 * 64 // 2)
    assert attention == 16_384
    forward = matmul + attention
    assert f == dict(forward=forward, training=3 * forward, matmul=matmul, attention_scores=attention, router=0,
                     capacity_padding=0, capacity_padding_training=0, dispatch_overhead=0,
                     dispatch_overhead_training=0)
    assert f["training"] == 638_976


def test_flops_per_token_moe_by_hand():
    c = moe_config()
    f = flops.run_flops_per_token(parse(c))
    # matmuls: attention 65,536 + dense SwiGLU 49,152 + k=2 active experts on 2 layers 73,728 + head 32,768
    matmul = 2 * (4 * 4 * 64 * 64 + 2 * 3 * 64 * 128 + 2 * 2 * 3 * 64 * 96 + 64 * 512)
    assert matmul == 442_368
    attention = 4 * (2 * 2 * 64 * 64 // 2)  # 4 layers x 8,192
    router = 2 * (2 * 64 * 4)               # only the 2 MoE layers: 1,024
    forward = matmul + attention + router
    assert forward == 476_160
    assert f["matmul"] == matmul and f["attention_scores"] == attention and f["router"] == router
    assert f["forward"] == forward and f["training"] == 3 * forward == 1_428_480

    # Capacity padding: a micro-batch has 8 x 64 = 512 tokens -> groups of T = 256 (largest divisor <= 256);
    # C = max(ceil(2 * 256 * 1.25 / 4), 4) = 160 slots per expert; the experts compute E*C/T = 4*160/256 = 2.5 slots
    # per token of which k = 2 hold a token: 0.5 padded slots x 2*3*64*96 = 36,864 FLOPs each = 18,432;
    # dispatch 'GTEC,GTM->EGCM' and combine cost 2*E*C*M = 81,920 each per token: 163,840.
    padded_slots = 4 * 160 / 256 - 2
    per_layer = padded_slots * (2 * 3 * 64 * 96) + 2 * (2 * 4 * 160 * 64)
    assert per_layer == 18_432 + 163_840
    assert f["capacity_padding"] == pytest.approx(2 * per_layer)  # 2 MoE layers: 364,544
    assert f["capacity_padding_training"] == pytest.approx(3 * 2 * per_layer)
    assert f["dispatch_overhead"] == f["capacity_padding"]
    # padding is reported apart: training is 3 x forward without it (checked above)


def test_flops_dropless_dispatch_overhead_by_hand():
    c = moe_config()
    c.moe.dispatch = "dropless"
    cap = per_token(moe_config())
    for platform in ("tpu", "cpu"):
        f = per_token(c, platform=platform)
        # the model FLOPs do not depend on the dispatch; dropless has no capacity padding
        assert {k: f[k] for k in ("forward", "training", "matmul", "router")} == \
            {k: cap[k] for k in ("forward", "training", "matmul", "router")}
        assert f["capacity_padding"] == 0
        combine = 2 * (2 * 2 * 64)  # 2 MoE layers x k=2 gate multiply-adds of width 64
        # XLA:CPU's ragged_dot: each of the k rows of a token meets all E = 4 experts' 3 matrices, k of them counted
        dense_fallback = 2 * (2 * 3 * 2 * 3 * 64 * 96) if platform == "cpu" else 0
        assert f["dispatch_overhead"] == combine + dense_fallback
        assert f["dispatch_overhead_training"] == 3 * f["dispatch_overhead"]
    c.moe.grouped_matmul = "megablox"
    assert per_token(c, platform="cpu")["dispatch_overhead"] == 2 * (2 * 2 * 64)


def test_flops_padding_follows_the_batch_and_group_size():
    c = moe_config()
    # batch 3 x seq 50 = 150 tokens <= group_size 256: one group of T = 150 tokens
    f = flops.flops_per_token(parse(c).model, seq_len=50, batch_size=3)
    t = 150
    cap = -(-2 * t * 125 // (4 * 100))  # ceil(2 * 150 * 1.25 / 4) = ceil(93.75) = 94
    assert cap == 94
    per_layer = (4 * cap / t - 2) * (2 * 3 * 64 * 96) + 2 * (2 * 4 * cap * 64)
    assert f["capacity_padding"] == pytest.approx(2 * per_layer)
    # the sequence length changes the attention term only: 4 layers x 2*S*M
    assert f["attention_scores"] == 4 * 2 * 50 * 64
    assert f["matmul"] == per_token(c)["matmul"]


def test_flops_per_step():
    for c in (dense_config(), moe_config()):
        t = c.train
        training = per_token(c)["training"]
        assert flops.flops_per_step(parse(c)) == training * t.batch_size * t.seq_len * t.grad_accum
    assert flops.flops_per_step(parse(dense_config())) == 638_976 * 8 * 64 * 3
    assert flops.flops_per_step(parse(moe_config())) == 1_428_480 * 8 * 64 * 2


def test_newton_schulz_flops_follow_the_method():
    """X space: ns_steps x (4 m^2 n + 2 m^3); Gram space (muon.newton_schulz_gram, for n >= 2 m only): 4 m^2 n +
    (8 steps - 6) m^3, 44% fewer at 384 x 1536; a square matrix costs the same under both. optimizer_flops_per_step
    counts the method the update runs (optim.ns_method; muon_impl='optax' is always X space)."""
    m, n = 384, 1536
    std = 5 * (4 * m * m * n + 2 * m ** 3)
    assert flops.newton_schulz_flops(m, n, 5) == flops.newton_schulz_flops(n, m, 5, "standard") == std
    gram = flops.newton_schulz_flops(n, m, 5, "gram")
    assert gram == 4 * m * m * n + 34 * m ** 3 and round(1 - gram / std, 2) == 0.44
    assert flops.newton_schulz_flops(m, m, 5, "gram") == flops.newton_schulz_flops(m, m, 5)
    assert flops.newton_schulz_flops(m, 1.5 * m, 5, "gram") == flops.newton_schulz_flops(m, 1.5 * m, 5)
    c = load_config_file(pathlib.Path(__file__).parent.parent / "configs" / "moe.py")
    per = {}
    for impl, method in (("batched", "standard"), ("batched", "gram"), ("optax", "gram")):
        c.optim.muon_impl, c.optim.ns_method = impl, method
        run = parse(c)
        per[impl, method] = flops.optimizer_flops_per_step(run.model, run.optim)
    assert per["batched", "standard"] == per["optax", "gram"] > per["batched", "gram"]
    d, f = c.model.d_model, c.moe.d_ff  # attention [384, 384] stays X space; every expert matrix (GELU: 2 per
    n_mats = c.model.n_layers * c.moe.num_experts * 2  # expert) is 384 x 1536
    assert per["batched", "standard"] - per["batched", "gram"] == n_mats * (
        flops.newton_schulz_flops(d, f, 5) - flops.newton_schulz_flops(d, f, 5, "gram"))


def test_moe_every_counts_only_moe_layers():
    """The seed-002 defect: counting every layer as MoE. every=1 (all 4 layers MoE) vs every=2 (2 of 4)."""
    a, b = moe_config(), moe_config()
    b.moe.every = 1
    pa, pb = flops.param_counts(parse(a).model), flops.param_counts(parse(b).model)
    assert pb["experts_total"] == 2 * pa["experts_total"] and pb["dense_ffn"] == 0 and pb["router"] == 2 * pa["router"]
    # forward difference: 2 layers switch from dense SwiGLU (2*3*64*128) to 2 active experts + router
    fa, fb = per_token(a)["forward"], per_token(b)["forward"]
    assert fb - fa == 2 * (2 * 2 * 3 * 64 * 96 + 2 * 64 * 4 - 2 * 3 * 64 * 128)


@pytest.mark.parametrize("make", [dense_config, moe_config], ids=["dense", "moe"])
def test_counts_agree_with_xla_cost_analysis(make):
    """Cross-check against the compiler: XLA's FLOP count of the compiled training-mode forward pass, per token, is
    forward + capacity padding + one more attention_scores (XLA's attention computes the full S x S scores, the
    count halves them for the causal mask), plus a few percent of elementwise work (norms, softmaxes, GELU, RoPE,
    routing masks) that the model count leaves out on purpose."""
    import jax.numpy as jnp
    c = make()
    graphdef, params = model.init_params(parse(c).model, c.seed)
    tokens = jnp.zeros((B, S), jnp.int32)
    fwd = jax.jit(lambda p, t: model.apply(graphdef, p, t, train=True)[0])
    xla = fwd.lower(params, tokens).compile().cost_analysis()["flops"] / (B * S)
    f = per_token(c)
    counted = f["forward"] + f["capacity_padding"] + f["attention_scores"]
    assert 1.0 <= xla / counted <= 1.06, (xla, counted)


# ------------------------------------------------------------------------------------------------ peaks and MFU


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 989.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("TPU v5 lite", 197.0),   # v5e's device_kind (matched before 'TPU v5')
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),        # v5p's device_kind
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),   # v6e (Trillium)
])
def test_lookup_peak_tflops_known(kind, peak):
    assert flops.lookup_peak_tflops(kind) == peak


@pytest.mark.parametrize("kind", ["cpu", "Tesla V100-SXM2-16GB", "TPU v3", ""])
def test_lookup_peak_tflops_unknown(kind):
    assert flops.lookup_peak_tflops(kind) is None


def test_peak_tflops_per_device():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert flops.peak_tflops(gpu) == 989.0
    odd = types.SimpleNamespace(platform="gpu", device_kind="Mystery Accelerator 9000")
    with pytest.raises(ValueError, match="train.peak_tflops"):
        flops.peak_tflops(odd)
    cpu = jax.devices()[0]
    assert cpu.platform == "cpu"
    assert flops.peak_tflops(cpu, measured_cpu=0.123) == 0.123  # the CPU peak is measured, never looked up


def test_devices_peak_tflops_sources():
    gpus = [types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")] * 4
    assert flops.devices_peak_tflops(gpus)[0] == 4 * 989.0  # the table, per device, times the devices
    assert flops.devices_peak_tflops(gpus, per_device_tflops=100.0)[0] == 400.0  # config.train.peak_tflops wins
    cpus = jax.devices()[:4]
    peak, source = flops.devices_peak_tflops(cpus, matmul_n=64)
    assert peak > 0 and "measured 64x64 float32 matmul" in source  # shared host cores: not multiplied by 4


def test_measure_matmul_tflops_is_positive():
    assert flops.measure_matmul_tflops(n=128, repeats=2) > 0


def test_mfu_formula():
    training = flops.run_flops_per_token(parse(moe_config()))["training"]
    tokens_per_s, peak = 12_345.0, 0.5
    # achieved model FLOP/s = tokens/s x training FLOPs/token (padding excluded), over the peak in FLOP/s
    assert flops.mfu(tokens_per_s, training, peak) == pytest.approx(12_345.0 * 1_428_480 / 0.5e12)
    assert flops.mfu(2 * tokens_per_s, training, peak) == pytest.approx(2 * flops.mfu(tokens_per_s, training, peak))
