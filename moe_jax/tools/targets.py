"""Compile targets: TPU slices and GPU nodes that `python -m moe_jax.aot --target NAME` compiles for without one
attached, with the real XLA TPU compiler (libtpu) and GPU compiler (the CUDA PJRT plugin) running on this host.

A target is one slice (TPU) or one node (GPU); `--slices N` takes N of them joined by the slow links (DCN between TPU
slices, InfiniBand between GPU nodes). Devices come from `jax.experimental.topologies.get_topology_desc`:
- TPU: the topology name, chip configuration, chips per host and wraparound of Cloud TPU's accelerator types, as in
  MaxText's accelerator_to_spec_map (v4-8 = 'v4:2x2x1', 4 chips in megacore mode, 1 host; v5p-128 = 'v5:4x4x4',
  64 chips, 16 hosts); with several slices each device carries its slice_index.
- GPU: an XLA GPU target config (the stream_executor GpuTargetConfigProto in text form, shipped beside this file in
  gpu_specs/) and the topology 'slices x hosts x devices per host'; nodes are hosts (process_index), so what crosses
  nodes is what crosses process boundaries. No CUDA libraries are needed to compile (and none to import the plugin
  with JAX_PLATFORMS=cpu); cuDNN is absent, so attention falls back from 'cudnn' to XLA's (moe_jax/tools/aot.py).

Memory, peak FLOP/s and bandwidths per device are the hardware.DEVICES row named by `device`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from moe_jax.tools import hardware

GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
INSTALL_HINT = "pip install '.[aot]' (or pip install -r requirements-aot.txt)"


class TargetError(ValueError):
    """A target that cannot be compiled for; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # the --target value
    device: str  # hardware.DEVICES key: peak, memory, bandwidths, price
    platform: str  # 'tpu' | 'gpu'
    chips: int  # devices in one slice (TPU) or one node (GPU)
    topology: str = ""  # TPU topology name, e.g. 'v5:4x4x4'
    chip_config: str = "default"  # TPU: 'megacore' (v4, v5p: one device per chip) or 'default'
    wrap: tuple[bool, bool, bool] = (False, False, False)  # TPU: wraparound links per physical axis
    gpu_spec: str = ""  # GPU: file in gpu_specs/

    @property
    def hardware(self) -> hardware.Device:
        return hardware.DEVICES[self.device]

    @property
    def memory_bytes(self) -> int:
        """Accelerator memory per device: the GPU spec's device_memory_size (what CUDA reports), else the table's
        GiB."""
        if self.gpu_spec:
            for line in self.gpu_spec_text().splitlines():
                if line.strip().startswith("device_memory_size:"):
                    return int(line.split(":")[1])
        return int(self.hardware.memory_gib * 2 ** 30)

    def gpu_spec_text(self) -> str:
        with open(os.path.join(GPU_SPECS, self.gpu_spec)) as f:
            return f.read()


def _tpu(name: str, device: str, topology: str, chip_config: str = "default",
         wrap: tuple[bool, bool, bool] = (False, False, False)) -> Target:
    chips = math.prod(int(s) for s in topology.split(":")[1].split("x"))
    return Target(name, device, "tpu", chips, topology, chip_config, wrap)


def _gpu(name: str, device: str, chips: int) -> Target:
    return Target(name, device, "gpu", chips, gpu_spec=f"{device}.txtpb")


# Cloud TPU accelerator types (chips = TensorCores / 2 on v4 and v5p, whose megacore chips are one device each) and
# GPU nodes. Wraparound: full 4x4x4 cubes and 16-wide v5e/v6e rows are tori (MaxText's accelerator_to_spec_map).
TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v4-8", "v4", "v4:2x2x1", "megacore"),
    _tpu("v4-16", "v4", "v4:2x2x2", "megacore"),
    _tpu("v5e-8", "v5e", "v5e:2x4"),
    _tpu("v5e-16", "v5e", "v5e:4x4"),
    _tpu("v5e-256", "v5e", "v5e:16x16", wrap=(True, True, False)),
    _tpu("v5p-8", "v5p", "v5:2x2x1", "megacore"),
    _tpu("v5p-64", "v5p", "v5:4x4x2", "megacore"),  # 32 chips (64 TensorCores); not a full cube: no wraparound
    _tpu("v5p-128", "v5p", "v5:4x4x4", "megacore", (True, True, True)),
    _tpu("v6e-8", "v6e", "v6e:2x4"),
    _tpu("v6e-256", "v6e", "v6e:16x16", wrap=(True, True, False)),
    _gpu("h100-1", "h100", 1),
    _gpu("h100-2", "h100", 2),  # a 2-GPU node (also the quick GPU case of tests/test_aot.py)
    _gpu("h100-8", "h100", 8),
    _gpu("h200-1", "h200", 1),  # the device check's one-GPU machine
    _gpu("h200-8", "h200", 8),
    _gpu("b200-8", "b200", 8),
)}

