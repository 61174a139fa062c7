"""Evaluation on the toy world: sample prompts with fixed seeds, score with the verifiable reward.

Images of one prompt are correlated, so confidence intervals come from a bootstrap over *prompts*
(resample prompts with replacement, recompute the mean), not over images. Seeds are a fixed function of
(prompt index, sample index), so two models evaluated on the same prompts see the same initial noise —
paired comparisons (win rate against the reference) are then meaningful.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones.base import Backbone
from .sampling import SamplerConfig, SampleOutput, sample
from .toyworld import ATTRIBUTES, PromptSpec, from_tensor, heldout_specs, score
from .utils.plots import save_labelled_grid

EVAL_SEED_BASE = 1_000_000  # disjoint from training and rollout seeds


def eval_seeds(num_prompts: int, per_prompt: int) -> list[int]:
    return [EVAL_SEED_BASE + i * per_prompt + j for i in range(num_prompts) for j in range(per_prompt)]


def bootstrap_ci(per_prompt: np.ndarray, *, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-prompt values (one row per prompt, any trailing shape)."""
    rng = np.random.default_rng(seed)
    n = per_prompt.shape[0]
    means = per_prompt[rng.integers(n, size=(reps, n))].mean(axis=(1, *range(2, per_prompt.ndim + 1)))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class Metric:
    mean: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, per_prompt: np.ndarray) -> "Metric":
        return cls(float(per_prompt.mean()), *bootstrap_ci(per_prompt))

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass
class EvalResult:
    num_prompts: int
    samples_per_prompt: int
    reward: Metric
    overall: Metric  # GenEval-strict: all four attributes right
    attributes: dict[str, Metric]
    best_of_k_reward: Metric  # mean over prompts of the best sample's reward
    best_of_k_overall: Metric
    rewards: np.ndarray = field(repr=False)  # (prompts, samples)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rewards"] = self.rewards.round(4).tolist()
        return d

    def table(self, name: str = "model") -> str:
        rows = [
            f"| {name} | reward | {self.reward} |",
            f"| {name} | overall (all 4 attributes) | {self.overall} |",
            *(f"| {name} | {a} | {m} |" for a, m in self.attributes.items()),
            f"| {name} | best-of-{self.samples_per_prompt} reward | {self.best_of_k_reward} |",
            f"| {name} | best-of-{self.samples_per_prompt} overall | {self.best_of_k_overall} |",
        ]
        return "| model | metric | mean [95% CI over prompts] |\n|---|---|---|\n" + "\n".join(rows)


def score_samples(specs: Sequence[PromptSpec], out: SampleOutput, per_prompt: int) -> EvalResult:
    prompts = [s.text for s in specs for _ in range(per_prompt)]
    res = score(out.images, prompts)
    shape = (len(specs), per_prompt)
    reward = np.asarray(res.reward, dtype=float).reshape(shape)
    overall = np.asarray(res.overall, dtype=float).reshape(shape)
    best = reward.argmax(1)
    return EvalResult(
        num_prompts=len(specs), samples_per_prompt=per_prompt,
        reward=Metric.of(reward), overall=Metric.of(overall),
        attributes={a: Metric.of(np.asarray(getattr(res, a), dtype=float).reshape(shape)) for a in ATTRIBUTES},
        best_of_k_reward=Metric.of(reward.max(1)),
        best_of_k_overall=Metric.of(overall[np.arange(len(specs)), best]),
        rewards=reward,
    )


def evaluate(backbone: Backbone, specs: Sequence[PromptSpec] | None = None, *, samples_per_prompt: int = 4,
             sampler: SamplerConfig = SamplerConfig(), reference: bool = False, grid_path: str | Path | None = None,
             grid_prompts: int = 12, progress: bool = True) -> tuple[EvalResult, SampleOutput]:
    """Sample ``samples_per_prompt`` images per prompt (held-out prompts by default) and score them."""
    specs = list(heldout_specs() if specs is None else specs)
    prompts = [s.text for s in specs for _ in range(samples_per_prompt)]
    out = sample(backbone, prompts, eval_seeds(len(specs), samples_per_prompt), sampler,
                 reference=reference, progress=progress)
    result = score_samples(specs, out, samples_per_prompt)
    if grid_path is not None:
        rows = min(grid_prompts, len(specs))
        images = from_tensor(out.images[: rows * samples_per_prompt])
        save_labelled_grid(images, [s.text for s in specs[:rows]], samples_per_prompt, grid_path,
                           scores=result.rewards[:rows])
    return result, out
