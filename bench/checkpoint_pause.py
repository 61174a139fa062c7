"""Training speed after a mid-run checkpoint, one worker: the product's save against DCP's collective save.

    python bench/checkpoint_pause.py                 # ≈5 min on 2 cores
    python bench/checkpoint_pause.py --repeats 1     # a quick look

A Ray Train worker runs inside a one-rank gloo process group. ``torch.distributed.checkpoint.save`` with its
collectives on such a group left every later training step of that process slower (found in the embedded
default's step lines: pairs/s fell by about a third after the first checkpoint of each round, with the CPU half
idle). ``pipeline/training/checkpoint.py: save_checkpoint`` now writes a one-worker checkpoint without
collectives (``no_dist``; the same folder, read back by the same loader, resharding included). This benchmark
runs the training engine (``pipeline/training/engine.py``) in a fresh process per run — the embedded default's
objective, batch and thread count on the shipped toy reference — trains ``--before`` steps, writes one
checkpoint, trains ``--after`` steps, and reports pairs/s before and after, per variant:

* ``product``: ``save_checkpoint`` under a one-rank gloo group (what a Ray Train worker does now);
* ``collective``: DCP's save with its collectives on that group (what it did before);
* ``no-group``: ``save_checkpoint`` with no process group at all (the control).

Variants alternate run by run; each is a fresh process, since the slowdown stays with the process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.utils.atomic import atomic_write_bytes
from pipeline.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("product", "collective", "no-group")


def child(variant: str, before: int, after: int, window: int) -> dict:
    """One run in this process: train, checkpoint, train; pairs/s per window."""
    import torch
    import torch.distributed as dist

    from pipeline.config import build
    from pipeline.recipes import recipe
    from pipeline.toyworld import train_specs
    from pipeline.training.checkpoint import _sharded, save_checkpoint
    from pipeline.training.config import TrainConfig
    from pipeline.training.engine import PairData, TrainEngine

    if variant != "no-group":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    cfg = build(TrainConfig, {**recipe("toy-rounds")["train"], "max_steps": before + after + 1})
    engine = TrainEngine(cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [s.text for s in train_specs()[:64]]
    data = PairData(torch.rand(64, 3, 32, 32, generator=g) * 2 - 1, torch.rand(64, 3, 32, 32, generator=g) * 2 - 1,
                    prompts, None, [f"p{i}" for i in range(64)])
    feed = engine.batches(data)

    def windows(steps: int) -> list[float]:
        rates = []
        for _ in range(steps // window):
            t0 = time.perf_counter()
            for _ in range(window):
                engine.train_step(next(feed))
            rates.append(window * cfg.batch_size / (time.perf_counter() - t0))
        return rates

    first = windows(before)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if variant == "collective":
            import torch.distributed.checkpoint as dcp

            dcp.save(_sharded(engine.state_dict()), checkpoint_id=d)
        else:
            save_checkpoint(engine, d, {"step": engine.step})
        save_s = time.perf_counter() - t0
    second = windows(after)
    return {"variant": variant, "before": first, "after": second, "save_s": save_s,
            "torch_threads": torch.get_num_threads()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steady(rates: list[float]) -> float:
    """Pairs/s over every window but the first (warm-up), as a harmonic mean of equal windows."""
    rest = rates[1:] or rates
    return len(rest) / sum(1.0 / r for r in rest)


def report(results: dict, argv: list[str]) -> str:
    rows = ["| variant | pairs/s before the checkpoint | pairs/s after | after / before | save s |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        runs = [r for r in results["runs"] if r["variant"] == v]
        b = statistics.median(_steady(r["before"]) for r in runs)
        a = statistics.median(_steady(r["after"]) for r in runs)
        ratio = statistics.median(_steady(r["after"]) / _steady(r["before"]) for r in runs)
        rows.append(f"| `{v}` | {b:.2f} | {a:.2f} | **{ratio:.2f}** | {statistics.median(r['save_s'] for r in runs):.2f} |")
    a = results["args"]
    return "\n".join([
        "# Training speed after a mid-run checkpoint, one worker (bench/checkpoint_pause.py)", "",
        f"{describe_machine()}, Python {platform.python_version()}. Produced by "
        f"`python bench/checkpoint_pause.py{(' ' + ' '.join(argv)) if argv else ''}` in {results['seconds']:.0f} s: "
        f"{a['repeats']} run(s) per variant, each a fresh process, variants alternating; the training engine on the "
        f"shipped toy reference with the embedded default's training config (SIPO β 500, SDPO safeguard, batch 8, "
        f"{results['runs'][0]['torch_threads']} torch threads), {a['before']} steps, one checkpoint, {a['after']} "
        f"steps, timed in windows of {a['window']} (the first window of each side is warm-up and left out; medians "
        "over runs).", "", *rows, "",
        "`product`: `save_checkpoint` under a one-rank gloo group, as in a one-worker Ray Train run (no collectives); "
        "`collective`: `torch.distributed.checkpoint.save` with its collectives on that group (the previous save); "
        "`no-group`: `save_checkpoint` without a process group (the control).", "",
        "Per run, pairs/s before → after: " + "; ".join(
            f"{r['variant']} {_steady(r['before']):.1f} → {_steady(r['after']):.1f}" for r in results["runs"]), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant")
    ap.add_argument("--before", type=int, default=30, help="steps before the checkpoint")
    ap.add_argument("--after", type=int, default=40, help="steps after it")
    ap.add_argument("--window", type=int, default=10, help="steps per timing window")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint_pause"), help="output path stem")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.before, args.after, args.window)))
        return 0
    t0, runs = time.time(), []
    for rep in range(args.repeats):
        for v in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", v, "--before", str(args.before), "--after",
                                  str(args.after), "--window", str(args.window)], capture_output=True, text=True,
                                 check=True, cwd=ROOT)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"{v}: {_steady(r['before']):.1f} → {_steady(r['after']):.1f} pairs/s (save {r['save_s']:.2f} s)", flush=True)
    results = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "runs": runs, "seconds": time.time() - t0}
    argv_shown = list(argv if argv is not None else sys.argv[1:])
    atomic_write_bytes(args.out + ".json", json.dumps(results, indent=1).encode())
    atomic_write_bytes(args.out + ".md", report(results, argv_shown).encode())
    print(report(results, argv_shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
