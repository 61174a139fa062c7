"""Model stages of the Ray Data pipeline: callable classes usable with ``Dataset.map_batches`` alone.

Each loads its model once per actor and runs on an ``ActorPoolStrategy`` pool (light, model-free stages
live in ``pairing.py``). Batches are dicts of numpy arrays (Ray Data's default format); images travel
as float32 (N, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..rewards import build_reward
from ..sampling import SamplerConfig, sample
from .perturb import PERTURBATIONS, LLMRewriter, perturb
from .preview import preview_png

Batch = dict[str, np.ndarray]


def samples_per_row(batch: Batch) -> int:
    """K when each row carries K samples (a ``seed`` column of shape (rows, K), :func:`pairing.sample_seeds`), else 0:
    one sample per row."""
    seeds = np.asarray(batch.get("seed", ()))
    return seeds.shape[1] if seeds.ndim == 2 else 0


# --------------------------------------------------------------------------------- perturbation
class PerturbPrompts:
    """Adds ``perturbed_prompt`` (c⁻). With ``method="llm"`` it holds the LLM, so run it on an actor pool."""

    def __init__(self, method: str, seed: int, llm_path: str = "", llm_task: str = "alignment"):
        if method not in PERTURBATIONS:
            raise ValueError(f"perturb.method={method!r}: expected one of {PERTURBATIONS}")
        self.method, self.seed = method, seed
        self.rewriter = LLMRewriter(llm_path, llm_task) if method == "llm" else None

    def __call__(self, batch: Batch) -> Batch:
        batch["perturbed_prompt"] = np.array(
            perturb(list(batch["prompt"]), batch["prompt_id"].tolist(), self.method, self.seed, self.rewriter), dtype=object
        )
        return batch


# --------------------------------------------------------------------------------- sampling
class GenerateImages:
    """Samples images with a backbone loaded once per actor.

    ``columns`` maps an output suffix to the prompt column to condition on, e.g. ``{"": "prompt"}`` for
    rollouts or ``{"_w": "prompt", "_l": "perturbed_prompt"}`` for paired DDSPO data (same seed for both).
    A row whose ``seed`` holds K seeds (on-policy rollouts, :func:`pairing.sample_seeds`) gets K samples, and its
    outputs a leading K axis.
    """

    def __init__(self, model: str, sampler: dict, columns: dict[str, str], *, use_reference: bool = False,
                 torch_threads: int = 0, write_png: bool = True, weights: str = "", lora_rank: int = 0):
        from ..backbones import load_backbone  # here, not at the top: the scoring actors import this module too

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(model, device=device, weights=weights, lora_rank=lora_rank)
        self.sampler = SamplerConfig(**sampler)
        self.columns, self.use_reference, self.write_png = columns, use_reference, write_png

    def __call__(self, batch: Batch) -> Batch:
        seeds, per_row = np.asarray(batch["seed"]), samples_per_row(batch)
        for suffix, prompt_column in self.columns.items():
            prompts = [str(p) for p in batch[prompt_column] for _ in range(per_row or 1)]
            out = sample(self.backbone, prompts, seeds.reshape(-1).tolist(), self.sampler, reference=self.use_reference)
            images = out.images.numpy().astype(np.float32)
            # an image's PNG, or a video's frame strip (pipeline/data/preview.py)
            png = np.empty(len(images), dtype=object)
            png[:] = [preview_png(im) if self.write_png else b"" for im in images]
            columns = {"image": images, "latent": out.latents.numpy().astype(np.float32),
                       "log_prob": out.log_probs.sum(1).numpy().astype(np.float64), "png": png}
            for name, values in columns.items():
                batch[f"{name}{suffix}"] = values.reshape(len(seeds), per_row, *values.shape[1:]) if per_row else values
        return batch


# --------------------------------------------------------------------------------- scoring
class ScoreImages:
    """Adds ``reward{suffix}`` for each image column with a reward model (or mixture) loaded once per actor; rows of
    K samples (a ``seed`` of K seeds) get K rewards. The images are dropped once scored: nothing after this stage
    reads them, and they are the largest column."""

    def __init__(self, reward: Any, suffixes: tuple[str, ...] = ("",)):
        self.reward, self.suffixes = build_reward(reward), suffixes

    def __call__(self, batch: Batch) -> Batch:
        per_row = samples_per_row(batch)
        prompts = [str(p) for p in batch["prompt"] for _ in range(per_row or 1)]
        for suffix in self.suffixes:
            images = np.ascontiguousarray(batch.pop(f"image{suffix}"))
            flat = torch.from_numpy(images.reshape(len(prompts), *images.shape[2 if per_row else 1:]))
            rewards = self.reward(flat, prompts).numpy().astype(np.float64)
            batch[f"reward{suffix}"] = rewards.reshape(-1, per_row) if per_row else rewards
        return batch


