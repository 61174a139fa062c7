"""Evaluation: sample held-out prompts with fixed seeds and score them — with the toy world's verifiable
reward (reward, all-four-attributes rate and each attribute) or with any reward model (``reward=``).

Images of one prompt are correlated, so confidence intervals come from a bootstrap over *prompts*
(resample prompts with replacement, recompute the mean), not over images. Seeds are a fixed function of
(prompt index, sample index), so two models evaluated on the same prompts see the same initial noise —
paired comparisons (win rate against the reference) are then meaningful.

Every evaluation also reports reward-free drift statistics of its images (:mod:`.drift`: background
brightness, colour entropy, seed diversity), the raw material for spotting a policy that games the reward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones.base import Backbone
from .drift import LABELS as DRIFT_LABELS, drift_statistics
from .reporting import fmt_ci
from .rewards.base import RewardModel
from .sampling import SamplerConfig, SampleOutput, sample
from .stats import mean_ci
from .toyworld import ATTRIBUTES, PromptSpec, as_spec, from_tensor, heldout_specs, score
from .utils.plots import save_labelled_grid

EVAL_SEED_BASE = 1_000_000  # disjoint from training and rollout seeds


def eval_seeds(num_prompts: int, per_prompt: int) -> list[int]:
    return [EVAL_SEED_BASE + i * per_prompt + j for i in range(num_prompts) for j in range(per_prompt)]


@dataclass
class Metric:
    mean: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, per_prompt: np.ndarray) -> "Metric":
        """Mean and bootstrap interval over prompts (rows) of per-prompt values (:func:`.stats.mean_ci`)."""
        return cls(**mean_ci(per_prompt))

    def __str__(self) -> str:
        return fmt_ci(asdict(self))


@dataclass
class EvalResult:
    num_prompts: int
    samples_per_prompt: int
    reward: Metric
    overall: Metric | None  # GenEval-strict: all four attributes right (toy world only)
    attributes: dict[str, Metric]  # per attribute (toy world only)
    best_of_k_reward: Metric  # mean over prompts of the best sample's reward
    best_of_k_overall: Metric | None
    rewards: np.ndarray = field(repr=False)  # (prompts, samples)
    drift: dict[str, Metric] = field(default_factory=dict)  # reward-free image statistics (.drift), any reward

    def to_dict(self) -> dict:
        """The eval.json schema: every metric as ``{"mean", "ci_low", "ci_high"}`` (``drift`` a dict of them,
        absent from files written before it existed: read it as ``d.get("drift") or {}``), ``rewards`` last."""
        d = asdict(self)
        del d["rewards"]
        d["rewards"] = self.rewards.round(4).tolist()
        return d

    def table(self, name: str = "model") -> str:
        rows = [
            f"| {name} | reward | {self.reward} |",
            *([f"| {name} | overall (all 4 attributes) | {self.overall} |"] if self.overall else []),
            *(f"| {name} | {a} | {m} |" for a, m in self.attributes.items()),
            f"| {name} | best-of-{self.samples_per_prompt} reward | {self.best_of_k_reward} |",
            *([f"| {name} | best-of-{self.samples_per_prompt} overall | {self.best_of_k_overall} |"]
              if self.best_of_k_overall else []),
            *(f"| {name} | drift: {DRIFT_LABELS.get(s, s)} | {m} |" for s, m in self.drift.items()),
        ]
        return "| model | metric | mean [95% CI over prompts] |\n|---|---|---|\n" + "\n".join(rows)


def score_samples(prompts: Sequence[PromptSpec | str], out: SampleOutput, per_prompt: int,
                  reward: RewardModel | None = None) -> EvalResult:
    """Score ``per_prompt`` samples of each prompt: with the toy detector (``reward=None``: reward, overall
    and per-attribute) or with a reward model (reward only); the drift statistics either way."""
    texts = [p.text if isinstance(p, PromptSpec) else p for p in prompts for _ in range(per_prompt)]
    shape = (len(prompts), per_prompt)
    drift = {s: Metric.of(v) for s, v in drift_statistics(out.images, per_prompt).items()}
    if reward is not None:
        values = np.asarray(reward(out.images, texts), dtype=float).reshape(shape)
        return EvalResult(num_prompts=len(prompts), samples_per_prompt=per_prompt, reward=Metric.of(values),
                          overall=None, attributes={}, best_of_k_reward=Metric.of(values.max(1)),
                          best_of_k_overall=None, rewards=values, drift=drift)
    res = score(out.images, texts)
    reward_ = np.asarray(res.reward, dtype=float).reshape(shape)
    overall = np.asarray(res.overall, dtype=float).reshape(shape)
    best = reward_.argmax(1)
    return EvalResult(
        num_prompts=len(prompts), samples_per_prompt=per_prompt,
        reward=Metric.of(reward_), overall=Metric.of(overall),
        attributes={a: Metric.of(np.asarray(getattr(res, a), dtype=float).reshape(shape)) for a in ATTRIBUTES},
        best_of_k_reward=Metric.of(reward_.max(1)),
        best_of_k_overall=Metric.of(overall[np.arange(len(prompts)), best]),
        rewards=reward_, drift=drift,
    )


def stratified_indices(prompts: Sequence[PromptSpec | str], n: int) -> list[int]:
    """Indices of ``n`` of ``prompts`` (in prompt order) that cover every held-out combination: toy prompts are
    grouped by their (colour, shape) pair — the combination held out from training — and taken round-robin
    across the groups, evenly spaced inside each (so counts and positions vary too); other prompts (any that
    do not parse as toy prompts) give an evenly spaced subset."""
    total = len(prompts)
    n = min(n, total)
    if n <= 0:
        return []
    try:
        specs = [as_spec(p) for p in prompts]
    except ValueError:
        return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault((s.colour, s.shape), []).append(i)
    take = dict.fromkeys(groups, 0)
    while sum(take.values()) < n:  # round-robin: every combination first, then second picks, …
        for g, members in groups.items():
            if take[g] < len(members) and sum(take.values()) < n:
                take[g] += 1
    chosen = [m[int(round(j))] for g, m in groups.items() if take[g] for j in np.linspace(0, len(m) - 1, take[g])]
    return sorted(set(chosen))


SAMPLES_FILE = "samples.npz"


def save_samples(path: str | Path, prompts: Sequence[PromptSpec | str], images, rewards: np.ndarray,
                 samples_per_prompt: int, indices: Sequence[int], *, max_side: int = 128) -> None:
    """The images of the prompts at ``indices`` (every sample, i.e. every evaluation seed) as uint8
    ``(rows, samples, H, W, 3)`` thumbnails (at most ``max_side`` pixels a side), with their prompt indices,
    texts and rewards: what a paired reference-vs-policy grid needs (:func:`load_samples`)."""
    import io

    import torch
    import torch.nn.functional as F

    from .utils.atomic import atomic_write_bytes

    idx = list(indices)
    texts = [p.text if isinstance(p, PromptSpec) else p for p in prompts]
    sel = torch.as_tensor(np.asarray([i * samples_per_prompt + j for i in idx for j in range(samples_per_prompt)]))
    imgs = images[sel].detach().to("cpu", torch.float32)
    side = max(imgs.shape[-2:])
    if side > max_side:
        imgs = F.interpolate(imgs, scale_factor=max_side / side, mode="bilinear", antialias=True, align_corners=False)
    arr = from_tensor(imgs)
    arr = arr.reshape(len(idx), samples_per_prompt, *arr.shape[1:])
    buf = io.BytesIO()
    np.savez_compressed(buf, images=arr, prompt_index=np.asarray(idx, dtype=np.int64),
                        texts=np.asarray([texts[i] for i in idx]), rewards=np.asarray(rewards, dtype=float)[idx])
    atomic_write_bytes(path, buf.getvalue())


def load_samples(path: str | Path) -> dict:
    """``{"images", "prompt_index", "texts", "rewards"}`` as :func:`save_samples` wrote them."""
    with np.load(path, allow_pickle=False) as z:
        return {"images": z["images"], "prompt_index": z["prompt_index"].tolist(),
                "texts": [str(t) for t in z["texts"]], "rewards": z["rewards"]}


def evaluate(backbone: Backbone, prompts: Sequence[PromptSpec | str] | None = None, *, samples_per_prompt: int = 4,
             sampler: SamplerConfig = SamplerConfig(), reference: bool = False, grid_path: str | Path | None = None,
             grid_prompts: int = 12, progress: bool = True, reward: RewardModel | None = None,
             samples_path: str | Path | None = None) -> tuple[EvalResult, SampleOutput]:
    """Sample ``samples_per_prompt`` images per prompt (the toy held-out prompts by default) and score them
    (the toy detector, or ``reward``). ``grid_path``: a labelled grid of ``grid_prompts`` prompts, a
    stratified subset (:func:`stratified_indices`: every held-out combination); ``samples_path``: the same
    subset's images per (prompt, seed), for paired grids (:func:`save_samples`)."""
    prompts = list(heldout_specs() if prompts is None else prompts)
    texts = [p.text if isinstance(p, PromptSpec) else p for p in prompts]
    out = sample(backbone, [t for t in texts for _ in range(samples_per_prompt)],
                 eval_seeds(len(prompts), samples_per_prompt), sampler, reference=reference, progress=progress)
    result = score_samples(prompts, out, samples_per_prompt, reward)
    idx = stratified_indices(prompts, grid_prompts)
    if grid_path is not None and idx:
        rows = np.repeat(np.asarray(idx) * samples_per_prompt, samples_per_prompt) + np.tile(
            np.arange(samples_per_prompt), len(idx))
        images = from_tensor(out.images[rows])
        save_labelled_grid(images, [texts[i] for i in idx], samples_per_prompt, grid_path,
                           scores=result.rewards[idx])
    if samples_path is not None:
        save_samples(samples_path, prompts, out.images, result.rewards, samples_per_prompt, idx)
    return result, out


def write_paired_grid(reference_samples: str | Path, policy_samples: str | Path, path: str | Path) -> bool:
    """``paired_grid`` of two :func:`save_samples` files of the same prompts and seeds (reference vs policy,
    per-row Δ = the row's mean reward difference). Returns False (and writes nothing) when either file is
    missing or they do not hold the same prompts and seeds."""
    from .utils.plots import paired_grid

    if not (Path(reference_samples).is_file() and Path(policy_samples).is_file()):
        return False
    ref, pol = load_samples(reference_samples), load_samples(policy_samples)
    if ref["prompt_index"] != pol["prompt_index"] or ref["images"].shape != pol["images"].shape or not ref["texts"]:
        return False
    deltas = (pol["rewards"] - ref["rewards"]).mean(axis=1)
    paired_grid(ref["images"], pol["images"], ref["texts"], deltas, path, ref_scores=ref["rewards"],
                policy_scores=pol["rewards"])
    return True
