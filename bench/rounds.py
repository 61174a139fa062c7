"""Why online rounds regress, and what makes them compound: the main job run under each switch, side by side.

    python bench/rounds.py run baseline refresh anchor      # runs jobs/iterative_sipo.py once per variant
    python bench/rounds.py report                           # bench/results/rounds.md from every finished run
    python bench/rounds.py list                             # the variants and their overrides

Every variant is the first embedded default (recipe ``toy-one-round``: SIPO β 20000, lr 5e-5, a fresh optimizer
per round) with a few ``--set`` overrides, run by the product's own job into ``bench/work/rounds/<variant>/`` (so
what is measured is what users run). ``report`` copies each run's ``summary.json`` and pair manifests to
``bench/results/rounds/<variant>.json`` (committed; the report renders from those alone) and writes one table per variant: per round the held-out reward, the
paired Δ against the reference and against the previous round (95 % bootstrap intervals over prompts), the
gold metric (all attributes right), the fresh pairs' statistics (count, reward gap, winner–loser distance,
the rollouts' reward), the last training report (loss, implicit accuracy, mean logit, the winner's residual
against the reference's) and the drift statistics. A variant *compounds* when every round's Δ against the
previous round is ≥ 0 (point estimate) and the last round's Δ against the reference has its interval above
0 and above round 0's point estimate — computed, not judged. docs/rounds.md interprets the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "rounds"
RESULTS = ROOT / "bench" / "results" / "rounds"
REPORT = ROOT / "bench" / "results" / "rounds.md"

#: variant → ``--set`` overrides on the embedded default (``rounds`` is 3 unless a variant says otherwise)
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "refresh": ["reference=refresh"],
    "ema-reference": ["reference.name=ema", "reference.decay=0.5"],
    "carry-optimizer": ["carry_optimizer=true"],
    "anchor": ["train.objective.anchor=20000"],
    "beta-5000": ["train.objective.beta=5000"],
    "beta-2000": ["train.objective.beta=2000"],
    "beta-2000-refresh": ["train.objective.beta=2000", "reference=refresh"],
    "beta-2000-carry-optimizer": ["train.objective.beta=2000", "carry_optimizer=true"],
    "beta-2000-carry-safeguard": ["train.objective.beta=2000", "carry_optimizer=true",
                                  "train.objective.safeguard.mu=0.9"],
    "beta-2000-carry-anchor": ["train.objective.beta=2000", "carry_optimizer=true", "train.objective.anchor=20000"],
    "beta-500-lr2e-4": ["train.objective.beta=500", "train.lr=2e-4"],
    "beta-500-lr2e-4-refresh": ["train.objective.beta=500", "train.lr=2e-4", "reference=refresh"],
    "safeguard": ["train.objective.safeguard.mu=0.9"],
    "margin-0.3": ["generation.min_reward_gap=0.3"],
    "replay-1": ["replay=1"],
    "lr-decay": ["lr_decay=0.6"],
    "select-validation": ["select.name=validation", "generation.prompts=toy:fit"],
    "batch-32": ["train.batch_size=32", "train.max_steps=40", "train.lr=1e-4", "train.checkpoint_every=20"],
    "batch-32-150": ["train.batch_size=32"],
    "batch-32-carry": ["train.batch_size=32", "carry_optimizer=true"],
    # 4× the pairs per step at 4× the lr (the linear scaling rule); the 32-pair runs above kept the default lr
    "batch-32-lr2e-4-carry": ["train.batch_size=32", "train.lr=2e-4", "carry_optimizer=true"],
    "batch-32-beta-2000-carry": ["train.batch_size=32", "train.objective.beta=2000", "carry_optimizer=true"],
    # DSPO at its SD 1.5 β: the shift β(1−σ(z)) is ≈ 5e-4, so the loss is the winner's denoising loss (fine-tuning
    # on each prompt's best rollout: rejection-sampling fine-tuning / expert iteration)
    "winner-sft-carry": ["train.objective.name=dspo", "train.objective.beta=0.001", "generation.pairing=best-worst",
                         "train.lr=1e-4", "carry_optimizer=true"],
    # only noise levels t ≥ 0.2·T (SNR ≤ 1.9 on the toy schedule): no training at the low-noise steps where the
    # loser term teaches sampler noise (β 500's speckle) and the winner term the sampler's artefacts
    "beta-500-lr2e-4-tmin-carry": ["train.objective.beta=500", "train.lr=2e-4", "train.objective.t_min=0.2",
                                   "carry_optimizer=true"],
    # β 500's large first round with the SDPO safeguard: the speckle is the policy denoising worse (winner residual
    # above the reference's), which is what the safeguard's λ stops
    "beta-500-lr2e-4-safeguard-carry": ["train.objective.beta=500", "train.lr=2e-4", "train.objective.safeguard.mu=0.9",
                                        "carry_optimizer=true"],
    "best-worst-safeguard-carry": ["generation.pairing=best-worst", "train.lr=1e-4", "train.objective.safeguard.mu=0.9",
                                   "carry_optimizer=true"],
}


#: variants whose switches act from round 1 on → the variant whose round 0 is theirs, bit for bit (the same
#: round-0 config); ``run --reuse-round0`` copies it from that run instead of computing it again
ROUND0_FROM = {"refresh": "baseline", "ema-reference": "baseline", "lr-decay": "baseline",
               "beta-2000-refresh": "beta-2000", "beta-500-lr2e-4-refresh": "beta-500-lr2e-4"}


def _reuse_round0(name: str) -> bool:
    """Seed the variant's run directory with its base variant's reference evaluation and round 0."""
    import shutil

    if name not in ROUND0_FROM:
        return False
    src, dst = WORK / ROUND0_FROM[name], WORK / name
    if not (src / "round_0" / "_COMPLETE").exists() or (dst / "round_0").exists():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for part in ("reference_eval", "round_0"):
        shutil.copytree(src / part, dst / part)
    return True


def run(names: list[str], rounds: int, reuse_round0: bool = False) -> None:
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        reused = reuse_round0 and _reuse_round0(name)
        overrides = [f"rounds={rounds}", *VARIANTS[name]]
        cmd = [sys.executable, str(ROOT / "jobs" / "iterative_sipo.py"), "--run-dir", str(WORK / name),
               "--recipe", "toy-one-round", "--set", *overrides]
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        path = WORK / name / "bench_record.json"
        earlier = json.loads(path.read_text()).get("seconds", 0) if path.exists() else 0  # a run extended by more rounds
        record = {"variant": name, "overrides": overrides, "seconds": round(earlier + time.time() - t0, 1),
                  "round0_from_baseline": reused, "machine": describe_machine()}
        path.write_text(json.dumps(record, indent=1))


def collect(name: str) -> dict | None:
    """One finished run's summary, pair manifests and record, as committed under bench/results/rounds/."""
    run_dir = WORK / name
    if not (run_dir / "summary.json").exists():
        return None
    rows = json.loads((run_dir / "summary.json").read_text())
    manifests = []
    for k in range(len(rows) - 1):
        path = run_dir / f"round_{k}" / "pairs_manifest.json"
        m = json.loads(path.read_text()) if path.exists() else {}
        manifests.append({key: m.get(key) for key in ("num_pairs", "mean_reward_gap", "mean_pair_distance",
                                                       "mean_prompt_reward")})
    record_path = run_dir / "bench_record.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
    else:  # the run stopped before its last round (killed once its trend was clear): say so, with what it asked for
        asked = json.loads((run_dir / "run_config.json").read_text())["config"]["rounds"]
        record = {"variant": name, "overrides": [f"rounds={asked}", *VARIANTS[name]], "machine": describe_machine(),
                  "note": f"stopped after {len(rows) - 1} of {asked} rounds"}
    for r in rows:  # the training history is long; the report uses the last report only
        history = r.pop("history", None) or []
        r["last_train"] = history[-1] if history else {}
    return {**record, "rows": rows, "pairs": manifests}


