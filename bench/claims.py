"""The three papers' claims, tested on the toy world with several seeds → ``docs/results.md`` + plots.

    python bench/claims.py                  # the full run on the shipped toy reference (≈ 45 min, 2 cores)
    python bench/claims.py --quick --model DIR --out DIR     # the CI form: same code, tiny budgets
    python bench/claims.py --render                          # rewrite results.md (+ β/round plots) from results.json

Every arm starts from the same model and trains in-process with the product's training engine
(``pipeline/training/engine.py``: the loop a Ray Train worker runs — AdamW, gradient clipping at 1, weight EMA) on Parquet pairs written by the real generator (Ray Data). Arms are judged
on the held-out prompts with the evaluation seeds every arm shares, so a difference between two arms is
*paired* per (prompt, seed); its 95 % interval is a bootstrap over prompts of the seed-averaged difference.
Training-curve claims use a t interval over seeds. The verdict of every claim is computed from its interval
— ``reproduces`` (excludes 0 in the claimed direction), ``contradicted`` (excludes 0 the other way) or
``inconclusive`` — never written by hand.

(a) Diffusion-SDPO Fig. 1/3: at an aggressive learning rate Diffusion-DPO's winner loss climbs above the
    reference's; the safeguard (output-space λ, the paper's μ = 0.9, and the exact parameter-space λ with
    μ = 0) holds it down, and the reward ends higher.
(b) DDSPO Table 1a: on the same perturbation pairs (winner from c, loser from c⁻, same seed), DDSPO's
    score-space targets beat Diffusion-DPO.
(c) SIPO Fig. 8c: across β, SIPO and DPO-C&M vary less than Diffusion-DPO and do not fall below the
    reference at small β; SIPO Fig. A1: over online rounds (roll out, score, pair, train, repeat),
    SIPO holds or improves while Diffusion-DPO degrades.
(d) Diffusion-SDPO Table 4: the overhead of the safeguard (copied from ``bench/results/objectives.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.backbones import load_backbone
from pipeline.config import build
from pipeline.data.schema import read_pairs
from pipeline.evaluation import evaluate
from pipeline.reporting import fmt_ci, markdown_table
from pipeline.sampling import SamplerConfig
from pipeline.stats import mean_ci, paired_over_seeds, t_band, t_interval, verdict
from pipeline.toyworld import heldout_specs
from pipeline.toyworld.reference import REFERENCE_DIR
from pipeline.training import PairData, TrainConfig, train_in_process
from pipeline.utils.atomic import atomic_write_bytes
from pipeline.utils.driver import ElapsedLog, start_ray
from pipeline.utils.plots import plot_bands

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Budget:
    """How much of everything; ``FULL`` is the committed run, ``QUICK`` the CI form."""

    prompts: int = 96  # toy:train prompts per rollout
    samples_per_prompt: int = 4
    rollout_steps: int = 10
    min_reward_gap: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 80  # optimizer steps per arm
    batch_size: int = 8
    lr: float = 5e-5  # the embedded default's
    ema_decay: float = 0.98  # arms are judged on their EMA weights, as the job exports them
    aggressive_lr: float = 1e-4  # claim (a)
    aggressive_steps: int = 40
    betas: tuple[float, ...] = (1000.0, 5000.0, 20000.0)
    beta_seeds: tuple[int, ...] = (0, 1)
    rounds: int = 3
    round_prompts: int = 48
    round_steps: int = 48
    eval_prompts: int = 48
    eval_samples: int = 2
    eval_steps: int = 20
    gen_batch: int = 64
    gen_actors: int = 2  # two single-threaded model actors are fastest on 2 cores (bench/results/generation.md)


FULL = Budget()
QUICK = Budget(prompts=6, samples_per_prompt=2, rollout_steps=2, min_reward_gap=0.0, seeds=(0, 1), steps=2, batch_size=2,
               aggressive_steps=3, betas=(1000.0, 20000.0), beta_seeds=(0,), rounds=2, round_prompts=6, round_steps=2,
               eval_prompts=3, eval_samples=1, eval_steps=2, gen_batch=8, gen_actors=1)


# ------------------------------------------------------------------------------------------------ data
def generate_pairs(model: str, out: Path, b: Budget, *, strategy: str = "onpolicy", weights: str = "",
                   round_: int = 0, prompts: int | None = None) -> dict:
    """Pairs from the real generator, in memory as the engine takes them. On-policy: every pair whose reward gap exceeds the budget's."""
    from pipeline.data.generate import GenerationConfig, generate

    cfg = GenerationConfig(model=model, weights=weights, strategy=strategy, prompt_limit=prompts or b.prompts,
                           samples_per_prompt=b.samples_per_prompt, pairing="all", min_reward_gap=b.min_reward_gap,
                           batch_size=b.gen_batch, num_actors=b.gen_actors, write_png=False, round=round_,
                           policy_version=f"round_{round_ - 1}" if weights else "reference",
                           sampler={"num_steps": b.rollout_steps, "guidance_scale": 3.0, "eta": 1.0,
                                    "batch_size": b.gen_batch})
    generate(cfg, out)
    table = read_pairs(out / "pairs")
    if table.num_rows == 0:
        raise RuntimeError(f"{out}: the generator wrote no pairs (every reward gap <= {b.min_reward_gap})")
    return PairData.from_table(table)


