"""Build a human study from the pipeline's own outputs: two models (or run directories) sampled by the project
on the same prompts and seeds, or the two sides of a pairs dataset.

A study is a folder (``jobs/human_study.py create --out DIR``):

    study.sqlite      items, images (PNG), latents, annotators, their item order and sides, votes (store.py)
    study.json        the config, the two systems' names and sources, counts
    links.md          one link per annotator, with their group (hand them out; tokens are stored hashed only)
    admin_token.txt   the token for /admin/* and for the report (read by the owner only)

Design of the assignment (SIPO appendix E): ``groups`` groups of ``annotators_per_group``; each group annotates
every item in its own random order (one permutation per group); left/right is drawn per annotator and item.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..config import sections
from ..sampling import SamplerConfig
from .aggregate import QualityControl
from .store import (ADMIN_FILE, CONFIG_FILE, DB_FILE, LINKS_FILE, AnnotatorRecord, ItemRecord, SampleRecord,  # noqa: F401
                    StudyError, StudyStore, open_study)


@dataclass(frozen=True)
class StudyConfig:
    """What ``jobs/human_study.py create`` builds (``--set`` any field by its dotted path)."""

    name: str = "study"
    source: Literal["models", "pairs"] = "models"
    #: models source: a model folder (model_index.json) or a run directory (its final_model/ or model/)
    model_a: str = "runs/iterative_sipo"
    #: "" = the shipped toy reference model
    model_b: str = ""
    label_a: str = ""  # shown in the report only ("" = the folder's name)
    label_b: str = ""
    #: pairs source: a pairs dataset (jobs/generate_pairs.py output); A = the dataset's winner, B = its loser
    pairs: str = ""
    max_items: int = 200  # pairs source: a seeded random subset of this many pairs (0 = all)
    prompts: str = "toy:heldout"  # models source: a prompt source (pipeline/data/prompts.py)
    max_prompts: int = 0  # 0 = every prompt of the source
    seeds_per_prompt: int = 1  # the evaluation's seeds (pipeline/evaluation.py eval_seeds): same noise for A and B
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    groups: int = 3
    annotators_per_group: int = 4
    seed: int = 0  # item orders and sides
    qc: QualityControl = field(default_factory=QualityControl)

    def __post_init__(self):
        sections(self, sampler=SamplerConfig, qc=QualityControl)
        for name in ("groups", "annotators_per_group", "seeds_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.max_items < 0 or self.max_prompts < 0:
            raise ValueError("max_items and max_prompts: expected >= 0 (0 = all)")
        if self.source == "pairs" and not self.pairs:
            raise ValueError("pairs='': the pairs source needs a pairs dataset path (--set pairs=DIR)")
        if self.source == "models" and not self.model_a:
            raise ValueError("model_a='': the models source needs a model folder or run directory")


def resolve_model(path: str | Path) -> Path:
    """A model folder from a model folder or a run directory (the main job's ``final_model/``, train.py's
    ``model/``)."""
    path = Path(path)
    for candidate in (path, path / "final_model", path / "model"):
        if any((candidate / f).is_file() for f in ("model_index.json", "unet/config.json", "transformer/config.json")):
            return candidate
    raise StudyError(f"{path}: not a model folder (model_index.json, unet/ or transformer/) nor a run directory with "
                     f"final_model/ or model/ inside; run `python jobs/iterative_sipo.py` first or pass a model folder")


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes with no metadata (nothing about its origin)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def _toy_rewards(images, texts: Sequence[str]) -> list[float] | None:
    """The toy world's verifiable reward when every prompt is a toy prompt, else None (no automatic reward)."""
    from ..toyworld import as_spec, score

    try:
        for t in set(texts):
            as_spec(t)
    except ValueError:
        return None
    return [float(r) for r in score(images, list(texts)).reward]


def _sample_model(path: Path, texts: list[str], seeds: list[int], sampler: SamplerConfig, system: str) -> list[SampleRecord]:
    from ..backbones import load_backbone
    from ..sampling import sample
    from ..toyworld import from_tensor

    out = sample(load_backbone(path), texts, seeds, sampler, progress=True)
    pixels = from_tensor(out.images)
    rewards = _toy_rewards(out.images, texts) or [None] * len(texts)
    return [SampleRecord(system=system, png=png_bytes(img), latent=lat.numpy(), seed=s, reward=r)
            for img, lat, s, r in zip(pixels, out.latents, seeds, rewards)]