GPUS_PER_NODE = 8

# chips per TPU host in every generation listed here (a v5e/v6e 8-chip host is two 2x2 trays as far as the
# topology description is concerned; MaxText passes the same bounds)
TPU_CHIPS_PER_HOST = (2, 2, 1)


# Cloud TPU accelerator-type prefixes that name a target differently (scripts/tpu.sh passes ACCELERATOR as is)
CLOUD_PREFIXES = {"v5litepod-": "v5e-"}


def get(name: str) -> Target:
    """The target named `name` (case-insensitive; Cloud TPU accelerator types such as v5litepod-8 too); TargetError
    naming the choices otherwise."""
    key = name.strip().lower()
    for cloud, ours in CLOUD_PREFIXES.items():
        if key.startswith(cloud):
            key = ours + key[len(cloud):]
    device, _, count = key.rpartition("-")
    if key not in TARGETS and device in _gpu_devices() and count.isdigit() and 1 <= int(count) <= GPUS_PER_NODE:
        return _gpu(key, device, int(count))  # a node of any 1-8 of these GPUs
    if key not in TARGETS:
        raise TargetError(f"--target {name!r}: unknown target; choose one of {', '.join(TARGETS)} (or a GPU node of "
                          f"1-{GPUS_PER_NODE} GPUs, e.g. h100-4)")
    return TARGETS[key]


def _gpu_devices() -> set[str]:
    return {t.device for t in TARGETS.values() if t.platform == "gpu"}


def for_devices(device: str, n: int) -> tuple[str, int]:
    """(target name, slices) of `n` devices of hardware row `device`: a target of exactly n devices; for GPUs a node
    of n <= 8 GPUs or n / 8 nodes of 8; for TPUs n / k slices of the largest slice of k chips that divides n.
    TargetError when none does."""
    own = [t for t in TARGETS.values() if t.device == device]
    if not own:
        raise TargetError(f"--device {device}: no compile target for it in moe_jax/tools/targets.py")
    exact = [t for t in own if t.chips == n]
    if exact:
        return exact[0].name, 1
    if own[0].platform == "gpu":
        if n <= GPUS_PER_NODE:
            return f"{device}-{n}", 1
        if n % GPUS_PER_NODE == 0:
            return f"{device}-{GPUS_PER_NODE}", n // GPUS_PER_NODE
        raise TargetError(f"{n} {device} GPUs: not whole nodes of {GPUS_PER_NODE}; the compile check needs a multiple")
    whole = [t for t in own if n % t.chips == 0]
    if not whole:
        raise TargetError(f"{n} {device} chips: no {device} slice in moe_jax/tools/targets.py divides them (slices of "
                          f"{', '.join(str(t.chips) for t in own)} chips)")
    t = max(whole, key=lambda t: t.chips)
    return t.name, n // t.chips


def compiler_package(platform: str) -> str:
    """The pip package whose compiler a platform needs."""
    return {"tpu": "libtpu", "gpu": "jax_cuda12_plugin"}[platform]


def check_compiler(target: Target) -> None:
    """TargetError with the install command when the target's compiler package is not installed."""
    package = compiler_package(target.platform)
    if importlib.util.find_spec(package) is None:
        raise TargetError(f"--target {target.name}: the {target.platform.upper()} compiler ({package}) is not "
                          f"installed; {INSTALL_HINT}")


def topology_devices(target: Target, slices: int = 1) -> list:
    """The devices of `slices` x `target` as the compiler sees them (nothing attached; compile only)."""
    from jax.experimental import topologies

    check_compiler(target)
    if slices < 1:
        raise TargetError(f"--slices {slices}: must be >= 1")
    if target.platform == "tpu":
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=target.chip_config,
                                            chips_per_host_bounds=TPU_CHIPS_PER_HOST, num_slices=slices,
                                            wrap=target.wrap)
    else:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.gpu_spec_text(),
                                            topology=f"1x{slices}x{target.chips}")
    devices = list(topo.devices)
    if len(devices) != slices * target.chips:
        raise TargetError(f"--target {target.name}: the compiler gives {len(devices)} devices, the table says "
                          f"{slices * target.chips}; fix TARGETS in moe_jax/tools/targets.py")
    return devices


def slice_of(device) -> int:
    """Which slice (TPU) or node (GPU) a device is in: what a collective crosses the slow links between."""
    if device.platform == "tpu":  # the hosts of one slice share its ICI: only slices are joined by DCN
        index = getattr(device, "slice_index", None)
        return 0 if index is None else int(index)  # a one-slice topology's devices carry no slice_index
    return int(device.process_index)