# ------------------------------------------------------------------------------------------------ arms
def train_arm(model: str, data: PairData, arm: dict, *, steps: int, batch_size: int, lr: float, seed: int,
              ema_decay: float = 0.0, init: dict | None = None):
    """One arm through the product's training engine, in this process (``train_in_process``: the loop a Ray
    Train worker runs, without Ray); ``arm`` is the ``train.objective`` section that makes the arm (name, β,
    safeguard). Returns the policy (its EMA weights when ``ema_decay``) and its per-step metrics."""
    cfg = build(TrainConfig, dict(model=model, objective=arm, lr=lr, max_steps=steps, batch_size=batch_size,
                                  seed=seed, ema_decay=ema_decay, log_every=1, checkpoint_every=steps))
    engine = train_in_process(cfg, data, init=init)
    return engine.apply_policy_weights(), engine.history


def held_out(backbone, b: Budget) -> np.ndarray:
    """(prompts, samples) toy rewards on the held-out prompts with the shared evaluation seeds."""
    result, _ = evaluate(backbone, list(heldout_specs())[:b.eval_prompts], samples_per_prompt=b.eval_samples,
                         sampler=SamplerConfig(num_steps=b.eval_steps, guidance_scale=3.0, eta=1.0, batch_size=96),
                         progress=False)
    return result.rewards


# ------------------------------------------------------------------------------------------------ statistics
# Written once in pipeline/stats.py (intervals, verdicts) and pipeline/reporting.py (formatting): an arm's
# difference from another arm (or a fixed baseline) is ``paired_over_seeds`` (seed-averaged per prompt,
# bootstrap over prompts, ``per_seed`` the spread between seeds), a training-curve number ``t_interval`` over
# seeds, and a verdict is read off the interval by ``verdict``.


def fmt(m: dict, sign: bool = True) -> str:
    return fmt_ci(m, signed=sign)


def winner_ratio(history: list[dict]) -> np.ndarray:
    """Policy winner loss over the reference's on the same noised winners, per step."""
    return np.array([h["residual_w"] / max(h["ref_residual_w"], 1e-12) for h in history])


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, len(x)))
    return np.convolve(x, np.ones(k) / k, mode="valid")


