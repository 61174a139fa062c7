"""Human labels back into training: the study's final labels (two-stage majority, quality control applied) as a
pairs dataset in the project's Parquet schema, which ``jobs/train.py --pairs`` and the engine read as they read
generated pairs.

Each item with a decisive final label becomes one pair: the preferred system's sample is the winner. Ties are
dropped: the objectives here (pipeline/objectives) take hard preferences only, none a soft ½ label, so a tie has
nothing to teach them; the manifest counts what was dropped. ``strategy`` is ``"human"``; the automatic rewards of
the two samples are kept when the study had them (NaN otherwise), so a dataset shows how often people and the
reward disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..data.pairing import pair_row, rows_to_table
from ..data.schema import MANIFEST, folder_checksums, make_pair_id, read_pairs
from ..utils.atomic import atomic_directory
from .store import StudyError, StudyStore

PARQUET_DIR = "pairs"


def label_rows(store: StudyStore, final_labels: dict[str, str], *, study: str) -> tuple[list[dict], dict]:
    """Pair rows for the decisive labels, and counts of what was kept and dropped."""
    rows, counts = [], {"A": 0, "B": 0, "tie": 0, "unlabelled": 0}
    for item in store.items():
        label = final_labels.get(item["item_key"])
        if label not in ("A", "B"):
            counts["tie" if label == "tie" else "unlabelled"] += 1
            continue
        counts[label] += 1
        w, l = (store.sample(item["item_id"], s) for s in ((label, "B" if label == "A" else "A")))
        if w["latent"] is None or l["latent"] is None:
            raise StudyError(f"item {item['item_key']} has no latents (the study's source had none); "
                             f"a pairs dataset for training needs them")
        nan = float("nan")
        rows.append(pair_row(
            strategy="human", round_=0, policy_version=study, prompt=item["prompt"], perturbed="",
            seed_w=w["seed"] if w["seed"] is not None else -1, seed_l=l["seed"] if l["seed"] is not None else -1,
            reward_w=nan if w["reward"] is None else w["reward"], reward_l=nan if l["reward"] is None else l["reward"],
            stats=(nan, nan, 2), latent_w=w["latent"], latent_l=l["latent"], png_w=w["png"], png_l=l["png"]))
        rows[-1]["pair_id"] = make_pair_id("human", study, item["item_key"])  # one pair per item
    return rows, counts


def export_pairs(store: StudyStore, result: dict, out: str | Path) -> dict:
    """Write ``out/pairs/*.parquet`` + ``out/manifest.json`` atomically; returns the manifest. ``result`` is
    :func:`.aggregate.aggregate`'s output. ``out`` must be absent, empty or an earlier export (replaced)."""
    meta = store.meta()
    rows, counts = label_rows(store, result["final_labels"], study=meta["name"])
    if not rows:
        raise StudyError(f"{store.path}: no item has a decisive label yet ({counts}); nothing to export")
    table = rows_to_table(rows).sort_by("pair_id")
    with atomic_directory(out, marker=True) as tmp:
        (tmp / PARQUET_DIR).mkdir()
        pq.write_table(table, tmp / PARQUET_DIR / "part-0.parquet")
        read_pairs(tmp / PARQUET_DIR)  # the schema's own validation, before the folder is published
        gaps = table.column("reward_w").to_numpy() - table.column("reward_l").to_numpy()
        manifest = {
            "source": "human study", "study": meta["name"], "database": str(store.path.resolve()),
            "systems": meta["systems"], "num_pairs": table.num_rows, "labels": counts,
            "ties": "dropped (no objective here takes soft labels)",
            "excluded_annotators": result.get("qc", {}).get("excluded", []),
            "reward_agreement": float(np.mean(gaps[~np.isnan(gaps)] > 0)) if (~np.isnan(gaps)).any() else None,
            "parquet_dir": PARQUET_DIR, "files": folder_checksums(tmp / PARQUET_DIR),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
