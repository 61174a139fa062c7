"""One round's training, measured both where it is tested and where it is trained: does it learn what its pairs teach?

    python bench/one_round.py run default beta-2000      # train each variant on the same round-0 pairs
    python bench/one_round.py report                     # bench/results/one_round.md from the committed results
    python bench/one_round.py list                       # the variants

The first embedded default's round 0 (recipe ``toy-one-round``), stage by stage, through the stages' own code: the pairs
come once from the real generator (Ray Data; the recipe's generation section, cached per config fingerprint
under ``bench/work/one_round/``); each variant trains in this process through the product's training engine
(``TrainEngine``: the loop a Ray Train worker runs, same steps and data order) with a few ``--set`` overrides,
and its published policy (the EMA weights) is evaluated at chosen steps on

* the **held-out** prompts, as the job evaluates a round (its ``eval`` section: 48 prompts × 4 seeds, 20 steps), and
* the **validation** prompts (``toy:val``: 24 prompts of the training distribution, 4 seeds, the rollouts'
  10-step sampler — the distribution the pairs come from),

each as a paired Δ against the reference on the same seeds (95 % bootstrap interval over prompts,
pipeline/stats.py). A round that lifts the held-out reward without lifting the validation reward has not
learnt what its pairs rank; a round that lowers the validation reward has left the distribution the next
round rolls out from. docs/rounds.md reads the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from functools import reduce
from pathlib import Path

import numpy as np

from pipeline.config import apply_overrides, build, fingerprint, to_dict
from pipeline.utils.atomic import atomic_write_bytes
from pipeline.utils.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "one_round"
RESULTS = ROOT / "bench" / "results" / "one_round"
REPORT = ROOT / "bench" / "results" / "one_round.md"
VALIDATION, VALIDATION_SAMPLES = "toy:val", 4

#: DSPO at its SD 1.5 β: the shift β(1 − σ(z)) is ≈ 5e-4, so the loss is the winner's own denoising loss
GROUND_TRUTH_SFT = ["train.objective.name=dspo", "train.objective.beta=0.001"]
GROUND_TRUTH_SEEDS = 4  # renders per toy:fit prompt

#: variant → ``--set`` overrides on the embedded default and the optimizer steps at which its policy is evaluated
#: (the run trains to the last of them); ``data: ground-truth`` trains on renders instead of the round's pairs
VARIANTS: dict[str, dict] = {
    "default": {"set": [], "eval_at": [150, 300, 450]},
    "lr2e-4": {"set": ["train.lr=2e-4"], "eval_at": [150]},
    "safeguard": {"set": ["train.objective.safeguard.mu=0.9"], "eval_at": [150]},
    "safeguard-lr2e-4": {"set": ["train.lr=2e-4", "train.objective.safeguard.mu=0.9"], "eval_at": [150]},
    "beta-2000": {"set": ["train.objective.beta=2000"], "eval_at": [150, 300, 450]},
    "beta-500-lr2e-4": {"set": ["train.objective.beta=500", "train.lr=2e-4"], "eval_at": [150]},
    "best-worst": {"set": ["generation.pairing=best-worst"], "eval_at": [150]},
    "best-worst-safeguard-lr1e-4": {"set": ["generation.pairing=best-worst", "train.lr=1e-4",
                                            "train.objective.safeguard.mu=0.9"], "eval_at": [150, 300, 450]},
    "batch-32": {"set": ["train.batch_size=32"], "eval_at": [50, 100, 150]},
    "timestep-linear": {"set": ["train.objective.timestep_weighting=linear"], "eval_at": [150]},
    "samples-8-best-worst": {"set": ["generation.samples_per_prompt=8", "generation.pairing=best-worst"],
                             "eval_at": [150, 300]},
    # the ceiling of one round's budget: fine-tuning on ground truth (renders of the toy:fit prompts with their
    # correct captions; DSPO at β 0.001 is the winner's own denoising loss) instead of the round's pairs
    "ground-truth-sft": {"set": GROUND_TRUTH_SFT + ["train.lr=1e-4"], "eval_at": [150], "data": "ground-truth"},
    "ground-truth-sft-lr1e-3": {"set": GROUND_TRUTH_SFT + ["train.lr=1e-3"], "eval_at": [150], "data": "ground-truth"},
}


def rounds_config(overrides: list[str]):
    from pipeline.recipes import recipe
    from pipeline.rounds import RoundsConfig

    return build(RoundsConfig, apply_overrides(recipe("toy-one-round"), overrides))


# ------------------------------------------------------------------------------------------------ stages
def round0_pairs(cfg):
    """The round's pairs, generated once per generation config (``generate`` refuses a folder of another)."""
    from pipeline.data.generate import generate
    from pipeline.data.schema import read_pairs
    from pipeline.training import PairData

    gen = cfg.generation_config(0, "")
    out = WORK / f"pairs-{gen.fingerprint()[:12]}"
    manifest = generate(gen, out)
    return PairData.from_table(read_pairs(out / "pairs")), manifest


