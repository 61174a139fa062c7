"""The three papers' claims, re-measured on toy world v2 through the product's own code → ``docs/results.md``.

    python bench/claims.py run sweep        # part 1: each method's β by an equal-budget sweep, chosen on validation prompts
    python bench/claims.py run offline      # part 2: the methods at their own best β, 5 seeds; + the SDPO combinations
    python bench/claims.py run sdpo         # part 3: SDPO Fig. 1/3 (aggressive lr); DDSPO on perturbation pairs
    python bench/claims.py run online-0 online-1 online-2   # parts 4–6: SIPO Fig. A1, 5 online rounds, one seed each
    python bench/claims.py run video        # part 7: SIPO Table 1 on the toy video world (its own sweep and seeds)
    python bench/claims.py render           # docs/results.md and its plots from every finished part
    python bench/claims.py run all --quick --out DIR --work DIR   # the CI form: every part, tiny budgets

Each part fits well under 90 minutes on 2 cores and writes its own ``<out>/results/parts/<part>.json``
(atomically, with its budget, machine and minutes), so a long re-measurement is a series of parts that each
commit; ``render`` builds one report from whichever parts exist and names the ones still missing. Within a
part every arm (one method, β and seed) is cached in ``--work`` under a fingerprint of what it trains and how
it is judged, so an interrupted part resumes arm by arm; the work folder records the budget (the project's
resume guard, ``pipeline/utils/run_record.py``) and refuses a rerun with another.

What runs is what users run: pairs from the real generator (Ray Data, ``pipeline/data/generate.py``), every
offline arm trained by the production engine in-process (``pipeline/training/engine.py: train_in_process``,
the loop a Ray Train worker runs: AdamW, clipping, weight EMA), the online claim by the product's own round
loop (``pipeline/rounds.py: run_rounds``, Ray Train and all), samples scored by ``pipeline/evaluation.py``.

Protocol. Rollouts use the training prompts without the validation split (``toy:fit``). β is chosen per
method on the validation split (``toy:val``) with sweep seeds of its own — never on the held-out test
prompts the claims are judged on (``toy:heldout``), and never with the claims' seeds. A difference between
two arms is paired per (prompt, sample seed); its 95 % interval is a bootstrap over prompts of the
difference averaged over training seeds (``pipeline/stats.py``); training-curve numbers use a t interval
over seeds. Each verdict is read off its interval (``reproduces`` / ``contradicted`` when it excludes 0, else
``inconclusive``); the report gives each interval's half-width against the issue's target of 0.03.

The video part runs the same protocol on the toy video world (``toy_video:fit`` / ``val`` / ``heldout``, the
world's shipped reference, its verifiable reward), with a budget of its own (``VIDEO``) and its own work folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.utils.driver import ElapsedLog, offline_mode, start_ray

offline_mode()  # before the model libraries are imported: this process never asks the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.backbones import load_backbone
from pipeline.config import build, fingerprint, merge
from pipeline.data.prompts import load_prompts
from pipeline.data.schema import read_pairs
from pipeline.evaluation import evaluate
from pipeline.reporting import fmt_ci, fmt_num, markdown_table
from pipeline.sampling import SamplerConfig
from pipeline.stats import describe, paired_over_seeds, t_band, t_interval, verdict
from pipeline.toyworld.reference import REFERENCE_DIR
from pipeline.training import PairData, TrainConfig, train_in_process
from pipeline.utils.atomic import atomic_directory, atomic_write_bytes, is_complete
from pipeline.utils.machine import describe_machine
from pipeline.utils.plots import plot_bands
from pipeline.utils.run_record import guard_run_dir

ROOT = Path(__file__).resolve().parents[1]
DPO_FAMILY = (500.0, 2000.0, 5000.0, 20000.0)  # β in this library's convention (docs/objectives.md)
TARGET_HALF_WIDTH = 0.03


@dataclass(frozen=True)
class Budget:
    """How much of everything; ``FULL`` is the committed run, ``QUICK`` the CI form (same code, tiny sizes)."""

    fit_prompts: int = 0  # toy:fit prompts rolled out for the offline pairs (0 = all 144)
    samples_per_prompt: int = 4
    rollout_steps: int = 10
    min_reward_gap: float = 0.1
    steps: int = 100  # optimizer steps per arm: the same for every method (an equal budget)
    batch_size: int = 8
    lr: float = 5e-5
    ema_decay: float = 0.98  # arms are judged on their EMA weights, as the job exports them
    #: each method's β grid: four points, the same for the Diffusion-DPO family, so that Fig. 8c compares like with like
    betas: dict = field(default_factory=lambda: {
        "diffusion-dpo": DPO_FAMILY, "dpo-cm": DPO_FAMILY, "sipo": DPO_FAMILY, "dmpo": DPO_FAMILY,
        "dspo": (0.001, 0.01, 0.1, 1.0),  # the SD 1.5 recipe's 0.001 and up: β scales z and the winner's shift
        "ddspo": (2000.0, 5000.0, 16000.0, 50000.0)})
    sweep_seeds: tuple[int, ...] = (100, 101)
    val_prompts: int = 0  # toy:val (0 = all 24)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    eval_prompts: int = 0  # toy:heldout (0 = all 48)
    eval_samples: int = 2
    eval_steps: int = 20
    aggressive_lr: float = 1e-4  # SDPO Fig. 1/3
    aggressive_steps: int = 40
    online_rounds: int = 5
    online_seeds: tuple[int, ...] = (0, 1, 2)
    online_prompts: int = 96  # toy:fit prompts rolled out per round
    online_steps: int = 100
    online_eval_samples: int = 4
    gen_batch: int = 64
    gen_actors: int = 2  # two single-threaded model actors are fastest on 2 cores (bench/results/generation.md)


FULL = Budget()
QUICK = Budget(fit_prompts=6, samples_per_prompt=2, rollout_steps=2, min_reward_gap=0.0, steps=2, batch_size=2,
               betas={"diffusion-dpo": (1000.0, 20000.0), "dpo-cm": (1000.0, 20000.0), "sipo": (1000.0, 20000.0),
                      "dmpo": (1000.0, 20000.0), "dspo": (0.001, 0.1), "ddspo": (5000.0, 16000.0)},
               sweep_seeds=(100,), val_prompts=3, seeds=(0,), eval_prompts=3, eval_samples=1, eval_steps=2,
               aggressive_steps=3, online_rounds=1, online_seeds=(0,), online_prompts=4, online_steps=2,
               online_eval_samples=1, gen_batch=8, gen_actors=1)

#: the video claim (SIPO Table 1: DPO-C&M and SIPO against Diffusion-DPO on VBench), on the toy video world; a
#: Budget of its own — its sizes fit a video reference's cost (bench/results/toy_video_reference). lr 2e-5: in a
#: pilot (SIPO only) on the video reference's pairs, lr 2e-4 and above lowered the reward (docs/rounds.md, "Video")
VIDEO_WORLD = "toy_video"
VIDEO_METHODS = ("diffusion-dpo", "dpo-cm", "sipo")
VIDEO = Budget(fit_prompts=64, samples_per_prompt=4, rollout_steps=8, min_reward_gap=0.1, steps=60, batch_size=4,
               lr=2e-5, betas={m: (100.0, 500.0, 2000.0) for m in VIDEO_METHODS}, sweep_seeds=(100,), val_prompts=0,
               seeds=(0, 1, 2, 3, 4), eval_prompts=0, eval_samples=2, eval_steps=8, gen_batch=32, gen_actors=1)
VIDEO_QUICK = Budget(fit_prompts=4, samples_per_prompt=2, rollout_steps=2, min_reward_gap=0.0, steps=2, batch_size=2,
                     betas={m: (500.0, 5000.0) for m in VIDEO_METHODS}, sweep_seeds=(100,), val_prompts=3, seeds=(0,),
                     eval_prompts=3, eval_samples=1, eval_steps=2, gen_batch=8, gen_actors=1)

ONLINE_ARMS = ("diffusion-dpo", "sipo")
PRETTY = {"diffusion-dpo": "Diffusion-DPO", "dpo-cm": "DPO-C&M", "sipo": "SIPO", "dspo": "DSPO", "dmpo": "DMPO",
          "ddspo": "DDSPO"}
ONPOLICY = ("diffusion-dpo", "dpo-cm", "sipo", "dspo", "dmpo")  # trained on the reference's on-policy pairs
PERTURB = ("diffusion-dpo", "ddspo")  # trained on perturbation pairs (winner from c, loser from c⁻, same seed)
SAFEGUARD = {"mu": 0.9}  # SDPO's output-space safeguard at the paper's slack


def parts(b: Budget) -> tuple[str, ...]:
    return ("sweep", "offline", "sdpo", *(f"online-{s}" for s in b.online_seeds), "video")


def video_budget(b: Budget) -> Budget:
    """The video part's budget that goes with the image parts' ``b`` (the CI form's goes with ``QUICK``)."""
    return VIDEO_QUICK if b == QUICK else VIDEO


def part_budget(part: str, b: Budget) -> Budget:
    return video_budget(b) if part == "video" else b


# ------------------------------------------------------------------------------------------------ the bench
class Bench:
    """One part's context: the model, the budget, a work folder (data, arm cache), the log and the world whose
    prompt splits (``<world>:fit`` / ``val`` / ``heldout``) and reward it uses (``pipeline/toyworld/worlds.py``)."""

    def __init__(self, model: str, work: Path, b: Budget, log, world: str = "toy"):
        self.model, self.work, self.b, self.log, self.world = model, work, b, log, world
        self._data: dict[str, PairData] = {}

    # ---- data
    def pairs(self, kind: str) -> PairData:
        """The reference's on-policy pairs (``onpolicy``) or perturbation pairs (``perturb``) of the world's ``fit``
        prompts; the generator writes each once into the work folder and returns it untouched on a rerun."""
        if kind not in self._data:
            from pipeline.data.generate import GenerationConfig, generate
            from pipeline.toyworld.worlds import get_world

            b = self.b
            cfg = GenerationConfig(model=self.model, prompts=f"{self.world}:fit", prompt_limit=b.fit_prompts,
                                   reward={"name": get_world(self.world).reward},
                                   strategy="onpolicy" if kind == "onpolicy" else "ddspo-paired",
                                   samples_per_prompt=b.samples_per_prompt, pairing="all",
                                   min_reward_gap=b.min_reward_gap, batch_size=b.gen_batch, num_actors=b.gen_actors,
                                   write_png=False, sampler={"num_steps": b.rollout_steps, "guidance_scale": 3.0,
                                                             "eta": 1.0, "batch_size": b.gen_batch})
            ensure_ray()
            generate(cfg, self.work / "data" / kind)
            table = read_pairs(self.work / "data" / kind / "pairs")
            if table.num_rows < b.batch_size:
                raise RuntimeError(f"{self.work / 'data' / kind}: {table.num_rows} pairs, fewer than a batch")
            self._data[kind] = PairData.from_table(table)
            self.log(f"data · {kind}: {table.num_rows} pairs")
        return self._data[kind]

    # ---- evaluation
    def score(self, weights: dict | None, split: str) -> np.ndarray:
        """(prompts, samples) toy rewards of the model (``weights``: a denoiser state, None = the reference) on
        ``heldout`` (the claims) or ``val`` (β selection), the same sample seeds for every arm."""
        b = self.b
        source, limit = self._source(split)
        prompts = [r["prompt"] for r in load_prompts(source, limit=limit)]
        backbone = load_backbone(self.model)
        if weights is not None:
            backbone.denoiser.load_state_dict(weights, strict=True)
        result, _ = evaluate(backbone, prompts, samples_per_prompt=b.eval_samples, progress=False,
                             sampler=SamplerConfig(num_steps=b.eval_steps, guidance_scale=3.0, eta=1.0, batch_size=96))
        return result.rewards

    def reference(self, split: str) -> np.ndarray:
        return np.asarray(self._cached({"reference": split, **self._eval_key(split)},
                                       lambda: {"rewards": self.score(None, split).tolist()})["rewards"])

    def _source(self, split: str) -> tuple[str, int]:
        """The prompt source of a split and how many of its prompts the budget takes."""
        return (f"{self.world}:heldout", self.b.eval_prompts) if split == "heldout" else (f"{self.world}:val",
                                                                                            self.b.val_prompts)

    def _eval_key(self, split: str) -> dict:
        b = self.b
        return {"split": split, "prompts": self._source(split)[1], "samples": b.eval_samples, "steps": b.eval_steps,
                "model": self.model}

    # ---- arms
    def arm(self, data: str, objective: dict, seed: int, split: str, *, lr: float | None = None,
            steps: int | None = None) -> dict:
        """Train one arm (``objective``: the ``train.objective`` section) with the engine and score its EMA
        weights on ``split``; cached by a fingerprint of everything that decides the result."""
        b = self.b
        train = dict(model=self.model, objective=objective, lr=lr or b.lr, max_steps=steps or b.steps,
                     batch_size=b.batch_size, seed=seed, ema_decay=b.ema_decay, log_every=1,
                     checkpoint_every=steps or b.steps)
        key = {"data": data, "data_budget": [b.fit_prompts, b.samples_per_prompt, b.rollout_steps, b.min_reward_gap],
               "train": train, **self._eval_key(split)}

        def compute() -> dict:
            t0 = time.time()
            engine = train_in_process(build(TrainConfig, train), self.pairs(data))
            policy = engine.apply_policy_weights()
            state = {n: t.detach().clone() for n, t in policy.denoiser.state_dict().items()}
            hist = engine.history
            ratio = np.array([h["residual_w"] / max(h["ref_residual_w"], 1e-12) for h in hist])
            rewards = self.score(state, split)
            out = {"rewards": rewards.tolist(), "winner_ratio_curve": ratio.tolist(),
                   "lambda_mean": float(np.mean([h.get("lambda_mean", 1.0) for h in hist])),
                   "seconds": round(time.time() - t0, 1)}
            self.log(f"arm · {data} · {describe_arm(objective)} · seed {seed} · {split} reward "
                     f"{rewards.mean():.3f} · {out['seconds']:.0f}s")
            return out

        return self._cached(key, compute)

    def _cached(self, key: dict, compute) -> dict:
        path = self.work / "arms" / f"{fingerprint(key)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        out = {**compute(), "key": key}
        atomic_write_bytes(path, json.dumps(out).encode())
        return out


def ensure_ray() -> None:
    """Start the local Ray on first need: a rerun whose arms and pairs are all cached trains in this process and
    never starts it."""
    import ray

    if not ray.is_initialized():
        start_ray(num_cpus=2)


def describe_arm(objective: dict) -> str:
    name = PRETTY.get(objective["name"], objective["name"])
    beta = f" β={objective['beta']:g}" if objective.get("beta") is not None else ""
    sg = objective.get("safeguard")
    sdpo = "" if not sg else f" + SDPO ({sg.get('space', 'output')} λ, μ={sg['mu']:g})"
    return f"{name}{beta}{sdpo}"


def rewards_of(runs: list[dict]) -> list[np.ndarray]:
    return [np.asarray(r["rewards"], dtype=np.float64) for r in runs]


def winner_excess(run: dict) -> float:
    """The winner loss over the reference's in the last quarter of training, minus 1 (> 0: the winner got worse)."""
    c = np.asarray(run["winner_ratio_curve"])
    return float(c[-max(1, len(c) // 4):].mean() - 1.0)


def smooth(x, k: int = 10) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    k = max(1, min(k, len(x)))
    return np.convolve(x, np.ones(k) / k, mode="valid")


# ------------------------------------------------------------------------------------------------ parts
def part_sweep(bench: Bench, groups=(("onpolicy", ONPOLICY), ("perturb", PERTURB))) -> dict:
    """Every method at every β of its grid, the same steps, lr and batch (an equal budget), scored on the validation
    split with sweep seeds; the best β is the one with the highest mean validation reward. ``groups``: which
    methods train on which pairs."""
    b, out = bench.b, {}
    ref = bench.reference("val")
    for data, methods in groups:
        for name in methods:
            rows = {}
            for beta in b.betas[name]:
                runs = [bench.arm(data, {"name": name, "beta": beta}, s, "val") for s in b.sweep_seeds]
                rows[f"{beta:g}"] = paired_over_seeds(rewards_of(runs), ref)
            best = max(rows, key=lambda x: rows[x]["mean"])
            out[f"{data}/{name}"] = {"by_beta": rows, "best_beta": float(best)}
            bench.log(f"sweep · {data} · {PRETTY[name]}: best β {best} (validation Δ {rows[best]['mean']:+.3f})")
    return {"methods": out}


def best_beta(sweep: dict, data: str, name: str) -> float:
    return sweep["methods"][f"{data}/{name}"]["best_beta"]


def part_offline(bench: Bench, sweep: dict) -> dict:
    """On the reference's on-policy pairs: every method at its own best β (SIPO and DPO-C&M against
    Diffusion-DPO), the three Diffusion-DPO-family methods at the grid's smallest β (SIPO Fig. 8c), and the
    SDPO safeguard added to Diffusion-DPO, DSPO, DMPO (SDPO Tables 1–2) and SIPO (a combination no paper ran)."""
    b = bench.b
    ref = bench.reference("heldout")
    arms = {}

    def run(key: str, objective: dict) -> None:
        arms[key] = {"objective": objective,
                     "runs": [bench.arm("onpolicy", objective, s, "heldout") for s in b.seeds]}

    for name in ONPOLICY:
        beta = best_beta(sweep, "onpolicy", name)
        run(f"{name}@best", {"name": name, "beta": beta})
        if name in ("diffusion-dpo", "sipo", "dspo", "dmpo"):
            run(f"{name}+sdpo@best", {"name": name, "beta": beta, "safeguard": SAFEGUARD})
    small = min(b.betas["sipo"])
    for name in ("diffusion-dpo", "dpo-cm", "sipo"):
        run(f"{name}@small", {"name": name, "beta": small})
    return summarise(arms, ref)


def part_sdpo(bench: Bench, sweep: dict) -> dict:
    """SDPO Fig. 1/3: Diffusion-DPO at an aggressive lr with and without the safeguard (output λ at μ = 0.9, the
    exact parameter-space λ at μ = 0); DDSPO Table 1a: DDSPO against Diffusion-DPO on perturbation pairs, each
    at its own best β, and DDSPO + SDPO."""
    b = bench.b
    ref = bench.reference("heldout")
    arms = {}
    dpo = best_beta(sweep, "onpolicy", "diffusion-dpo")
    for key, sg in (("dpo", None), ("dpo+sdpo-output", SAFEGUARD), ("dpo+sdpo-parameter", {"mu": 0.0, "space": "parameter"})):
        objective = {"name": "diffusion-dpo", "beta": dpo, **({"safeguard": sg} if sg else {})}
        arms[f"aggressive/{key}"] = {"objective": objective, "runs": [
            bench.arm("onpolicy", objective, s, "heldout", lr=b.aggressive_lr, steps=b.aggressive_steps) for s in b.seeds]}
    for key, objective in (("dpo", {"name": "diffusion-dpo", "beta": best_beta(sweep, "perturb", "diffusion-dpo")}),
                           ("ddspo", {"name": "ddspo", "beta": best_beta(sweep, "perturb", "ddspo")}),
                           ("ddspo+sdpo", {"name": "ddspo", "beta": best_beta(sweep, "perturb", "ddspo"),
                                           "safeguard": SAFEGUARD})):
        arms[f"perturb/{key}"] = {"objective": objective,
                                  "runs": [bench.arm("perturb", objective, s, "heldout") for s in b.seeds]}
    out = summarise(arms, ref)
    for key, arm in out["arms"].items():  # the winner's loss curves (SDPO Fig. 3), mean ± t band over seeds
        if key.startswith("aggressive/"):
            curves = [smooth(r["winner_ratio_curve"]) for r in arms[key]["runs"]]
            mean, lo, hi = t_band(np.stack(curves))
            arm["winner_curve"] = {"mean": mean.tolist(), "low": lo.tolist(), "high": hi.tolist()}
            arm["winner_excess"] = t_interval([winner_excess(r) for r in arms[key]["runs"]])
            arm["lambda_mean"] = float(np.mean([r["lambda_mean"] for r in arms[key]["runs"]]))
    return out


def part_video(bench: Bench) -> dict:
    """SIPO Table 1 on the toy video world: Diffusion-DPO, DPO-C&M and SIPO on the video reference's on-policy
    pairs, each at its own best β from an equal-budget sweep on the world's validation prompts, then the claims'
    seeds on its held-out prompts."""
    sweep = part_sweep(bench, (("onpolicy", VIDEO_METHODS),))
    ref = bench.reference("heldout")
    arms = {}
    for name in VIDEO_METHODS:
        objective = {"name": name, "beta": best_beta(sweep, "onpolicy", name)}
        arms[f"{name}@best"] = {"objective": objective,
                                "runs": [bench.arm("onpolicy", objective, s, "heldout") for s in bench.b.seeds]}
    return {"sweep": sweep, "model": bench.model, **summarise(arms, ref)}


def summarise(arms: dict, ref: np.ndarray) -> dict:
    """Each arm's objective, its seeds' rewards (kept: the report pairs arms against each other at render
    time) and its paired gain over the reference."""
    return {"reference": {"mean": float(ref.mean())}, "reference_rewards": ref.tolist(),
            "arms": {k: {"objective": a["objective"], "rewards": [r["rewards"] for r in a["runs"]],
                         "winner_excess_per_seed": [winner_excess(r) for r in a["runs"]],
                         "vs_reference": paired_over_seeds(rewards_of(a["runs"]), ref)} for k, a in arms.items()}}


def part_online(bench: Bench, sweep: dict, seed: int) -> dict:
    """SIPO Fig. A1 through the product's round loop: Diffusion-DPO and SIPO, each at its own best β, for
    ``online_rounds`` rounds (fixed reference, a fresh optimizer per round, the settings of the first embedded
    default, recipe ``toy-one-round``, otherwise) with rollouts and training seeded by ``seed``; per round the
    held-out rewards of the job's own evaluation (the same prompts and sample seeds for both arms and every round)."""
    from pipeline.data.generate import generate
    from pipeline.recipes import recipe
    from pipeline.rounds import RoundsConfig, load_eval, run_rounds

    b, out = bench.b, {}
    shared = bench.work / f"online-{seed}" / "round_0_pairs"
    for name in ONLINE_ARMS:
        tree = merge(recipe("toy-one-round"), {
            "model": bench.model, "rounds": b.online_rounds,
            "generation": {"prompts": "toy:fit", "prompt_limit": b.online_prompts, "seed": seed,
                           "samples_per_prompt": b.samples_per_prompt, "min_reward_gap": b.min_reward_gap,
                           "batch_size": b.gen_batch, "num_actors": b.gen_actors,
                           "sampler": {"num_steps": b.rollout_steps, "batch_size": b.gen_batch}},
            "train": {"objective": {"name": name, "beta": best_beta(sweep, "onpolicy", name)}, "seed": seed,
                      "lr": b.lr, "max_steps": b.online_steps, "batch_size": b.batch_size,
                      "checkpoint_every": b.online_steps, "log_every": max(1, b.online_steps // 5)},
            "eval": {"num_prompts": b.eval_prompts, "samples": b.online_eval_samples,
                     "sampler": {"num_steps": b.eval_steps}}})
        cfg = build(RoundsConfig, tree)
        run_dir = bench.work / f"online-{seed}" / name
        first = bench.work / f"online-{seed}" / ONLINE_ARMS[0]
        if name != ONLINE_ARMS[0]:
            # the same model, held-out prompts and seeds for both arms: the first arm's reference evaluation is theirs
            _share(first / "reference_eval", run_dir / "reference_eval")
        ensure_ray()
        if not (run_dir / "round_0").exists():
            # round 0 rolls out the reference with the same generation config in both arms: one dataset, made once
            # and handed to each arm's round (its generator reuses a finished dataset whose fingerprint is its config's)
            generate(cfg.generation_config(0, ""), shared)
            _share(shared, run_dir / ".round_0.work" / "pairs")
        run_rounds(cfg, run_dir, log=bench.log)
        out[name] = {"objective": tree["train"]["objective"],
                     "reference": load_eval(run_dir / "reference_eval")["rewards"],
                     "rounds": [load_eval(run_dir / f"round_{k}")["rewards"] for k in range(b.online_rounds)]}
    return {"seed": seed, "arms": out}


def _share(src: Path, dst: Path) -> None:
    """Copy a finished output (a marked atomic directory, marker included) to where a run would compute the same
    one, whole or not at all."""
    if is_complete(src) and not dst.exists():
        with atomic_directory(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------ claims
def claims(results: dict, b: Budget) -> list[dict]:
    """Every claim: what it says, where the papers say it, the part that measures it, the interval (``None`` until
    the part has run) and the claimed sign. The verdict is computed from the interval when the report is written."""
    rows = []

    def add(text, where, part, direction, interval=None):
        rows.append({"claim": text, "paper": where, "part": part, "direction": direction, "interval": interval})

    def vs(part, a, c):
        arms = (results.get(part) or {}).get("arms")
        if not arms:
            return None
        return paired_over_seeds([np.asarray(x) for x in arms[a]["rewards"]], [np.asarray(x) for x in arms[c]["rewards"]])

    def excess(part, key):
        arms = (results.get(part) or {}).get("arms")
        return arms[key]["winner_excess"] if arms else None

    def excess_vs(part, a, c):
        arms = (results.get(part) or {}).get("arms")
        if not arms:
            return None
        return t_interval([x - y for x, y in zip(arms[a]["winner_excess_per_seed"], arms[c]["winner_excess_per_seed"])])

    add("Diffusion-DPO's winner loss ends above the reference's (ratio − 1), aggressive lr", "SDPO Fig. 1/3", "sdpo", +1,
        excess("sdpo", "aggressive/dpo"))
    for key, label in (("dpo+sdpo-output", "output λ, μ = 0.9"), ("dpo+sdpo-parameter", "parameter λ, μ = 0")):
        k = f"aggressive/{key}"
        add(f"DPO + SDPO ({label}) keeps the winner loss at or below the reference's (ratio − 1)", "SDPO Fig. 3",
            "sdpo", -1, excess("sdpo", k))
        add(f"DPO + SDPO ({label}) keeps the winner loss below Diffusion-DPO's (ratio difference)", "SDPO Fig. 3",
            "sdpo", -1, excess_vs("sdpo", k, "aggressive/dpo"))
        add(f"DPO + SDPO ({label}) ends with a higher reward than Diffusion-DPO", "SDPO Table 1", "sdpo", +1,
            vs("sdpo", k, "aggressive/dpo"))
    add("DDSPO beats Diffusion-DPO on the same perturbation pairs, each at its best β (reward)", "DDSPO Table 1a",
        "sdpo", +1, vs("sdpo", "perturb/ddspo", "perturb/dpo"))
    add("SIPO beats Diffusion-DPO, each at its best β (reward)", "SIPO Table 2", "offline", +1,
        vs("offline", "sipo@best", "diffusion-dpo@best"))
    add("DPO-C&M beats Diffusion-DPO, each at its best β (reward)", "SIPO Table 2", "offline", +1,
        vs("offline", "dpo-cm@best", "diffusion-dpo@best"))
    add("SIPO beats DPO-C&M, each at its best β (reward)", "SIPO Table 2", "offline", +1,
        vs("offline", "sipo@best", "dpo-cm@best"))
    small = f"{min(b.betas['sipo']):g}"
    add(f"SIPO beats Diffusion-DPO at β = {small} (reward)", "SIPO Fig. 8c", "offline", +1,
        vs("offline", "sipo@small", "diffusion-dpo@small"))
    add(f"DPO-C&M beats Diffusion-DPO at β = {small} (reward)", "SIPO Fig. 8c", "offline", +1,
        vs("offline", "dpo-cm@small", "diffusion-dpo@small"))
    off = (results.get("offline") or {}).get("arms")
    add(f"SIPO at β = {small} is not below the reference (reward − reference; above it counts as reproduced)",
        "SIPO Fig. 8c", "offline", +1, off["sipo@small"]["vs_reference"] if off else None)
    online = online_series(results, b)
    if online:
        last = len(online["sipo"]["rounds"]) - 1
        add(f"after {last + 1} online round{'s' if last else ''} SIPO beats Diffusion-DPO (reward)", "SIPO Fig. A1", "online", +1,
            online["sipo_vs_dpo"][-1])
        add("SIPO's last round is not below its first (reward; above it counts as reproduced)", "SIPO Fig. A1", "online",
            +1, online["sipo"]["last_vs_first"])
        add("Diffusion-DPO's last round falls below its first (reward)", "SIPO Fig. A1", "online", -1,
            online["diffusion-dpo"]["last_vs_first"])
    else:
        add("after the online rounds SIPO beats Diffusion-DPO (reward)", "SIPO Fig. A1", "online", +1)
    for base in ("diffusion-dpo", "dspo", "dmpo", "sipo"):
        add(f"{PRETTY[base]} + SDPO beats {PRETTY[base]} at its best β (reward)",
            "no paper" if base == "sipo" else "SDPO Tables 1–2", "offline", +1,
            vs("offline", f"{base}+sdpo@best", f"{base}@best"))
    add("DDSPO + SDPO beats DDSPO at its best β (reward)", "no paper", "sdpo", +1,
        vs("sdpo", "perturb/ddspo+sdpo", "perturb/ddspo"))
    for a, c in (("sipo", "diffusion-dpo"), ("dpo-cm", "diffusion-dpo"), ("sipo", "dpo-cm")):
        add(f"video: {PRETTY[a]} beats {PRETTY[c]}, each at its best β (toy video reward)", "SIPO Table 1 (VBench)",
            "video", +1, vs("video", f"{a}@best", f"{c}@best"))
    return rows


def online_series(results: dict, b: Budget) -> dict | None:
    """The online parts pooled over their seeds: per arm and round the gain over the reference and over the
    previous round, SIPO − Diffusion-DPO per round, each paired over seeds; ``None`` until a seed has run."""
    seeds = [results[p] for p in sorted(results) if p.startswith("online-")]
    if not seeds:
        return None
    out = {"seeds": [s["seed"] for s in seeds]}
    for name in ONLINE_ARMS:
        rounds = [[np.asarray(s["arms"][name]["rounds"][k]) for s in seeds] for k in range(len(seeds[0]["arms"][name]["rounds"]))]
        refs = [np.asarray(s["arms"][name]["reference"]) for s in seeds]
        out[name] = {"rounds": [paired_over_seeds(r, refs) for r in rounds],
                     "vs_previous": [paired_over_seeds(rounds[0], refs)] + [
                         paired_over_seeds(rounds[k], rounds[k - 1]) for k in range(1, len(rounds))],
                     "last_vs_first": paired_over_seeds(rounds[-1], rounds[0])}
    n = len(out["sipo"]["rounds"])
    out["sipo_vs_dpo"] = [paired_over_seeds([np.asarray(s["arms"]["sipo"]["rounds"][k]) for s in seeds],
                                            [np.asarray(s["arms"]["diffusion-dpo"]["rounds"][k]) for s in seeds])
                          for k in range(n)]
    return out


# ------------------------------------------------------------------------------------------------ report
def half_width(m: dict | None) -> float | None:
    return None if m is None else (m["ci_high"] - m["ci_low"]) / 2


def _seeds(m: dict) -> str:
    return "(" + ", ".join(f"{x:+.3f}" for x in m["per_seed"]) + ")" if m.get("per_seed") else ""


def verdict_word(row: dict) -> str:
    if row["interval"] is None:
        return f"not measured yet (`bench/claims.py run {row['part'] if row['part'] != 'online' else 'online-0'}`)"
    v = verdict(row["interval"], row["direction"])
    if row["paper"] == "no paper":  # a question, not a claim: say which way it went
        v = {"reproduces": "the safeguard helps", "contradicted": "the safeguard hurts"}.get(v, v)
    return f"**{v}**"


def report(results: dict, b: Budget, quick: bool) -> str:
    present = [p for p in parts(b) if p in results]
    minutes = sum(results[p]["minutes"] for p in present)
    machines = sorted({results[p]["machine"] for p in present})
    L = ["# The papers' claims on toy world v2", "",
         f"Produced by `python bench/claims.py run <part>` for each part{' (the CI form, --quick)' if quick else ''}, then "
         f"`python bench/claims.py render`. Parts present: {', '.join(present) or 'none'} "
         f"({minutes:.0f} min in all; {'; '.join(machines) or 'no machine'}); "
         f"missing: {', '.join(p for p in parts(b) if p not in results) or 'none'}. Model: the shipped toy reference "
         "(v-prediction, `pipeline/toyworld/reference_model`); the video part: the shipped toy video reference, with a "
         "budget of its own (its section). Deterministic on one machine, not across machines.", "",
         "Protocol (bench/claims.py): pairs from the real generator on the `toy:fit` prompts; every offline arm trained by "
         "the production engine, the online claim run by the product's round loop; β chosen per method on the validation "
         "prompts (`toy:val`) with sweep seeds of its own; claims judged on the held-out prompts (`toy:heldout`) with "
         f"seeds {list(b.seeds)}. Differences between arms are paired per (prompt, sample seed); intervals: {describe()}, "
         "over prompts, of the difference averaged over training seeds (per-seed means in brackets); winner-loss numbers "
         "use a t interval over seeds. Verdicts are computed from the intervals: *reproduces* / *contradicted* when the "
         f"interval excludes 0, else *inconclusive*. Target half-width of a reward interval: {TARGET_HALF_WIDTH}.", "",
         f"Budget: `{json.dumps(asdict(b))}`", "", "## Summary", ""]
    rows = claims(results, b)
    L.append(markdown_table(["claim", "paper", "measured [95 % CI]", "half-width", "verdict"], [
        [r["claim"], r["paper"], "–" if r["interval"] is None else f"{fmt_ci(r['interval'], signed=True)} {_seeds(r['interval'])}",
         "–" if r["interval"] is None else f"{half_width(r['interval']):.3f}", verdict_word(r)] for r in rows]))
    reward_rows = [r for r in rows if r["interval"] is not None and "ratio" not in r["claim"]]
    if reward_rows:
        met = sum(half_width(r["interval"]) <= TARGET_HALF_WIDTH for r in reward_rows)
        L += ["", f"Reward intervals with a half-width ≤ {TARGET_HALF_WIDTH}: {met} of {len(reward_rows)}.", ""]
    L += _sweep_section(results.get("sweep"), b)
    L += _arms_section(results.get("offline"), "## Offline: each method at its own best β, and at the smallest β",
                       "On the reference's on-policy pairs", b)
    L += _sdpo_section(results.get("sdpo"), b)
    L += _online_section(online_series(results, b), b)
    L += _video_section(results.get("video"), video_budget(b))
    overhead = ROOT / "bench" / "results" / "objectives.md"
    if overhead.exists():
        L += ["## Diffusion-SDPO Table 4 — the safeguard's overhead", "", "From `bench/results/objectives.md` "
              "(`python bench/objectives.py`):", ""]
        L += [line for line in overhead.read_text().splitlines() if line.startswith("|")] + [""]
    return "\n".join(L) + "\n"


def _missing(part: str) -> list[str]:
    return [f"Not measured yet: `python bench/claims.py run {part}`.", ""]


def _sweep_section(s: dict | None, b: Budget) -> list[str]:
    L = ["## The β sweep (validation prompts)", "",
         f"Every method at every β of its grid: {b.steps} steps × {b.batch_size} pairs, lr {b.lr:g}, seeds "
         f"{list(b.sweep_seeds)}; validation reward − the reference's (paired). The best β (highest mean) is "
         "the one the other parts use.", ""]
    if s is None:
        return L + _missing("sweep")
    rows = []
    for key, m in s["methods"].items():
        data, name = key.split("/")
        rows.append([PRETTY[name], "on-policy" if data == "onpolicy" else "perturbation",
                     *[f"{beta}: {fmt_ci(v, signed=True)}" for beta, v in m["by_beta"].items()], f"{m['best_beta']:g}"])
    width = max(len(r) for r in rows)
    rows = [r[:-1] + [""] * (width - len(r)) + r[-1:] for r in rows]
    L.append(markdown_table(["method", "pairs", *[f"β point {i + 1}" for i in range(width - 3)], "best β"], rows))
    L += ["", "![β sweep](results/sweep.png)", ""]
    spread = {PRETTY[k.split("/")[1]]: max(v["mean"] for v in m["by_beta"].values()) - min(v["mean"] for v in m["by_beta"].values())
              for k, m in s["methods"].items() if k.startswith("onpolicy/")}
    L += ["Not given a verdict (point estimates): SIPO Fig. 8c also claims SIPO and DPO-C&M are less sensitive to β than "
          "Diffusion-DPO; the spread of the mean validation gain across the grid here is "
          + ", ".join(f"{k} {v:.3f}" for k, v in spread.items()) + ".", ""]
    return L


def _arms_section(part: dict | None, title: str, what: str, b: Budget, name: str = "offline") -> list[str]:
    L = [title, "", f"{what}, {b.steps} steps × {b.batch_size} pairs, lr {b.lr:g}, seeds {list(b.seeds)}; held-out reward "
         "− the reference's, paired.", ""]
    if part is None:
        return L + _missing(name)
    L.append(markdown_table(["arm", "objective", "reward − reference [95 % CI]"], [
        [k, describe_arm(a["objective"]), f"{fmt_ci(a['vs_reference'], signed=True)} {_seeds(a['vs_reference'])}"]
        for k, a in part["arms"].items()]))
    arms = part["arms"]
    same = [k for k in arms if "+sdpo@" in k and k.replace("+sdpo", "") in arms and np.allclose(
        arms[k]["vs_reference"]["per_seed"], arms[k.replace("+sdpo", "")]["vs_reference"]["per_seed"], rtol=0, atol=1e-4)]
    if same:  # computed from the arms, not asserted: which safeguarded arms changed nothing
        why = (" In DSPO's SD 1.5 form the loser enters only through z, inside the winner's shift β·(1 − σ(z)); at "
               "β = 0.001 that shift is ≈ 5·10⁻⁴, so the loss is the winner's own denoising loss (fine-tuning on winners) "
               "and the loser's gradient, which λ scales, is ≈ 10⁻⁷ of it (`pipeline/objectives/losses.py: dspo_loss`). "
               "The safeguard has nothing to act on at this β.") if all(k.startswith("dspo+") for k in same) else ""
        L += ["", f"{', '.join(f'`{k}`' for k in same)}: per seed, the reward of the arm without the safeguard to within "
              f"10⁻⁴.{why}"]
    return L + [""]


def _sdpo_section(part: dict | None, b: Budget) -> list[str]:
    L = ["## SDPO Fig. 1/3 (aggressive lr) and DDSPO Table 1a (perturbation pairs)", "",
         f"Aggressive arms: lr {b.aggressive_lr:g}, {b.aggressive_steps} steps; perturbation arms: winner from c, loser "
         f"from c⁻ (rand-removal), same seed, {b.steps} steps; seeds {list(b.seeds)}.", ""]
    if part is None:
        return L + _missing("sdpo")
    L.append(markdown_table(["arm", "objective", "winner loss / reference's − 1 (last quarter)", "mean λ",
                             "reward − reference [95 % CI]"], [
        [k, describe_arm(a["objective"]), fmt_ci(a["winner_excess"], signed=True) if "winner_excess" in a else "–",
         fmt_num(a.get("lambda_mean")), f"{fmt_ci(a['vs_reference'], signed=True)} {_seeds(a['vs_reference'])}"]
        for k, a in part["arms"].items()]))
    return L + ["", "![winner loss](results/winner_loss.png)", "",
                "The parameter-space λ makes the winner's loss non-increasing only to first order and for a plain "
                "gradient step; under AdamW's per-parameter scaling that guarantee does not carry over. The "
                "output-space λ acts on the loss itself.", ""]


def _subset_note(split: str, n: int) -> str:
    """The colours a ``prompt_limit`` of ``n`` leaves out of an image-world split (the world's own subset, ``World.
    prompts``: the first N, and the grammar lists prompts colour by colour; docs/rounds.md)."""
    from pipeline.toyworld.worlds import get_world

    world = get_world("toy")
    colours = [world.as_spec(t).colour for t in world.prompts(split)]
    missing = sorted(set(colours) - {world.as_spec(t).colour for t in world.prompts(split, limit=n)})
    return (f" ({n} of the split's {len(colours)}, with no {' or '.join(missing)} prompt: docs/rounds.md)"
            if missing else "")


def _online_section(o: dict | None, b: Budget) -> list[str]:
    L = ["## SIPO Fig. A1 — online rounds (the product's round loop)", "",
         f"`pipeline/rounds.py: run_rounds`, {b.online_rounds} rounds, {b.online_prompts} `toy:fit` prompts"
         f"{_subset_note('fit', b.online_prompts)} × {b.samples_per_prompt} rollouts per round, {b.online_steps} "
         f"steps × {b.batch_size}, fixed reference, a fresh optimizer per round, each arm at its best β; held-out: the job's evaluation, {b.online_eval_samples} sample "
         f"seeds per prompt; intervals over prompts of the seed-averaged difference, seeds {list(b.online_seeds)}.", ""]
    if o is None:
        return L + _missing("online-0")
    n = len(o["sipo"]["rounds"])
    rows = []
    for name in ONLINE_ARMS:
        rows.append([f"{PRETTY[name]}: Δ vs reference", *[fmt_ci(m, signed=True) for m in o[name]["rounds"]]])
        rows.append([f"{PRETTY[name]}: Δ vs previous round", *[fmt_ci(m, signed=True) for m in o[name]["vs_previous"]]])
    rows.append(["SIPO − Diffusion-DPO", *[fmt_ci(m, signed=True) for m in o["sipo_vs_dpo"]]])
    L.append(markdown_table(["", *[f"round {k}" for k in range(n)]], rows))
    return L + ["", f"Seeds pooled: {o['seeds']}.", "", "![rounds](results/rounds.png)", ""]


def _video_section(part: dict | None, b: Budget) -> list[str]:
    L = _arms_section(part, "## SIPO Table 1 on video — the toy video world",
                      f"The toy video world (8 frames of 32 × 32; reward: colour, shape, count, motion, consistency, "
                      f"`pipeline/toyworld/video/detector.py`), the shipped video reference's on-policy pairs of "
                      f"{b.fit_prompts or 'all'} `{VIDEO_WORLD}:fit` prompts × {b.samples_per_prompt} rollouts "
                      f"({b.rollout_steps} flow steps), each method at its own best β from the sweep below "
                      f"(validation prompts, sweep seeds {list(b.sweep_seeds)}); held-out: {b.eval_prompts or 'all'} "
                      f"`{VIDEO_WORLD}:heldout` prompts × {b.eval_samples} sample seed(s), {b.eval_steps} flow steps; "
                      "every arm",
                      b, name="video")
    if part is None:
        return L
    L.append(markdown_table(["method", *[f"β = {x}" for x in part["sweep"]["methods"][f"onpolicy/{VIDEO_METHODS[0]}"]["by_beta"]],
                             "best β"], [
        [PRETTY[k.split("/")[1]], *[fmt_ci(v, signed=True) for v in m["by_beta"].values()], f"{m['best_beta']:g}"]
        for k, m in part["sweep"]["methods"].items()]))
    return L + ["", f"β sweep above: validation reward − the reference's (paired). Video reference held-out reward "
                f"{part['reference']['mean']:.3f}. The lr ({b.lr:g}, the same for every method) comes from a pilot with "
                "SIPO alone in which higher learning rates lowered this reference's reward (docs/rounds.md, \"Video\"); "
                "the pilot saw held-out prompts, the β choice above did not.", ""]


def plots(results: dict, b: Budget, figs: Path) -> None:
    """Every plot from the stored parts (so ``render`` redraws them all)."""
    figs.mkdir(parents=True, exist_ok=True)
    s = results.get("sweep")
    if s:
        series = {}
        for key, m in s["methods"].items():
            data, name = key.split("/")
            if data == "onpolicy" and tuple(b.betas[name]) == tuple(b.betas["sipo"]):
                xs = sorted(m["by_beta"], key=float)
                series[PRETTY[name]] = ([float(x) for x in xs], *([m["by_beta"][x][k] for x in xs]
                                                               for k in ("mean", "ci_low", "ci_high")))
        plot_bands(series, figs / "sweep.png", xlabel="β (this library's convention)", log_x=True, markers=True,
                   ylabel="validation reward − reference", hline=0.0,
                   title="β sweep, on-policy pairs (paired 95% CI over prompts)")
    d = results.get("sdpo")
    if d:
        series = {describe_arm(a["objective"]): (np.arange(len(a["winner_curve"]["mean"])) + 1, a["winner_curve"]["mean"],
                                                  a["winner_curve"]["low"], a["winner_curve"]["high"])
                  for k, a in d["arms"].items() if "winner_curve" in a}
        plot_bands(series, figs / "winner_loss.png", xlabel="step (10-step moving mean)", ylabel="winner loss / reference's",
                   hline=1.0, title=f"winner loss at lr {b.aggressive_lr:g}: mean ± 95% CI over {len(b.seeds)} seeds")
    o = online_series(results, b)
    if o:
        plot_bands({PRETTY[n]: (list(range(len(o[n]["rounds"]))), *([m[k] for m in o[n]["rounds"]]
                                                                  for k in ("mean", "ci_low", "ci_high")))
                    for n in ONLINE_ARMS}, figs / "rounds.png", xlabel="online round", markers=True, hline=0.0,
                   ylabel="held-out reward − reference", title="online rounds (paired 95% CI over prompts, seeds pooled)")


# ------------------------------------------------------------------------------------------------ driver
def load_parts(out: Path, b: Budget) -> dict:
    """Every finished part under ``out/results/parts``; a part measured with another budget is refused by name."""
    results = {}
    for part in parts(b):
        path = out / "results" / "parts" / f"{part}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            if r.get("budget") != json.loads(json.dumps(asdict(part_budget(part, b)))):
                raise SystemExit(f"{path}: measured with another budget than this report's "
                                 f"({'--quick' if b == QUICK else 'the full budget'}); rerun that part or render with "
                                 f"{'the full budget' if b == QUICK else '--quick'}")
            results[part] = r
    return results


def render(out: Path, b: Budget, quick: bool) -> int:
    results = load_parts(out, b)
    plots(results, b, out / "results")
    atomic_write_bytes(out / "results.md", report(results, b, quick).encode())
    print(f"wrote {out / 'results.md'} from {len(results)} part(s)")
    return 0


def run_part(part: str, bench: Bench, out: Path) -> None:
    path = out / "results" / "parts" / f"{part}.json"
    if path.is_file():
        bench.log(f"{part}: finished already ({path})")
        return
    b = bench.b
    t0 = time.time()
    bench.log(f"== part {part}")
    done = {} if part == "video" else load_parts(out, b)  # the video part has its own sweep
    if part not in ("sweep", "video") and "sweep" not in done:
        raise SystemExit(f"part {part!r} uses each method's best β: run `bench/claims.py run sweep` first "
                         f"({out / 'results' / 'parts' / 'sweep.json'} is missing)")
    if part == "sweep":
        r = part_sweep(bench)
    elif part == "offline":
        r = part_offline(bench, done["sweep"])
    elif part == "sdpo":
        r = part_sdpo(bench, done["sweep"])
    elif part == "video":
        r = part_video(bench)
    else:
        r = part_online(bench, done["sweep"], int(part.split("-", 1)[1]))
    r.update(part=part, budget=asdict(b), minutes=(time.time() - t0) / 60, machine=describe_machine(),
             torch=torch.__version__)
    atomic_write_bytes(path, json.dumps(r, default=float).encode())
    bench.log(f"== part {part}: done in {r['minutes']:.1f} min → {path}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("run", "run parts (each writes <out>/results/parts/<part>.json), then render"),
                       ("render", "rewrite results.md and the plots from the parts already there (no training)")):
        s = sub.add_parser(name, help=text)
        if name == "run":
            s.add_argument("parts", nargs="+", help="sweep, offline, sdpo, online-<seed>, video, or all")
        s.add_argument("--quick", action="store_true", help="tiny budgets (the CI form)")
        s.add_argument("--model", default=str(REFERENCE_DIR), help="model folder (default: the shipped toy reference)")
        s.add_argument("--out", type=Path, default=ROOT / "docs", help="results.md, results/*.png, results/parts/*.json")
        s.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "claims",
                       help="pairs and the per-arm cache (resumable; refuses another budget)")
    args = p.parse_args(argv)
    b = QUICK if args.quick else FULL
    if args.cmd == "render":
        return render(args.out, b, args.quick)
    names = list(parts(b)) if args.parts == ["all"] else args.parts
    unknown = [n for n in names if n not in parts(b)]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; the parts of this budget: {', '.join(parts(b))}, or all")
    work = args.work / ("quick" if args.quick else "full")
    torch.set_num_threads(2)
    log = ElapsedLog()
    benches = {}
    if any(n != "video" for n in names):
        guard_run_dir(work, {"model": args.model, "budget": asdict(b)}, job="claims")
        benches["image"] = Bench(args.model, work, b, log)
    if "video" in names:
        from pipeline.toyworld.worlds import resolve_model

        vb, model = video_budget(b), resolve_model(f"{VIDEO_WORLD}:reference")
        guard_run_dir(work / VIDEO_WORLD, {"model": model, "budget": asdict(vb)}, job="claims")
        benches["video"] = Bench(model, work / VIDEO_WORLD, vb, log, world=VIDEO_WORLD)
    import ray

    ours = not ray.is_initialized()  # a Ray this run starts (ensure_ray) is stopped at its end; another one is not
    for part in names:
        run_part(part, benches["video" if part == "video" else "image"], args.out)
    if ours and ray.is_initialized():
        ray.shutdown()
    return render(args.out, b, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
