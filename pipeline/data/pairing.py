"""Light Ray Data stages: seeds, prompt perturbation without a model, and pair building.

Only numpy and pyarrow at import time: Ray imports this module in every task worker, and a worker that
had to import torch, diffusers and transformers first (~8 s) would cost more than the work itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .perturb import perturb
from .schema import PAIR_SCHEMA, SCHEMA_VERSION, make_pair_id

Batch = dict[str, np.ndarray]


def derive_seed(base: int, *parts: int) -> int:
    """A 31-bit seed that is a pure function of its parts (stable across processes and reruns)."""
    return int(np.random.default_rng([int(base), *map(int, parts)]).integers(2**31 - 1))


def add_seed_and_group(row: dict[str, Any], *, seed: int, round_: int, group_size: int) -> dict[str, Any]:
    """One seed per prompt (paired DDSPO, efficient variants) and its loser-borrowing group."""
    return {**row, "seed": derive_seed(seed, round_, row["prompt_id"]), "group": row["prompt_id"] // group_size}


def perturb_batch(batch: Batch, *, method: str, seed: int) -> Batch:
    """Adds ``perturbed_prompt`` (c⁻) with a model-free method (rand-removal, aesthetic-template)."""
    batch["perturbed_prompt"] = np.array(perturb(list(batch["prompt"]), batch["prompt_id"].tolist(), method, seed),
                                         dtype=object)
    return batch


def sample_seeds(row: dict[str, Any], *, samples_per_prompt: int, seed: int, round_: int) -> dict[str, Any]:
    """The K rollout seeds of one prompt, in one row (``seed`` of shape (K,)): a prompt's samples travel together
    through generation and scoring to :func:`pairs_from_prompts`, so no shuffle has to gather them."""
    return {**row, "seed": np.array([derive_seed(seed, round_, row["prompt_id"], k) for k in range(samples_per_prompt)],
                                    dtype=np.int64)}


# --------------------------------------------------------------------------------- pairing
def pair_row(*, strategy: str, round_: int, policy_version: str, prompt: str, perturbed: str, seed_w: int,
              seed_l: int, reward_w: float, reward_l: float, stats: tuple[float, float, int], latent_w: np.ndarray,
              latent_l: np.ndarray, png_w: bytes, png_l: bytes) -> dict[str, Any]:
    """One row of the pair schema. Latents of any rank are stored flat with their shape: (C, H, W) images or
    (C, F, H, W) videos (``validate_table`` checks the rank); winner and loser must share it."""
    if np.shape(latent_w) != np.shape(latent_l):
        raise ValueError(f"pair of {prompt!r}: winner latent {np.shape(latent_w)} and loser latent "
                         f"{np.shape(latent_l)} differ in shape")
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


def rows_to_table(rows: list[dict[str, Any]]):
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


def pairs_from_prompts(batch: Batch, *, pairing: str, min_gap: float, round_: int, policy_version: str):
    """Scored prompts → pairs (``map_batches``): each row holds one prompt's K samples (``seed``, ``reward``, ``latent``
    and ``png`` with a leading K axis), paired by :func:`pairs_from_rollouts`."""
    tables = []
    for i in range(len(batch["prompt"])):
        k = len(batch["seed"][i])
        group = {"prompt": np.full(k, batch["prompt"][i], dtype=object), "sample_idx": np.arange(k),
                 "seed": np.asarray(batch["seed"][i]), "reward": np.asarray(batch["reward"][i], dtype=np.float64),
                 "latent": np.asarray(batch["latent"][i]), "png": np.array(list(batch["png"][i]), dtype=object)}
        tables.append(pairs_from_rollouts(group, pairing=pairing, min_gap=min_gap, round_=round_,
                                          policy_version=policy_version))
    return pa.concat_tables(tables) if tables else rows_to_table([])


def pairs_from_rollouts(group: Batch, *, pairing: str, min_gap: float, round_: int, policy_version: str):
    """All K scored samples of one prompt → pairs.

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
        rows.append(pair_row(
            strategy="onpolicy", round_=round_, policy_version=policy_version, prompt=str(group["prompt"][a]),
            perturbed="", seed_w=group["seed"][a], seed_l=group["seed"][b], reward_w=rewards[i], reward_l=rewards[j],
            stats=stats, latent_w=group["latent"][a], latent_l=group["latent"][b],
            png_w=group["png"][a], png_l=group["png"][b]))
    return rows_to_table(rows)


def pairs_from_ddspo(batch: Batch, *, round_: int, policy_version: str):
    """Paired DDSPO: winner rendered from c, loser from c⁻ with the same seed (label-free)."""
    nan = float("nan")
    rows = [pair_row(strategy="ddspo-paired", round_=round_, policy_version=policy_version,
                      prompt=str(batch["prompt"][i]), perturbed=str(batch["perturbed_prompt"][i]),
                      seed_w=batch["seed"][i], seed_l=batch["seed"][i],
                      reward_w=batch["reward_w"][i] if "reward_w" in batch else nan,
                      reward_l=batch["reward_l"][i] if "reward_l" in batch else nan, stats=(nan, nan, 0),
                      latent_w=batch["latent_w"][i], latent_l=batch["latent_l"][i],
                      png_w=batch["png_w"][i], png_l=batch["png_l"][i])
            for i in range(len(batch["prompt"]))]
    return rows_to_table(rows)


def pairs_borrowing_losers(group: Batch, *, strategy: str, seed: int, round_: int, policy_version: str):
    """Efficient DDSPO without negative images, within one group of prompts (map_groups on ``group``).

    The loser image is the winner image of another prompt of the group (a derangement seeded by the
    group, so reruns match); c⁻ is that prompt (``rand-positive``) or this prompt perturbed (``not-paired``).
    """
    order = np.argsort(group["prompt_id"])
    n = len(order)
    if n < 2:
        return rows_to_table([])
    import torch  # only this strategy needs it; keeps the module light for every other task

    from ..objectives import derangement

    perm = derangement(n, generator=torch.Generator().manual_seed(derive_seed(seed, round_, int(group["group"][0]))))
    nan = float("nan")
    rows = []
    for i in range(n):
        a, b = order[i], order[int(perm[i])]
        perturbed = str(group["prompt"][b]) if strategy == "rand-positive" else str(group["perturbed_prompt"][a])
        rows.append(pair_row(strategy=strategy, round_=round_, policy_version=policy_version,
                              prompt=str(group["prompt"][a]), perturbed=perturbed, seed_w=group["seed"][a],
                              seed_l=group["seed"][b], reward_w=nan, reward_l=nan, stats=(nan, nan, 0),
                              latent_w=group["latent"][a], latent_l=group["latent"][b],
                              png_w=group["png"][a], png_l=group["png"][b]))
    return rows_to_table(rows)
