"""Evaluate a model on the toy world's held-out prompts with fixed seeds (a couple of minutes on CPU).

    python jobs/evaluate_toy.py                                  # the shipped reference model
    python jobs/evaluate_toy.py --model runs/x/final_model --out runs/x/eval

Writes to ``--out``: ``eval.json`` (every number), ``eval.md`` (the table below), ``grid.png`` (samples,
one row per prompt, reward under each image). Reports the verifiable reward and GenEval-style
per-attribute accuracy with 95 % bootstrap confidence intervals over prompts, and best-of-K (the best
of the K samples of each prompt by reward), which shows how much the reward can still rise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.utils.driver import offline_mode  # noqa: E402

offline_mode()  # before diffusers / transformers are imported (below)

from pipeline.backbones import UNetBackbone  # noqa: E402
from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.sampling import SamplerConfig  # noqa: E402
from pipeline.toyworld import heldout_specs, train_specs  # noqa: E402
from pipeline.toyworld.reference import REFERENCE_DIR  # noqa: E402
from pipeline.utils.atomic import atomic_write_bytes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REFERENCE_DIR, help="model folder (default: the shipped toy reference)")
    p.add_argument("--out", type=Path, default=Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout", help="which prompts to evaluate")
    p.add_argument("--max-prompts", type=int, default=0, help="evaluate only the first N prompts (0: all)")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="K: images per prompt (best-of-K uses them)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1: ancestral, 0: deterministic)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    args = p.parse_args(argv)
    if args.samples_per_prompt < 1 or args.max_prompts < 0:
        p.error("--samples-per-prompt must be >= 1 and --max-prompts >= 0")
    return args


def main(argv=None) -> int:
    from pipeline.cli import print_options_if_asked
    from pipeline.utils.runlock import run_lock

    args = parse_args(argv)
    print_options_if_asked(args)
    with run_lock(args.out):  # one job per output folder; clears killed writes' leftovers
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    backbone = UNetBackbone.from_pretrained(args.model)
    specs = list(heldout_specs() if args.split == "heldout" else train_specs())
    if args.max_prompts:
        specs = specs[: args.max_prompts]
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta, batch_size=args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result, _ = evaluate(backbone, specs, samples_per_prompt=args.samples_per_prompt, sampler=sampler,
                         grid_path=args.out / "grid.png")
    seconds = time.time() - t0
    table = result.table(args.model.name)
    header = (f"# Toy-world evaluation: {args.model}\n\n{len(specs)} {args.split} prompts × {args.samples_per_prompt} "
              f"samples, {args.steps} DDIM steps (η={args.eta}), guidance {args.guidance}; {seconds:.0f} s.\n\n")
    atomic_write_bytes(args.out / "eval.md", (header + table + "\n").encode())
    payload = {"model": str(args.model), "split": args.split, "sampler": vars(sampler), "seconds": seconds, **result.to_dict()}
    atomic_write_bytes(args.out / "eval.json", json.dumps(payload, indent=1, default=str).encode())
    print(header + table)
    print(f"\nwrote {args.out}/eval.md, eval.json, grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
