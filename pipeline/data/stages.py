"""Ray Data stages: each is a plain function or a callable class usable with ``Dataset.map_batches`` alone.

Model stages (:class:`GenerateImages`, :class:`ScoreImages`, :class:`PerturbPrompts` with an LLM) load
their model once per actor and run on an ``ActorPoolStrategy`` pool; pure stages are functions. Batches
are dicts of numpy arrays (Ray Data's default format); images travel as float32 (N, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ..backbones import load_backbone
from ..objectives import derangement
from ..rewards import build_reward
from ..sampling import SamplerConfig, sample
from .perturb import PERTURBATIONS, LLMRewriter, perturb
from .schema import PAIR_SCHEMA, SCHEMA_VERSION, make_pair_id

Batch = dict[str, np.ndarray]


def _png(image: np.ndarray) -> bytes:
    arr = np.clip((image.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def derive_seed(base: int, *parts: int) -> int:
    """A 31-bit seed that is a pure function of its parts (stable across processes and reruns)."""
    return int(np.random.default_rng([int(base), *map(int, parts)]).integers(2**31 - 1))


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
def expand_samples(row: dict[str, Any], *, samples_per_prompt: int, seed: int, round_: int) -> list[dict[str, Any]]:
    """K rollout rows per prompt, each with its own seed (flat_map)."""
    return [{**row, "sample_idx": k, "seed": derive_seed(seed, round_, row["prompt_id"], k)}
            for k in range(samples_per_prompt)]


class GenerateImages:
    """Samples images with a backbone loaded once per actor.

    ``columns`` maps an output suffix to the prompt column to condition on, e.g. ``{"": "prompt"}`` for
    rollouts or ``{"_w": "prompt", "_l": "perturbed_prompt"}`` for paired DDSPO data (same seed for both).
    """

    def __init__(self, model: str, sampler: dict, columns: dict[str, str], *, use_reference: bool = False,
                 torch_threads: int = 0, write_png: bool = True, lora_path: str = ""):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(model, device=device)
        if lora_path:
            self.backbone.denoiser.load_lora_adapter(lora_path, local_files_only=True)
        self.sampler = SamplerConfig(**sampler)
        self.columns, self.use_reference, self.write_png = columns, use_reference, write_png

    def __call__(self, batch: Batch) -> Batch:
        seeds = batch["seed"].tolist()
        for suffix, prompt_column in self.columns.items():
            out = sample(self.backbone, list(batch[prompt_column]), seeds, self.sampler, reference=self.use_reference)
            images = out.images.numpy().astype(np.float32)
            batch[f"image{suffix}"] = images
            batch[f"latent{suffix}"] = out.latents.numpy().astype(np.float32)
            batch[f"log_prob{suffix}"] = out.log_probs.sum(1).numpy().astype(np.float64)
            batch[f"png{suffix}"] = np.array([_png(im) if self.write_png else b"" for im in images], dtype=object)
        return batch


# --------------------------------------------------------------------------------- scoring
class ScoreImages:
    """Adds ``reward{suffix}`` for each image column with a reward model (or mixture) loaded once per actor."""

    def __init__(self, reward: Any, suffixes: tuple[str, ...] = ("",)):
        self.reward, self.suffixes = build_reward(reward), suffixes

    def __call__(self, batch: Batch) -> Batch:
        for suffix in self.suffixes:
            images = torch.from_numpy(np.ascontiguousarray(batch[f"image{suffix}"]))
            batch[f"reward{suffix}"] = self.reward(images, list(batch["prompt"])).numpy().astype(np.float64)
        return batch


# --------------------------------------------------------------------------------- pairing
def _pair_row(*, strategy: str, round_: int, policy_version: str, prompt: str, perturbed: str, seed_w: int,
              seed_l: int, reward_w: float, reward_l: float, stats: tuple[float, float, int], latent_w: np.ndarray,
              latent_l: np.ndarray, png_w: bytes, png_l: bytes) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "pair_id": make_pair_id(strategy, round_, policy_version, prompt, perturbed, seed_w, seed_l),
        "prompt": prompt, "perturbed_prompt": perturbed, "strategy": strategy, "round": round_,
        "policy_version": policy_version, "seed_w": int(seed_w), "seed_l": int(seed_l),
        "reward_w": float(reward_w), "reward_l": float(reward_l),
        "prompt_reward_mean": float(stats[0]), "prompt_reward_std": float(stats[1]), "prompt_num_samples": int(stats[2]),
        "latent_shape": list(latent_w.shape), "latent_w": latent_w.reshape(-1), "latent_l": latent_l.reshape(-1),
        "png_w": png_w, "png_l": png_l,
    }


def _rows_to_table(rows: list[dict[str, Any]]):
    """Pair rows → an Arrow table in the pair schema (latents as list<float32> built without Python lists)."""
    if not rows:
        return PAIR_SCHEMA.empty_table()
    columns = {}
    for field in PAIR_SCHEMA:
        values = [r[field.name] for r in rows]
        if field.name in ("latent_w", "latent_l"):
            flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in values])
            offsets = np.cumsum([0] + [int(np.asarray(v).size) for v in values]).astype(np.int32)
            columns[field.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=PAIR_SCHEMA)


def pairs_from_rollouts(group: Batch, *, pairing: str, min_gap: float, round_: int, policy_version: str):
    """All K scored samples of one prompt → pairs (map_groups on ``prompt_id``).

    ``best-worst``: one pair, the highest against the lowest reward; ``all``: every ordered pair whose gap
    exceeds ``min_gap``. Ties (gap ≤ ``min_gap``) are dropped: a tie carries no preference.
    """
    order = np.argsort(group["sample_idx"])
    rewards = group["reward"][order]
    stats = (float(rewards.mean()), float(rewards.std()), int(len(rewards)))
    if pairing == "best-worst":
        candidates = [(int(np.argmax(rewards)), int(np.argmin(rewards)))]
    elif pairing == "all":
        candidates = [(i, j) for i in range(len(rewards)) for j in range(len(rewards)) if rewards[i] > rewards[j]]
    else:
        raise ValueError(f"pairing={pairing!r}: expected 'best-worst' or 'all'")
    rows = []
    for i, j in candidates:
        if rewards[i] - rewards[j] <= min_gap:
            continue
        a, b = order[i], order[j]
        rows.append(_pair_row(
            strategy="onpolicy", round_=round_, policy_version=policy_version, prompt=str(group["prompt"][a]),
            perturbed="", seed_w=group["seed"][a], seed_l=group["seed"][b], reward_w=rewards[i], reward_l=rewards[j],
            stats=stats, latent_w=group["latent"][a], latent_l=group["latent"][b],
            png_w=group["png"][a], png_l=group["png"][b]))
    return _rows_to_table(rows)


def pairs_from_ddspo(batch: Batch, *, round_: int, policy_version: str):
    """Paired DDSPO: winner rendered from c, loser from c⁻ with the same seed (label-free)."""
    nan = float("nan")
    rows = [_pair_row(strategy="ddspo-paired", round_=round_, policy_version=policy_version,
                      prompt=str(batch["prompt"][i]), perturbed=str(batch["perturbed_prompt"][i]),
                      seed_w=batch["seed"][i], seed_l=batch["seed"][i],
                      reward_w=batch["reward_w"][i] if "reward_w" in batch else nan,
                      reward_l=batch["reward_l"][i] if "reward_l" in batch else nan, stats=(nan, nan, 0),
                      latent_w=batch["latent_w"][i], latent_l=batch["latent_l"][i],
                      png_w=batch["png_w"][i], png_l=batch["png_l"][i])
            for i in range(len(batch["prompt"]))]
    return _rows_to_table(rows)


def pairs_borrowing_losers(group: Batch, *, strategy: str, seed: int, round_: int, policy_version: str):
    """Efficient DDSPO without negative images, within one group of prompts (map_groups on ``group``).

    The loser image is the winner image of another prompt of the group (a derangement seeded by the
    group, so reruns match); c⁻ is that prompt (``rand-positive``) or this prompt perturbed (``not-paired``).
    """
    order = np.argsort(group["prompt_id"])
    n = len(order)
    if n < 2:
        return _rows_to_table([])
    perm = derangement(n, generator=torch.Generator().manual_seed(derive_seed(seed, round_, int(group["group"][0]))))
    nan = float("nan")
    rows = []
    for i in range(n):
        a, b = order[i], order[int(perm[i])]
        perturbed = str(group["prompt"][b]) if strategy == "rand-positive" else str(group["perturbed_prompt"][a])
        rows.append(_pair_row(strategy=strategy, round_=round_, policy_version=policy_version,
                              prompt=str(group["prompt"][a]), perturbed=perturbed, seed_w=group["seed"][a],
                              seed_l=group["seed"][b], reward_w=nan, reward_l=nan, stats=(nan, nan, 0),
                              latent_w=group["latent"][a], latent_l=group["latent"][b],
                              png_w=group["png"][a], png_l=group["png"][b]))
    return _rows_to_table(rows)
