"""What Ray costs the embedded default: the job end to end against an in-process run of the same stages.

    python bench/fixed_costs.py run                 # both sides, 3 rounds each → bench/results/fixed_costs.{json,md}
    python bench/fixed_costs.py run --rounds 1      # a quicker look (one round each)

Side **ray** is the README's main job, ``jobs/iterative_sipo.py`` (recipe ``toy-rounds``), in a subprocess: a local
Ray, generation on Ray Data actor pools, training under Ray Train, evaluation in the driver. Side **in-process**
runs the same stages, one after another, in one subprocess without Ray, through the same code: the generation
stages' own classes and pairing functions (``pipeline/data/stages.py``, ``pipeline/data/pairing.py``) called on
batches of the same size, the training engine (``pipeline/training/engine.py``: the loop a Ray Train worker runs)
with the same config, optimizer carry-over and EMA, and the job's own evaluation
(``pipeline/rounds.py: _evaluate_here``). Both sides print the same stage lines; this script timestamps every
line as it arrives and reads the stages' wall times off them, so the table is per stage and per round.

Issue 16's target: the job's end-to-end time ≤ 1.3× the in-process run's, both measured here in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "fixed_costs"
RESULTS = ROOT / "bench" / "results"
TARGET = 1.3

#: stage name → the line that starts it (a round's stage ends where the next line of any kind starts)
STARTS = {
    "generate": re.compile(r"^round (\d+) · generate · \d+ prompts"),
    "train": re.compile(r"^round (\d+): training on"),
    "evaluate": re.compile(r"^round (\d+) · evaluate · \d+ held-out"),
    "reference": re.compile(r"^reference · evaluate · \d+ held-out"),
}
MARK = re.compile(r"^\[\s*\d+s\]\s*")  # the job's elapsed-time prefix


# ------------------------------------------------------------------------------------------------ in-process side
def in_process(run_dir: Path, rounds: int, overrides: list[str]) -> None:
    """The embedded default's stages without Ray (the baseline); prints the job's stage lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the job's console (without importing Ray for it)
    from pipeline.utils.driver import offline_mode

    offline_mode()  # before the model libraries are imported, as the job does
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from pipeline.config import apply_overrides, build
    from pipeline.data.generate import rollout_pairs_in_process
    from pipeline.data.prompts import load_prompts
    from pipeline.data.stages import GenerateImages, ScoreImages
    from pipeline.recipes import recipe
    from pipeline.reporting import fmt_ci
    from pipeline.rounds import RoundsConfig, _evaluate_here
    from pipeline.stats import paired_delta
    from pipeline.training.engine import PairData, TrainEngine

    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    cfg = build(RoundsConfig, apply_overrides(recipe("toy-rounds"), [f"rounds={rounds}", *overrides]))
    if cfg.reference.name != "fixed" or cfg.replay or cfg.select.name != "last":
        raise SystemExit("the in-process side runs the default's round schedule: a fixed reference, no replay, the "
                         "last checkpoint")
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    log(f"reference · evaluate · {cfg.eval.num_prompts} held-out prompts")
    ref, _ = _evaluate_here(cfg, "")
    log(f"reference · evaluate · done · reward {fmt_ci(ref['reward'])}")
    policy, optimizer, rows = "", "", []
    for k in range(cfg.rounds):
        gen = cfg.generation_config(k, policy)
        prompts = load_prompts(gen.prompts, limit=gen.prompt_limit, repeat=gen.prompt_repeat)
        log(f"round {k} · generate · {len(prompts)} prompts × {gen.samples_per_prompt} samples")
        generator = GenerateImages(gen.model, asdict(gen.sampler), {"": "prompt"}, torch_threads=threads,
                                   write_png=gen.write_png, weights=gen.weights, lora_rank=gen.lora_rank)
        table = rollout_pairs_in_process(gen, generator, ScoreImages(gen.reward))
        log(f"round {k}: training on {table.num_rows} pairs")
        engine = TrainEngine(cfg.train_config(k, policy, "", optimizer))
        engine.run(PairData.from_table(table))
        state = engine.state_dict()
        policy, optimizer = str(run_dir / f"policy_{k}.safetensors"), str(run_dir / f"optimizer_{k}.pt")
        save_file({n: t.contiguous() for n, t in engine.policy_weights().items()}, policy)
        torch.save(state["optimizer"], optimizer)
        log(f"round {k} · evaluate · {cfg.eval.num_prompts} held-out prompts")
        ev, _ = _evaluate_here(cfg, policy)
        delta = paired_delta(np.asarray(ev["rewards"], float), np.asarray(ref["rewards"], float))
        rows.append({"round": k, "pairs": table.num_rows, "reward": ev["reward"], "delta_vs_ref": delta})
        log(f"round {k} · evaluate · done · reward {fmt_ci(ev['reward'])} · Δ {fmt_ci(delta, signed=True)}")
    (run_dir / "rows.json").write_text(json.dumps(rows, indent=1))


