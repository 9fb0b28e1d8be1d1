"""The compile-time prediction table: configs x targets, one `aot.run` each, kept in a JSON file so that a row
already computed is never recompiled (the table is resumable: run it again with more configs or targets and only
the new rows compile), and written as a Markdown table.

    python -m moe_jax.aot --table --configs configs/smoke.py,configs/gpu_moe.py --targets v4-8,v6e-8,h100-8 \
        --markdown docs/aot_table.md [--table_json docs/aot_table.json]

A row's key is (config file, target, slices, mesh); a row records either the prediction (fits, peak GiB per device,
compile CPU-seconds, roofline step time with its terms, MFU estimate and ceiling, collectives) or the one-line reason it could not be compiled
(out of memory, a mesh or batch the target cannot hold).
"""

from __future__ import annotations

import json
import os

from moe_jax.config import schema as config_lib
from moe_jax.tools import aot as aot_lib
from moe_jax.tools import targets as targets_lib

COLUMNS = ("config", "target", "fits", "peak GiB/device", "of GiB", "compile CPU-s", "step ms: about (range)",
           "bound", "MFU: about / at most", "collectives per step")


def row_key(config_path: str, request: aot_lib.Request) -> str:
    mesh = "config" if request.mesh is None else ",".join(map(str, request.mesh))
    return f"{os.path.normpath(config_path)}|{request.target}|slices={request.slices}|mesh={mesh}"


def _short_collectives(colls: dict) -> str:
    parts = [f"{k} {r['count']} ({r['wire_bytes'] / 2**20:.1f} MiB)" for k, r in colls["by_kind"].items()
             if r["count"]]
    return ", ".join(parts) or "none"


def summarise(config_path: str, result: dict | None, error: str | None) -> dict:
    """One table row from `aot.run`'s result (or the error that stopped it)."""
    row = {"config": os.path.normpath(config_path), "target": None, "error": error}
    if result is None:
        return row
    train = result["programs"]["train"]
    r = train["roofline"]
    row.update(target=result["target"], fits=result["fits"], mesh=result["mesh"],
               peak_gib=train["memory"]["peak"] / aot_lib.GIB if train["memory"] else None,
               device_gib=train["device_memory"] / aot_lib.GIB,
               compile_cpu_s=sum(p["compile_cpu_s"] for p in result["programs"].values()),
               step_ms=(1e3 * r["step_s_min"], 1e3 * r["step_s_estimate"], 1e3 * r["step_s_max"]), bound=r["bound"],
               mfu_estimate=r["mfu_estimate"], mfu_ceiling=r["mfu_ceiling"],
               terms_ms={k[:-2]: 1e3 * r[k] for k in ("compute_s", "memory_s", "least_memory_s", "ici_s", "dcn_s")},
               flops=train["flops"], bytes=train["bytes"], bytes_source=train["bytes_source"],
               custom_calls=train.get("custom_calls", {}),
               collectives=_short_collectives(train["collectives"]), notes=result["notes"])
    return row


def load(path: str) -> dict:
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(path: str, rows: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def compute(config_paths: list[str], target_names: list[str], table_json: str, *, slices: int = 1,
            mesh: tuple[int, ...] | None = None, out=print) -> dict:
    """Every (config, target) row not yet in `table_json`, computed and saved one at a time. Returns all rows."""
    from moe_jax import cli
    for name in target_names:
        targets_lib.get(name)  # unknown names fail before any compile
    rows = load(table_json)
    for path in config_paths:
        for name in target_names:
            request = aot_lib.Request(target=name, mesh=mesh, slices=slices)
            key = row_key(path, request)
            if key in rows:
                out(f"{key}: cached")
                continue
            try:
                result, error = aot_lib.run(cli.load_config_file(path), request), None
            except (aot_lib.AotError, targets_lib.TargetError, config_lib.ConfigError) as e:
                result, error = None, str(e)
            rows[key] = summarise(path, result, error)
            rows[key]["target"] = name
            save(table_json, rows)
            out(f"{key}: {'error: ' + error if error else 'done'}")
    return rows


def _step(ms) -> str:
    low, about, high = ms
    return f"{about:.3g} ({low:.3g}-{high:.3g})"


def markdown(rows: dict) -> str:
    """The rows as a Markdown table (sorted by config, then target)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for key in sorted(rows):
        r = rows[key]
        if r.get("error"):
            lines.append(f"| {r['config']} | {r['target']} | no: {r['error']} |" + " |" * (len(COLUMNS) - 3))
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "?"
        lines.append(f"| {r['config']} | {r['target']} | {'yes' if r['fits'] else 'no (memory)'} | {peak} | "
                     f"{r['device_gib']:.1f} | {r['compile_cpu_s']:.0f} | {_step(r['step_ms'])} | {r['bound']} | "
                     f"{100 * r['mfu_estimate']:.0f}% / {100 * r['mfu_ceiling']:.0f}% | {r['collectives']} |")
    return "\n".join(lines) + "\n"


def device_target(device_kind: str, n: int = 1) -> str | None:
    """The target of `n` devices of a JAX device_kind ('NVIDIA H100 80GB HBM3' -> 'h100-1'), or None."""
    kind = device_kind.lower()
    for name, target in targets_lib.TARGETS.items():
        if target.platform == "gpu" and target.chips == n and target.device in kind:
            return name
    return None


def against_measurement(row: dict, step_s: float, memory: dict) -> dict:
    """A table row's prediction beside what a device measured for the same config: the measured step time against
    the roofline's estimate and interval, and the compiled peak memory (`memory`: the device's own
    memory_analysis(), as moe_jax.bench records it) against the predicted peak."""
    low, about, high = (ms / 1e3 for ms in row["step_ms"])
    out = {"target": row["target"], "predicted_step_s": about, "predicted_step_range_s": [low, high],
           "measured_step_s": step_s, "measured_over_predicted_step": step_s / about,
           "step_within_range": low <= step_s <= high,
           "predicted_mfu": row["mfu_estimate"], "mfu_ceiling": row["mfu_ceiling"]}
    if memory and row.get("peak_gib") is not None:
        peak = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                - memory.get("alias_size_in_bytes", 0) + memory["temp_size_in_bytes"]
                + memory.get("generated_code_size_in_bytes", 0)) / aot_lib.GIB
        out.update(predicted_peak_gib=row["peak_gib"], measured_peak_gib=peak,
                   measured_over_predicted_peak=peak / row["peak_gib"])
    return out
