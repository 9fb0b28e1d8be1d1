"""Experiment studies: plan -> run -> report, resumable, with budgets, bracketed learning-rate grids, replicates, a
test split, n-gram baselines and Holm-adjusted verdicts on intervals that include test-sampling variance.
`moe_jax.compare` is a thin wrapper over it.

    python -m moe_jax.studies --config configs/studies/dense_vs_moe.py --workdir runs/studies/dense_vs_moe

A study config (configs/studies/*.py) has
  name        - the study's name (report title);
  base        - a full moe_jax config: data, tokenizer, optimizer and training setup shared by every arm;
  arms        - name -> nested overrides of base (any field: model, moe, optim, batch size, sequence length...) or a
                derived arm ({'derive': 'same_active' | 'same_total', 'from_arm': ...}, plan.arm_configs);
  arm_names   - the arms to run, in report order (comma-separated); the first is the ranking's reference;
  seeds       - replicate seeds (>= 3 for a verdict; the shipped studies use 5);
  data_orders - 'paired' (default: replicate k uses seed k for the initialisation and the data order) or a tuple
                of shuffle seeds crossed with the seeds;
  lr_grid     - optional: arm (or 'all') -> tuple of learning rates for lr_field (default 'optim.muon_lr'); the
                value of lowest mean validation loss over the selection replicates is chosen per arm (and budget),
                and only its runs are reported (on test);
  lr_select_replicates - the first k replicates run every grid value (0: all); the others run only the chosen one;
  lr_extend, lr_step - a choice on the grid's edge grows the grid by one step (x or / lr_step, default 2) beyond it,
                at most lr_extend times (default 0); an arm still on the edge is marked 'edge', its verdicts withheld;
  lr_tied     - ((field, ratio), ...): fields set to ratio x the swept rate (e.g. the AdamW rate tied to Muon's);
  lr_from     - arm -> source arm: the arm runs the rate chosen for its source (no grid of its own);
  budget      - kinds: tuple of budget conventions ('model_flops', 'executed_flops', 'tokens', 'wall_seconds',
                'micro_batches'; budget.py), each planned and reported on its own; amount (per run, in the
                convention's unit) or, when 0, reference_arm x reference_steps; calibration_steps for wall_seconds;
                arm_kinds: arm -> convention: that arm spends what the reference arm spends under it instead;
  num_evals   - evaluations per run (eval_every = ceil(steps / num_evals));
  report_split- 'auto' (test when base.data.test_fraction > 0, else validation), 'test' or 'validation';
  comparisons - 'pairwise' (default: every pair of arms) or 'reference' (every arm against the first): the verdicts
                drawn, under every budget; together they are the family whose p-values are Holm-adjusted;
  bootstrap_seed - the seed of the document resamples behind every interval (stats.resample_counts; default 0);
  correlation - True: a heatmap of correlations between arm settings and outcomes;
  conclusions - text appended to the report (what it supports and what it does not).

Modules: plan.py (config -> runs), budget.py (conventions), runner.py (train, resume, whole-split evaluation,
per-document losses), baselines.py (unigram and bigram on the same tokens), report.py (selection, headline, tables,
report.md, results.json), plots.py (figures), stats.py (intervals, Holm, verdict rule). Two processes may run one
study in one workdir (runner.py: run claims).
Layout: <workdir>/[<budget kind>/]<arm>/[lr<lr>/]seed<k>[_order<o>]/ (ordinary moe_jax.train run dirs), plus
report.md, results.json, plots/ and (wall_seconds) calibration.json.
"""