def compounds(rows: list[dict]) -> dict:
    rounds = rows[1:]
    if not rounds:
        return {"compounds": False, "why": "no round"}
    every = all((r.get("delta_vs_prev") or {}).get("mean", -1) >= 0 for r in rounds)
    last, first = rounds[-1]["delta_vs_ref"], rounds[0]["delta_vs_ref"]["mean"]
    above = last["ci_low"] > 0 and last["ci_low"] > first
    return {"compounds": bool(every and above and len(rounds) >= 2), "every_round_rises": every,
            "final_above_round0": above}


def _f(v, signed=False) -> str:
    from pipeline.reporting import fmt_num

    return fmt_num(v, signed=signed)


def render(results: list[dict]) -> str:
    from pipeline.reporting import fmt_ci, markdown_table

    head = ["# Online rounds under each switch (bench/rounds.py)", "",
           "Each variant is `python jobs/iterative_sipo.py --recipe toy-one-round --set rounds=N <overrides>` (the "
           "first embedded default: SIPO β 20000, lr 5e-5, a fresh optimizer per round); "
           "48 held-out prompts × 4 seeds shared by every round; intervals are 95 % bootstrap intervals over "
           "prompts (pipeline/stats.py). Deterministic on one machine, not across machines. "
           "Columns: docs/rounds.md. A variant acting from round 1 on may reuse its base variant's round 0 "
           "(identical by construction; noted per variant).", ""]
    out: list[str] = []
    verdicts = []
    for res in results:
        rows, pairs = res["rows"], res["pairs"]
        copied = f" (round 0 copied from {ROUND0_FROM.get(res['variant'], 'baseline')})" if res.get("round0_from_baseline") else ""
        v = compounds(rows)
        verdicts.append([res["variant"], " ".join(res.get("overrides", [])[1:]) or "(default)",
                         fmt_ci(rows[-1]["delta_vs_ref"], signed=True), _f((rows[-1].get("overall") or {}).get("mean")),
                         "yes" if v["compounds"] else "no", f"{res['seconds'] / 60:.1f}" if "seconds" in res else "–"])
        table = []
        for i, r in enumerate(rows):
            p = pairs[i - 1] if i else {}
            t = r.get("last_train") or {}
            winner_drift = (t["residual_w"] - t["ref_residual_w"]) if "residual_w" in t and "ref_residual_w" in t else None
            drift = r.get("drift") or {}
            table.append([
                r["round"], fmt_ci(r["reward"]), "–" if not i else fmt_ci(r["delta_vs_ref"], signed=True),
                "–" if not i else fmt_ci(r.get("delta_vs_prev"), signed=True),
                _f((r.get("overall") or {}).get("mean")),
                _f(p.get("num_pairs")), _f(p.get("mean_reward_gap")), _f(p.get("mean_pair_distance")),
                _f(p.get("mean_prompt_reward")),
                _f(t.get("loss")), _f(t.get("implicit_acc")), _f(t.get("logit_mean")),
                _f(winner_drift, signed=True) if winner_drift is not None else "–",
                _f((drift.get("background_brightness") or {}).get("mean")),
                _f((drift.get("colour_entropy") or {}).get("mean")),
                _f((drift.get("seed_diversity") or {}).get("mean")),
            ])
        minutes = f"{res['seconds'] / 60:.1f} min" if "seconds" in res else "wall time not recorded"
        out += [f"## {res['variant']}", "", f"Overrides: `{' '.join(res.get('overrides', []))}`; "
                f"{minutes}{copied}{'; ' + res['note'] if res.get('note') else ''}; machine: {res.get('machine', 'not recorded')}; compounds: {'yes' if v['compounds'] else 'no'} "
                f"(every round ≥ previous: {v.get('every_round_rises')}, final interval above 0 and round 0: "
                f"{v.get('final_above_round0')}).", "",
                markdown_table(["round", "reward", "Δ vs ref", "Δ vs prev", "all attr.", "pairs", "gap", "w–l dist.",
                                "rollout reward", "loss", "impl. acc", "logit", "winner resid. − ref",
                                "bg bright.", "colour entropy", "diversity"], table), ""]
    summary = markdown_table(["variant", "overrides", "final Δ vs ref", "final all attr.", "compounds", "minutes"],
                             verdicts)
    return "\n".join(head + ["## Summary", "", summary, ""] + out)


def report() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in VARIANTS:
        res = collect(name)
        if res is not None:
            (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    results = [json.loads((RESULTS / f"{n}.json").read_text()) for n in VARIANTS if (RESULTS / f"{n}.json").exists()]
    REPORT.write_text(render(results))
    print(REPORT.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run variants through jobs/iterative_sipo.py")
    r.add_argument("variants", nargs="+")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--reuse-round0", action="store_true",
                   help="variants acting from round 1 on (" + ", ".join(f"{k} ← {v}" for k, v in ROUND0_FROM.items())
                   + ") copy their base variant's round 0")
    sub.add_parser("report", help="render bench/results/rounds.md")
    sub.add_parser("list", help="print the variants")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.variants, args.rounds, args.reuse_round0)
    elif args.cmd == "report":
        report()
    else:
        for name, overrides in VARIANTS.items():
            print(f"{name:20s} {' '.join(overrides) or '(default)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
