"""Rentable accelerators for budgeting: on-demand price per device-hour, dense bf16 peak, and measured MFU.

One row per device name accepted by `python -m moe_jax.budget --device`. Prices are on-demand list prices for one
device (one GPU, or one TPU chip) for one hour, in US dollars, as retrieved on 2026-11-26 from the source named in
the row; cloud prices change and differ by region and provider, so every row says where its number comes from and
whether it is `approximate` (a market rate quoted by a third party, with a spread across providers) or a list price.
Peaks are flops.PEAK_TFLOPS (dense bf16, no sparsity). Memory and bandwidths (HBM, the fast interconnect within a
slice or node: ICI on TPUs, NVLink on GPUs, and the data-centre network between slices or nodes: DCN / InfiniBand),
per device, each with its source, feed the compile-time predictions of `python -m moe_jax.aot` (moe_jax/tools/aot.py:
roofline step time). Bandwidths are bytes/s that one device can send in one direction (a bidirectional figure is
halved), aggregated over all its links: an optimistic figure, as the roofline is. `mfu` is a model FLOP utilisation
measured with this trainer on that device and recorded in docs/benchmarks.md; None means no such measurement exists
yet (today: none for any accelerator; docs/benchmarks.md has CPU figures only), and the budget uses DEFAULT_MFU or
--mfu.
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
    hbm_bytes_per_s: float = 0.0  # HBM bandwidth per device
    hbm_source: str = ""
    ici_bytes_per_s: float = 0.0  # fast interconnect (ICI / NVLink) per device, one direction, all links
    ici_source: str = ""
    dcn_bytes_per_s: float = 0.0  # between slices / nodes (DCN / InfiniBand) per device, one direction
    dcn_source: str = ""
    mfu: float | None = None  # measured with moe_jax on this device (docs/benchmarks.md), None if not yet
    mfu_source: str = ""


_GPU_IB = ("DGX H100/H200 and DGX B200 systems: eight 400 Gb/s ConnectX-7 InfiniBand ports, one per GPU -> 50 GB/s "
           "per GPU each way")

DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", "NVIDIA H100 SXM 80GB", 2.49,
           "Lambda on-demand H100 SXM per GPU, as quoted by gpuadvisor.com/h100-vs-b200 (2026); specialised clouds "
           "range ~$2.0-3.0, AWS p5 ~$12 per GPU", True,
           flops.PEAK_TFLOPS["H100"], "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16", 80,
           3.35e12, "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3",
           450e9, "NVIDIA H100 SXM datasheet: NVLink 900 GB/s (bidirectional, 18 NVLink 4 links) -> 450 GB/s each way",
           50e9, _GPU_IB),
    Device("h200", "NVIDIA H200 SXM 141GB", 4.54,
           "Spheron on-demand H200 SXM per GPU as of 2026-03-17 (spheron.network/blog/nvidia-h200-vs-b200-vs-gb200); "
           "RunPod listed $3.59 (deploybase.ai, 2026-03)", True,
           flops.PEAK_TFLOPS["H200"], "NVIDIA H200 datasheet: same GH100 compute as H100, 989 TFLOP/s dense BF16", 141,
           4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s HBM3e",
           450e9, "NVIDIA H200 SXM datasheet: NVLink 900 GB/s (bidirectional) -> 450 GB/s each way",
           50e9, _GPU_IB),
    Device("b200", "NVIDIA B200 180-192GB", 6.99,
           "Lambda on-demand B200 per GPU, as quoted by gpuadvisor.com/h100-vs-b200 (2026); specialised clouds "
           "range ~$3.75-8.00", True,
           flops.PEAK_TFLOPS["B200"], "NVIDIA HGX B200: 2.25 PFLOP/s dense BF16 per GPU (4.5 with sparsity)", 180,
           8e12, "NVIDIA HGX B200 datasheet: 64 TB/s HBM3e for 8 GPUs = 8 TB/s per GPU",
           900e9, "NVIDIA HGX B200 datasheet: NVLink 5 1.8 TB/s per GPU (bidirectional) -> 900 GB/s each way",
           50e9, _GPU_IB),
    Device("v4", "Google Cloud TPU v4 chip", 3.22,
           "cloud.google.com/tpu/pricing on-demand per chip-hour (us-central2, the only v4 region), as listed in 2024; "
           "not re-checked on the retrieval date", True,
           flops.PEAK_TFLOPS["TPU v4"], "Cloud TPU v4 docs: 275 TFLOP/s BF16 per chip", 32,
           1200e9, "cloud.google.com/tpu/docs/v4: HBM2 1200 GB/s per chip",
           270e9, "Jouppi et al. 2023 (TPU v4, ISCA): 6 ICI links per chip in the 3D torus; 45 GB/s each way per link "
           "(How To Scale Your Model, part 2 'TPUs', ICI table) -> 270 GB/s",
           6.25e9, "no v4 figure found; assumed equal to v5p's 50 Gbps DCN per chip (cloud.google.com/tpu/docs/v5p)"),
    Device("v5e", "Google Cloud TPU v5e chip", 1.20,
           "cloud.google.com/tpu/pricing on-demand per chip-hour (us regions), as quoted by "
           "artificial-intelligence-wiki.com TPU v5 guide (2026-01-27)", False,
           flops.PEAK_TFLOPS["TPU v5e"], "Cloud TPU v5e docs: 197 TFLOP/s BF16 per chip", 16,
           819e9, "cloud.google.com/tpu/docs/v5e: 819 GB/s HBM2e per chip (the v6e page rounds it to 800)",
           200e9, "cloud.google.com/tpu/docs/v6e (v5e column): ICI 1600 Gbps per chip over 4 ports (direction not "
           "stated; taken as each way)",
           3.125e9, "cloud.google.com/tpu/docs/v6e (v5e column): 2 x 100 Gbps NICs per host of 8 chips = 25 Gbps "
           "per chip"),
    Device("v5p", "Google Cloud TPU v5p chip", 4.20,
           "cloud.google.com/tpu/pricing on-demand per chip-hour (us regions), as quoted by "
           "artificial-intelligence-wiki.com TPU v5 guide (2026-01-27)", False,
           flops.PEAK_TFLOPS["TPU v5p"], "Cloud TPU v5p docs: 459 TFLOP/s BF16 per chip", 95,
           2765e9, "cloud.google.com/tpu/docs/v5p: HBM bandwidth 2765 GB/s per chip",
           600e9, "cloud.google.com/tpu/docs/v5p: bidirectional ICI 1200 GB/s per chip -> 600 GB/s each way",
           6.25e9, "cloud.google.com/tpu/docs/v5p: DCN 50 Gbps per chip"),
    Device("v6e", "Google Cloud TPU v6e (Trillium) chip", 2.70,
           "Google's Trillium GA announcement (2024-12): from $2.70 per chip-hour on demand ($1.89 1-year, $1.22 "
           "3-year commitment), as quoted by neowin.net", False,
           flops.PEAK_TFLOPS["TPU v6e"], "Cloud TPU v6e docs: 918 TFLOP/s BF16 per chip", 32,
           1600e9, "cloud.google.com/tpu/docs/v6e: HBM bandwidth 1600 GBps per chip",
           400e9, "cloud.google.com/tpu/docs/v6e: ICI 3200 Gbps per chip over 4 ports (direction not stated; taken "
           "as each way)",
           12.5e9, "cloud.google.com/tpu/docs/v6e: 4 x 200 Gbps NICs per host of 8 chips = 100 Gbps per chip"),
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
