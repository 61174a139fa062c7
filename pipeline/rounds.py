"""Online preference rounds (IPO protocol, SIPO appendix F.2): roll out → score → pair → train → evaluate.

Round k samples on-policy pairs from the current policy (the reference for k = 0), trains it with Ray
Train, and evaluates the new policy on held-out prompts with the same fixed seeds as the reference, so
the per-round table can report a paired win rate. What carries from round to round is configurable
(docs/rounds.md gives each switch's measured effect): the reference (``reference``: fixed, refreshed
every k rounds, or an EMA of the policies), the optimizer state (``carry_optimizer``), the learning rate
(``lr_decay``), earlier rounds' pairs (``replay``); the objective's ``anchor`` bounds the drift from the
reference.

Run directory::

    run_dir/run_config.json          the resolved config and its fingerprint (a rerun with another config refuses)
    run_dir/reference_eval/          eval.json, grid.png, samples.npz of the starting model (computed once)
    run_dir/round_<k>/               policy.safetensors, eval.json, grid.png, samples.npz, paired_grid.png,
                                     train_metrics.json, pairs_manifest.json, _COMPLETE
    run_dir/.round_<k>.work/         the round in progress: pairs (idempotent), Ray Train storage (resumable)
    run_dir/tensorboard/round_<k>/   TensorBoard events and progress.jsonl (a point every train.log_every steps)
    run_dir/summary.md, summary.json, curves.png, reward.png, delta.png
    run_dir/final_model/             diffusers-format folder of the last policy

A finished round is published by an atomic rename with a completion marker; rerunning the job skips
finished rounds and resumes an unfinished one (pairs are not regenerated, training resumes from its
last checkpoint, bit-identically).

Video models run the same loop (``configs/toy_video.yaml``: the toy video world): rollouts, pairs and training
carry (N, C, F, H, W) latents, the evaluation scores per dimension through the world registry
(:mod:`.toyworld.worlds`), and the grids are frame strips, one row per (prompt, seed) (docs/rounds.md, "Video").
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .backbones import load_backbone
from .config import absolute_paths, sections
from .data.generate import GenerationConfig, generate
from .data.prompts import load_prompts
from .evaluation import SAMPLES_FILE, evaluate, write_paired_grid
from .rewards import build_reward
from .export import export_model, optimizer_from_checkpoint, policy_from_checkpoint
from .training.checkpoint import checkpoint_history
from .sampling import SamplerConfig
from .toyworld.reference import REFERENCE_DIR
from .toyworld.worlds import resolve_model, world_of_dimensions, world_of_reward
from .training.config import TrainConfig
from .training.trainer import run_training
from .utils.atomic import atomic_directory, atomic_write_bytes, is_complete
from .reporting import fmt_ci, fmt_num, legend, markdown_table
from .stats import describe as describe_ci, paired_delta, win_rate, win_rate_ci
from .utils.plots import plot_intervals, plot_training_curves
from .utils.run_record import guard_run_dir

POLICY_FILE = "policy.safetensors"
DRIFT_LEGEND = {
    "background_brightness": "mean luminance of the background pixels (pipeline/drift.py); rising = the policy "
                             "paints the background",
    "colour_entropy": "entropy (bits) of the hue histogram of coloured pixels; falling = fewer colours drawn",
    "seed_diversity": "mean distance between the samples of one prompt; falling = mode collapse",
}
OPTIMIZER_FILE = "optimizer.pt"  # the round's final AdamW state (carry_optimizer)
REFERENCE_FILE = "reference.safetensors"  # the round's reference weights (reference.name = "ema")
#: fields a rerun into the same run directory may change: run more rounds, or the same work on other resources
RESUMABLE = ("rounds", "train.num_workers", "train.use_gpu", "train.worker_resources", "train.worker_labels",
             "generation.actor_resources", "generation.actor_labels", "train.torch_threads", "train.log_every",
             "train.report_to", "train.mlflow_uri", "train.async_checkpoint_upload")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: the same prompts and seeds for the reference and every round (paired Δ)."""

    prompts: str = "toy:heldout"  # a .txt / .parquet file or a toy world's split (toy:heldout, toy_video:heldout)
    num_prompts: int = 48  # how many of them (0 = all)
    reward: Any = None  # a reward spec; None = the generation's reward (toy: per-attribute scores too)
    samples: int = 4  # seeds per prompt
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        sections(self, sampler=SamplerConfig)
        absolute_paths(self, "prompts", "reward")
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts={self.num_prompts}: expected >= 0 (0 = all)")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}: expected >= 1")


