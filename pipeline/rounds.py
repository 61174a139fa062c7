"""Online preference rounds (IPO protocol, SIPO appendix F.2): roll out → score → pair → train → evaluate.

Round k samples on-policy pairs from the current policy (the reference for k = 0), trains it with Ray
Train, and evaluates the new policy on held-out prompts with the same fixed seeds as the reference, so
the per-round table can report a paired win rate. The reference is fixed, or refreshed to the
previous round's policy (``reference="refresh"``).

Run directory::

    run_dir/run_config.json          the resolved config and its fingerprint (a rerun with another config refuses)
    run_dir/reference_eval/          eval.json, grid.png, samples.npz of the starting model (computed once)
    run_dir/round_<k>/               policy.safetensors, eval.json, grid.png, samples.npz, paired_grid.png,
                                     train_metrics.json, pairs_manifest.json, _COMPLETE
    run_dir/.round_<k>.work/         the round in progress: pairs (idempotent), Ray Train storage (resumable)
    run_dir/tensorboard/round_<k>/   TensorBoard events and progress.jsonl (a point every train.log_every steps)
    run_dir/summary.md, summary.json, curves.png, reward.png
    run_dir/final_model/             diffusers-format folder of the last policy

A finished round is published by an atomic rename with a completion marker; rerunning the job skips
finished rounds and resumes an unfinished one (pairs are not regenerated, training resumes from its
last checkpoint, bit-identically).
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
from .config import sections
from .data.generate import GenerationConfig, generate
from .data.prompts import load_prompts
from .evaluation import SAMPLES_FILE, evaluate, write_paired_grid
from .rewards import build_reward
from .export import checkpoint_history, export_model, policy_from_checkpoint
from .sampling import SamplerConfig
from .toyworld.reference import REFERENCE_DIR
from .training.config import TrainConfig
from .training.trainer import run_training
from .utils.atomic import atomic_directory, atomic_write_bytes, is_complete
from .reporting import fmt_ci, fmt_num, legend, markdown_table
from .stats import describe as describe_ci, paired_delta, win_rate, win_rate_ci
from .utils.plots import plot_intervals, plot_training_curves
from .utils.run_record import guard_run_dir

POLICY_FILE = "policy.safetensors"
#: fields a rerun into the same run directory may change: run more rounds, or the same work on other resources
RESUMABLE = ("rounds", "train.num_workers", "train.use_gpu", "train.torch_threads", "train.log_every",
             "train.report_to", "train.mlflow_uri")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: the same prompts and seeds for the reference and every round (paired Δ)."""

    prompts: str = "toy:heldout"  # a .txt / .parquet file or a toy:* source
    num_prompts: int = 48  # how many of them (0 = all)
    reward: Any = None  # a reward spec; None = the generation's reward (toy: per-attribute scores too)
    samples: int = 4  # seeds per prompt
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        sections(self, sampler=SamplerConfig)
        if self.num_prompts < 0:
            raise ValueError(f"num_prompts={self.num_prompts}: expected >= 0 (0 = all)")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}: expected >= 1")


@dataclass(frozen=True)
class RoundsConfig:
    """The online rounds job's config tree: ``generation`` (→ ``sampler``), ``train`` (→ ``objective`` →
    ``safeguard``), ``eval`` (→ ``sampler``). ``model`` is the starting model for all three (their own
    ``model`` fields are set from it)."""

    model: str = str(REFERENCE_DIR)
    rounds: int = 3
    reference: Literal["fixed", "refresh"] = "fixed"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        sections(self, generation=GenerationConfig, train=TrainConfig, eval=EvalConfig)
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: expected >= 1")
        if self.reference == "refresh" and self.lora_rank:
            raise ValueError("reference='refresh' with train.lora_rank > 0: the LoRA reference is the base model "
                             "(adapters off); use reference='fixed' or full fine-tuning")
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

    def train_config(self, init: str, reference: str) -> TrainConfig:
        return replace(self.train, model=self.model, init_weights=init, reference_weights=reference)


def _eval_reward(cfg: RoundsConfig):
    """None (the toy detector, with its per-attribute scores) or a reward model."""
    spec = cfg.eval.reward if cfg.eval.reward is not None else cfg.generation.reward
    return None if isinstance(spec, dict) and spec.get("name") == "toy" else build_reward(spec)


