"""Rentable accelerators for budgeting: on-demand price per device-hour, dense bf16 peak, and measured MFU.

One row per device name accepted by `python -m moe_jax.budget --device`. Prices are on-demand list prices for one
device (one GPU, or one TPU chip) for one hour, in US dollars, as retrieved on 2026-11-26 from the source named in
the row; cloud prices change and differ by region and provider, so every row says where its number comes from and
whether it is `approximate` (a market rate quoted by a third party, with a spread across providers) or a list price.
Peaks are flops.PEAK_TFLOPS (dense bf16, no sparsity). `mfu` is a model FLOP utilisation measured with this
trainer on that device and recorded in docs/benchmarks.md; None means no such measurement exists yet (today: none
for any accelerator; docs/benchmarks.md has CPU figures only), and the budget uses DEFAULT_MFU or --mfu.
"""

from __future__ import annotations

import dataclasses

from moe_jax.model import flops

PRICES_RETRIEVED = "2026-11-26"

# MFU assumed when a device has no measurement: a common figure for well-tuned dense transformer training in bf16 on
# one node (PaLM reported 46% at 540B on TPU v4; small models with MoE dispatch usually get less). moe_jax's own
# CPU measurement is 35-45% of the measured matmul peak (docs/benchmarks.md, 2026-11-24).
DEFAULT_MFU = 0.35


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # the --device value
    description: str
    usd_per_hour: float  # on-demand, one device (GPU or TPU chip)
    price_source: str
    approximate: bool  # True: a third-party quote of a market rate, not a provider's list price
    peak_tflops: float  # dense bf16 per device
    peak_source: str
    memory_gib: float  # accelerator memory per device (HBM)
    mfu: float | None = None  # measured with moe_jax on this device (docs/benchmarks.md), None if not yet
    mfu_source: str = ""


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", "NVIDIA H100 SXM 80GB", 2.49,
           "Lambda on-demand H100 SXM per GPU, as quoted by gpuadvisor.com/h100-vs-b200 (2026); specialised clouds "
           "range ~$2.0-3.0, AWS p5 ~$12 per GPU", True,
           flops.PEAK_TFLOPS["H100"], "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16", 80),
    Device("h200", "NVIDIA H200 SXM 141GB", 4.54,
           "Spheron on-demand H200 SXM per GPU as of 2026-03-17 (spheron.network/blog/nvidia-h200-vs-b200-vs-gb200); "
           "RunPod listed $3.59 (deploybase.ai, 2026-03)", True,
           flops.PEAK_TFLOPS["H200"], "NVIDIA H200 datasheet: same GH100 compute as H100, 989 TFLOP/s dense BF16", 141),
    Device("b200", "NVIDIA B200 180-192GB", 6.99,
           "Lambda on-demand B200 per GPU, as quoted by gpuadvisor.com/h100-vs-b200 (2026); specialised clouds "
           "range ~$3.75-8.00", True,
           flops.PEAK_TFLOPS["B200"], "NVIDIA HGX B200: 2.25 PFLOP/s dense BF16 per GPU (4.5 with sparsity)", 180),
    Device("v5e", "Google Cloud TPU v5e chip", 1.20,
           "cloud.google.com/tpu/pricing on-demand per chip-hour (us regions), as quoted by "
           "artificial-intelligence-wiki.com TPU v5 guide (2026-01-27)", False,
           flops.PEAK_TFLOPS["TPU v5e"], "Cloud TPU v5e docs: 197 TFLOP/s BF16 per chip", 16),
    Device("v5p", "Google Cloud TPU v5p chip", 4.20,
           "cloud.google.com/tpu/pricing on-demand per chip-hour (us regions), as quoted by "
           "artificial-intelligence-wiki.com TPU v5 guide (2026-01-27)", False,
           flops.PEAK_TFLOPS["TPU v5p"], "Cloud TPU v5p docs: 459 TFLOP/s BF16 per chip", 95),
    Device("v6e", "Google Cloud TPU v6e (Trillium) chip", 2.70,
           "Google's Trillium GA announcement (2024-12): from $2.70 per chip-hour on demand ($1.89 1-year, $1.22 "
           "3-year commitment), as quoted by neowin.net", False,
           flops.PEAK_TFLOPS["TPU v6e"], "Cloud TPU v6e docs: 918 TFLOP/s BF16 per chip", 32),
)}


def get(name: str) -> Device:
    """The row for a --device value (case-insensitive); ValueError naming the choices otherwise."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise ValueError(f"--device {name!r}: unknown device; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


def mfu_for(device: Device, override: float | None = None) -> tuple[float, str]:
    """(MFU, where it comes from): --mfu when given, else the device's measurement, else DEFAULT_MFU."""
    if override is not None:
        return float(override), "--mfu"
    if device.mfu is not None:
        return device.mfu, device.mfu_source
    return DEFAULT_MFU, (f"default: no moe_jax measurement on {device.name} in docs/benchmarks.md yet; "
                         "override with --mfu")