def ground_truth_pairs():
    """Renders of every toy:fit prompt (``GROUND_TRUTH_SEEDS`` seeds each) with their correct captions as winners,
    the same renders shuffled as losers (DSPO at β 0.001 gives the loser no weight)."""
    from pipeline.toyworld.grammar import fit_specs
    from pipeline.toyworld.renderer import render_batch, to_tensor
    from pipeline.training import PairData

    specs = [s for s in fit_specs() for _ in range(GROUND_TRUTH_SEEDS)]
    images = to_tensor(render_batch(specs, list(range(len(specs))), 32))
    losers = images[np.random.default_rng(0).permutation(len(specs))]
    return PairData(images, losers, [s.text for s in specs], None, [f"gt-{i:05d}" for i in range(len(specs))]), {
        "num_pairs": len(specs)}


def evaluate_both(cfg, weights: str) -> dict:
    """Held-out and validation rewards, per prompt and seed, of a policy (a denoiser weights file; "" = the
    reference): held-out by the job's own round evaluation, validation with the rollouts' sampler."""
    from pipeline.backbones import load_backbone
    from pipeline.data.prompts import load_prompts
    from pipeline.evaluation import evaluate
    from pipeline.rounds import _evaluate_here

    heldout, _ = _evaluate_here(cfg, weights)
    backbone = load_backbone(cfg.model, device="cpu", weights=weights)
    val = [r["prompt"] for r in load_prompts(VALIDATION)]
    v, _ = evaluate(backbone, val, samples_per_prompt=VALIDATION_SAMPLES, sampler=cfg.generation.sampler,
                    progress=False)
    return {"heldout": heldout, "validation": v.to_dict()}


def reference_eval(cfg) -> dict:
    """The reference's evaluation, cached per evaluation setting (every variant of one setting shares it)."""
    key = [to_dict(cfg.eval), to_dict(cfg.generation.sampler), cfg.model, VALIDATION, VALIDATION_SAMPLES]
    path = WORK / f"reference-{fingerprint(key)[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())
    ev = evaluate_both(cfg, "")
    WORK.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(ev).encode())
    return ev


def train_and_snapshot(tc, data, eval_at: list[int], log=print) -> tuple[dict[int, dict], dict[int, dict]]:
    """Train (``tc``: a TrainConfig) to the last of ``eval_at`` and keep the published weights — what a run of
    that many steps would ship (tests/test_bench_one_round.py) — and the metrics of the window before each."""
    from pipeline.training.engine import TrainEngine

    engine = TrainEngine(replace(tc, max_steps=max(eval_at), checkpoint_every=reduce(math.gcd, eval_at)))
    snaps, metrics = {}, {}

    def keep(m: dict) -> None:
        if engine.step in eval_at:
            snaps[engine.step] = {k: v.clone() for k, v in engine.policy_weights().items()}
            metrics[engine.step] = m
            log(f"  step {engine.step}: loss {m['loss']:.3f} · implicit acc {m['implicit_acc']:.2f}")

    engine.run(data, on_checkpoint=keep)
    return snaps, metrics


def compare(ev: dict, ref: dict) -> dict:
    """Reward, paired Δ against the reference, gold metric and attributes of one evaluation."""
    from pipeline.stats import paired_delta

    out = {}
    for split in ("heldout", "validation"):
        e, r = ev[split], ref[split]
        out[split] = {"reward": e["reward"], "overall": e.get("overall"), "attributes": e.get("attributes"),
                      "drift": e.get("drift"),
                      "delta_vs_ref": paired_delta(np.asarray(e["rewards"], float), np.asarray(r["rewards"], float))}
    return out


