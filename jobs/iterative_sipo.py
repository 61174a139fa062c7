"""Online, IPO-style rounds of SIPO (SIPO paper, appendix F.2): roll out, score, pair, train, evaluate.

    python jobs/iterative_sipo.py                          # embedded default (recipe toy-rounds), local Ray
    python jobs/iterative_sipo.py --print-config           # the resolved config tree, as YAML
    python jobs/iterative_sipo.py --set rounds=3 reference=refresh train.objective.name=diffusion-dpo \\
        train.objective.safeguard.mu=0.9 --run-dir runs/dpo-sdpo
    ray job submit --working-dir . -- python jobs/iterative_sipo.py --config rounds.yaml --run-dir /shared/runs/x

Each round samples K images per prompt from the current policy, scores them with the reward, trains on
pairs (every pair above a reward gap, or best-vs-worst) with Ray Train (FSDP2), and evaluates the new policy
on held-out prompts with the reference's seeds. Writes to ``--run-dir``: the resolved config
(run_config.json), a per-round table (summary.md), training curves and reward plots, TensorBoard events
(tensorboard/), image grids per round, and the final model folder. Finished rounds are skipped on rerun; a
rerun with another config is refused, naming the fields that differ (``rounds`` may grow).

Config: the ``RoundsConfig`` tree (pipeline/rounds.py) — ``generation`` (→ ``sampler``), ``train`` (→
``objective`` → ``safeguard``), ``eval`` (→ ``sampler``); see docs/jobs.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from pipeline.cli import add_config_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs") / "iterative_sipo", help="output folder (reruns resume)")
    add_config_args(p, default_recipe="toy-rounds")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.utils.driver import ElapsedLog, offline_mode, start_ray

    offline_mode()  # before torch / diffusers / transformers / Ray are imported
    args = parse_args(argv)
    from pipeline.utils.runlock import refuse_if_locked, run_lock

    if not args.print_config:
        refuse_if_locked(args.run_dir)  # a busy run directory is said at once, before the heavy imports
    from pipeline.cli import resolve
    from pipeline.preflight import check_rounds
    from pipeline.rounds import RESUMABLE, RoundsConfig, run_rounds
    from pipeline.utils.run_record import guard_run_dir

    cfg = resolve(args, RoundsConfig)
    check_rounds(cfg)  # every input exists and fits, before Ray starts
    with run_lock(args.run_dir):  # one job per run directory; clears killed writes' leftovers
        guard_run_dir(args.run_dir, cfg, job="iterative_sipo", resumable=RESUMABLE)  # before Ray starts
        start_ray(args.num_cpus)
        log = ElapsedLog()
        run_rounds(cfg, args.run_dir, log=log)
    print(f"done in {log.seconds:.0f} s; see {args.run_dir}/summary.md, reward.png, curves.png, "
          f"round_*/grid.png and {args.run_dir}/final_model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