def _evaluate_here(cfg: RoundsConfig, weights: str) -> tuple[dict, dict[str, bytes]]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(cfg.model, device=device, weights=weights, lora_rank=cfg.lora_rank if weights else 0)
    prompts = [r["prompt"] for r in load_prompts(cfg.eval.prompts, limit=cfg.eval.num_prompts)]
    with tempfile.TemporaryDirectory() as d:
        result, _ = evaluate(backbone, prompts, samples_per_prompt=cfg.eval.samples,
                             sampler=cfg.eval.sampler, grid_path=Path(d) / "grid.png",
                             samples_path=Path(d) / SAMPLES_FILE, progress=False, reward=_eval_reward(cfg))
        return result.to_dict(), {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file()}


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
    (:func:`~pipeline.utils.run_record.guard_run_dir`; only ``RESUMABLE`` fields may change)."""
    run_dir = Path(run_dir)
    guard_run_dir(run_dir, cfg, job="iterative_sipo", resumable=RESUMABLE)
    ref_dir = run_dir / "reference_eval"
    if not is_complete(ref_dir):
        with atomic_directory(ref_dir, marker=True) as tmp:
            log(f"reference · evaluate · {_eval_size(cfg)}")
            t0 = time.time()
            report = evaluate_policy(cfg, "", tmp)
            log(f"reference · evaluate · done in {time.time() - t0:.0f}s · reward {fmt_ci(report['reward'])}")
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
    manifest = generate(cfg.generation_config(k, policy), work / "pairs")
    reference = policy if cfg.reference == "refresh" else ""
    log(f"round {k}: training on {manifest['num_pairs']} pairs")
    result = run_training(cfg.train_config(policy, reference), work / "pairs" / "pairs", work / "ray", "train",
                          logdir=run_dir / "tensorboard" / f"round_{k}")
    with result.checkpoint.as_directory() as d:
        policy_from_checkpoint(d, work / POLICY_FILE)
        history = checkpoint_history(d)
    log(f"round {k} · evaluate · {_eval_size(cfg)}")
    t0 = time.time()
    with atomic_directory(run_dir / f"round_{k}", marker=True) as tmp:
        report = evaluate_policy(cfg, str(work / POLICY_FILE), tmp)
        log(f"round {k} · evaluate · done in {time.time() - t0:.0f}s · reward {fmt_ci(report['reward'])}")
        shutil.copy(work / POLICY_FILE, tmp / POLICY_FILE)
        shutil.copy(work / "pairs" / "manifest.json", tmp / "pairs_manifest.json")
        (tmp / "train_metrics.json").write_text(json.dumps({"last": result.metrics, "history": history}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _summary_row(name: str, ev: dict, ref: dict, train: dict) -> dict:
    """One row of the per-round table: the evaluation's own metrics (reward, and whatever per-attribute
    scores the reward gave — none for a plain reward model), the paired comparison with the reference, and
    the last training report."""
    last = train.get("last", {})
    policy, reference = np.asarray(ev["rewards"], dtype=np.float64), np.asarray(ref["rewards"], dtype=np.float64)
    return {
        "round": name,
        "num_prompts": ev.get("num_prompts"), "samples_per_prompt": ev.get("samples_per_prompt"),
        "reward": ev["reward"], "overall": ev.get("overall"), "attributes": dict(ev.get("attributes") or {}),
        "win_rate_vs_ref": win_rate(policy, reference), "win_rate_ci": win_rate_ci(policy, reference),
        "delta_vs_ref": paired_delta(policy, reference),
        "loss": last.get("loss"), "implicit_acc": last.get("implicit_acc"), "lambda": last.get("lambda_mean"),
        "lambda_active_frac": last.get("lambda_active_frac"),
        "iw_mean": last.get("iw_mean"), "masked_frac": last.get("masked_frac"),
        "history": train.get("history", []),
    }


def _write_summary(run_dir: Path, rows: list[dict]) -> None:
    """``summary.md`` (a header naming the model, config, evaluation and interval method; the table; a legend
    of its columns), ``summary.json``, ``reward.png``, ``curves.png`` and each round's ``paired_grid.png``."""
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
    columns = ["round", "reward [95% CI]", "Δ vs ref, paired [95% CI]", "win vs ref [95% CI]"]
    columns += ["all attributes"] * toy + attributes + [h for _, h, _ in shown]
    table_rows = []
    for i, r in enumerate(rows):
        cells = [r["round"], fmt_ci(r["reward"]),
                 "–" if i == 0 else fmt_ci(r["delta_vs_ref"], signed=True),
                 "–" if i == 0 else fmt_ci(r.get("win_rate_ci") or {"mean": r["win_rate_vs_ref"]})]
        cells += [fmt_num((r.get("overall") or {}).get("mean"))] * toy
        cells += [fmt_num(((r.get("attributes") or {}).get(a) or {}).get("mean")) for a in attributes]
        cells += [fmt_num(r.get(k)) for k, _, _ in shown]
        table_rows.append(cells)

    n_prompts, n_seeds = ref.get("num_prompts"), ref.get("samples_per_prompt")
    model = config.get("model")
    head = ["# Online rounds", ""]
    facts = []
    if model:
        facts.append(f"Model: `{model}`.")
    if record.get("fingerprint"):
        facts.append(f"Config fingerprint `{record['fingerprint']}` (`run_config.json`).")
    if n_prompts:
        facts.append(f"Held-out evaluation: {n_prompts} prompts × {n_seeds} seeds, the same seeds for the "
                     f"reference and every round.")
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
        entries["all attributes"] = "share of samples with every attribute right (GenEval-strict)"
    for a in attributes:
        entries[a] = f"share of samples with the {a} right" if toy else f"the evaluation's {a!r} score"
    entries.update({h: text for _, h, text in shown})
    table = markdown_table(columns, table_rows)
    text = "\n".join(head + [table, "", "Columns:", "", legend(entries), ""])
    atomic_write_bytes(run_dir / "summary.md", text.encode())
    atomic_write_bytes(run_dir / "summary.json", json.dumps(rows, indent=1, default=str).encode())

    rw = ref["reward"]
    plot_intervals([r["round"] for r in rows], [r["reward"]["mean"] for r in rows], [r["reward"]["ci_low"] for r in rows],
                   [r["reward"]["ci_high"] for r in rows], run_dir / "reward.png", ylabel="held-out reward",
                   band=(rw["mean"], rw["ci_low"], rw["ci_high"]), band_label="reference (95% CI)",
                   title=f"held-out reward per round (95% CI over {n_prompts or '?'} prompts)")
    histories = [r["history"] for r in trained]
    if any(h.get("loss") is not None for hist in histories for h in hist):
        plot_training_curves(histories, run_dir / "curves.png", xlabel="optimizer step (all rounds)",
                             title="training curves (a point per logged step)")
    for k, r in enumerate(trained):  # rows[1:] are rounds 0, 1, …
        out = run_dir / f"round_{k}" / "paired_grid.png"
        if not out.exists():
            write_paired_grid(run_dir / "reference_eval" / SAMPLES_FILE, run_dir / f"round_{k}" / SAMPLES_FILE, out)
    print(text)