@dataclass(frozen=True)
class ReferenceSchedule:
    """Which model each round's preference reference is: the starting model (``fixed``), the latest policy
    every ``every`` rounds (``refresh``), or an exponential moving average of the policies (``ema``:
    reference_k = decay·reference_(k−1) + (1 − decay)·policy_(k−1), reference_0 = the starting model)."""

    name: Literal["fixed", "refresh", "ema"] = "fixed"
    every: int = 1  # refresh: rounds between refreshes
    decay: float = 0.5  # ema: weight of the previous reference

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every={self.every}: expected >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay}: expected a value in [0, 1)")


@dataclass(frozen=True)
class SelectConfig:
    """Which checkpoint becomes the round's policy: the ``last``, or the one with the best mean reward on a
    ``validation`` split of training-distribution prompts (never the held-out test prompts; for the toy world
    ``toy:val``, and rollouts then use ``toy:fit``), ``samples`` seeds each, with the rollouts' sampler."""

    name: Literal["last", "validation"] = "last"
    prompts: str = "toy:val"
    num_prompts: int = 0  # 0 = all
    samples: int = 2
    include_start: bool = True  # the round's starting policy competes too: a round never validates worse

    def __post_init__(self):
        absolute_paths(self, "prompts")
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts={self.num_prompts}: expected >= 0 (0 = all)")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}: expected >= 1")


