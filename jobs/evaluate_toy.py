"""Evaluate a model on a toy world's held-out prompts with fixed seeds (a couple of minutes on CPU).

    python jobs/evaluate_toy.py                                  # the shipped image reference model
    python jobs/evaluate_toy.py --model runs/x/final_model --out runs/x/eval
    python jobs/evaluate_toy.py --world video --split heldout,train --out bench/results/toy_video_reference

Writes to ``--out``: ``eval.json`` (every number), ``eval.md`` (the table below), ``grid.png`` (samples,
one row per prompt, reward under each image; for videos a frame strip per sample). Reports the verifiable reward and
per-dimension accuracy (the image world's four attributes, GenEval-style; the video world's colour, shape, count,
motion and temporal consistency) with 95 % bootstrap confidence intervals over prompts, and best-of-K (the best
of the K samples of each prompt by reward), which shows how much the reward can still rise.

``--split`` takes one split or several separated by commas; with several, ``eval.json`` holds one result per
split under ``"splits"`` and ``grid.png`` is the first split's (``grid_<split>.png`` for the others). ``--world``
defaults to the model folder's kind (a video backbone → the video world).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.utils.driver import offline_mode  # noqa: E402

offline_mode()  # before diffusers / transformers are imported (in _evaluate: --help and a busy --out stay quick)

#: --world → the world registry's name (pipeline/toyworld/worlds.py)
WORLDS = {"image": "toy", "video": "toy_video"}
SPLITS = ("heldout", "train", "val", "fit", "all")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=sorted(WORLDS), default=None,
                   help="which toy world's prompts and scorer (default: the model's kind; image without --model)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the world's shipped reference)")
    p.add_argument("--out", type=Path, default=Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--split", default="heldout",
                   help=f"which prompts to evaluate: one of {', '.join(SPLITS)}, or several separated by commas")
    p.add_argument("--max-prompts", type=int, default=0, help="evaluate only the first N prompts of each split (0: all)")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="K: samples per prompt (best-of-K uses them)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0,
                   help="sampler eta (1: ancestral DDPM / the flow SDE, 0: deterministic DDIM / flow Euler)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    args = p.parse_args(argv)
    if args.samples_per_prompt < 1 or args.max_prompts < 0:
        p.error("--samples-per-prompt must be >= 1 and --max-prompts >= 0")
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad or len(set(splits)) != len(splits):
        p.error(f"--split {args.split!r}: expected one or more of {', '.join(SPLITS)} separated by commas")
    args.split = ",".join(splits)
    if args.world is None:
        args.world = _world_of_model(args.model) if args.model is not None else "image"
    if args.model is None:
        from pipeline.toyworld.worlds import get_world

        args.model = get_world(WORLDS[args.world]).reference_dir
    return args


def _world_of_model(path: Path) -> str:
    from pipeline.backbones import VideoBackbone, backbone_class

    try:
        return "video" if issubclass(backbone_class(path), VideoBackbone) else "image"
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return "image"  # the job's own checks report the folder


def main(argv=None) -> int:
    from pipeline.cli import print_options_if_asked
    from pipeline.utils.runlock import run_lock

    args = parse_args(argv)
    print_options_if_asked(args)
    with run_lock(args.out):  # one job per output folder; clears killed writes' leftovers
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.backbones import load_backbone
    from pipeline.evaluation import evaluate
    from pipeline.sampling import SamplerConfig
    from pipeline.toyworld.worlds import get_world
    from pipeline.utils.atomic import atomic_write_bytes

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    world = get_world(WORLDS[args.world])
    backbone = load_backbone(args.model)
    if bool(getattr(backbone, "is_video", False)) != world.video:
        raise SystemExit(f"error: {args.model} is {'a video' if backbone.is_video else 'an image'} model but "
                         f"--world {args.world} evaluates {'videos' if world.video else 'images'}")
    sampler = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta, batch_size=args.batch_size)
    sampler_name = "flow steps" if backbone.process.parameterization.value == "flow" else "DDIM steps"
    args.out.mkdir(parents=True, exist_ok=True)
    splits = args.split.split(",")
    header = f"# Toy-world evaluation: {args.model}\n\n"
    tables, payloads = [], {}
    for i, split in enumerate(splits):
        specs = list(world.specs(split))
        if args.max_prompts:
            specs = specs[: args.max_prompts]
        t0 = time.time()
        result, _ = evaluate(backbone, specs, samples_per_prompt=args.samples_per_prompt, sampler=sampler,
                             grid_path=args.out / ("grid.png" if i == 0 else f"grid_{split}.png"), world=world)
        seconds = time.time() - t0
        tables.append(f"{'## ' + split + chr(10) + chr(10) if len(splits) > 1 else ''}"
                      f"{len(specs)} {split} prompts × {args.samples_per_prompt} samples, {args.steps} {sampler_name} "
                      f"(η={args.eta}), guidance {args.guidance}; {seconds:.0f} s.\n\n"
                      f"{result.table(args.model.name)}\n")
        payloads[split] = {"split": split, "seconds": seconds, **result.to_dict()}
    text = header + "\n".join(tables)
    atomic_write_bytes(args.out / "eval.md", text.encode())
    common = {"model": str(args.model), "world": world.name, "sampler": vars(sampler)}
    if len(splits) == 1:
        payload = {**common, **payloads[splits[0]]}
    else:
        payload = {**common, "splits": payloads}
    atomic_write_bytes(args.out / "eval.json", json.dumps(payload, indent=1, default=str).encode())
    print(text)
    print(f"\nwrote {args.out}/eval.md, eval.json, grid.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