def run(names: list[str]) -> None:
    from safetensors.torch import save

    from pipeline.reporting import fmt_ci
    from pipeline.utils.driver import offline_mode, start_ray
    from pipeline.utils.run_record import guard_run_dir

    offline_mode()
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    start_ray(num_cpus=2)
    for name in names:
        spec = VARIANTS[name]
        cfg = rounds_config(spec["set"])
        guarded = {"rounds": cfg, "eval_at": spec["eval_at"], **({"data": spec["data"]} if "data" in spec else {})}
        guard_run_dir(WORK / name, guarded, job="bench/one_round")  # the training data is part of what it measured
        t0 = time.time()
        log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {name} · {msg}", flush=True)  # noqa: E731
        data, manifest = ground_truth_pairs() if spec.get("data") == "ground-truth" else round0_pairs(cfg)
        ref = reference_eval(cfg)
        log(f"training on {len(data)} pairs, evaluating at steps {spec['eval_at']}")
        snaps, metrics = train_and_snapshot(cfg.train_config(0, "", ""), data, spec["eval_at"], log)
        points = []
        for step in spec["eval_at"]:
            weights = WORK / name / f"policy_step_{step}.safetensors"
            atomic_write_bytes(weights, save(snaps[step]))
            cmp = compare(evaluate_both(cfg, str(weights)), ref)
            points.append({"step": step, "train": metrics[step], **cmp})
            log(f"  step {step}: held-out Δ {fmt_ci(cmp['heldout']['delta_vs_ref'], signed=True)} · validation Δ "
                f"{fmt_ci(cmp['validation']['delta_vs_ref'], signed=True)}")
        result = {"variant": name, "overrides": spec["set"], "data": spec.get("data", "round-0 pairs"), "eval_at": spec["eval_at"], "machine": describe_machine(),
                  "seconds": round(time.time() - t0, 1),
                  "pairs": {k: manifest.get(k) for k in ("num_pairs", "mean_reward_gap", "mean_pair_distance",
                                                         "mean_prompt_reward")},
                  "reference": {s: {"reward": ref[s]["reward"], "overall": ref[s].get("overall")} for s in ref},
                  "points": points}
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(RESULTS / f"{name}.json", json.dumps(result, indent=1).encode())
    report()


# ------------------------------------------------------------------------------------------------ report
def render(results: list[dict]) -> str:
    from pipeline.reporting import fmt_ci, fmt_num, markdown_table

    rows = []
    for res in results:
        for p in res["points"]:
            h, v, t = p["heldout"], p["validation"], p["train"]
            drift = t.get("residual_w", math.nan) - t.get("ref_residual_w", math.nan)
            data = "" if res.get("data", "round-0 pairs") == "round-0 pairs" else f" (on {res['data']})"
            rows.append([res["variant"], (" ".join(res["overrides"]) or "(default)") + data, p["step"],
                         fmt_ci(h["delta_vs_ref"], signed=True), fmt_ci(v["delta_vs_ref"], signed=True),
                         fmt_num((h.get("overall") or {}).get("mean")), fmt_num((v.get("overall") or {}).get("mean")),
                         fmt_num((h.get("attributes") or {}).get("shape", {}).get("mean")),
                         fmt_num((h.get("drift") or {}).get("colour_entropy", {}).get("mean")),
                         fmt_num(t.get("implicit_acc")), fmt_num(drift, signed=True)])
    ref = results[0]["reference"] if results else {}
    machines = sorted({r.get("machine", "not recorded") for r in results})
    head = ["# One round's training, on held-out and on validation prompts (bench/one_round.py)", "",
            "Every variant trains on the same round-0 pairs of the embedded default (or on the pairs its own "
            "generation overrides make) through the product's training engine; its published (EMA) policy is "
            "evaluated at each listed step. Held-out: the job's evaluation (48 prompts × 4 seeds, 20 steps); "
            "validation: toy:val (24 training-distribution prompts × 4 seeds, the rollouts' 10 steps). Δ is paired "
            "against the reference on the same seeds, 95 % bootstrap interval over prompts. Deterministic on one "
            f"machine, not across machines ({'; '.join(machines)}).", "",
            f"Reference: held-out reward {fmt_ci((ref.get('heldout') or {}).get('reward'))}, validation reward "
            f"{fmt_ci((ref.get('validation') or {}).get('reward'))}.", ""]
    table = markdown_table(["variant", "overrides", "step", "held-out Δ", "validation Δ", "held-out all attr.",
                            "validation all attr.", "held-out shape", "held-out colour entropy", "impl. acc",
                            "winner resid. − ref"], rows)
    return "\n".join(head + [table, ""])


def report() -> None:
    results = [json.loads((RESULTS / f"{n}.json").read_text()) for n in VARIANTS if (RESULTS / f"{n}.json").exists()]
    atomic_write_bytes(REPORT, render(results).encode())
    print(REPORT.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate variants")
    r.add_argument("variants", nargs="+")
    sub.add_parser("report", help="render bench/results/one_round.md")
    sub.add_parser("list", help="print the variants")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.variants)
    elif args.cmd == "report":
        report()
    else:
        for name, spec in VARIANTS.items():
            print(f"{name:30s} steps {spec['eval_at']} · {' '.join(spec['set']) or '(default)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
