"""The compile-time prediction table: configs x targets, one `aot.run` each, kept in a JSON file so that a row
already computed is never recompiled (the table is resumable: run it again with more configs or targets and only
the new rows compile), and written as a Markdown table.

    python -m moe_jax.aot --table --configs configs/smoke.py,configs/gpu_moe.py --targets v4-8,v6e-8,h100-8 \
        --markdown docs/aot_table.md [--table_json docs/aot_table.json]

A row's key is (config file, target, slices, mesh); a row records either the prediction (fits, peak GiB per device,
compile CPU-seconds, roofline step time, MFU ceiling, collectives) or the one-line reason it could not be compiled
(out of memory, a mesh or batch the target cannot hold).
"""

from __future__ import annotations

import json
import os

from moe_jax.config import schema as config_lib
from moe_jax.tools import aot as aot_lib
from moe_jax.tools import targets as targets_lib

COLUMNS = ("config", "target", "fits", "peak GiB/device", "of GiB", "compile CPU-s", "step ms (roofline)",
           "bound", "MFU ceiling", "collectives per step")


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
               step_ms=(1e3 * r["step_s_min"], 1e3 * r["step_s_max"]), bound=r["bound"], mfu_ceiling=r["mfu_ceiling"],
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
                     f"{r['device_gib']:.1f} | {r['compile_cpu_s']:.0f} | {r['step_ms'][0]:.2f}-{r['step_ms'][1]:.2f}"
                     f" | {r['bound']} | {100 * r['mfu_ceiling']:.0f}% | {r['collectives']} |")
    return "\n".join(lines) + "\n"
