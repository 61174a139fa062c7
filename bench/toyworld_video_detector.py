"""Accuracy and false-accept rate of the toy video world's verifiable reward, on rendered ground truth.

Every prompt of the video grammar (270) is rendered with ``--seeds`` seeds each, and then:

* **accuracy**: each clip scored against its own prompt, per dimension (colour, shape, count, motion,
  consistency) and all five;
* **false accepts, one attribute changed**: the clip of a spec with one attribute changed (same seed) is
  scored against the original prompt; a false accept is a clip judged right in all five dimensions. Motion
  is changed four ways: reversed, turned 90 degrees, stopped (a moving prompt, a still clip) and started
  (a still prompt, a moving clip);
* **false accepts, temporal faults** (for the consistency dimension): the ground-truth clip with its frames
  shuffled, with one middle frame blanked, with one middle frame's colour changed (RGB channels rotated),
  and with one middle frame displaced by 2 px across the motion;
* **robustness**: ground truth after independent per-frame Gaussian blur plus noise;
* throughput of rendering and scoring (one process).

    python bench/toyworld_video_detector.py            # writes bench/results/toyworld_video_detector.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from pipeline.toyworld.video import (DIMENSIONS, DIRECTIONS, REVERSED, VideoSpec, all_specs, detect_batch,
                                     differ_in, judge, render_batch, to_tensor)

OUT = Path(__file__).resolve().parent / "results" / "toyworld_video_detector"


def _perpendicular(spec: VideoSpec, rng: np.random.Generator) -> VideoSpec:
    axis = {"left": "x", "right": "x", "up": "y", "down": "y"}
    options = [d for d in DIRECTIONS if axis[d] != axis[spec.motion]]
    return spec.replace(motion=options[int(rng.integers(len(options)))])


def _start(spec: VideoSpec, rng: np.random.Generator) -> VideoSpec:
    return spec.replace(motion=DIRECTIONS[int(rng.integers(len(DIRECTIONS)))])


# name -> (which specs it applies to, the spec actually rendered, the dimension it should fail)
CHANGES: dict[str, tuple[Callable[[VideoSpec], bool], Callable[[VideoSpec, np.random.Generator], VideoSpec], str]] = {
    "colour changed": (lambda s: True, lambda s, r: differ_in(s, "colour", r), "colour"),
    "shape changed": (lambda s: True, lambda s, r: differ_in(s, "shape", r), "shape"),
    "count changed": (lambda s: True, lambda s, r: differ_in(s, "count", r), "count"),
    "motion reversed": (lambda s: s.motion != "still", lambda s, r: s.replace(motion=REVERSED[s.motion]), "motion"),
    "motion turned 90 degrees": (lambda s: s.motion != "still", _perpendicular, "motion"),
    "moving prompt, still clip": (lambda s: s.motion != "still", lambda s, r: s.replace(motion="still"), "motion"),
    "still prompt, moving clip": (lambda s: s.motion == "still", _start, "motion"),
}


def _shuffle(clip: np.ndarray, spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    order = np.arange(len(clip))
    while np.array_equal(order, np.arange(len(clip))):
        order = rng.permutation(len(clip))
    return clip[order]


def _blank(clip: np.ndarray, spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    out = clip.copy()
    out[len(clip) // 2] = 0
    return out


def _recolour(clip: np.ndarray, spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    out = clip.copy()
    out[len(clip) // 2] = np.roll(out[len(clip) // 2], 1, axis=-1)   # hue turns by 120 degrees
    return out


def _jump(clip: np.ndarray, spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    out = clip.copy()
    k = len(clip) // 2
    shift = (2, 0) if spec.motion in ("left", "right") else (0, 2)   # (rows, cols): across the motion
    out[k] = ndimage.shift(clip[k], (*shift, 0), order=0, cval=0)
    return out


# name -> (which specs, the fault, the dimension it should fail)
FAULTS = {
    "frames shuffled": (lambda s: s.motion != "still", _shuffle, "consistency"),
    "one frame blanked": (lambda s: True, _blank, "consistency"),
    "one frame recoloured": (lambda s: True, _recolour, "consistency"),
    "one frame displaced 2 px": (lambda s: True, _jump, "consistency"),
}


def _degrade(clips: np.ndarray, blur: float, noise: float, seed: int) -> np.ndarray:
    x = to_tensor(clips).numpy()
    if blur > 0:
        x = ndimage.gaussian_filter(x, (0, 0, 0, blur, blur))
    return x + noise * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)


def _rates(result, dims=(*DIMENSIONS, "overall")) -> dict[str, float]:
    return {d: float(np.mean(getattr(result, d))) for d in dims}


def run(num_seeds: int, size: int, frames: int, speed: "float | None", seed: int,
        conditions: list[tuple[float, float]]) -> dict:
    rng = np.random.default_rng(seed)
    specs = [s for s in all_specs() for _ in range(num_seeds)]
    seeds = [int(x) for x in rng.integers(1 << 30, size=len(specs))]
    start = time.perf_counter()
    clips = render_batch(specs, seeds, size, frames, speed)
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    truth = judge(detect_batch(clips), specs)
    score_s = time.perf_counter() - start
    report: dict = {
        "clips": len(specs), "specs": len(all_specs()), "seeds_per_spec": num_seeds, "size": size,
        "frames": frames, "speed": speed, "seed": seed,
        "accuracy": _rates(truth),
        "reward": {"mean": float(truth.reward.mean()), "min": float(truth.reward.min())},
        "throughput": {"render_clips_per_s": len(specs) / render_s, "score_clips_per_s": len(specs) / score_s},
    }
    print(f"accuracy ({len(specs)} clips):", report["accuracy"], flush=True)

    report["false_accepts"] = {}
    for name, (applies, change, dim) in CHANGES.items():
        idx = [i for i, s in enumerate(specs) if applies(s)]
        shown = [change(specs[i], rng) for i in idx]
        result = judge(detect_batch(render_batch(shown, [seeds[i] for i in idx], size, frames, speed)),
                       [specs[i] for i in idx])
        worst = [(specs[i].text, shown[j].text) for j, i in enumerate(idx) if result.overall[j]][:5]
        report["false_accepts"][name] = {"n": len(idx), "false_accept": float(result.overall.mean()),
                                         "dimension": dim, "dimension_passed": float(getattr(result, dim).mean()),
                                         "reward_mean": float(result.reward.mean()),
                                         "reward_max": float(result.reward.max()), "examples": worst}
        print(name, report["false_accepts"][name], flush=True)

    report["temporal_faults"] = {}
    for name, (applies, fault, dim) in FAULTS.items():
        idx = [i for i, s in enumerate(specs) if applies(s)]
        faulty = np.stack([fault(clips[i], specs[i], rng) for i in idx])
        result = judge(detect_batch(faulty), [specs[i] for i in idx])
        report["temporal_faults"][name] = {"n": len(idx), "false_accept": float(result.overall.mean()),
                                           "dimension": dim, "dimension_passed": float(getattr(result, dim).mean()),
                                           "reward_mean": float(result.reward.mean())}
        print(name, report["temporal_faults"][name], flush=True)

    report["robustness"] = []
    for blur, noise in conditions:
        result = judge(detect_batch(_degrade(clips, blur, noise, seed)), specs)
        report["robustness"].append({"blur": blur, "noise": noise, **_rates(result)})
        print("robustness", report["robustness"][-1], flush=True)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def markdown(report: dict, command: str, machine: str, wall_s: float) -> str:
    a = report["accuracy"]
    lines = [
        "# Toy video world: detector accuracy and false accepts",
        "",
        f"`{command}` — {machine}; {wall_s:.0f} s wall. {report['clips']} clips: all {report['specs']} prompts "
        f"× {report['seeds_per_spec']} seeds, {report['frames']} frames of {report['size']}×{report['size']}, "
        f"speed {report['speed'] or 'default (size // 16)'} px/frame. Raw numbers: `toyworld_video_detector.json`.",
        "",
        "## Accuracy on matching prompts (rendered ground truth)",
        "",
        "| colour | shape | count | motion | consistency | all five | reward mean (min) |",
        "|---|---|---|---|---|---|---|",
        f"| {_pct(a['colour'])} | {_pct(a['shape'])} | {_pct(a['count'])} | {_pct(a['motion'])} | "
        f"{_pct(a['consistency'])} | {_pct(a['overall'])} | {report['reward']['mean']:.4f} "
        f"({report['reward']['min']:.4f}) |",
        "",
        "## False accepts: the clip of a prompt with one attribute changed, scored against the original prompt",
        "",
        "A false accept is a clip judged right in all five dimensions. *Dimension passed*: how often the "
        "dimension that should catch the change still passed.",
        "",
        "| change | clips | false accepts | dimension passed | reward mean / max |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["false_accepts"].items():
        lines.append(f"| {name} | {r['n']} | {_pct(r['false_accept'])} | {r['dimension']} "
                     f"{_pct(r['dimension_passed'])} | {r['reward_mean']:.3f} / {r['reward_max']:.3f} |")
    lines += [
        "",
        "## False accepts: ground-truth clips with a temporal fault (middle frame = frame F // 2)",
        "",
        "| fault | clips | false accepts | consistency passed | reward mean |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["temporal_faults"].items():
        lines.append(f"| {name} | {r['n']} | {_pct(r['false_accept'])} | {_pct(r['dimension_passed'])} "
                     f"| {r['reward_mean']:.3f} |")
    lines += [
        "",
        "## Robustness: matching prompts after independent per-frame Gaussian blur (σ px) + noise (σ, [-1, 1] units)",
        "",
        "| blur | noise | colour | shape | count | motion | consistency | all five |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["robustness"]:
        lines.append(f"| {r['blur']:.2f} | {r['noise']:.2f} | " + " | ".join(
            _pct(r[d]) for d in (*DIMENSIONS, "overall")) + " |")
    t = report["throughput"]
    lines += ["", f"Throughput (one process, {report['frames']} frames per clip): render "
              f"{t['render_clips_per_s']:,.0f} clips/s, score {t['score_clips_per_s']:,.0f} clips/s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default 3)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--speed", type=float, default=None, help="px/frame (default size // 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", nargs="+", default=["0.5:0.1", "1.0:0.1"], metavar="BLUR:NOISE")
    parser.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    args = parser.parse_args()
    command = "python bench/toyworld_video_detector.py" + "".join(f" {a}" for a in sys.argv[1:])
    machine = (f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPU cores, "
               f"{platform.machine()}")
    start = time.perf_counter()
    conditions = [tuple(float(v) for v in c.split(":")) for c in args.conditions]
    report = run(args.seeds, args.size, args.frames, args.speed, args.seed, conditions)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    report.update(command=command, machine=machine, wall_s=wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report, command, machine, wall))
    print(f"wrote {args.out.with_suffix('.md')} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
