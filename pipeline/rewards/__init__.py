"""Reward models behind one batched scorer interface, loaded only from local paths.

Every scorer is a :class:`RewardModel`: ``reward(images, prompts) -> (N,) float32`` on the CPU,
with ``images`` (N, 3, H, W) in [-1, 1] on any device. Build them from config specs::

    build_reward({"name": "pickscore", "path": "/models/PickScore_v1", "batch_size": 32})
    build_reward([{"name": "pickscore", "path": "/models/PickScore_v1", "weight": 1.0},
                  {"name": "hps", "path": "/models/HPS_v2.1_compressed.pt", "weight": 10.0}])

Known names: ``pickscore``, ``hps``, ``imagereward``, ``aesthetic``, ``clip_score``, ``toy``
(a few aliases such as ``hpsv2`` / ``image_reward`` / ``clipscore`` are accepted). See
docs/rewards.md for each model's folder layout, formula and preprocessing. Video scorers take
``(N, 3, F, H, W)``: ``frame_average`` (``{"name": "frame_average", "inner": <any image spec>}``, the
per-frame mean) and ``temporal_consistency`` (adjacent-frame CLIP similarity); see docs/rewards.md "Video".

Spec keys: ``name`` (required); ``path`` and the model's own keyword arguments (``batch_size``,
``device``, ``dtype`` and e.g. ``processor_path``, ``clip_path``, ``model_config``, ``variant``);
``weight`` (mixture weight, default 1.0; a single spec with a weight other than 1 becomes a
one-component mixture); ``mean`` / ``std`` (optional fixed standardisation
``(s - mean) / std``). A list of specs, or ``{"components": [...], "standardize": "batch"}``,
builds a :class:`WeightedMixture`. Modules are imported lazily, so ``toy`` needs neither
transformers nor open_clip.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import (CheckpointKeyError, RewardModel, RewardModelError, Standardized, WeightedMixture,
                   check_inputs)

# canonical name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "pickscore": ("pickscore", "PickScore"),
    "hps": ("hps", "HPSv2"),
    "imagereward": ("imagereward", "ImageReward"),
    "aesthetic": ("aesthetic", "AestheticScore"),
    "clip_score": ("clip_score", "CLIPScore"),
    "toy": ("toy", "ToyReward"),
    "toy_video": ("toy_video", "ToyVideoReward"),
    "frame_average": ("video", "FrameAverage"),
    "temporal_consistency": ("video", "TemporalConsistency"),
}
_ALIASES = {
    "pick_score": "pickscore", "hpsv2": "hps", "hps_v2": "hps", "hpsv2.1": "hps", "hps_v2.1": "hps",
    "image_reward": "imagereward", "laion_aesthetic": "aesthetic", "aesthetic_score": "aesthetic",
    "clipscore": "clip_score", "clip": "clip_score", "toyworld": "toy",
    "frame_avg": "frame_average", "frame_mean": "frame_average", "frames": "frame_average",
    "temporal": "temporal_consistency", "frame_consistency": "temporal_consistency",
}
_MIXTURE_KEYS = ("weight", "mean", "std")


def known_rewards() -> list[str]:
    """The canonical reward names ``build_reward`` accepts."""
    return sorted(_REGISTRY)


def _canonical(name: Any) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown reward model {name!r}; known: {known_rewards()} "
                         f"(aliases: {sorted(_ALIASES)})")
    return key


def reward_class(name: str) -> type[RewardModel]:
    """The RewardModel class registered under ``name`` (imports its module)."""
    module, cls = _REGISTRY[_canonical(name)]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def _check_one(spec: Mapping[str, Any]) -> tuple[str, dict]:
    """Name, keys and local paths of one reward spec, without loading anything."""
    if "name" not in spec:
        raise ValueError(f"reward spec needs a 'name' (one of {known_rewards()}): {dict(spec)}")
    key = _canonical(spec["name"])
    kwargs = {k: v for k, v in spec.items() if k != "name" and k not in _MIXTURE_KEYS}
    factory = reward_class(key)
    target = factory.__init__ if isinstance(factory, type) else factory
    params = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = [n for n in params if n != "self"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"reward {key!r}: unknown spec keys {unknown}; accepted: "
                             f"{['name', *allowed, *_MIXTURE_KEYS]}")
    for k, v in kwargs.items():
        if k.endswith("path") and v and not Path(str(v)).exists():
            raise FileNotFoundError(f"reward {key!r}: {k}={v} does not exist (reward models load from local paths only)")
    if "inner" in kwargs:  # a wrapper (frame_average): its inner spec is checked the same way, still loading nothing
        check_reward_spec(kwargs["inner"])
    return key, kwargs


def check_reward_spec(spec: Any) -> None:
    """Every component's name, keys and local paths — the checks :func:`build_reward` makes, without loading
    a model (jobs call it before Ray starts)."""
    if isinstance(spec, RewardModel):
        return
    if isinstance(spec, Mapping) and "components" in spec:
        for s in _as_spec_list(spec["components"]):
            _check_one(s)
    elif isinstance(spec, Mapping):
        _check_one(spec)
    elif isinstance(spec, (list, tuple)):
        for s in _as_spec_list(spec):
            _check_one(s)
    else:
        raise TypeError(f"reward spec must be a dict, a list of dicts or a RewardModel, got {type(spec).__name__}")


def _build_one(spec: Mapping[str, Any]) -> tuple[RewardModel, float]:
    key, kwargs = _check_one(spec)
    factory = reward_class(key)
    model = factory(**kwargs)
    if "mean" in spec or "std" in spec:
        model = Standardized(model, float(spec.get("mean", 0.0)), float(spec.get("std", 1.0)))
    return model, float(spec.get("weight", 1.0))


def build_reward(spec: "Mapping[str, Any] | Sequence[Mapping[str, Any]] | RewardModel") -> RewardModel:
    """Build a reward model (or a :class:`WeightedMixture`) from a config spec (see module docs)."""
    if isinstance(spec, RewardModel):
        return spec
    if isinstance(spec, Mapping):
        if "components" in spec:
            extra = sorted(set(spec) - {"components", "standardize", "eps"})
            if extra:
                raise ValueError(f"mixture spec: unknown keys {extra}; accepted: components, standardize, eps")
            comps = [_build_one(s) for s in _as_spec_list(spec["components"])]
            return WeightedMixture(comps, standardize=spec.get("standardize", False), eps=spec.get("eps", 1e-6))
        model, weight = _build_one(spec)
        return model if weight == 1.0 else WeightedMixture([(model, weight)])
    if isinstance(spec, (list, tuple)):
        return WeightedMixture([_build_one(s) for s in _as_spec_list(spec)])
    raise TypeError(f"reward spec must be a dict, a list of dicts or a RewardModel, got {type(spec).__name__}")


def _as_spec_list(specs: Any) -> list[Mapping[str, Any]]:
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError("a reward mixture needs a non-empty list of component specs")
    for s in specs:
        if not isinstance(s, Mapping):
            raise TypeError(f"each mixture component must be a dict spec, got {type(s).__name__}")
    return list(specs)


__all__ = [
    "CheckpointKeyError", "RewardModel", "RewardModelError", "Standardized", "WeightedMixture",
    "build_reward", "check_inputs", "check_reward_spec", "known_rewards", "reward_class",
]
