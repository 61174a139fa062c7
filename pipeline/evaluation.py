"""Evaluation: sample held-out prompts with fixed seeds and score them — with the toy world's verifiable
reward (reward, all-four-attributes rate and each attribute) or with any reward model (``reward=``).

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
from .rewards.base import RewardModel
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
    overall: Metric | None  # GenEval-strict: all four attributes right (toy world only)
    attributes: dict[str, Metric]  # per attribute (toy world only)
    best_of_k_reward: Metric  # mean over prompts of the best sample's reward
    best_of_k_overall: Metric | None
    rewards: np.ndarray = field(repr=False)  # (prompts, samples)

    def to_dict(self) -> dict:
        d = asdict(self)
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
        ]
        return "| model | metric | mean [95% CI over prompts] |\n|---|---|---|\n" + "\n".join(rows)


def score_samples(prompts: Sequence[PromptSpec | str], out: SampleOutput, per_prompt: int,
                  reward: RewardModel | None = None) -> EvalResult:
    """Score ``per_prompt`` samples of each prompt: with the toy detector (``reward=None``: reward, overall
    and per-attribute) or with a reward model (reward only)."""
    texts = [p.text if isinstance(p, PromptSpec) else p for p in prompts for _ in range(per_prompt)]
    shape = (len(prompts), per_prompt)
    if reward is not None:
        values = np.asarray(reward(out.images, texts), dtype=float).reshape(shape)
        return EvalResult(num_prompts=len(prompts), samples_per_prompt=per_prompt, reward=Metric.of(values),
                          overall=None, attributes={}, best_of_k_reward=Metric.of(values.max(1)),
                          best_of_k_overall=None, rewards=values)
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
        rewards=reward_,
    )


def evaluate(backbone: Backbone, prompts: Sequence[PromptSpec | str] | None = None, *, samples_per_prompt: int = 4,
             sampler: SamplerConfig = SamplerConfig(), reference: bool = False, grid_path: str | Path | None = None,
             grid_prompts: int = 12, progress: bool = True, reward: RewardModel | None = None,
             ) -> tuple[EvalResult, SampleOutput]:
    """Sample ``samples_per_prompt`` images per prompt (the toy held-out prompts by default) and score them
    (the toy detector, or ``reward``)."""
    prompts = list(heldout_specs() if prompts is None else prompts)
    texts = [p.text if isinstance(p, PromptSpec) else p for p in prompts]
    out = sample(backbone, [t for t in texts for _ in range(samples_per_prompt)],
                 eval_seeds(len(prompts), samples_per_prompt), sampler, reference=reference, progress=progress)
    result = score_samples(prompts, out, samples_per_prompt, reward)
    if grid_path is not None:
        rows = min(grid_prompts, len(prompts))
        images = from_tensor(out.images[: rows * samples_per_prompt])
        save_labelled_grid(images, texts[:rows], samples_per_prompt, grid_path, scores=result.rewards[:rows])
    return result, out
