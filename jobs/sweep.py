"""Tune μ (SDPO slack), β and ε (SIPO clip) with Ray Tune: a grid or Optuna, ASHA on the held-out reward.

    python jobs/sweep.py                                   # embedded default: a 2×2 grid (μ, β) on the toy world
    python jobs/sweep.py --search optuna --num-samples 12  # Optuna (TPE) over μ, β, ε in `space`
    python jobs/sweep.py --set 'grid.mu=[null,0.3]' grid.beta=[1000] 'grid.epsilon=[0.1,0.2]'
    python jobs/sweep.py --rounds-config my_rounds.yaml    # tune round 0 of your own iterative_sipo config
    python jobs/sweep.py --set segments=4 reduction_factor=3 trial.eval.num_prompts=24 --out runs/sweep-4seg
    python jobs/iterative_sipo.py --config runs/sweep/best_config.yaml   # then run the winner
    ray job submit --working-dir . -- python jobs/sweep.py --config sweep.yaml --out /shared/runs/sweep

Tunes round 0 of an iterative_sipo run (``rounds``, default: a shortened toy-one-round recipe, pipeline/recipes.py):
the reference's pairs are generated once under ``--out`` and shared by all trials; each trial trains with
Ray Train (a TorchTrainer fitted inside the Tune trial, Train V2) in ``segments`` of ``steps_per_segment``
optimizer steps (default: train.max_steps / segments, the run's own budget), evaluates the held-out reward
after each, and reports it to Tune; ASHA stops the worst trials between segments. ``trial`` holds overrides
for the trials only (a smaller held-out evaluation by default) that do not go into best_config.yaml.

Writes to ``--out``: results.csv and results.md (one row per trial: the values, final and best reward
with 95% CIs, segments run, stopped early or not), reward_vs_hparams.png (one panel per hyperparameter),
best_config.yaml (the ``rounds`` config with the best trial's μ / β / ε, ready for
``jobs/iterative_sipo.py --config``), per-trial evals in trials/, Tune's experiment in tune/. Rerunning
with the same config resumes the sweep.

Config: the ``SweepConfig`` tree (pipeline/sweep.py) — recipe ``toy-sweep`` ← ``--config`` (JSON/YAML, merged)
← ``--set`` overrides (dotted paths into ``rounds``, ``trial``, ``grid`` and ``space``); ``--print-config``
shows it. Swept names: mu → train.objective.safeguard.mu (null turns the safeguard off; grid only), beta →
train.objective.beta (log scale in Optuna), epsilon → train.objective.epsilon. A rerun into the same
``--out`` resumes; with another config it is refused, naming the fields that differ.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; trials fit TorchTrainers (Train V2 + Tune)


def parse_args(argv=None) -> argparse.Namespace:
    from pipeline.cli import add_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs") / "sweep", help="output folder (reruns resume)")
    add_config_args(p, default_recipe="toy-sweep", tree="sweep")
    p.add_argument("--rounds-config", type=Path,
                   help="a JSON/YAML RoundsConfig (e.g. an iterative_sipo config) to tune instead of the recipe's")
    p.add_argument("--search", choices=["grid", "optuna"], help="grid search or Optuna (same as --set search=...)")
    p.add_argument("--num-samples", type=int, help="grid: repeats of the grid; optuna: number of trials")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    from pipeline.cli import config_data, resolve
    from pipeline.config import ConfigError, merge, read_config_file
    from pipeline.sweep import SweepConfig

    extra = ([f"search={args.search}"] if args.search else []) + \
        ([f"num_samples={args.num_samples}"] if args.num_samples is not None else [])
    try:
        data = config_data(args, extra)
        if args.rounds_config:
            data["rounds"] = merge(data.get("rounds", {}), read_config_file(args.rounds_config))
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    return resolve(args, SweepConfig, data=data)


def main(argv=None) -> int:
    from pipeline.utils.driver import ElapsedLog, offline_mode, start_ray

    offline_mode()  # before torch / diffusers / transformers / Ray are imported
    args = parse_args(argv)
    from pipeline.utils.runlock import refuse_if_locked, run_lock

    if not args.print_config:
        refuse_if_locked(args.out)  # a busy --out is said at once, before the heavy imports
    cfg = build(args)
    from pipeline.preflight import check_rounds
    from pipeline.sweep import RESUMABLE, run_sweep

    check_rounds(cfg.trial_rounds())  # every input exists and fits, before Ray starts
    from pipeline.utils.run_record import guard_run_dir

    with run_lock(args.out):  # one sweep per output folder; clears killed writes' leftovers
        guard_run_dir(args.out.resolve(), cfg, job="sweep", resumable=RESUMABLE)  # before Ray starts
        start_ray(args.num_cpus)
        log = ElapsedLog()
        res = run_sweep(cfg, args.out, log=log)
    print((args.out / "results.md").read_text())
    print(f"done in {log.seconds:.0f} s; see {args.out}/results.md, results.csv, reward_vs_hparams.png"
          + (f" and {args.out}/best_config.yaml" if res["best"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
