"""Evaluation: sample held-out prompts with fixed seeds and score them — with a toy world's verifiable reward
(reward, the all-dimensions-right rate and each dimension; the world registry :mod:`.toyworld.worlds`: the image
world's four attributes, the video world's colour, shape, count, motion and consistency) or with any reward
model (``reward=``). Videos ``(N, 3, F, H, W)`` are evaluated like images; their grids are frame strips.

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
from typing import Any, Sequence

import numpy as np

from .backbones.base import Backbone
from .drift import LABELS as DRIFT_LABELS, drift_statistics
from .reporting import fmt_ci
from .rewards.base import RewardModel
from .sampling import SamplerConfig, SampleOutput, sample
from .stats import mean_ci
from .toyworld.worlds import World, get_world, world_of_prompts
from .utils.plots import save_labelled_grid

PromptSpec = Any  # a toy world's structured prompt (it has ``.text``) or a plain string

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
    overall: Metric | None  # every dimension right (a toy world's gold metric; GenEval-strict for images)
    attributes: dict[str, Metric]  # per dimension (toy worlds only)
    best_of_k_reward: Metric  # mean over prompts of the best sample's reward
    best_of_k_overall: Metric | None
    rewards: np.ndarray = field(repr=False)  # (prompts, samples)
    drift: dict[str, Metric] = field(default_factory=dict)  # reward-free image statistics (.drift), any reward
    world: str | None = None  # the toy world that scored it (its registry name), None for a reward model

    def to_dict(self) -> dict:
        """The eval.json schema: every metric as ``{"mean", "ci_low", "ci_high"}`` (``drift`` a dict of them,
        absent from files written before it existed: read it as ``d.get("drift") or {}``), ``rewards`` last. The
        world is not a key of its own (the schema is pinned, tests/test_drift.py): its dimension names in
        ``attributes`` say it (:func:`.toyworld.worlds.world_of_dimensions`)."""
        d = asdict(self)
        del d["rewards"], d["world"]
        d["rewards"] = self.rewards.round(4).tolist()
        return d

    def table(self, name: str = "model") -> str:
        word = get_world(self.world or "toy").dimension_word
        rows = [
            f"| {name} | reward | {self.reward} |",
            *([f"| {name} | overall (all {len(self.attributes)} {word}) | {self.overall} |"] if self.overall else []),
            *(f"| {name} | {a} | {m} |" for a, m in self.attributes.items()),
            f"| {name} | best-of-{self.samples_per_prompt} reward | {self.best_of_k_reward} |",
            *([f"| {name} | best-of-{self.samples_per_prompt} overall | {self.best_of_k_overall} |"]
              if self.best_of_k_overall else []),
            *(f"| {name} | drift: {DRIFT_LABELS.get(s, s)} | {m} |" for s, m in self.drift.items()),
        ]
        return "| model | metric | mean [95% CI over prompts] |\n|---|---|---|\n" + "\n".join(rows)


def _text(p) -> str:
    return p if isinstance(p, str) else p.text


def _drift(samples, per_prompt: int) -> dict[str, np.ndarray]:
    """:func:`.drift.drift_statistics` of images, or of videos frame by frame: the samples of one prompt are compared
    frame f with frame f (seed diversity), and each statistic is the mean over the frames."""
    import torch

    samples = torch.as_tensor(samples)
    if samples.ndim != 5:
        return drift_statistics(samples, per_prompt)
    n, c, frames, h, w = samples.shape
    prompts = n // per_prompt
    by_frame = samples.reshape(prompts, per_prompt, c, frames, h, w).permute(0, 3, 1, 2, 4, 5)  # (P, F, S, 3, H, W)
    stats = drift_statistics(by_frame.reshape(-1, c, h, w), per_prompt)
    return {k: v.reshape(prompts, frames).mean(axis=1) for k, v in stats.items()}


def score_samples(prompts: Sequence[PromptSpec | str], out: SampleOutput, per_prompt: int,
                  reward: RewardModel | None = None, world: World | str | None = None) -> EvalResult:
    """Score ``per_prompt`` samples of each prompt: with a toy world's scorer (``reward=None``: reward, overall and
    per dimension; ``world`` names it, by default the world whose grammar parses the prompts, else the image
    world) or with a reward model (reward only); the drift statistics either way."""
    texts = [_text(p) for p in prompts for _ in range(per_prompt)]
    shape = (len(prompts), per_prompt)
    drift = {s: Metric.of(v) for s, v in _drift(out.images, per_prompt).items()}
    if reward is not None:
        values = np.asarray(reward(out.images, texts), dtype=float).reshape(shape)
        return EvalResult(num_prompts=len(prompts), samples_per_prompt=per_prompt, reward=Metric.of(values),
                          overall=None, attributes={}, best_of_k_reward=Metric.of(values.max(1)),
                          best_of_k_overall=None, rewards=values, drift=drift)
    world = get_world(world) if world is not None else (world_of_prompts(prompts) or get_world("toy"))
    res = world.score(out.images, texts)
    reward_ = np.asarray(res.reward, dtype=float).reshape(shape)
    overall = np.asarray(res.overall, dtype=float).reshape(shape)
    best = reward_.argmax(1)
    return EvalResult(
        num_prompts=len(prompts), samples_per_prompt=per_prompt,
        reward=Metric.of(reward_), overall=Metric.of(overall),
        attributes={a: Metric.of(np.asarray(v, dtype=float).reshape(shape)) for a, v in res.dimensions.items()},
        best_of_k_reward=Metric.of(reward_.max(1)),
        best_of_k_overall=Metric.of(overall[np.arange(len(prompts)), best]),
        rewards=reward_, drift=drift, world=world.name,
    )


def stratified_indices(prompts: Sequence[PromptSpec | str], n: int) -> list[int]:
    """Indices of ``n`` of ``prompts`` (in prompt order) that cover every held-out combination: a toy world's
    prompts are grouped by the combination its held-out split holds out (``World.strata``: the (colour, shape)
    pair) and taken round-robin across the groups, evenly spaced inside each (so counts, positions and motions
    vary too); other prompts (any that do not parse as one world's prompts) give an evenly spaced subset."""
    total = len(prompts)
    n = min(n, total)
    if n <= 0:
        return []
    world = world_of_prompts(prompts)
    if world is None:
        return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        spec = world.as_spec(p)
        groups.setdefault(tuple(getattr(spec, a) for a in world.strata), []).append(i)
    take = dict.fromkeys(groups, 0)
    while sum(take.values()) < n:  # round-robin: every combination first, then second picks, …
        for g, members in groups.items():
            if take[g] < len(members) and sum(take.values()) < n:
                take[g] += 1
    chosen = [m[int(round(j))] for g, m in groups.items() if take[g] for j in np.linspace(0, len(m) - 1, take[g])]
    return sorted(set(chosen))


SAMPLES_FILE = "samples.npz"


def to_uint8(samples) -> np.ndarray:
    """float ``(N, 3, H, W)`` images or ``(N, 3, F, H, W)`` videos in [-1, 1] (clamped) → uint8 ``(N, H, W, 3)`` /
    ``(N, F, H, W, 3)``."""
    import torch

    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim not in (4, 5) or samples.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images or (N, 3, F, H, W) videos, got shape {samples.shape}")
    scaled = np.round((np.clip(samples, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(scaled, 1, -1)


def save_samples(path: str | Path, prompts: Sequence[PromptSpec | str], images, rewards: np.ndarray,
                 samples_per_prompt: int, indices: Sequence[int], *, max_side: int = 128) -> None:
    """The images of the prompts at ``indices`` (every sample, i.e. every evaluation seed) as uint8
    ``(rows, samples, H, W, 3)`` thumbnails — videos ``(rows, samples, F, H, W, 3)`` — at most ``max_side`` pixels
    a side, with their prompt indices, texts and rewards: what a paired reference-vs-policy grid needs
    (:func:`load_samples`)."""
    import io

    import torch
    import torch.nn.functional as F

    from .utils.atomic import atomic_write_bytes

    idx = list(indices)
    texts = [_text(p) for p in prompts]
    sel = torch.as_tensor(np.asarray([i * samples_per_prompt + j for i in idx for j in range(samples_per_prompt)]))
    imgs = images[sel].detach().to("cpu", torch.float32)
    video = imgs.ndim == 5
    if video:  # (n, 3, F, H, W) → frames (n·F, 3, H, W) for the resize
        n, _, frames, h, w = imgs.shape
        imgs = imgs.permute(0, 2, 1, 3, 4).reshape(n * frames, 3, h, w)
    side = max(imgs.shape[-2:])
    if side > max_side:
        imgs = F.interpolate(imgs, scale_factor=max_side / side, mode="bilinear", antialias=True, align_corners=False)
    if video:
        imgs = imgs.reshape(n, frames, 3, *imgs.shape[-2:]).permute(0, 2, 1, 3, 4)
    arr = to_uint8(imgs)
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


def _clip_labels(texts: Sequence[str], per_prompt: int) -> list[str]:
    return [f"{t} | seed {j}" for t in texts for j in range(per_prompt)]


def evaluate(backbone: Backbone, prompts: Sequence[PromptSpec | str] | None = None, *, samples_per_prompt: int = 4,
             sampler: SamplerConfig = SamplerConfig(), reference: bool = False, grid_path: str | Path | None = None,
             grid_prompts: int = 12, progress: bool = True, reward: RewardModel | None = None,
             samples_path: str | Path | None = None,
             world: World | str | None = None) -> tuple[EvalResult, SampleOutput]:
    """Sample ``samples_per_prompt`` images (videos, for a video backbone) per prompt (the image world's held-out
    prompts by default) and score them (a toy world's scorer — ``world``, by default the one whose grammar the
    prompts follow — or ``reward``). ``grid_path``: a labelled grid of ``grid_prompts`` prompts, a stratified
    subset (:func:`stratified_indices`: every held-out combination) — for videos one frame strip per (prompt,
    seed); ``samples_path``: the same subset's samples per (prompt, seed), for paired grids
    (:func:`save_samples`)."""
    prompts = list(get_world("toy").specs("heldout") if prompts is None else prompts)
    texts = [_text(p) for p in prompts]
    out = sample(backbone, [t for t in texts for _ in range(samples_per_prompt)],
                 eval_seeds(len(prompts), samples_per_prompt), sampler, reference=reference, progress=progress)
    result = score_samples(prompts, out, samples_per_prompt, reward, world)
    idx = stratified_indices(prompts, grid_prompts)
    if grid_path is not None and idx:
        rows = np.repeat(np.asarray(idx) * samples_per_prompt, samples_per_prompt) + np.tile(
            np.arange(samples_per_prompt), len(idx))
        images = to_uint8(out.images[rows])
        if images.ndim == 5:  # videos: a frame strip per (prompt, seed)
            from .reporting import frame_strip_grid

            labels = [f"{lab} | {r:.2f}" for lab, r in zip(_clip_labels([texts[i] for i in idx], samples_per_prompt),
                                                             result.rewards[idx].ravel())]
            frame_strip_grid([images], labels, grid_path, titles=["frames, left to right (reward after the seed)"])
        else:
            save_labelled_grid(images, [texts[i] for i in idx], samples_per_prompt, grid_path,
                               scores=result.rewards[idx])
    if samples_path is not None:
        save_samples(samples_path, prompts, out.images, result.rewards, samples_per_prompt, idx)
    return result, out


def write_paired_grid(reference_samples: str | Path, policy_samples: str | Path, path: str | Path) -> bool:
    """``paired_grid`` of two :func:`save_samples` files of the same prompts and seeds (reference vs policy,
    per-row Δ = the row's mean reward difference); for videos a :func:`.reporting.frame_strip_grid` with one row
    per (prompt, seed): the reference's frame strip, then the policy's on the same seed, labelled with both
    rewards and their difference. Returns False (and writes nothing) when either file is missing or they do not
    hold the same prompts and seeds."""
    from .utils.plots import paired_grid

    if not (Path(reference_samples).is_file() and Path(policy_samples).is_file()):
        return False
    ref, pol = load_samples(reference_samples), load_samples(policy_samples)
    if ref["prompt_index"] != pol["prompt_index"] or ref["images"].shape != pol["images"].shape or not ref["texts"]:
        return False
    if ref["images"].ndim == 6:  # videos (rows, samples, F, H, W, 3)
        from .reporting import frame_strip_grid

        per = ref["images"].shape[1]
        labels = [f"{lab} | {r:.2f} -> {p:.2f} ({p - r:+.2f})" for lab, r, p in
                  zip(_clip_labels(ref["texts"], per), ref["rewards"].ravel(), pol["rewards"].ravel())]
        frame_strip_grid([ref["images"].reshape(-1, *ref["images"].shape[2:]),
                          pol["images"].reshape(-1, *pol["images"].shape[2:])], labels, path,
                         titles=["reference", "policy (same seed)"])
        return True
    deltas = (pol["rewards"] - ref["rewards"]).mean(axis=1)
    paired_grid(ref["images"], pol["images"], ref["texts"], deltas, path, ref_scores=ref["rewards"],
                policy_scores=pol["rewards"])
    return True
