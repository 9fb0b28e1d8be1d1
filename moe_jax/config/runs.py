"""Is this config.json the same run? The one comparison of a run's saved config with a new one, and its field lists.

Two callers: resuming a workdir (train/workdir.py `check_resume_config`: safe changes pass and are printed, others
need --allow_config_change, structural ones are refused) and re-running a study (studies/runner.py `check_run_dir`:
any change but RERUN_IGNORED is refused). Both compare flattened JSON views ('model.d_model': 384) of the resolved
configs (config.json holds resolved values, and so does a RunConfig), fields absent on one side included.
"""

from __future__ import annotations

import json

from moe_jax.config.schema import ConfigError

# Fields a resumed run may change freely: they change cadence, logging, bookkeeping or the length of the run, not the
# shapes, the token stream or the meaning of the saved params and optimizer state. (train.steps also stretches the
# learning-rate schedule, which follows it: the change is printed.)
SAFE_FIELDS = (
    "name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.peak_tflops", "train.plots", "train.progress_bar",
    "train.inject_nan_at_step", "train.inject_nan_mode", "train.on_nonfinite", "train.max_skipped_steps",
    "data.cache_dir", "data.worker_count", "data.max_val_windows", "mesh.shape", "model.remat", "model.attention",
    "model.attention_block", "optim.ns_stack",  # stacking Newton-Schulz chains changes rounding only (tested 1e-6)
    "mesh.fsdp",  # a layout: the checkpoint restores into either (tests/test_checkpoint.py)
)
# Fields that change the shapes or structure of the saved state: no flag can allow them (the restore cannot work).
STRUCTURAL_FIELDS = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.mlp",
    "model.tie_embeddings", "moe.num_experts", "moe.d_ff", "moe.every", "optim.name", "optim.router_muon",
)
# Fields a study re-run may change without invalidating a run dir (presentation, caches, peak for MFU).
RERUN_IGNORED = ("train.progress_bar", "train.plots", "train.async_checkpoint", "train.peak_tflops",
                 "data.cache_dir", "data.worker_count")
ABSENT = "<absent>"


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64} (nested dicts to dotted keys)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def comparable(config) -> dict:
    """The flattened JSON view of a config: a RunConfig, a ConfigDict (both have to_dict) or config.json's dict
    (tuples become lists, as in config.json)."""
    d = config.to_dict() if hasattr(config, "to_dict") else config
    return flatten(json.loads(json.dumps(d, default=str)))


def changes(old, new, ignore=(), absent=ABSENT) -> list[tuple[str, object, object]]:
    """Sorted (field, old value, new value) of every field that differs between two configs (any form `comparable`
    takes), leaving out `ignore`; a field missing on one side shows as `absent`."""
    a, b = comparable(old), comparable(new)
    return [(f, a.get(f, absent), b.get(f, absent)) for f in sorted(set(a) | set(b))
            if f not in ignore and a.get(f, ABSENT) != b.get(f, ABSENT)]


def allowed(field: str, allow) -> bool:
    """Whether `field` is named in `allow`, itself or through its section ('optim' allows 'optim.muon_lr')."""
    return any(field == a or field.startswith(a + ".") for a in allow)


def check_allow(allow, config) -> None:
    """Every name in `allow` (--allow_config_change) must be a field ('optim.muon_lr') or a section ('optim') of
    `config` (any form `comparable` takes): raise ConfigError naming the first that is not, and the nearest real one."""
    import difflib

    fields = set(comparable(config))
    names = sorted(fields | {f.split(".", 1)[0] for f in fields if "." in f})
    for a in allow:
        if a not in names:
            near = difflib.get_close_matches(a, names, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"--allow_config_change: {a!r} is not a config field or section; {hint}name fields as "
                              "section.field (e.g. optim.muon_lr) or whole sections (e.g. optim)")


def check_resume(saved, config, allow=(), log=print) -> list[str]:
    """Compare the config of a resumed run with the run's saved one. Safe changes (SAFE_FIELDS) and those named in
    `allow` (fields or whole sections, e.g. ('optim.muon_lr', 'optim.adamw_lr') or ('optim',)) are printed through
    `log` and returned as 'field: old -> new' lines; any other change raises ConfigError listing every one as
    `field: old -> new` with the fix. STRUCTURAL_FIELDS cannot be allowed."""
    changed = changes(saved, config)
    structural = [c for c in changed if c[0] in STRUCTURAL_FIELDS]
    refused = [c for c in changed if c[0] not in SAFE_FIELDS and not allowed(c[0], allow)]
    fmt = "; ".join
    if structural:
        raise ConfigError(
            "resuming with a changed model: " + fmt(f"config.{f}: {o!r} -> {n!r}" for f, o, n in structural)
            + " changes the shapes of the saved state; undo the change or start a new --workdir")
    if refused:
        raise ConfigError(
            "resuming with a changed config: " + fmt(f"config.{f}: {o!r} -> {n!r}" for f, o, n in refused)
            + " changes the data stream or the meaning of the saved state; undo it, start a new --workdir, or allow "
            "it deliberately with --allow_config_change=" + ",".join(f for f, _, _ in refused))
    lines = [f"config.{f}: {o!r} -> {n!r}" for f, o, n in changed]
    if lines:
        log("resuming with config changes: " + "; ".join(lines))
    return lines


def check_rerun(saved, config, run_dir: str) -> None:
    """A study's run dir may be re-run only with the config it was started with (RERUN_IGNORED aside): ConfigError
    listing the first changes otherwise."""
    diff = changes(saved, config, ignore=RERUN_IGNORED, absent=None)
    if diff:
        shown = ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diff[:6])
        raise ConfigError(f"{run_dir} was started with a different config ({shown}"
                          f"{', ...' if len(diff) > 6 else ''}); use a new --workdir or delete that run")
