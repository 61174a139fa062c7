"""Tune μ (SDPO slack), β and ε (SIPO clip) with Ray Tune: a grid or Optuna, ASHA on the held-out reward.

    python jobs/sweep.py                                   # embedded default: a 2×2 grid (μ, β) on the toy world
    python jobs/sweep.py --search optuna --num-samples 12  # Optuna (TPE) over μ, β, ε in `space`
    python jobs/sweep.py --set grid.mu=[0.0,0.3] grid.beta=[1000] 'grid.epsilon=[0.1,0.2]'
    python jobs/sweep.py --set rounds=my_rounds.yaml       # tune round 0 of your own iterative_sipo config
    python jobs/sweep.py --set segments=4 reduction_factor=3 trial.eval_prompts=24 --out runs/sweep-4seg
    python jobs/iterative_sipo.py --config runs/sweep/best_config.yaml   # then run the winner
    ray job submit --working-dir . -- python jobs/sweep.py --config sweep.yaml --out /shared/runs/sweep

Tunes round 0 of an iterative_sipo run (``rounds``, default: jobs/iterative_sipo.py's embedded default):
the reference's pairs are generated once under ``--out`` and shared by all trials; each trial trains with
Ray Train (a TorchTrainer fitted inside the Tune trial, Train V2) in ``segments`` of ``steps_per_segment``
optimizer steps (default: train.max_steps / segments, the run's own budget), evaluates the held-out reward
after each, and reports it to Tune; ASHA stops the worst trials between segments. ``trial`` holds overrides
for the trials only (a smaller held-out evaluation by default) that do not go into best_config.yaml.

Writes to ``--out``: results.csv and results.md (one row per trial: the values, final and best reward
with 95% CIs, segments run, stopped early or not), reward_vs_hparams.png (one panel per hyperparameter),
best_config.yaml (the ``rounds`` config with the best trial's sdpo_mu / objective_overrides, ready for
``jobs/iterative_sipo.py --config``), per-trial evals in trials/, Tune's experiment in tune/. Rerunning
with the same config resumes the sweep.

Config: fields of ``SweepConfig`` (pipeline/sweep.py) from ``--config`` (JSON/YAML; a file without
``rounds`` tunes iterative_sipo's embedded default), then ``--set`` overrides (dotted keys into ``rounds``,
``trial``, ``grid`` and ``space``). Swept names: mu → train.sdpo_mu (-1 turns the safeguard off; grid only),
beta → train.objective_overrides.beta (log scale in Optuna), epsilon → train.objective_overrides.epsilon.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; trials fit TorchTrainers (Train V2 + Tune)

from iterative_sipo import EMBEDDED_DEFAULT as ROUNDS_DEFAULT  # noqa: E402

#: The embedded default: a 2×2 grid over μ and β (ε stays at the tuned run's value; the Optuna search and
#: `--set grid.epsilon=[0.1,0.2]` sweep it too) tuning round 0 of a shortened iterative_sipo default (96
#: prompts, 100 steps, so that the sweep fits 10 minutes on a 2-core CPU machine) as 2 segments (ASHA stops
#: about half the trials at half the budget), two trials at a time, each segment scored on 16 held-out
#: prompts × 2 samples (docs/jobs.md). μ = -1 is SIPO without the safeguard.
SWEPT_ROUNDS = {**ROUNDS_DEFAULT, "generation": {**ROUNDS_DEFAULT["generation"], "prompt_limit": 96},
                "train": {**ROUNDS_DEFAULT["train"], "max_steps": 100}}
EMBEDDED_DEFAULT = {
    "rounds": SWEPT_ROUNDS,
    "trial": {"eval_prompts": 16, "eval_samples": 2},
    "search": "grid",
    "grid": {"mu": [-1.0, 0.5], "beta": [5000.0, 20000.0]},
    "space": {"mu": [0.0, 1.0], "beta": [1000.0, 100000.0], "epsilon": [0.05, 0.3]},
    "segments": 2,
    "grace_period": 1,
    "reduction_factor": 2,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs") / "sweep", help="output folder (reruns resume)")
    p.add_argument("--config", type=Path, help="JSON or YAML file with SweepConfig fields (replaces the embedded default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. segments=3 grid.mu=[0.5,0.9]")
    p.add_argument("--search", choices=["grid", "optuna"], help="grid search or Optuna (same as --set search=...)")
    p.add_argument("--num-samples", type=int, help="grid: repeats of the grid; optuna: number of trials")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    from pipeline.config import UnknownConfigField, build_config, read_config_file
    from pipeline.sweep import SweepConfig

    data = read_config_file(args.config) if args.config else dict(EMBEDDED_DEFAULT)
    data.setdefault("rounds", ROUNDS_DEFAULT)
    overrides = list(args.set)
    if args.search:
        overrides.append(f"search={args.search}")
    if args.num_samples is not None:
        overrides.append(f"num_samples={args.num_samples}")
    try:
        return build_config(SweepConfig, None, overrides, base=data)
    except UnknownConfigField as err:
        raise SystemExit(str(err)) from err


def main(argv=None) -> int:
    from pipeline.utils.driver import ElapsedLog, offline_mode, start_ray

    offline_mode()  # before torch / diffusers / transformers / Ray are imported
    args = parse_args(argv)
    cfg = build(args)
    from pipeline.sweep import run_sweep
    from pipeline.utils.runlock import run_lock

    with run_lock(args.out):  # one sweep per output folder; clears killed writes' leftovers
        start_ray(args.num_cpus)
        log = ElapsedLog()
        res = run_sweep(cfg, args.out, log=log)
    print((args.out / "results.md").read_text())
    print(f"done in {log.seconds:.0f} s; see {args.out}/results.md, results.csv, reward_vs_hparams.png"
          + (f" and {args.out}/best_config.yaml" if res["best"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