@dataclass(frozen=True)
class RoundsConfig:
    """The online rounds job's config tree: ``generation`` (→ ``sampler``), ``train`` (→ ``objective`` →
    ``safeguard``), ``eval`` (→ ``sampler``). ``model`` is the starting model for all three (their own
    ``model`` fields are set from it): a model folder, or ``<world>:reference`` for a toy world's reference model
    (``toy_video:reference``; :func:`.toyworld.worlds.resolve_model`)."""

    model: str = str(REFERENCE_DIR)
    rounds: int = 3
    reference: ReferenceSchedule = field(default_factory=ReferenceSchedule)
    carry_optimizer: bool = False  # round k's AdamW starts from round k−1's moments (else a fresh optimizer)
    lr_decay: float = 1.0  # round k trains with train.lr × lr_decay^k
    replay: int = 0  # how many earlier rounds' pairs join each round's training data (off-policy; SIPO's weights)
    select: SelectConfig = field(default_factory=SelectConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        sections(self, reference=ReferenceSchedule, select=SelectConfig, generation=GenerationConfig, train=TrainConfig,
                 eval=EvalConfig)
        object.__setattr__(self, "model", resolve_model(self.model))  # toy_video:reference → its folder
        absolute_paths(self, "model")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: expected >= 1")
        if not self.lr_decay > 0:
            raise ValueError(f"lr_decay={self.lr_decay}: expected > 0")
        if self.replay < 0:
            raise ValueError(f"replay={self.replay}: expected >= 0 (0 = only the round's own pairs)")
        if self.select.name == "validation":
            overlap = {r["prompt"] for r in load_prompts(self.select.prompts, limit=self.select.num_prompts)} & {
                r["prompt"] for r in load_prompts(self.eval.prompts, limit=self.eval.num_prompts)}
            if overlap:
                raise ValueError(f"select.prompts={self.select.prompts!r} shares {len(overlap)} prompt(s) with "
                                 f"eval.prompts={self.eval.prompts!r}: checkpoints are never chosen on test prompts")
        if self.reference.name != "fixed" and self.lora_rank:
            raise ValueError(f"reference={self.reference.name!r} with train.lora_rank > 0: the LoRA reference is the "
                             "base model (adapters off); use reference='fixed' or full fine-tuning")
        # the starting model is one leaf: the sections' own ``model`` fields follow it (so --print-config and
        # run_config.json show what runs)
        object.__setattr__(self, "generation", replace(self.generation, model=self.model))
        object.__setattr__(self, "train", replace(self.train, model=self.model))

    def generation_config(self, k: int, weights: str) -> GenerationConfig:
        return replace(self.generation, model=self.model, round=k, weights=weights,
                       lora_rank=self.lora_rank if weights else 0,
                       policy_version=f"round_{k - 1}" if weights else "reference")

    @property
    def lora_rank(self) -> int:
        return self.train.lora_rank

    def train_config(self, k: int, init: str, reference: str, optimizer: str = "") -> TrainConfig:
        return replace(self.train, model=self.model, init_weights=init, reference_weights=reference,
                       init_optimizer=optimizer, lr=self.train.lr * self.lr_decay**k)


def _eval_reward(cfg: RoundsConfig) -> dict:
    """The evaluation's scorer: ``{"world": name}`` when the reward is a toy world's (its scorer, per dimension;
    :func:`.toyworld.worlds.world_of_reward`), else ``{"reward": a reward model}``."""
    spec = cfg.eval.reward if cfg.eval.reward is not None else cfg.generation.reward
    world = world_of_reward(spec)
    return {"world": world.name} if world is not None else {"reward": build_reward(spec)}


def _evaluate_here(cfg: RoundsConfig, weights: str) -> tuple[dict, dict[str, bytes]]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(cfg.model, device=device, weights=weights, lora_rank=cfg.lora_rank if weights else 0)
    prompts = [r["prompt"] for r in load_prompts(cfg.eval.prompts, limit=cfg.eval.num_prompts)]
    with tempfile.TemporaryDirectory() as d:
        result, _ = evaluate(backbone, prompts, samples_per_prompt=cfg.eval.samples,
                             sampler=cfg.eval.sampler, grid_path=Path(d) / "grid.png",
                             samples_path=Path(d) / SAMPLES_FILE, progress=False, **_eval_reward(cfg))
        return result.to_dict(), {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


def _validation_reward(cfg: RoundsConfig, weights: list[str]) -> list[float]:
    """Mean reward of each candidate policy ("" = the starting model) on the validation prompts, the same
    seeds for all candidates, sampled with the rollouts' sampler (the choice needs a ranking, not a report)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [r["prompt"] for r in load_prompts(cfg.select.prompts, limit=cfg.select.num_prompts)]
    means = []
    for w in weights:
        backbone = load_backbone(cfg.model, device=device, weights=w, lora_rank=cfg.lora_rank if w else 0)
        result, _ = evaluate(backbone, prompts, samples_per_prompt=cfg.select.samples,
                             sampler=cfg.generation.sampler, progress=False, **_eval_reward(cfg))
        means.append(float(result.reward.mean))
    return means


def select_policy(cfg: RoundsConfig, result, start: str, work: Path, log) -> tuple[str, dict]:
    """The weights file that becomes the round's policy, and a record of the choice: the last checkpoint, or
    the best on the validation prompts (``cfg.select``) among the kept checkpoints and — with
    ``select.include_start`` — the round's starting policy (``start``; "" = the starting model), so that a round
    whose every checkpoint validates worse than where it started keeps its start instead of regressing."""
    kept = sorted(result.best_checkpoints, key=lambda cm: cm[1].get("step", 0))
    if cfg.select.name == "last":
        with result.checkpoint.as_directory() as d:
            path = policy_from_checkpoint(d, work / "candidates" / "last.safetensors")
        return str(path), {"selected_step": kept[-1][1].get("step") if kept else None}
    paths, steps = [], []
    if cfg.select.include_start:
        paths.append(start)
        steps.append(0)
    for ckpt, metrics in kept:
        with ckpt.as_directory() as d:
            paths.append(str(policy_from_checkpoint(d, work / "candidates" / f"step_{metrics['step']}.safetensors")))
        steps.append(metrics["step"])
    t0 = time.time()
    rewards = _validation_reward(cfg, paths)
    best = int(np.argmax(rewards))
    log("select · validation reward per checkpoint: " + ", ".join(f"step {s} {r:.3f}" for s, r in zip(steps, rewards))
        + f" · step {steps[best]} chosen in {time.time() - t0:.0f}s")
    chosen = paths[best]
    if not chosen:  # the starting model itself: its denoiser's weights as a policy file
        from safetensors.torch import save_file

        chosen = str(work / "candidates" / "start.safetensors")
        start_model = load_backbone(cfg.model, lora_rank=cfg.lora_rank)  # LoRA: zero-initialised adapters
        save_file({n: t.contiguous() for n, t in start_model.denoiser.state_dict().items()}, chosen)
    return chosen, {"selected_step": steps[best], "validation": [{"step": s, "reward": r} for s, r in zip(steps, rewards)]}


def evaluate_policy(cfg: RoundsConfig, weights: str, out: Path) -> dict:
    """Evaluate in this process, or — when the cluster has GPUs and this driver has none — in a one-GPU task."""
    import ray
    import torch

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) and not torch.cuda.is_available():
        report, files = ray.get(ray.remote(num_gpus=1)(_evaluate_here).remote(cfg, weights))
    else:
        report, files = _evaluate_here(cfg, weights)
    for name, data in files.items():  # grid.png, samples.npz (the paired grids' images)
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=1).encode())
    return report


def _eval_size(cfg: RoundsConfig) -> str:
    n = len(load_prompts(cfg.eval.prompts, limit=cfg.eval.num_prompts))  # a limit above the source's size keeps all
    return f"{n} held-out prompts × {cfg.eval.samples} seeds = {n * cfg.eval.samples} samples"


def load_eval(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


def run_rounds(cfg: RoundsConfig, run_dir: str | Path, *, log=print) -> list[dict]:
    """Run (or resume) every round into ``run_dir``; a run directory made with another config is refused
    (:func:`~pipeline.utils.run_record.guard_run_dir`; only ``RESUMABLE`` fields may change). A relative
    ``run_dir`` is taken from this process's working directory: the paths a round hands to Ray Train's workers
    and Ray Data's actors (the previous policy, optimizer and reference) are absolute, since theirs differs."""
    run_dir = Path(run_dir).absolute()
    guard_run_dir(run_dir, cfg, job="iterative_sipo", resumable=RESUMABLE)
    ref_dir = run_dir / "reference_eval"
    if not is_complete(ref_dir):
        with atomic_directory(ref_dir, marker=True) as tmp:
            log(f"reference · evaluate · {_eval_size(cfg)}")
            t0 = time.time()
            report = evaluate_policy(cfg, "", tmp)
            log(f"reference · evaluate · done in {time.time() - t0:.0f}s · reward {fmt_ci(report['reward'])}")
    ref_eval = load_eval(ref_dir)
    rows = [_summary_row("reference", ref_eval, ref_eval, ref_eval, {}, {})]
    policy, previous = "", ref_eval
    for k in range(cfg.rounds):
        final = run_dir / f"round_{k}"
        if is_complete(final):
            log(f"round {k}: complete, skipped")
        else:
            _run_round(cfg, k, policy, run_dir, log)
        policy = str(final / POLICY_FILE)
        current = load_eval(final)
        rows.append(_summary_row(f"round {k}", current, ref_eval, previous,
                                 json.loads((final / "train_metrics.json").read_text()),
                                 json.loads((final / "pairs_manifest.json").read_text())))
        previous = current
        for warning in hacking_warnings(rows):
            log(f"warning · {warning}")
        _write_summary(run_dir, rows)
    export_model(cfg.model, policy, run_dir / "final_model", lora_rank=cfg.lora_rank)
    return rows


def reference_for_round(cfg: RoundsConfig, k: int, run_dir: Path, work: Path) -> str:
    """The reference weights of round k ("" = the starting model's own), per ``cfg.reference``; the EMA
    schedule writes its average to ``work/reference.safetensors`` (published with the round, the next
    round's starting point)."""
    sched = cfg.reference
    if k == 0 or sched.name == "fixed":
        return ""
    if sched.name == "refresh":
        last = (k // sched.every) * sched.every - 1  # the policy of the last refresh point
        return str(run_dir / f"round_{last}" / POLICY_FILE) if last >= 0 else ""
    from safetensors.torch import load_file, save_file

    out = work / REFERENCE_FILE
    if not out.exists():
        previous = run_dir / f"round_{k - 1}" / REFERENCE_FILE
        ref = (load_file(str(previous)) if previous.exists()
               else {n: t.detach().clone() for n, t in load_backbone(cfg.model).denoiser.state_dict().items()})
        policy = load_file(str(run_dir / f"round_{k - 1}" / POLICY_FILE))
        avg = {n: (sched.decay * ref[n].double() + (1 - sched.decay) * policy[n].double()).to(policy[n].dtype)
               if policy[n].is_floating_point() else policy[n] for n in policy}
        save_file(avg, str(work / f".{REFERENCE_FILE}.tmp"))
        (work / f".{REFERENCE_FILE}.tmp").replace(out)
    return str(out)


def _run_round(cfg: RoundsConfig, k: int, policy: str, run_dir: Path, log) -> None:
    work = run_dir / f".round_{k}.work"
    work.mkdir(exist_ok=True)
    manifest = generate(cfg.generation_config(k, policy), work / "pairs")
    reference = reference_for_round(cfg, k, run_dir, work)
    optimizer = str(run_dir / f"round_{k - 1}" / OPTIMIZER_FILE) if cfg.carry_optimizer and k else ""
    pairs = [work / "pairs" / "pairs"] + [run_dir / f"round_{j}" / "pairs" / "pairs"
                                          for j in range(max(0, k - cfg.replay), k)]
    replayed = f" + {len(pairs) - 1} earlier round(s)' pairs" if len(pairs) > 1 else ""
    log(f"round {k}: training on {manifest['num_pairs']} pairs{replayed}")
    result = run_training(cfg.train_config(k, policy, reference, optimizer), pairs, work / "ray", "train",
                          logdir=run_dir / "tensorboard" / f"round_{k}",
                          keep_checkpoints=None if cfg.select.name == "validation" else 2)
    with result.checkpoint.as_directory() as d:
        history = checkpoint_history(d)  # the last checkpoint's: every report of the run
        if cfg.carry_optimizer:
            optimizer_from_checkpoint(d, work / OPTIMIZER_FILE)
    chosen, selection = select_policy(cfg, result, policy, work, log)
    shutil.copy(chosen, work / POLICY_FILE)
    log(f"round {k} · evaluate · {_eval_size(cfg)}")
    t0 = time.time()
    with atomic_directory(run_dir / f"round_{k}", marker=True) as tmp:
        report = evaluate_policy(cfg, str(work / POLICY_FILE), tmp)
        log(f"round {k} · evaluate · done in {time.time() - t0:.0f}s · reward {fmt_ci(report['reward'])}")
        shutil.copy(work / POLICY_FILE, tmp / POLICY_FILE)
        shutil.copy(work / "pairs" / "manifest.json", tmp / "pairs_manifest.json")
        for name in (OPTIMIZER_FILE, REFERENCE_FILE):  # the next round's starting points, when the config uses them
            if (work / name).exists():
                shutil.copy(work / name, tmp / name)
        if cfg.replay:  # later rounds train on these pairs again
            shutil.copytree(work / "pairs", tmp / "pairs")
        (tmp / "train_metrics.json").write_text(json.dumps({"last": result.metrics, "history": history,
                                                            "selection": selection}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _summary_row(name: str, ev: dict, ref: dict, prev: dict, train: dict, pairs: dict) -> dict:
    """One row of the per-round table: the evaluation's own metrics (reward, and whatever per-attribute
    scores the reward gave — none for a plain reward model), the paired comparisons with the reference and
    with the previous round, the drift statistics, the round's pairs (count, reward gap, the rollouts' mean
    reward on the training prompts) and the last training report."""
    last = train.get("last", {})
    policy, reference = np.asarray(ev["rewards"], dtype=np.float64), np.asarray(ref["rewards"], dtype=np.float64)
    before = np.asarray(prev["rewards"], dtype=np.float64)
    return {
        "round": name,
        "num_prompts": ev.get("num_prompts"), "samples_per_prompt": ev.get("samples_per_prompt"),
        "reward": ev["reward"], "overall": ev.get("overall"), "attributes": dict(ev.get("attributes") or {}),
        "drift": dict(ev.get("drift") or {}),
        "win_rate_vs_ref": win_rate(policy, reference), "win_rate_ci": win_rate_ci(policy, reference),
        "delta_vs_ref": paired_delta(policy, reference),
        "delta_vs_prev": None if name == "reference" else paired_delta(policy, before),
        "num_pairs": pairs.get("num_pairs"), "pair_reward_gap": pairs.get("mean_reward_gap"),
        "rollout_reward": pairs.get("mean_prompt_reward"),
        "loss": last.get("loss"), "implicit_acc": last.get("implicit_acc"), "lambda": last.get("lambda_mean"),
        "lambda_active_frac": last.get("lambda_active_frac"),
        "iw_mean": last.get("iw_mean"), "masked_frac": last.get("masked_frac"),
        "history": train.get("history", []),
    }


#: the reward-hacking guard's thresholds (docs/rounds.md): a drop in the gold metric (all attributes right) while
#: the trained-for reward rises; a background this much brighter than the reference's; seed diversity below
#: this share of the reference's
GOLD_DROP, BRIGHTNESS_RISE, DIVERSITY_SHARE = 0.0, 0.10, 0.5
#: colour entropy (bits) above the reference's by more than this: speckled, many-hued pixels (noise the detector
#: reads as colour); the rollouts' reward on the training prompts below the reference's by more than this: the
#: policy left the distribution it is trained on (docs/rounds.md, "β = 500")
ENTROPY_RISE, TRAIN_REWARD_DROP = 0.5, 0.05


def hacking_warnings(rows: list[dict]) -> list[str]:
    """Signs that the last round gamed the reward rather than aligned the model: the reward it was trained on
    rose while the gold metric (GenEval-strict on held-out prompts, not trained on) fell, or the drift
    statistics left the reference's range (a brighter background, speckled many-hued pixels, samples of one prompt
    collapsing), or the previous round's policy scores clearly worse than the reference on the training prompts."""
    if len(rows) < 2:
        return []
    ref, prev, last = rows[0], rows[-2], rows[-1]
    name, out = last["round"], []
    gold = (last.get("overall") or {}).get("mean"), (prev.get("overall") or {}).get("mean")
    rise = (last.get("delta_vs_prev") or {}).get("mean")
    if None not in gold and rise is not None and rise > 0 and gold[0] < gold[1] - GOLD_DROP:
        out.append(f"{name}: the trained reward rose ({rise:+.3f} vs the previous round) while the gold metric "
                   f"(all attributes right, held out) fell {gold[1]:.3f} → {gold[0]:.3f}")
    drift, base = last.get("drift") or {}, ref.get("drift") or {}
    if "background_brightness" in drift and "background_brightness" in base:
        b, b0 = drift["background_brightness"]["mean"], base["background_brightness"]["mean"]
        if b > b0 + BRIGHTNESS_RISE:
            out.append(f"{name}: background brightness {b:.3f} vs the reference's {b0:.3f}")
    if "seed_diversity" in drift and "seed_diversity" in base:
        d, d0 = drift["seed_diversity"]["mean"], base["seed_diversity"]["mean"]
        if d0 > 0 and d < DIVERSITY_SHARE * d0:
            out.append(f"{name}: diversity across seeds {d:.3f}, below {DIVERSITY_SHARE:.0%} of the reference's {d0:.3f}")
    if "colour_entropy" in drift and "colour_entropy" in base:
        e, e0 = drift["colour_entropy"]["mean"], base["colour_entropy"]["mean"]
        if e > e0 + ENTROPY_RISE:
            out.append(f"{name}: colour entropy {e:.2f} bits vs the reference's {e0:.2f} (speckled, many-hued pixels)")
    # row k's rollouts are round k−1's policy on the training prompts; row 1's (round 0's) are the reference's
    first, now = rows[1].get("rollout_reward"), last.get("rollout_reward")
    if len(rows) > 2 and first is not None and now is not None and now < first - TRAIN_REWARD_DROP:
        out.append(f"{prev['round']}'s policy scores {now:.3f} on the training prompts, below the reference's "
                   f"{first:.3f}: it left the distribution it is trained on")
    return out


def _write_summary(run_dir: Path, rows: list[dict]) -> None:
    """``summary.md`` (a header naming the model, config, evaluation and interval method; the table; a legend
    of its columns), ``summary.json``, ``reward.png``, ``delta.png`` (the paired Δ vs the reference), ``curves.png``
    and each round's ``paired_grid.png``."""
    record = {}
    if (run_dir / "run_config.json").is_file():
        try:
            record = json.loads((run_dir / "run_config.json").read_text())
        except json.JSONDecodeError:
            record = {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    ref = rows[0]
    toy = ref.get("overall") is not None
    attributes = list(dict.fromkeys(a for r in rows for a in (r.get("attributes") or {})))
    world = world_of_dimensions(attributes) if toy else None  # eval.json files before video: the image world's
    every = f"all {world.dimension_word if world else 'attributes'}"
    train_cols = [  # (row key, header, legend); a column is shown only when some round logged it
        ("loss", "loss", "the preference loss at the last training report"),
        ("implicit_acc", "impl. acc", "implicit accuracy: share of pairs the policy ranks as the data does "
                                      "(logit > 0), at the last report"),
        ("lambda", "λ", "mean SDPO safeguard λ at the last report (1 = loser gradient unscaled)"),
        ("lambda_active_frac", "λ active", "share of pairs where the safeguard scaled the loser (λ < 1)"),
        ("iw_mean", "w̄", "mean importance weight (SIPO / DPO-C&M) at the last report"),
        ("masked_frac", "masked", "share of pairs masked out by DPO-C&M's clip at the last report"),
    ]
    trained = rows[1:]
    shown = [c for c in train_cols if any(r.get(c[0]) is not None for r in trained)]
    if all(r.get("lambda") in (None, 1.0) for r in trained):  # safeguard off: λ ≡ 1 says nothing
        shown = [c for c in shown if c[0] not in ("lambda", "lambda_active_frac")]
    columns = ["round", "reward [95% CI]", "Δ vs ref, paired [95% CI]", "Δ vs previous, paired", "win vs ref [95% CI]"]
    columns += [every] * toy + attributes
    table_rows = []
    for i, r in enumerate(rows):
        cells = [r["round"], fmt_ci(r["reward"]),
                 "–" if i == 0 else fmt_ci(r["delta_vs_ref"], signed=True),
                 "–" if i == 0 else fmt_ci(r.get("delta_vs_prev"), signed=True),
                 "–" if i == 0 else fmt_ci(r.get("win_rate_ci") or {"mean": r["win_rate_vs_ref"]})]
        cells += [fmt_num((r.get("overall") or {}).get("mean"))] * toy
        cells += [fmt_num(((r.get("attributes") or {}).get(a) or {}).get("mean")) for a in attributes]
        table_rows.append(cells)
    # the second table: the round's data, its training, and the drift statistics (the reward-hacking guard)
    drifts = list(dict.fromkeys(d for r in rows for d in (r.get("drift") or {})))
    data_cols = [("num_pairs", "pairs", "pairs the round trained on (its own, before replay)"),
                 ("pair_reward_gap", "reward gap", "mean reward gap winner − loser of the round's pairs"),
                 ("rollout_reward", "rollout reward", "mean reward of the round's rollouts on the training prompts "
                                                      "(the previous policy's, on-policy)")]
    data_cols = [c for c in data_cols if any(r.get(c[0]) is not None for r in trained)]
    columns2 = ["round"] + [h for _, h, _ in data_cols] + [h for _, h, _ in shown] + [d.replace("_", " ") for d in drifts]
    table2_rows = [[r["round"]] + [fmt_num(r.get(k)) for k, _, _ in data_cols] + [fmt_num(r.get(k)) for k, _, _ in shown]
                   + [fmt_num(((r.get("drift") or {}).get(d) or {}).get("mean")) for d in drifts] for r in rows]

    n_prompts, n_seeds = ref.get("num_prompts"), ref.get("samples_per_prompt")
    model = config.get("model")
    head = ["# Online rounds", ""]
    facts = []
    if model:
        facts.append(f"Model: `{model}`.")
    if record.get("fingerprint"):
        facts.append(f"Config fingerprint `{record['fingerprint']}` (`run_config.json`).")
    if n_prompts:
        scored = f", scored per dimension by the toy world `{world.name}`" if world else ""
        facts.append(f"Held-out evaluation: {n_prompts} prompts × {n_seeds} seeds, the same seeds for the "
                     f"reference and every round{scored}.")
    facts.append(f"Intervals: {describe_ci()}; Δ and win rate are paired per (prompt, seed).")
    head += [" ".join(facts), ""]
    entries = {
        "reward": "mean held-out reward over prompts and seeds",
        "Δ vs ref, paired": "policy − reference reward on the same (prompt, seed) samples; the interval is a "
                            "bootstrap over prompts of the per-prompt mean difference",
        "win vs ref": "share of (prompt, seed) samples where the policy scores higher than the reference (ties "
                      "count ½), with a bootstrap interval over prompts",
    }
    if toy:
        entries[every] = f"share of samples with {world.overall_label if world else 'every attribute right'}"
    for a in attributes:
        entries[a] = f"share of samples with the {a} right" if toy else f"the evaluation's {a!r} score"
    entries["Δ vs previous, paired"] = "the same paired Δ against the previous round (the reference for round 0)"
    entries.update({h: text for _, h, text in data_cols})
    entries.update({h: text for _, h, text in shown})
    entries.update({d.replace("_", " "): DRIFT_LEGEND.get(d, d) for d in drifts})
    table = markdown_table(columns, table_rows) + "\n\n" + markdown_table(columns2, table2_rows)
    warnings = [w for i in range(2, len(rows) + 1) for w in hacking_warnings(rows[:i])]
    guard = (["Reward-hacking guard:", "", *(f"- {w}" for w in warnings), ""] if warnings
             else ["Reward-hacking guard: no warning (docs/rounds.md).", ""])
    text = "\n".join(head + [table, "", *guard, "Columns:", "", legend(entries), ""])
    atomic_write_bytes(run_dir / "summary.md", text.encode())
    atomic_write_bytes(run_dir / "summary.json", json.dumps(rows, indent=1, default=str).encode())

    rw = ref["reward"]
    plot_intervals([r["round"] for r in rows], [r["reward"]["mean"] for r in rows], [r["reward"]["ci_low"] for r in rows],
                   [r["reward"]["ci_high"] for r in rows], run_dir / "reward.png", ylabel="held-out reward",
                   band=(rw["mean"], rw["ci_low"], rw["ci_high"]), band_label="reference (95% CI)",
                   title=f"held-out reward per round (95% CI over {n_prompts or '?'} prompts)")
    # the intervals above overlap where the paired difference does not: the same samples' Δ, round by round
    deltas = [r["delta_vs_ref"] for r in trained]
    plot_intervals([r["round"] for r in trained], [d["mean"] for d in deltas], [d["ci_low"] for d in deltas],
                   [d["ci_high"] for d in deltas], run_dir / "delta.png", ylabel="policy − reference, paired",
                   band=(0.0, 0.0, 0.0), band_label="reference",
                   title=f"paired Δ vs the reference per round (95% CI over {n_prompts or '?'} prompts)")
    histories = [r["history"] for r in trained]
    if any(h.get("loss") is not None for hist in histories for h in hist):
        plot_training_curves(histories, run_dir / "curves.png", xlabel="optimizer step (all rounds)",
                             title="training curves (a point per logged step)")
    for k, r in enumerate(trained):  # rows[1:] are rounds 0, 1, …
        out = run_dir / f"round_{k}" / "paired_grid.png"
        if not out.exists():
            write_paired_grid(run_dir / "reference_eval" / SAMPLES_FILE, run_dir / f"round_{k}" / SAMPLES_FILE, out)
    print(text)
