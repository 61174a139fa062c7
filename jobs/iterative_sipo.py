"""Online, IPO-style rounds of SIPO (SIPO paper, appendix F.2): roll out, score, pair, train, evaluate.

    python jobs/iterative_sipo.py                          # embedded default: the toy world, local Ray
    python jobs/iterative_sipo.py --set rounds=5 train.objective=diffusion-dpo train.sdpo_mu=0.9
    ray job submit --working-dir . -- python jobs/iterative_sipo.py --config rounds.yaml --run-dir /shared/runs/x

Each round samples K images per prompt from the current policy, scores them with the reward, trains on
best-vs-worst pairs with Ray Train (FSDP2), and evaluates the new policy on held-out prompts with the
reference's seeds. Writes to ``--run-dir``: a per-round table (summary.md), training curves and reward
plots, image grids per round, and the final model folder. Finished rounds are skipped on rerun.

Config: fields of ``RoundsConfig`` (pipeline/rounds.py) from ``--config`` (JSON/YAML), then ``--set``
overrides with dotted keys into ``generation``, ``train`` and ``eval_sampler``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The embedded default: sized to finish in minutes on a 2-core CPU machine.
EMBEDDED_DEFAULT = {
    "rounds": 2,
    "generation": {"prompts": "toy:train", "prompt_limit": 64, "samples_per_prompt": 4, "batch_size": 64,
                   "sampler": {"num_steps": 10, "guidance_scale": 3.0, "eta": 1.0, "batch_size": 64}},
    # Conservative: the held-out reward stays within the reference's interval (0.249 -> 0.227 after one round).
    # lr 1e-4 over-optimises (0.249 -> 0.112); the exact parameter-space safeguard (sdpo_space=parameter,
    # sdpo_mu=0) holds the winner's loss but did not raise the reward within this budget either (README).
    "train": {"objective": "sipo", "sdpo_mu": 0.9, "lr": 1e-5, "max_steps": 40, "batch_size": 8,
              "checkpoint_every": 20, "torch_threads": 2},
    "eval_prompts": 48,
    "eval_samples": 4,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs") / "iterative_sipo", help="output folder (reruns resume)")
    p.add_argument("--config", type=Path, help="JSON or YAML file with RoundsConfig fields (replaces the embedded default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.lr=5e-5")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    from pipeline.config import UnknownConfigField, build_config
    from pipeline.rounds import RoundsConfig

    try:
        return build_config(RoundsConfig, args.config, args.set, base=EMBEDDED_DEFAULT)
    except UnknownConfigField as err:
        raise SystemExit(str(err)) from err


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build(args)
    import ray

    from pipeline.rounds import run_rounds

    ray.init(num_cpus=args.num_cpus, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    t0 = time.time()
    run_rounds(cfg, args.run_dir, log=lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True))
    print(f"done in {time.time() - t0:.0f} s; see {args.run_dir}/summary.md, reward.png, curves.png, "
          f"round_*/grid.png and {args.run_dir}/final_model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
