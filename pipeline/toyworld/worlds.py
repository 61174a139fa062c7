"""The toy worlds behind one registry: everything generic code (prompt sources, evaluation, the rounds job) knows
about a world, so that it reaches the toy worlds only through here.

A world is a name with

* **prompt splits** — ``train`` (every training prompt) = ``fit`` + ``val`` (checkpoint selection), ``heldout``
  (evaluation only: combinations never trained on), ``all`` — the prompt sources ``<world>:<split>`` that
  :func:`pipeline.data.prompts.load_prompts` reads (``toy:heldout``, ``toy_video:train``, …);
* a **verifiable scorer** — :meth:`World.score` judges samples against their prompts in each of the world's
  ``dimensions``, with ``overall`` = all of them right (the world's gold metric) and the ``reward`` it trains on;
* the **reward** name its scorer is registered under (:mod:`pipeline.rewards`): a rounds config whose reward is
  that name evaluates with the world's scorer, per dimension;
* its **reference model** folder, which a config may name as ``<world>:reference`` (:func:`resolve_model`).

The worlds:

* ``toy`` — images (N, 3, H, W) in [-1, 1]; colour, shape, count, position; reward ``toy``; reference
  ``pipeline/toyworld/reference_model``;
* ``toy_video`` — videos (N, 3, F, H, W) in [-1, 1]; colour, shape, count, motion, consistency; reward
  ``toy_video``; reference ``pipeline/toyworld/video/reference_model``.

The worlds' own modules are imported on first use (the video reference's module imports diffusers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

#: a world's prompt splits → the function of its grammar module that lists them
SPLITS: dict[str, str] = {"train": "train_specs", "fit": "fit_specs", "val": "validation_specs",
                          "heldout": "heldout_specs", "all": "all_specs"}
#: ``<world>:reference`` names the world's reference model folder
REFERENCE = "reference"


@dataclass(frozen=True)
class WorldScores:
    """A batch judged by a world's scorer: one boolean array per dimension, all of them, and the reward."""

    dimensions: dict[str, np.ndarray]
    overall: np.ndarray
    reward: np.ndarray


@dataclass(frozen=True)
class World:
    name: str
    package: str  # the world's package: its split functions, ``as_spec``, ``score``
    dimensions_attr: str  # the package's tuple of judged dimensions
    dimension_word: str  # "attributes" / "dimensions", for labels
    overall_label: str  # what ``overall`` means, for legends
    reward: str  # the RewardModel name of its verifiable reward
    reference_attr: str  # "module:ATTRIBUTE" of its reference model folder
    video: bool
    strata: tuple[str, ...]  # spec fields whose combination is what the held-out split holds out (grid subsets)
    #: how ``limit`` prompts are taken from a split: "first" (the image world: its published results used the
    #: first N) or "spread" (evenly spaced, so that N prompts cover the grammar rather than its first colour)
    limit_order: str = "first"

    @property
    def module(self):
        return importlib.import_module(self.package)

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, self.dimensions_attr))

    @property
    def reference_dir(self) -> Path:
        module, attr = self.reference_attr.split(":")
        return Path(getattr(importlib.import_module(module), attr))

    def source(self, split: str) -> str:
        return f"{self.name}:{split}"

    def specs(self, split: str) -> tuple:
        if split not in SPLITS:
            raise ValueError(f"{self.name}: unknown prompt split {split!r}; expected one of {sorted(SPLITS)}")
        return tuple(getattr(self.module, SPLITS[split])())

    def prompts(self, split: str, limit: int = 0) -> list[str]:
        """The split's prompts; ``limit`` > 0 keeps that many (see ``limit_order``), in split order."""
        texts = [s.text for s in self.specs(split)]
        if not limit or limit >= len(texts):
            return texts
        if self.limit_order == "first":
            return texts[:limit]
        keep = np.unique(np.floor(np.arange(limit) * len(texts) / limit).astype(int))
        return [texts[i] for i in keep]

    def as_spec(self, prompt: Any):
        """The structured spec of a prompt of this world (raises ValueError for any other prompt)."""
        return self.module.as_spec(prompt)

    def score(self, samples: Any, prompts: Sequence[Any]) -> WorldScores:
        """Judge each sample against its prompt (text or spec)."""
        res = self.module.score(samples, list(prompts))
        return WorldScores(dimensions={d: np.asarray(getattr(res, d), dtype=bool) for d in self.dimensions},
                           overall=np.asarray(res.overall, dtype=bool), reward=np.asarray(res.reward, dtype=float))


WORLDS: dict[str, World] = {
    "toy": World(name="toy", package="pipeline.toyworld", dimensions_attr="ATTRIBUTES", dimension_word="attributes",
                 overall_label="every attribute right (GenEval-strict)", reward="toy",
                 reference_attr="pipeline.toyworld.reference:REFERENCE_DIR", video=False, strata=("colour", "shape")),
    "toy_video": World(name="toy_video", package="pipeline.toyworld.video", dimensions_attr="DIMENSIONS",
                       dimension_word="dimensions",
                       overall_label="every dimension right (colour, shape, count, motion and temporal consistency)",
                       reward="toy_video", reference_attr="pipeline.toyworld.video.reference:VIDEO_REFERENCE_DIR",
                       video=True, strata=("colour", "shape"), limit_order="spread"),
}


def world_names() -> list[str]:
    return list(WORLDS)


def get_world(name: "str | World") -> World:
    if isinstance(name, World):
        return name
    if name not in WORLDS:
        raise KeyError(f"unknown world {name!r}; known worlds: {', '.join(WORLDS)}")
    return WORLDS[name]


def prompt_sources() -> list[str]:
    """Every ``<world>:<split>`` prompt source."""
    return [w.source(s) for w in WORLDS.values() for s in SPLITS]


def parse_source(source: str) -> tuple[World, str] | None:
    """``"toy_video:heldout"`` → (the toy video world, ``"heldout"``); None when ``source`` names no world."""
    name, sep, split = str(source).partition(":")
    if not sep or name not in WORLDS:
        return None
    if split not in SPLITS:
        raise ValueError(f"prompt source {source!r}: world {name!r} has the splits {', '.join(SPLITS)}")
    return WORLDS[name], split


def resolve_model(model: str) -> str:
    """``"<world>:reference"`` → the world's reference model folder (absolute); anything else unchanged."""
    name, sep, rest = str(model).partition(":")
    if sep and rest == REFERENCE and name in WORLDS:
        return str(WORLDS[name].reference_dir)
    return model


def world_of_reward(spec: Any) -> World | None:
    """The world whose verifiable reward ``spec`` is (a single spec naming it, without mixture keys), else None:
    such a reward is evaluated with the world's scorer, per dimension."""
    if not isinstance(spec, Mapping) or any(k in spec for k in ("weight", "mean", "std", "components")):
        return None
    name = str(spec.get("name", "")).strip().lower().replace("-", "_")
    name = {"toyworld": "toy"}.get(name, name)  # the reward registry's alias
    return next((w for w in WORLDS.values() if w.reward == name), None)


def world_of_dimensions(names) -> World | None:
    """The world whose scorer judges exactly these dimensions (an eval.json's ``attributes`` keys), else None."""
    names = set(names)
    return next((w for w in WORLDS.values() if names and set(w.dimensions) == names), None)


def world_of_prompts(prompts: Sequence[Any]) -> World | None:
    """The world whose grammar parses every prompt (text or spec), else None."""
    for world in WORLDS.values():
        try:
            for p in prompts:
                world.as_spec(p)
        except (ValueError, TypeError, AttributeError):
            continue
        return world
    return None