# ------------------------------------------------------------------------------------------------ timing
def timed(cmd: list[str], log_path: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd``; return its wall time and every output line with the second it arrived."""
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            lines.append((time.time() - t0, line.rstrip("\n")))
            out.write(f"{lines[-1][0]:8.1f} {line}")
        if proc.wait():
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log_path}")
    return time.time() - t0, lines


def stages(lines: list[tuple[float, str]], total: float) -> dict:
    """Wall seconds per stage and round, read off the stage lines (a stage lasts until the next one starts)."""
    marks = []
    for t, line in lines:
        text = MARK.sub("", line)
        for name, pattern in STARTS.items():
            m = pattern.match(text)
            if m:
                marks.append((t, name if name == "reference" else f"{name} {m.group(1)}"))
    out = {"start-up (imports, config, Ray)": marks[0][0] if marks else total}
    for (t, name), nxt in zip(marks, marks[1:] + [(total, "end")]):
        out[name] = nxt[0] - t
    return out


def run(rounds: int, overrides: list[str], repeats: int) -> None:
    """Both sides ``repeats`` times, alternating which goes first (a slow spell on a shared machine then hits
    both); the table gives each stage's median, the ratio is the median of the per-repeat ratios."""
    import numpy as np

    from pipeline.reporting import markdown_table
    from pipeline.utils.atomic import atomic_write_bytes
    from pipeline.utils.machine import describe_machine

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)

    def command(side: str, r: int) -> list[str]:
        if side == "ray":
            return [sys.executable, "jobs/iterative_sipo.py", "--run-dir", str(WORK / f"ray-{r}"), "--set",
                    f"rounds={rounds}", *overrides]
        return [sys.executable, "bench/fixed_costs.py", "in-process", "--run-dir", str(WORK / f"in-process-{r}"),
                "--rounds", str(rounds), "--set", *overrides]

    measured: dict[str, list[dict]] = {"ray": [], "in-process": []}
    for r in range(repeats):
        for side in (("ray", "in-process") if r % 2 == 0 else ("in-process", "ray")):
            cmd = command(side, r)
            print(f"== repeat {r + 1}/{repeats} · {side}: {' '.join(cmd[1:])}", flush=True)
            total, lines = timed(cmd, WORK / f"{side}-{r}.log")
            measured[side].append({"seconds": round(total, 1),
                                   "stages": {k: round(v, 1) for k, v in stages(lines, total).items()}})
            print(f"   {total:.0f} s", flush=True)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(measured["ray"], measured["in-process"])]
    ratio = float(np.median(ratios))
    summary = json.loads((WORK / "ray-0" / "summary.json").read_text())
    median = {side: {"seconds": float(np.median([m["seconds"] for m in runs])),
                     "stages": {k: float(np.median([m["stages"].get(k, 0.0) for m in runs])) for k in runs[0]["stages"]}}
              for side, runs in measured.items()}
    result = {"rounds": rounds, "overrides": overrides, "repeats": repeats, "machine": describe_machine(),
              "ratio": round(ratio, 3), "ratios": [round(x, 3) for x in ratios], "target": TARGET, "runs": measured,
              "ray_summary": [{k: row.get(k) for k in ("round", "reward", "delta_vs_ref", "delta_vs_prev", "overall")}
                              for row in summary],
              "in_process_delta_vs_ref": [row["delta_vs_ref"] for row in
                                          json.loads((WORK / "in-process-0" / "rows.json").read_text())]}
    names = list(dict.fromkeys([*median["ray"]["stages"], *median["in-process"]["stages"]]))
    ray_s, loop_s = median["ray"]["stages"], median["in-process"]["stages"]
    rows = [[n, f"{ray_s.get(n, 0):.1f}", f"{loop_s.get(n, 0):.1f}", f"{ray_s.get(n, 0) - loop_s.get(n, 0):+.1f}"]
            for n in names]
    rows.append(["**end to end**", f"**{median['ray']['seconds']:.1f}**", f"**{median['in-process']['seconds']:.1f}**",
                 f"**{median['ray']['seconds'] - median['in-process']['seconds']:+.1f}**"])
    ray_deltas = [row["delta_vs_ref"]["mean"] for row in summary[1:]]
    loop_deltas = [d["mean"] for d in result["in_process_delta_vs_ref"]]
    same = ("identical" if ray_deltas == loop_deltas else
            "not identical: the in-process side samples each batch with both threads instead of two single-threaded actors")
    per_repeat = "; ".join(f"{a['seconds']:.0f} s / {b['seconds']:.0f} s = {x:.2f}"
                           for a, b, x in zip(measured["ray"], measured["in-process"], ratios))
    text = "\n".join([
        "# Fixed costs: the embedded default under Ray vs the same stages in one process (bench/fixed_costs.py)", "",
        f"{describe_machine()}; {rounds} round(s) of recipe `toy-rounds`"
        f"{' with ' + ' '.join(overrides) if overrides else ''} on each side, {repeats} repeat(s) alternating which "
        f"side goes first, in one run of `python bench/fixed_costs.py run --rounds {rounds} --repeats {repeats}`. Wall "
        "seconds per stage (median over repeats), read off the stage lines as they arrived: a stage lasts until the "
        "next starts, so the job's stages include what Ray adds to them (actor and worker start-up, the shuffles, "
        "the checkpoints) and its last one the final model's export and the summary's plots.", "",
        markdown_table(["stage", "ray (the job)", "in-process", "difference"], rows), "",
        f"**End-to-end ratio ray / in-process: {ratio:.2f}** (median of the repeats; target ≤ {TARGET}: "
        f"{'met' if ratio <= TARGET else 'not met'}). Per repeat, ray / in-process: {per_repeat}.", "",
        "Paired Δ vs the reference per round, ray: " + ", ".join(f"{d:+.3f}" for d in ray_deltas)
        + "; in-process: " + ", ".join(f"{d:+.3f}" for d in loop_deltas) + f" (the same work; {same}).", ""])
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS / "fixed_costs.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(RESULTS / "fixed_costs.md", text.encode())
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure both sides and write bench/results/fixed_costs.{json,md}")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both sides")
    r.add_argument("--repeats", type=int, default=1, help="alternating repeats of both sides (medians reported)")
    i = sub.add_parser("in-process", help="one side: the default's stages without Ray")
    i.add_argument("--run-dir", type=Path, required=True)
    i.add_argument("--rounds", type=int, default=3)
    i.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.rounds, args.set, args.repeats)
    else:
        in_process(args.run_dir, args.rounds, args.set)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
