"""Online preference rounds (IPO protocol, SIPO appendix F.2): roll out → score → pair → train → evaluate.

Round k samples on-policy pairs from the current policy (the reference for k = 0), trains it with Ray
Train, and evaluates the new policy on held-out prompts with the same fixed seeds as the reference, so
the per-round table can report a paired win rate. The reference is fixed, or refreshed to the
previous round's policy (``reference="refresh"``).

Run directory::

    run_dir/reference_eval/          eval.json, grid.png of the starting model (computed once)
    run_dir/round_<k>/               policy.safetensors, eval.json, grid.png, train_metrics.json, _COMPLETE
    run_dir/.round_<k>.work/         the round in progress: pairs (idempotent), Ray Train storage (resumable)
    run_dir/summary.md, summary.json, curves.png, reward.png
    run_dir/final_model/             diffusers-format folder of the last policy

A finished round is published by an atomic rename with a completion marker; rerunning the job skips
finished rounds and resumes an unfinished one (pairs are not regenerated, training resumes from its
last checkpoint).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import load_backbone
from .data.generate import GenerationConfig, generate
from .data.prompts import load_prompts
from .evaluation import Metric, evaluate
from .rewards import build_reward
from .export import checkpoint_history, export_model, policy_from_checkpoint
from .sampling import SamplerConfig
from .toyworld.reference import REFERENCE_DIR
from .training.config import TrainConfig
from .training.trainer import run_training
from .utils.atomic import atomic_directory, atomic_write_bytes, is_complete
from .utils.plots import plot_curves

POLICY_FILE = "policy.safetensors"


@dataclass
class RoundsConfig:
    model: str = str(REFERENCE_DIR)
    rounds: int = 3
    reference: str = "fixed"  # fixed | refresh
    generation: dict = field(default_factory=dict)  # GenerationConfig overrides (prompts, K, sampler, …)
    train: dict = field(default_factory=dict)  # TrainConfig overrides (objective, lr, max_steps, …)
    eval_prompt_source: str = "toy:heldout"  # held-out prompts: a .txt / .parquet file or a toy:* source
    eval_prompts: int = 48  # how many of them (0 = all)
    eval_reward: Any = None  # a reward spec; None = the generation's reward (toy: per-attribute scores too)
    eval_samples: int = 4
    eval_sampler: dict = field(default_factory=lambda: asdict(SamplerConfig()))

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: expected >= 1")
        if self.reference not in ("fixed", "refresh"):
            raise ValueError(f"reference={self.reference!r}: expected 'fixed' or 'refresh'")
        if self.reference == "refresh" and self.lora_rank:
            raise ValueError("reference='refresh' with train.lora_rank > 0: the LoRA reference is the base model "
                             "(adapters off); use reference='fixed' or full fine-tuning")
        self.generation_config(0, "")  # validate the overrides early
        self.train_config("", "")

    def generation_config(self, k: int, weights: str) -> GenerationConfig:
        base = dict(model=self.model, strategy="onpolicy", policy_version=f"round_{k - 1}" if weights else "reference")
        return GenerationConfig(**{**base, **self.generation, "round": k, "weights": weights,
                                   "lora_rank": self.lora_rank if weights else 0})

    @property
    def lora_rank(self) -> int:
        return int(self.train.get("lora_rank", 0))

    def train_config(self, init: str, reference: str) -> TrainConfig:
        return TrainConfig(**{**self.train, "model": self.model, "init_weights": init, "reference_weights": reference})


def win_rate(policy: np.ndarray, reference: np.ndarray) -> float:
    """Paired by (prompt, seed): the share of samples the policy scores higher on (ties count half)."""
    return float(((policy > reference) + 0.5 * (policy == reference)).mean())


def paired_delta(policy: np.ndarray, reference: np.ndarray) -> dict:
    """Policy minus reference reward on the same (prompt, seed) samples, with a bootstrap CI over prompts:
    pairing removes the prompt and seed variance both evaluations share, so it is far tighter than
    comparing the two unpaired intervals."""
    diff = np.asarray(policy, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return asdict(Metric.of(diff))


def _eval_reward(cfg: RoundsConfig):
    """None (the toy detector, with its per-attribute scores) or a reward model."""
    spec = cfg.eval_reward if cfg.eval_reward is not None else cfg.generation_config(0, "").reward
    return None if isinstance(spec, dict) and spec.get("name") == "toy" else build_reward(spec)


def _evaluate_here(cfg: RoundsConfig, weights: str) -> tuple[dict, bytes]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(cfg.model, device=device, weights=weights, lora_rank=cfg.lora_rank if weights else 0)
    prompts = [r["prompt"] for r in load_prompts(cfg.eval_prompt_source, limit=cfg.eval_prompts)]
    with tempfile.TemporaryDirectory() as d:
        result, _ = evaluate(backbone, prompts, samples_per_prompt=cfg.eval_samples,
                             sampler=SamplerConfig(**cfg.eval_sampler), grid_path=Path(d) / "grid.png",
                             progress=False, reward=_eval_reward(cfg))
        return result.to_dict(), (Path(d) / "grid.png").read_bytes()


def evaluate_policy(cfg: RoundsConfig, weights: str, out: Path) -> dict:
    """Evaluate in this process, or — when the cluster has GPUs and this driver has none — in a one-GPU task."""
    import ray
    import torch

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) and not torch.cuda.is_available():
        report, grid = ray.get(ray.remote(num_gpus=1)(_evaluate_here).remote(cfg, weights))
    else:
        report, grid = _evaluate_here(cfg, weights)
    atomic_write_bytes(out / "grid.png", grid)
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=1).encode())
    return report


def load_eval(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


def run_rounds(cfg: RoundsConfig, run_dir: str | Path, *, log=print) -> list[dict]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ref_dir = run_dir / "reference_eval"
    if not is_complete(ref_dir):
        with atomic_directory(ref_dir, marker=True) as tmp:
            log("evaluating the reference on held-out prompts")
            evaluate_policy(cfg, "", tmp)
    ref_eval = load_eval(ref_dir)
    rows = [_summary_row("reference", ref_eval, ref_eval, {})]
    policy = ""
    for k in range(cfg.rounds):
        final = run_dir / f"round_{k}"
        if is_complete(final):
            log(f"round {k}: complete, skipped")
        else:
            _run_round(cfg, k, policy, run_dir, log)
        policy = str(final / POLICY_FILE)
        rows.append(_summary_row(f"round {k}", load_eval(final), ref_eval,
                                 json.loads((final / "train_metrics.json").read_text())))
        _write_summary(run_dir, rows)
    export_model(cfg.model, policy, run_dir / "final_model", lora_rank=cfg.lora_rank)
    return rows


def _run_round(cfg: RoundsConfig, k: int, policy: str, run_dir: Path, log) -> None:
    work = run_dir / f".round_{k}.work"
    work.mkdir(exist_ok=True)
    log(f"round {k}: generating on-policy pairs")
    manifest = generate(cfg.generation_config(k, policy), work / "pairs")
    reference = policy if cfg.reference == "refresh" else ""
    log(f"round {k}: training on {manifest['num_pairs']} pairs")
    result = run_training(cfg.train_config(policy, reference), work / "pairs" / "pairs", work / "ray", "train",
                          logdir=run_dir / "tensorboard" / f"round_{k}")
    with result.checkpoint.as_directory() as d:
        policy_from_checkpoint(d, work / POLICY_FILE)
        history = checkpoint_history(d)
    log(f"round {k}: evaluating the policy")
    with atomic_directory(run_dir / f"round_{k}", marker=True) as tmp:
        evaluate_policy(cfg, str(work / POLICY_FILE), tmp)
        shutil.copy(work / POLICY_FILE, tmp / POLICY_FILE)
        shutil.copy(work / "pairs" / "manifest.json", tmp / "pairs_manifest.json")
        (tmp / "train_metrics.json").write_text(json.dumps({"last": result.metrics, "history": history}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _summary_row(name: str, ev: dict, ref: dict, train: dict) -> dict:
    last = train.get("last", {})
    return {
        "round": name,
        "reward": ev["reward"], "overall": ev["overall"],
        **{a: ev["attributes"].get(a, {}).get("mean") for a in ("colour", "shape", "count", "position")},
        "win_rate_vs_ref": win_rate(np.array(ev["rewards"]), np.array(ref["rewards"])),
        "delta_vs_ref": paired_delta(ev["rewards"], ref["rewards"]),
        "loss": last.get("loss"), "implicit_acc": last.get("implicit_acc"), "lambda": last.get("lambda_mean"),
        "iw_mean": last.get("iw_mean"), "masked_frac": last.get("masked_frac"),
        "history": train.get("history", []),
    }


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _write_summary(run_dir: Path, rows: list[dict]) -> None:
    head = ("| round | reward [95% CI] | Δ vs ref, paired [95% CI] | all 4 | colour | shape | count | position | win vs ref | loss | "
            "impl. acc | λ | w̄ | masked |\n|" + "---|" * 14)
    lines = [head]
    for r in rows:
        rw, dv = r["reward"], r["delta_vs_ref"]
        lines.append(f"| {r['round']} | {rw['mean']:.3f} [{rw['ci_low']:.3f}, {rw['ci_high']:.3f}] | "
                     f"{dv['mean']:+.3f} [{dv['ci_low']:+.3f}, {dv['ci_high']:+.3f}] | "
                     f"{_fmt((r['overall'] or {}).get('mean'))} | {_fmt(r['colour'])} | {_fmt(r['shape'])} | {_fmt(r['count'])} | "
                     f"{_fmt(r['position'])} | {_fmt(r['win_rate_vs_ref'])} | {_fmt(r['loss'])} | "
                     f"{_fmt(r['implicit_acc'])} | {_fmt(r['lambda'])} | {_fmt(r['iw_mean'])} | {_fmt(r['masked_frac'])} |")
    table = "\n".join(lines) + "\n"
    atomic_write_bytes(run_dir / "summary.md", table.encode())
    atomic_write_bytes(run_dir / "summary.json", json.dumps(rows, indent=1, default=str).encode())
    plot_curves({"held-out reward": (list(range(len(rows))), [r["reward"]["mean"] for r in rows])},
                run_dir / "reward.png", xlabel="round (0 = reference)", title="held-out reward per round")
    curves = {}
    offset = 0
    for r in rows[1:]:
        hist = [h for h in r["history"] if h.get("loss") is not None]
        for key in ("loss", "implicit_acc", "lambda_mean"):
            xs, ys = curves.setdefault(key, ([], []))
            xs.extend(offset + h.get("step", i) for i, h in enumerate(hist))
            ys.extend(h.get(key, float("nan")) for h in hist)
        offset += max([h.get("step", 0) for h in hist] + [0])
    if curves:
        plot_curves(curves, run_dir / "curves.png", xlabel="optimizer step (all rounds)", title="training curves")
    print(table)
