"""Pairs per second: the Ray Data pipeline against a plain in-process loop doing the same work.

Work: K rollouts per prompt from the toy reference (CFG sampling), scoring by the verifiable reward,
best-vs-worst pairing. Both sides use the same model folder, sampler and batch size and count the
whole run (model loading included, Ray's one-off ``ray.init`` excluded). Variants run interleaved and
repeated; the report gives medians and the ratio to the loop.

    python bench/generation.py                  # results to bench/results/generation.md
    python bench/generation.py --prompts 48 --steps 10 --repeats 2     # a small run: fixed costs dominate

On the 2-core machine one actor gets both cores (``torch_threads=2``); with two actors each gets one,
so the scaling row shows Ray's overhead rather than a speed-up — on a GPU cluster each actor is a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.data.generate import GenerationConfig, generate
from pipeline.data.prompts import load_prompts
from pipeline.data.pairing import derive_seed, pairs_from_rollouts
from pipeline.rewards import build_reward
from pipeline.sampling import sample


def loop_pairs(cfg: GenerationConfig) -> int:
    """The same work as the Ray pipeline, in one process, batch by batch."""
    backbone = load_backbone(cfg.model)
    reward = build_reward(cfg.reward)
    sampler = cfg.sampler
    rows = [{**r, "sample_idx": k, "seed": derive_seed(cfg.seed, cfg.round, r["prompt_id"], k)}
            for r in load_prompts(cfg.prompts, limit=cfg.prompt_limit) for k in range(cfg.samples_per_prompt)]
    images, latents, rewards = [], [], []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        out = sample(backbone, [r["prompt"] for r in chunk], [r["seed"] for r in chunk], sampler)
        rewards.append(reward(out.images, [r["prompt"] for r in chunk]).numpy())
        latents.append(out.latents.numpy())
        images.append(out.images)
    rewards_all, latents_all = np.concatenate(rewards), np.concatenate(latents)
    n_pairs = 0
    k = cfg.samples_per_prompt
    for p in range(len(rows) // k):
        sl = slice(p * k, (p + 1) * k)
        group = {"prompt_id": np.full(k, p), "prompt": np.array([rows[p * k]["prompt"]] * k, dtype=object),
                 "sample_idx": np.arange(k), "seed": np.array([r["seed"] for r in rows[sl]]),
                 "reward": rewards_all[sl], "latent": latents_all[sl], "png": np.array([b""] * k, dtype=object)}
        n_pairs += pairs_from_rollouts(group, pairing=cfg.pairing, min_gap=cfg.min_reward_gap, round_=0,
                                       policy_version="bench").num_rows
    return n_pairs


def ray_pairs(cfg: GenerationConfig) -> int:
    with tempfile.TemporaryDirectory() as d:
        return generate(cfg, Path(d) / "pairs")["num_pairs"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=168, help="prompts (each gets K rollouts)")
    ap.add_argument("--k", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every variant")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation"))
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    base = dict(prompt_limit=args.prompts, samples_per_prompt=args.k, batch_size=args.batch_size, write_png=False,
                sampler={"num_steps": args.steps, "guidance_scale": 3.0, "eta": 1.0, "batch_size": args.batch_size})
    variants = {
        "in-process loop (2 threads)": lambda: loop_pairs(GenerationConfig(**base)),
        "Ray Data, 1 actor (2 threads)": lambda: ray_pairs(GenerationConfig(**base, num_actors=1, torch_threads=2)),
        "Ray Data, 2 actors (1 thread each)": lambda: ray_pairs(GenerationConfig(**base, num_actors=2, torch_threads=1)),
    }
    torch.set_num_threads(2)
    times: dict[str, list[float]] = {v: [] for v in variants}
    counts: dict[str, int] = {}
    for r in range(args.repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            counts[name] = run()
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {r + 1}: {name}: {counts[name]} pairs in {times[name][-1]:.1f}s", flush=True)
    loop_name = next(iter(variants))
    rate = {v: counts[v] / statistics.median(times[v]) for v in variants}
    lines = [
        "# Pair generation throughput: Ray Data vs an in-process loop", "",
        f"{args.prompts} toy prompts × K={args.k} rollouts, {args.steps} DDIM steps with CFG, batch {args.batch_size}, "
        f"toy verifiable reward, best-vs-worst pairs. {platform.machine()}, 2 CPU cores, torch {torch.__version__}. "
        f"Median of {args.repeats} interleaved runs; model loading included. Produced by "
        f"`python bench/generation.py {' '.join(sys.argv[1:] if argv is None else argv)}`.", "",
        "| variant | pairs | median time (s) | pairs/s | ratio to loop |", "|---|---|---|---|---|",
    ]
    for v in variants:
        lines.append(f"| {v} | {counts[v]} | {statistics.median(times[v]):.1f} | {rate[v]:.2f} | {rate[v] / rate[loop_name]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"times": times, "counts": counts, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
