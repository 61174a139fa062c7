"""Accuracy, false-accept rate and throughput of the toy world's verifiable reward.

Renders N random (spec, seed) samples, scores them against their own prompt (accuracy), against
prompts that differ in exactly one attribute (false accepts), and against their own prompt after
Gaussian blur + noise (robustness to what a small diffusion model produces).

    python bench/toyworld_detector.py --n 4000 --sizes 32 16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from scipy import ndimage

from pipeline.toyworld import ATTRIBUTES, all_specs, differ_in, render_batch, score, to_tensor


def degrade(images: np.ndarray, noise: float, blur: float, seed: int) -> np.ndarray:
    """Blur (sigma in pixels) then add Gaussian noise (sigma in [-1, 1] units); NCHW float."""
    x = to_tensor(images).numpy()
    if blur > 0:
        x = ndimage.gaussian_filter(x, (0, 0, blur, blur))
    return x + noise * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)


def run(n: int, size: int, seed: int, conditions: list[tuple[float, float]], batch: int) -> None:
    rng = np.random.default_rng(seed)
    specs_all = all_specs()
    specs = [specs_all[int(i)] for i in rng.integers(len(specs_all), size=n)]
    seeds = [int(s) for s in rng.integers(1 << 30, size=n)]
    start = time.perf_counter()
    images = render_batch(specs, seeds, size)
    render_s = time.perf_counter() - start

    score(images[:batch], specs[:batch])  # warm-up
    start = time.perf_counter()
    parts = [score(images[i:i + batch], specs[i:i + batch]) for i in range(0, n, batch)]
    score_s = time.perf_counter() - start
    stack = {k: np.concatenate([getattr(p, k) for p in parts])
             for k in (*ATTRIBUTES, "overall", "reward")}

    print(f"\n== size {size}, {n} samples (seed {seed}) ==")
    print("accuracy on matching prompts:")
    for k in (*ATTRIBUTES, "overall"):
        print(f"  {k:9s} {stack[k].mean() * 100:7.2f} %")
    print(f"  reward    mean {stack['reward'].mean():.4f}, min {stack['reward'].min():.4f}")

    print("false-accept rate (prompt differs in exactly this attribute):")
    for attribute in ATTRIBUTES:
        wrong = [differ_in(s, attribute, rng) for s in specs]
        result = score(images, wrong)
        print(f"  {attribute:9s} {result.overall.mean() * 100:7.2f} %   "
              f"(attribute judged correct: {getattr(result, attribute).mean() * 100:.2f} %)")

    print("matching prompts after Gaussian blur (sigma px) + noise (sigma, [-1,1] units):")
    for noise, blur in conditions:
        noisy = score(degrade(images, noise, blur, seed), specs)
        print(f"  blur {blur:.2f} noise {noise:.2f}: " + ", ".join(
            f"{k} {v * 100:.2f} %" for k, v in noisy.summary().items() if k != "reward"))

    print(f"throughput: score {n / score_s:,.0f} images/s (batches of {batch}, one process), "
          f"render {n / render_s:,.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per size (default 4000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32],
                        help="image sizes to test (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", nargs="+", default=["0.1:0.5", "0.1:1.0", "0.2:0.5"],
                        metavar="NOISE:BLUR",
                        help="robustness checks: noise sigma in [-1, 1] units and Gaussian blur "
                             "sigma in pixels (default 0.1:0.5 0.1:1.0 0.2:0.5)")
    parser.add_argument("--batch", type=int, default=512, help="scoring batch size")
    args = parser.parse_args()
    print(f"python bench/toyworld_detector.py {' '.join(sys.argv[1:])}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPU cores, {platform.machine()}")
    for size in args.sizes:
        conditions = [tuple(float(v) for v in c.split(":")) for c in args.conditions]
        run(args.n, size, args.seed, conditions, args.batch)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