# ------------------------------------------------------------------------------------------------ claims
def claim_a(model: str, data: dict, ref: np.ndarray, b: Budget, figs: Path, log) -> dict:
    arms = {"Diffusion-DPO": {"name": "diffusion-dpo"},
            "DPO + SDPO (output λ, μ=0.9)": {"name": "diffusion-dpo", "safeguard": {"mu": 0.9}},
            "DPO + SDPO (parameter λ, μ=0)": {"name": "diffusion-dpo", "safeguard": {"mu": 0.0, "space": "parameter"}}}
    curves, rewards, final_ratio, lam = {}, {}, {}, {}
    for name, obj in arms.items():
        for seed in b.seeds:
            policy, hist = train_arm(model, data, obj, steps=b.aggressive_steps, batch_size=b.batch_size,
                                     lr=b.aggressive_lr, seed=seed, ema_decay=b.ema_decay)
            curves.setdefault(name, []).append(smooth(winner_ratio(hist), 10))
            final_ratio.setdefault(name, []).append(float(winner_ratio(hist)[-max(1, len(hist) // 4):].mean()))
            lam.setdefault(name, []).append(float(np.mean([h["lambda_mean"] for h in hist])))
            rewards.setdefault(name, []).append(held_out(policy, b))
            log(f"(a) {name} seed {seed}: winner/ref loss {final_ratio[name][-1]:.3f}, "
                f"reward {rewards[name][-1].mean():.3f}")
    series = {}
    for name, cs in curves.items():
        c = np.stack(cs)
        series[name] = (np.arange(c.shape[1]) + 1, *t_band(c))
    plot_bands(series, figs / "a_winner_loss.png", xlabel="step (10-step moving mean)",
               ylabel="winner loss / reference's", hline=1.0,
               title=f"(a) winner loss at lr {b.aggressive_lr:g}: mean ± 95% CI over {len(b.seeds)} seeds")
    dpo = "Diffusion-DPO"
    rows = []
    for name in arms:
        row = {"arm": name, "winner_ratio": t_interval(final_ratio[name]), "lambda_mean": float(np.mean(lam[name])),
               "reward_vs_ref": paired_over_seeds(rewards[name], ref)}
        if name != dpo:
            row["winner_ratio_vs_dpo"] = t_interval([x - y for x, y in zip(final_ratio[name], final_ratio[dpo])])
            row["reward_vs_dpo"] = paired_over_seeds(rewards[name], rewards[dpo])
            row["verdict_winner"] = verdict(row["winner_ratio_vs_dpo"], -1)
            row["verdict_reward"] = verdict(row["reward_vs_dpo"], +1)
        rows.append(row)
    return {"rows": rows, "dpo_winner_climbs": verdict(
        t_interval([x - 1.0 for x in final_ratio[dpo]]), +1)}


def claim_b(model: str, data: dict, ref: np.ndarray, b: Budget, log) -> dict:
    # the same β for both arms (Diffusion-DPO's 5000), so the targets are the only difference
    arms = {"Diffusion-DPO": {"name": "diffusion-dpo"}, "DDSPO": {"name": "ddspo", "beta": 5000.0}}
    rewards = {}
    for name, obj in arms.items():
        for seed in b.seeds:
            policy, _ = train_arm(model, data, obj, steps=b.steps, batch_size=b.batch_size, lr=b.lr, seed=seed,
                                  ema_decay=b.ema_decay)
            rewards.setdefault(name, []).append(held_out(policy, b))
            log(f"(b) {name} seed {seed}: reward {rewards[name][-1].mean():.3f}")
    diff = paired_over_seeds(rewards["DDSPO"], rewards["Diffusion-DPO"])
    return {"rows": [{"arm": n, "reward_vs_ref": paired_over_seeds(r, ref)} for n, r in rewards.items()],
            "ddspo_vs_dpo": diff, "verdict": verdict(diff, +1), "pairs": len(data)}


BETA_ARMS = ("diffusion-dpo", "dpo-cm", "sipo")
PRETTY = {"diffusion-dpo": "Diffusion-DPO", "dpo-cm": "DPO-C&M", "sipo": "SIPO"}


def plot_beta(by_beta: dict[str, dict[str, dict]], path: Path) -> None:
    """Held-out reward gain against β per objective (from the stored intervals, so ``--render`` redraws it)."""
    series = {}
    for n, d in by_beta.items():
        xs = sorted(d, key=float)
        series[PRETTY.get(n, n)] = ([float(x) for x in xs], *([d[x][k] for x in xs] for k in ("mean", "ci_low", "ci_high")))
    plot_bands(series, path, xlabel="β (this library's convention)", ylabel="held-out reward − reference", log_x=True,
               markers=True, hline=0.0, title="(c) reward gain across β (paired 95% CI over prompts)")


def plot_rounds(by_round: dict[str, list[dict]], path: Path) -> None:
    """Held-out reward gain per online round per objective (from the stored intervals)."""
    plot_bands({n: (list(range(1, len(v) + 1)), *([x[k] for x in v] for k in ("mean", "ci_low", "ci_high")))
                for n, v in by_round.items()}, path, xlabel="online round", ylabel="held-out reward − reference",
               markers=True, hline=0.0, title="(c) online rounds (paired 95% CI over prompts)")


def claim_c_beta(model: str, data: dict, ref: np.ndarray, b: Budget, log) -> dict:
    res: dict[str, dict[float, dict]] = {}
    raw: dict[str, dict[float, list]] = {}
    for name in BETA_ARMS:
        for beta in b.betas:
            for seed in b.beta_seeds:
                policy, _ = train_arm(model, data, {"name": name, "beta": beta}, steps=b.steps, batch_size=b.batch_size,
                                      lr=b.lr, seed=seed, ema_decay=b.ema_decay)
                raw.setdefault(name, {}).setdefault(beta, []).append(held_out(policy, b))
                log(f"(c) {name} β={beta:g} seed {seed}: reward {raw[name][beta][-1].mean():.3f}")
            res.setdefault(name, {})[beta] = paired_over_seeds(raw[name][beta], ref)
    spread = {n: max(res[n][x]["mean"] for x in b.betas) - min(res[n][x]["mean"] for x in b.betas) for n in BETA_ARMS}
    small = min(b.betas)
    checks = {f"{n} vs Diffusion-DPO at β={small:g}": paired_over_seeds(raw[n][small], raw["diffusion-dpo"][small])
              for n in ("sipo", "dpo-cm")}
    return {"by_beta": {n: {f"{x:g}": v for x, v in d.items()} for n, d in res.items()}, "spread": spread,
            "small_beta": {k: {**v, "verdict": verdict(v, +1)} for k, v in checks.items()}}


def claim_c_rounds(model: str, work: Path, ref: np.ndarray, b: Budget, log, *, onpolicy=None) -> dict:
    """``onpolicy``: the reference's on-policy pairs of claim (a); round 0 trains on them when the budget rolls
    out as many prompts per round (the same generator config, so the same pairs) instead of generating them again."""
    arms = {"Diffusion-DPO": {"name": "diffusion-dpo"},
            "DPO-C&M": {"name": "dpo-cm", "beta": 5000.0},
            "SIPO": {"name": "sipo", "beta": 5000.0}}
    res: dict[str, list[dict]] = {}
    rewards: dict[str, list[np.ndarray]] = {}
    # the reference's pairs: shared by every arm's round 0
    first = onpolicy if onpolicy is not None and b.round_prompts == b.prompts else \
        generate_pairs(model, work / "rounds_0", b, prompts=b.round_prompts)
    for name, obj in arms.items():
        state, weights = None, ""
        for k in range(b.rounds):
            data = first if k == 0 else generate_pairs(model, work / f"rounds_{name}_{k}", b, weights=weights,
                                                       round_=k, prompts=b.round_prompts)
            policy, _ = train_arm(model, data, obj, steps=b.round_steps, batch_size=b.batch_size, lr=b.lr,
                                  seed=k, ema_decay=b.ema_decay, init=state)
            state = {n: t.detach().clone() for n, t in policy.denoiser.state_dict().items()}
            weights = str(work / f"policy_{name}_{k}.safetensors")
            save_file(state, weights)
            r = held_out(policy, b)
            rewards.setdefault(name, []).append(r)
            res.setdefault(name, []).append(paired_over_seeds([r], ref))
            log(f"(c) rounds {name} round {k}: {len(data)} pairs, reward {r.mean():.3f}")
    last = paired_over_seeds([rewards["SIPO"][-1]], [rewards["Diffusion-DPO"][-1]])
    return {"by_round": res, "sipo_vs_dpo_last": {**last, "verdict": verdict(last, +1)}}


# ------------------------------------------------------------------------------------------------ report
def shifted(m: dict, by: float) -> dict:
    return {**m, "mean": m["mean"] + by, "ci_low": m["ci_low"] + by, "ci_high": m["ci_high"] + by,
            "per_seed": [x + by for x in m["per_seed"]]}


def pretty(claim: str) -> str:
    """'sipo vs …' → 'SIPO vs …': results.json keeps the objectives' preset names, the report their paper names."""
    arm, _, rest = claim.partition(" ")
    return f"{PRETTY.get(arm, arm)} {rest}"


def summary(r: dict, b: Budget) -> list[tuple[str, str, dict, int]]:
    """(claim, where in the papers, the measured interval, the claimed sign) for every tested claim; the verdict
    is computed from the interval when the report is written, so a re-render can never disagree with the data."""
    small = f"{min(b.betas):g}"
    rows = [("Diffusion-DPO's winner loss ends above the reference's (ratio − 1)", "SDPO Fig. 1/3",
             shifted(r["a"]["rows"][0]["winner_ratio"], -1.0), +1)]
    for row in r["a"]["rows"][1:]:
        rows += [(f"{row['arm']} keeps the winner loss at or below the reference's (ratio − 1)", "SDPO Fig. 3",
                  shifted(row["winner_ratio"], -1.0), -1),
                 (f"{row['arm']} keeps the winner loss below Diffusion-DPO's (ratio difference)", "SDPO Fig. 3",
                  row["winner_ratio_vs_dpo"], -1),
                 (f"{row['arm']} ends with a higher reward than Diffusion-DPO", "SDPO Table 1", row["reward_vs_dpo"], +1)]
    rows.append(("DDSPO beats Diffusion-DPO on the same perturbation pairs (reward)", "DDSPO Table 1a",
                 r["b"]["ddspo_vs_dpo"], +1))
    for name, m in r["c_beta"]["small_beta"].items():
        rows.append((pretty(name).replace(" at β", " (reward) at β"), "SIPO Fig. 8c", m, +1))
    rows.append((f"SIPO at β = {small} is not below the reference (reward − reference; above it counts as reproduced)",
                 "SIPO Fig. 8c", r["c_beta"]["by_beta"]["sipo"][small], +1))
    rows.append((f"after {b.rounds} online rounds SIPO beats Diffusion-DPO (reward)", "SIPO Fig. A1",
                 r["c_rounds"]["sipo_vs_dpo_last"], +1))
    return rows


def report(r: dict, b: Budget, argv: list[str]) -> str:
    L = ["# The papers' claims on the toy world", "",
         f"Produced by `{' '.join(['python bench/claims.py', *argv])}` in {r['minutes']:.0f} min "
         f"(2-core CPU, torch {r.get('torch', torch.__version__)}). Model: the shipped toy reference. "
         f"Held-out reward: {b.eval_prompts} held-out prompts × {b.eval_samples} shared seeds, {b.eval_steps} "
         f"sampling steps; the reference scores {fmt(r['reference'], sign=False)}.", "",
         "Differences between arms are paired per (prompt, seed); [a, b] is a 95 % bootstrap interval over prompts of "
         "the seed-averaged difference (per-seed means in brackets after it). Training-curve numbers use a t interval "
         "over seeds. Rewards are those of each arm's EMA weights (decay "
         f"{b.ema_decay:g}, as the job exports them); training curves are the live weights'. Verdicts are computed from the intervals: *reproduces* / *contradicted* when the interval "
         "excludes 0, else *inconclusive*.", "",
         f"Budget: {json.dumps(asdict(b))}", "",
         "## Summary", "",
         markdown_table(["claim", "paper", "measured [95 % CI]", "verdict"],
                        [[claim, where, f"{fmt(m)} {_seeds(m)}", f"**{verdict(m, sign)}**"]
                         for claim, where, m, sign in summary(r, b)])]
    spread = ", ".join(f"{PRETTY.get(n, n)} {v:.3f}" for n, v in r["c_beta"]["spread"].items())
    L += ["", "Not given a verdict (a point estimate, no interval): SIPO Fig. 8c also claims SIPO and DPO-C&M are less "
          f"sensitive to β than Diffusion-DPO; the spread of the mean reward across β here is {spread}.", ""]
    a = r["a"]
    L += ["## (a) Diffusion-SDPO Fig. 1/3 — the winner's loss at an aggressive learning rate", "",
          f"lr {b.aggressive_lr:g}, {b.aggressive_steps} steps × {b.batch_size} pairs, β = 5000, seeds {list(b.seeds)}, "
          f"{r['pairs_onpolicy']} on-policy pairs of the reference ({b.prompts} prompts × {b.samples_per_prompt}, "
          f"all pairs with a reward gap > {b.min_reward_gap:g}).", "",
          "![winner loss](results/a_winner_loss.png)", "",
          markdown_table(["arm", "winner loss / reference's (last quarter)", "mean λ", "reward − reference",
                          "vs Diffusion-DPO: winner ratio", "vs Diffusion-DPO: reward"],
                         [[row["arm"], fmt(row["winner_ratio"], sign=False), f"{row['lambda_mean']:.3f}",
                           f"{fmt(row['reward_vs_ref'])} {_seeds(row['reward_vs_ref'])}",
                           *(["–", "–"] if "reward_vs_dpo" not in row else
                             [f"{fmt(row['winner_ratio_vs_dpo'])} → **{row['verdict_winner']}**",
                              f"{fmt(row['reward_vs_dpo'])} → **{row['verdict_reward']}**"])] for row in a["rows"]])]
    L += ["", f"Diffusion-DPO's winner loss climbs above the reference's: **{a['dpo_winner_climbs']}**.", "",
          "The parameter-space safeguard's λ makes the winner's loss non-increasing only to first order and for a plain "
          "gradient step; under AdamW's per-parameter scaling and many steps that guarantee does not carry over. "
          "The output-space λ acts on the loss itself and does not depend on the "
          "optimiser.", ""]
    bb = r["b"]
    L += ["## (b) DDSPO Table 1a — DDSPO vs Diffusion-DPO on the same perturbation pairs", "",
          f"{bb['pairs']} paired pairs (winner from c, loser from c⁻ by rand-removal, same seed), lr {b.lr:g}, "
          f"{b.steps} steps × {b.batch_size}, β = 5000, seeds {list(b.seeds)}.", "",
          markdown_table(["arm", "reward − reference"],
                         [[row["arm"], f"{fmt(row['reward_vs_ref'])} {_seeds(row['reward_vs_ref'])}"] for row in bb["rows"]])]
    L += ["", f"DDSPO − Diffusion-DPO: {fmt(bb['ddspo_vs_dpo'])} → **{bb['verdict']}**.", ""]
    c = r["c_beta"]
    L += ["## (c) SIPO Fig. 8c — across β", "",
          f"Same on-policy pairs as (a), lr {b.lr:g}, {b.steps} steps × {b.batch_size}, seeds {list(b.beta_seeds)}.", "",
          "![beta](results/c_beta.png)", "",
          markdown_table(["objective", *(f"β = {x:g}" for x in b.betas), "spread of means"],
                         [[PRETTY[n], *(fmt(c["by_beta"][n][f"{x:g}"]) for x in b.betas), f"{c['spread'][n]:.3f}"]
                          for n in BETA_ARMS])]
    L += [""] + [f"- {pretty(k)}: {fmt(v)} → **{v['verdict']}**" for k, v in c["small_beta"].items()]
    L += [""]
    cr = r["c_rounds"]
    L += ["## (c) SIPO Fig. A1 — across online rounds", "",
          f"Each round rolls out {b.round_prompts} prompts × {b.samples_per_prompt} with the current policy, pairs "
          f"them, trains {b.round_steps} steps (lr {b.lr:g}, β = 5000 for every arm, reference fixed) and evaluates.", "",
          "![rounds](results/c_rounds.png)", "",
          markdown_table(["objective", *(f"round {k + 1}" for k in range(b.rounds))],
                         [[n, *(fmt(v) for v in vals)] for n, vals in cr["by_round"].items()])]
    L += ["", f"SIPO − Diffusion-DPO after the last round: {fmt(cr['sipo_vs_dpo_last'])} → "
          f"**{cr['sipo_vs_dpo_last']['verdict']}** (one seed per round; rounds are sequential).", ""]
    L += ["## (d) Diffusion-SDPO Table 4 — overhead", "", "From `bench/results/objectives.md` (`python bench/objectives.py`):", ""]
    L += [line for line in r["overhead"].splitlines() if line.startswith("|")]
    return "\n".join(L) + "\n"


def _seeds(m: dict) -> str:
    return "(" + ", ".join(f"{x:+.3f}" for x in m["per_seed"]) + ")"


def render(out: Path) -> int:
    """Writes ``results.md`` and the plots drawn from stored intervals (β, rounds) from ``results.json``: the run
    ends here, and a report change needs no new run. The winner-loss curves are not stored, so ``claim_a`` draws
    that plot during the run."""
    source = out / "results.json"
    if not source.exists():
        raise SystemExit(f"--render: {source} does not exist (run bench/claims.py with --out {out} first)")
    r = json.loads(source.read_text())
    if "budget" not in r:
        raise SystemExit(f"--render: {source} has no 'budget' (written by an older bench/claims.py; run it again)")
    b = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["budget"].items()})
    atomic_write_bytes(out / "results.md", report(r, b, r["argv"]).encode())
    (out / "results").mkdir(exist_ok=True)
    plot_beta(r["c_beta"]["by_beta"], out / "results" / "c_beta.png")
    plot_rounds(r["c_rounds"]["by_round"], out / "results" / "c_rounds.png")
    print(f"wrote {out / 'results.md'}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets (the CI form)")
    p.add_argument("--model", default=str(REFERENCE_DIR), help="model folder (default: the shipped toy reference)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="writes results.md, results/*.png, results.json here")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for pairs (default: a temp dir)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite results.md from the results.json already in --out (no training)")
    args = p.parse_args(argv)
    if args.render:
        return render(args.out)
    b = QUICK if args.quick else FULL
    import ray
    import tempfile

    torch.set_num_threads(2)
    log = ElapsedLog()
    figs = args.out / "results"
    figs.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    start_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        onpolicy = generate_pairs(args.model, work / "onpolicy", b)
        perturbed = generate_pairs(args.model, work / "ddspo", b, strategy="ddspo-paired")
        log(f"pairs: {len(onpolicy)} on-policy, {len(perturbed)} perturbation")
        ref_rewards = held_out(load_backbone(args.model), b)
        r = {"reference": mean_ci(ref_rewards), "pairs_onpolicy": len(onpolicy), "torch": torch.__version__}
        r["a"] = claim_a(args.model, onpolicy, ref_rewards, b, figs, log)
        r["b"] = claim_b(args.model, perturbed, ref_rewards, b, log)
        r["c_beta"] = claim_c_beta(args.model, onpolicy, ref_rewards, b, log)
        r["c_rounds"] = claim_c_rounds(args.model, work, ref_rewards, b, log, onpolicy=onpolicy)
    ray.shutdown()
    overhead = ROOT / "bench" / "results" / "objectives.md"
    r["overhead"] = overhead.read_text() if overhead.exists() else ""
    r["minutes"] = log.seconds / 60
    r["budget"], r["argv"] = asdict(b), list(argv)
    atomic_write_bytes(args.out / "results.json", json.dumps(r, indent=1, default=float).encode())
    render(args.out)
    log(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
