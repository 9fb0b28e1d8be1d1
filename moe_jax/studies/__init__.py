"""Experiment studies: plan -> run -> report, resumable, with budgets, learning-rate grids, replicates, a test split
and t-interval verdicts. `moe_jax.compare` is a thin wrapper over it.

    python -m moe_jax.studies --config configs/studies/dense_vs_moe.py --workdir runs/studies/dense_vs_moe

A study config (configs/studies/*.py) has
  name        - the study's name (report title);
  base        - a full moe_jax config: data, tokenizer, optimizer and training setup shared by every arm;
  arms        - name -> nested overrides of base (any field: model, moe, optim, batch size, sequence length...) or a
                derived arm ({'derive': 'same_active' | 'same_total', 'from_arm': ...}, plan.arm_configs);
  arm_names   - the arms to run, in report order (comma-separated); the first is the ranking's reference;
  seeds       - replicate seeds (>= 3 for a verdict);
  data_orders - 'paired' (default: replicate k uses seed k for the initialisation and the data order) or a tuple
                of shuffle seeds crossed with the seeds;
  lr_grid     - optional: arm (or 'all') -> tuple of learning rates for lr_field (default 'optim.muon_lr'); the
                value of lowest mean validation loss is selected per arm, and only its runs are reported (on test);
  budget      - kinds: tuple of budget conventions ('model_flops', 'executed_flops', 'tokens', 'wall_seconds';
                budget.py), each planned and reported on its own; amount (per run, in the convention's unit) or, when
                0, reference_arm x reference_steps; calibration_steps for wall_seconds;
  num_evals   - evaluations per run (eval_every = ceil(steps / num_evals));
  report_split- 'auto' (test when base.data.test_fraction > 0, else validation), 'test' or 'validation';
  correlation - True: a heatmap of correlations between arm settings and outcomes;
  conclusions - text appended to the report (what it supports and what it does not).

Modules: plan.py (config -> runs), budget.py (conventions), runner.py (train, resume, whole-split evaluation,
per-document losses), baselines.py (unigram and bigram on the same tokens), report.py (selection, tables, report.md,
results.json), plots.py (figures), stats.py (t intervals, verdict rule).
Layout: <workdir>/[<budget kind>/]<arm>/[lr<lr>/]seed<k>[_order<o>]/ (ordinary moe_jax.train run dirs), plus
report.md, results.json, plots/ and (wall_seconds) calibration.json.
"""