def items_from_models(cfg: StudyConfig, reference_dir: Path) -> tuple[list[ItemRecord], dict]:
    """Sample both models on the same prompts and seeds; one item per (prompt, seed)."""
    from ..data.prompts import load_prompts
    from ..evaluation import eval_seeds

    path_a = resolve_model(cfg.model_a)
    path_b = resolve_model(cfg.model_b) if cfg.model_b else reference_dir
    prompts = [r["prompt"] for r in load_prompts(cfg.prompts, limit=cfg.max_prompts)]
    k = cfg.seeds_per_prompt
    texts = [p for p in prompts for _ in range(k)]
    seeds = eval_seeds(len(prompts), k)
    a = _sample_model(path_a, texts, seeds, cfg.sampler, "A")
    b = _sample_model(path_b, texts, seeds, cfg.sampler, "B")
    items = [ItemRecord(prompt=t, prompt_index=i // k, a=sa, b=sb) for i, (t, sa, sb) in enumerate(zip(texts, a, b))]
    systems = {"A": {"name": cfg.label_a or _label(path_a), "source": str(path_a.resolve())},
               "B": {"name": cfg.label_b or _label(path_b), "source": str(path_b.resolve())}}
    return items, systems


def _label(path: Path) -> str:
    return path.parent.name if path.name in ("final_model", "model") else path.name


def items_from_pairs(cfg: StudyConfig) -> tuple[list[ItemRecord], dict]:
    """One item per pair (a seeded subset of ``max_items``): A = the dataset's winner, B = its loser."""
    from ..data.schema import latents_of, read_pairs

    table = read_pairs(cfg.pairs)
    n = table.num_rows
    keep = np.arange(n)
    if cfg.max_items and n > cfg.max_items:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.max_items, replace=False))
    table = table.take(keep)
    rows = table.select(["pair_id", "prompt", "seed_w", "seed_l", "reward_w", "reward_l", "png_w", "png_l"]).to_pylist()
    lat_w, lat_l = latents_of(table, "latent_w"), latents_of(table, "latent_l")
    prompt_index = {p: i for i, p in enumerate(dict.fromkeys(r["prompt"] for r in rows))}
    items = []
    for r, lw, ll in zip(rows, lat_w, lat_l):
        if not r["png_w"] or not r["png_l"]:
            raise StudyError(f"{cfg.pairs}: pair {r['pair_id']} has no PNG images (the dataset was written without "
                             f"them); a study shows images to people: regenerate it with PNGs on")

        def rec(system, png, lat, seed, reward):
            return SampleRecord(system=system, png=png, latent=lat, seed=seed,
                                reward=None if reward is None or np.isnan(reward) else reward)

        items.append(ItemRecord(prompt=r["prompt"], prompt_index=prompt_index[r["prompt"]],
                                a=rec("A", r["png_w"], lw, r["seed_w"], r["reward_w"]),
                                b=rec("B", r["png_l"], ll, r["seed_l"], r["reward_l"])))
    systems = {"A": {"name": cfg.label_a or "dataset winner", "source": str(Path(cfg.pairs).resolve())},
               "B": {"name": cfg.label_b or "dataset loser", "source": str(Path(cfg.pairs).resolve())}}
    return items, systems


def assign(num_items: int, groups: int, per_group: int, seed: int) -> list[AnnotatorRecord]:
    """Annotators ``g<group>-a<k>`` with fresh tokens: one item order per group, sides per annotator and item."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        order = rng.permutation(num_items).tolist()
        for k in range(per_group):
            out.append(AnnotatorRecord(name=f"g{g + 1}-a{k + 1}", group_index=g, token=secrets.token_urlsafe(16),
                                       order=order, a_on_left=(rng.random(num_items) < 0.5).tolist()))
    return out


def links_markdown(annotators: Sequence[AnnotatorRecord], base_url: str) -> str:
    from ..reporting import markdown_table

    rows = [(a.name, a.group_index + 1, f"{base_url}/annotate/{a.token}") for a in annotators]
    return ("# Annotator links\n\nOne link per person; a link is that person's identity (their votes, their order). "
            "The server's address is an example: use the one `serve` prints.\n\n"
            + markdown_table(["annotator", "group", "link"], rows) + "\n")


def create_study(cfg: StudyConfig, out: str | Path, *, reference_dir: Path | None = None,
                 base_url: str = "http://127.0.0.1:8000") -> dict:
    """Sample (or read) the items, assign annotators and write the study folder. ``out`` must not exist or be
    empty: a study folder is never replaced (it may hold votes)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; a study is never overwritten (it may hold "
                              f"votes): choose another --out")
    if reference_dir is None:
        from ..toyworld.reference import REFERENCE_DIR as reference_dir
    items, systems = items_from_pairs(cfg) if cfg.source == "pairs" else items_from_models(cfg, Path(reference_dir))
    if not items:
        raise StudyError("the study has no items (no prompts or no pairs)")
    annotators = assign(len(items), cfg.groups, cfg.annotators_per_group, cfg.seed)
    admin = secrets.token_urlsafe(24)
    from ..config import to_dict

    meta = {"name": cfg.name, "config": to_dict(cfg), "systems": systems, "groups": cfg.groups,
            "annotators_per_group": cfg.annotators_per_group, "num_items": len(items),
            "num_prompts": len({i.prompt_index for i in items})}
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        StudyStore.create(tmp / DB_FILE, meta=meta, items=items, annotators=annotators, admin_token=admin)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        (tmp / LINKS_FILE).write_text(links_markdown(annotators, base_url))
        fd = os.open(tmp / ADMIN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(admin + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
