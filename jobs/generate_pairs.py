"""Generate preference pairs with Ray Data (on-policy rollouts or DDSPO perturbation pairs).

    python jobs/generate_pairs.py --out runs/pairs                         # toy world, on-policy, local Ray
    python jobs/generate_pairs.py --out runs/ddspo --set strategy=ddspo-paired perturb=rand-removal
    ray job submit --working-dir . -- python jobs/generate_pairs.py --config gen.yaml --out /shared/pairs

Config: the ``GenerationConfig`` tree (pipeline/data/generate.py, docs/data.md) from ``--config`` (JSON or
YAML), then ``--set key=value`` overrides (dotted paths for nested fields: ``sampler.num_steps=10``);
``--print-config`` shows the result. The output folder is written atomically; rerunning with the same config
is a no-op, with another config it is refused (naming the fields that differ), and a folder that is not a
finished dataset of this project is never replaced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    from pipeline.cli import add_config_args

    add_config_args(p, default_recipe="defaults", section="generation")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.utils.driver import offline_mode, start_ray

    offline_mode()  # before torch / diffusers / transformers / Ray are imported
    args = parse_args(argv)
    from pipeline.utils.runlock import refuse_if_locked, run_lock

    if not args.print_config:
        refuse_if_locked(args.out, sibling=True)  # a busy --out is said at once, before the heavy imports
    from pipeline.cli import resolve
    from pipeline.preflight import check_generation
    from pipeline.data.generate import GenerationConfig, existing_output, generate

    cfg = resolve(args, GenerationConfig)
    check_generation(cfg)  # every input exists and fits, before Ray starts
    # --out is replaced by rename: the lock is a sibling file, <parent>/.<name>.lock
    with run_lock(args.out, sibling=True):
        try:
            existing_output(cfg, args.out)  # refuse a folder that is not this config's dataset before Ray starts
            start_ray(args.num_cpus)
            manifest = generate(cfg, args.out)
        except (FileExistsError, ValueError) as err:  # an output folder that is not ours, a bad dataset
            raise SystemExit(f"error: {err}") from err
    state = "already complete, nothing to do" if manifest["skipped"] else f"done in {manifest['seconds']} s"
    print(f"{args.out}: {manifest['num_pairs']} pairs from {manifest['num_prompts']} prompts ({state})")
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
