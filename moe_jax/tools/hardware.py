"""Rentable accelerators for budgeting: on-demand price per device-hour, dense bf16 peak, and measured MFU.

One row per device name accepted by `python -m moe_jax.budget --device`, in hardware.json beside this file. Prices are on-demand list prices for one
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
import json
import os

from moe_jax.model import flops

TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hardware.json")

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
    peak_tflops: float  # dense bf16 per device (flops.PEAK_TFLOPS[peak_key])
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


def _load(path: str = TABLE_FILE) -> tuple[str, dict[str, Device]]:
    """(retrieval date, {name: Device}) from the table file: the figures are data, kept with their sources in
    hardware.json; each row's peak is flops.PEAK_TFLOPS[row['peak_key']], the one peak table."""
    with open(path) as f:
        table = json.load(f)
    devices = {}
    for row in table["devices"]:
        row = dict(row)
        peak = flops.PEAK_TFLOPS[row.pop("peak_key")]
        devices[row["name"]] = Device(peak_tflops=peak, **row)
    return table["prices_retrieved"], devices


PRICES_RETRIEVED, DEVICES = _load()


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
