"""The scorer interface every reward model implements, shared preprocessing, checkpoint I/O.

A reward model maps a batch of generated images and their prompts to one float per image::

    scores = reward(images, prompts)   # images (N, 3, H, W) in [-1, 1], any device -> (N,) float32 CPU

``RewardModel.__call__`` validates the inputs, cuts them into chunks of ``batch_size``, moves
each chunk to the model's device and calls the subclass's ``score_batch`` under
``torch.no_grad()``. Subclasses only implement ``score_batch`` (and list their modules in
``modules()`` so that ``to(device)`` moves them).

Preprocessing happens in torch on the model's device, so that scoring needs no PIL round trip:
:func:`to_unit` maps [-1, 1] to [0, 1]; :func:`resize_shortest_center_crop` (CLIP / BLIP) and
:func:`resize_longest_pad` (HPS) reproduce the torchvision / PIL pipelines the reward models
were trained with. Resizing uses ``torch.nn.functional.interpolate`` with ``antialias=True``,
whose bicubic kernel is PIL's (a = -0.5) when downsampling; results are clamped to [0, 1] as PIL
clamps to the uint8 range. We do not quantise to uint8, so scores differ from a PIL pipeline on
the same image by float rounding only.

:class:`WeightedMixture` combines scorers; :class:`Standardized` applies a fixed affine
normalisation ``(s - mean) / std`` to one scorer.
"""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants (also BLIP's, ImageReward's and HPS's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


class RewardModelError(ValueError):
    """A reward model's files are of the wrong kind, corrupt, or inconsistent."""


class CheckpointKeyError(RewardModelError):
    """A checkpoint's keys do not match the model: unmapped, missing or unexpected keys."""


# ----------------------------------------------------------------------------- interface


class RewardModel(ABC):
    """Batched, device-aware scorer: ``(images, prompts) -> (N,) float32 scores on CPU``.

    ``images`` are ``(N, 3, H, W)`` floats in [-1, 1] (what the diffusion backbones decode to),
    on any device; values outside [-1, 1] are clipped by the preprocessing. ``prompts`` is a
    sequence of ``N`` strings. Higher scores are better.

    ``device`` (constructor): where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, or
    ``"auto"`` = CUDA when available); ``to(device)`` moves it later. ``batch_size``: images per
    forward pass.
    """

    name: str = "reward"
    #: True for scorers of videos ``(N, 3, F, H, W)``: ``__call__`` then checks 5-D input, and ``batch_size``
    #: counts videos. Image scorers score videos through :class:`pipeline.rewards.video.FrameAverage`.
    video: bool = False

    def __init__(self, batch_size: int = 32, device: "str | torch.device | None" = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._device = torch.device("cpu")
        if isinstance(device, str) and device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._pending_device = device

    # -- to be implemented by subclasses
    @abstractmethod
    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score one chunk: ``images`` (n, 3, H, W) in [-1, 1] already on ``self.device``."""

    def modules(self) -> list[nn.Module]:
        """The torch modules that ``to(device)`` moves (none for a pure-NumPy scorer)."""
        return []

    # -- provided
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: "str | torch.device") -> "RewardModel":
        device = torch.device(device)
        for module in self.modules():
            module.to(device)
        self._device = device
        return self

    def _finish_init(self) -> None:
        """Subclasses call this at the end of ``__init__``: eval mode, then the requested device."""
        for module in self.modules():
            module.eval()
            module.requires_grad_(False)
        if self._pending_device is not None:
            self.to(self._pending_device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = check_inputs(images, prompts, video=self.video)
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                # non_blocking only host -> GPU: a GPU -> host copy could be read before it lands
                chunk = images[start:start + self.batch_size].to(
                    self.device, non_blocking=self.device.type == "cuda" and images.device.type == "cpu")
                chunk_prompts = prompts[start:start + self.batch_size]
                scores = self.score_batch(chunk, chunk_prompts)
                scores = scores.detach().reshape(-1).to("cpu", torch.float32)
                if scores.shape[0] != chunk.shape[0]:
                    raise RuntimeError(f"{type(self).__name__}.score_batch returned {scores.shape[0]} "
                                       f"scores for {chunk.shape[0]} images")
                out.append(scores)
        if not out:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size})"


def check_inputs(images: Any, prompts: Any, video: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Validate the scorer inputs: a (N, 3, H, W) float tensor — (N, 3, F, H, W) with ``video`` — and N prompt
    strings. The errors say which layout the scorer expected, so an image batch given to a video scorer (or the
    reverse) is named as such rather than failing inside a model."""
    what, layout = ("videos", "(N, 3, F, H, W)") if video else ("images", "(N, 3, H, W)")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor {layout} in [-1, 1], got {type(images).__name__}")
    if images.ndim != (5 if video else 4) or images.shape[1] != 3:
        hint = ""
        if video and images.ndim == 4:
            hint = " (an image batch: score images with an image scorer, or add a frame axis)"
        elif not video and images.ndim == 5:
            hint = (" (a video batch: score videos with a video scorer, e.g. "
                    "{'name': 'frame_average', 'inner': <this scorer's spec>})")
        raise ValueError(f"{what} must have shape {layout}, got {tuple(images.shape)}{hint}")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be floating point in [-1, 1], got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, one per {what[:-1]}, not a single string")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} {what} but {len(prompts)} prompts")
    if not all(isinstance(p, str) for p in prompts):
        prompts = [str(p) for p in prompts]  # e.g. toy-world PromptSpec objects
    return images, prompts


# ----------------------------------------------------------------------------- mixtures


class Standardized(RewardModel):
    """``(inner(images, prompts) - mean) / std`` with fixed, published or measured constants."""

    def __init__(self, inner: RewardModel, mean: float = 0.0, std: float = 1.0) -> None:
        if not (float(std) > 0.0 and math.isfinite(float(std))):
            raise ValueError(f"std must be positive and finite, got {std}")
        super().__init__(batch_size=inner.batch_size)
        self.inner, self.mean, self.std = inner, float(mean), float(std)
        self.name = inner.name
        self.video = inner.video
        self._device = inner.device

    def modules(self) -> list[nn.Module]:
        return self.inner.modules()

    def to(self, device: "str | torch.device") -> "Standardized":
        self.inner.to(device)
        self._device = self.inner.device
        return self

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        return (self.inner.score_batch(images, prompts).float() - self.mean) / self.std

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.inner(images, prompts) - self.mean) / self.std


class WeightedMixture(RewardModel):
    """Weighted sum of reward models: ``sum_i w_i * s_i(images, prompts)``.

    ``standardize``:

    * ``False`` / ``"none"`` (default): raw component scores are summed.
    * ``True`` / ``"batch"``: each component's scores are z-scored over the images of the call,
      ``(s_i - mean(s_i)) / (std(s_i) + eps)`` (population std), before weighting; this puts
      rewards of very different scales (PickScore ~20, HPS ~0.3) on one footing, but the value
      of an image then depends on the other images in the call (for pairing K rollouts of a
      prompt that is what one wants; for absolute evaluation use fixed constants instead). With
      one image, or a component constant over the call, that component contributes 0.

    Fixed, batch-independent standardisation of a component: wrap it in :class:`Standardized`
    (``build_reward`` does that for specs with ``"mean"`` / ``"std"``).
    Each component batches internally with its own ``batch_size``.
    """

    def __init__(self, components: Iterable[tuple[RewardModel, float]],
                 standardize: "bool | str" = False, eps: float = 1e-6) -> None:
        comps = [(model, float(weight)) for model, weight in components]
        if not comps:
            raise ValueError("WeightedMixture needs at least one component")
        for model, weight in comps:
            if not isinstance(model, RewardModel):
                raise TypeError(f"mixture components must be RewardModel instances, got {type(model).__name__}")
            if not math.isfinite(weight):
                raise ValueError(f"weight of {model.name} must be finite, got {weight}")
        kinds = {model.video for model, _ in comps}
        if len(kinds) > 1:  # one call gets one tensor: images (N, 3, H, W) or videos (N, 3, F, H, W), not both
            raise ValueError("a mixture cannot combine image scorers "
                             f"{[m.name for m, _ in comps if not m.video]} with video scorers "
                             f"{[m.name for m, _ in comps if m.video]}; wrap each image scorer as "
                             "{'name': 'frame_average', 'inner': <its spec>} to score videos frame by frame")
        mode = {False: "none", True: "batch", None: "none"}.get(standardize, standardize)  # type: ignore[arg-type]
        if mode not in ("none", "batch"):
            raise ValueError(f"standardize must be False/'none' or True/'batch', got {standardize!r}")
        super().__init__(batch_size=max(m.batch_size for m, _ in comps))
        self.components = comps
        self.video = kinds.pop()
        self.standardize = mode
        self.eps = float(eps)
        self.name = "+".join(f"{w:g}*{m.name}" for m, w in comps)
        self._device = comps[0][0].device

    def modules(self) -> list[nn.Module]:
        return [mod for model, _ in self.components for mod in model.modules()]

    def to(self, device: "str | torch.device") -> "WeightedMixture":
        for model, _ in self.components:
            model.to(device)
        self._device = torch.device(device)
        return self

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        return self(images, prompts)

    def component_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each component's raw (unweighted, unstandardised) scores, keyed by component name
        (``name``, ``name#2`` ... when a name repeats)."""
        images, prompts = check_inputs(images, prompts, video=self.video)
        out: dict[str, torch.Tensor] = {}
        for model, _ in self.components:
            key, k = model.name, 2
            while key in out:
                key, k = f"{model.name}#{k}", k + 1
            out[key] = model(images, prompts)
        return out

    def combine(self, scores: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combine per-component scores (in component order) into the mixture score."""
        total = torch.zeros_like(scores[0], dtype=torch.float32)
        for s, (_, weight) in zip(scores, self.components):
            s = s.float()
            if self.standardize == "batch":
                s = s - s.mean()
                if s.numel() > 1:
                    s = s / (s.std(unbiased=False) + self.eps)
            total = total + weight * s
        return total

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(list(self.component_scores(images, prompts).values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"({m!r}, {w:g})" for m, w in self.components)
        return f"WeightedMixture([{inner}], standardize={self.standardize!r})"


# ----------------------------------------------------------------------------- preprocessing


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, clipped."""
    return ((images.float() + 1.0) * 0.5).clamp_(0.0, 1.0)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs: dict[str, Any] = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kwargs.update(align_corners=False, antialias=True)
    return nn.functional.interpolate(x, size=size, **kwargs).clamp_(0.0, 1.0)


def resize_shortest(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """torchvision ``Resize(size)``: shortest side to ``size``, long side ``int(size * long / short)``."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    return _resize(x, (size, new_long) if h <= w else (new_long, size), mode)


def center_crop(x: torch.Tensor, crop: "int | tuple[int, int]") -> torch.Tensor:
    """torchvision ``CenterCrop``: offsets ``round((H - h) / 2)``; zero-pads first if smaller."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def resize_shortest_center_crop(x: torch.Tensor, size: int, crop: "int | tuple[int, int] | None" = None,
                                mode: str = "bicubic") -> torch.Tensor:
    """``Resize(size)`` then ``CenterCrop(crop or size)`` (CLIP / BLIP preprocessing); ``x`` in [0, 1]."""
    return center_crop(resize_shortest(x, size, mode), size if crop is None else crop)


def resize_longest_pad(x: torch.Tensor, size: int, fill: float = 0.0, mode: str = "bicubic") -> torch.Tensor:
    """HPS / open_clip ``ResizeMaxSize``: longest side to ``size`` (``round(dim * size / max)``),
    then pad to ``size x size`` with ``fill`` (in [0, 1] pixel units), image centred
    (left/top pad ``pad // 2``)."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0 and h == w:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = _resize(x, (nh, nw), mode)
    ph, pw = size - nh, size - nw
    if ph or pw:
        x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resolve_dtype(dtype: "str | torch.dtype | None") -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


# ----------------------------------------------------------------------------- shared MLP head


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head, reused verbatim by ImageReward:
    ``Linear(d, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64)
    -> Dropout(0.1) -> Linear(64, 16) -> Linear(16, 1)`` with no non-linearities (the ReLUs are
    commented out in both published sources). State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------- files


def require_path(path: "str | os.PathLike[str] | None", what: str) -> Path:
    """The path as a ``Path``; ``FileNotFoundError`` naming it (and ``what``) when absent."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{what}: no path given (reward models load only from local paths)")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist (reward models load only from local "
                                f"paths; nothing is downloaded)")
    return p


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RewardModelError(f"{what}: {path} is not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise RewardModelError(f"{what}: {path} does not hold a JSON object")
    return data


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def require_transformers_folder(path: "str | os.PathLike[str]", what: str,
                                model_types: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    """Check that ``path`` is a local transformers model folder of one of ``model_types``:
    a directory with ``config.json`` whose ``model_type`` matches, and a weights file.
    Returns the folder and its parsed config."""
    p = require_path(path, what)
    if not p.is_dir():
        raise RewardModelError(f"{what}: {p} is a file; expected a transformers model folder "
                               f"(config.json + model.safetensors) of type {list(model_types)}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise RewardModelError(f"{what}: {p} has no config.json; expected a transformers model "
                               f"folder of type {list(model_types)}; found {sorted(x.name for x in p.iterdir())[:12]}")
    cfg = read_json(cfg_file, what)
    mt = cfg.get("model_type")
    if mt not in model_types:
        raise RewardModelError(f"{what}: {cfg_file} has model_type {mt!r}; expected one of {list(model_types)}")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise RewardModelError(f"{what}: {p} has no weights file (one of {list(_WEIGHT_FILES)})")
    return p, cfg


def load_state_dict_file(path: "str | os.PathLike[str]", what: str,
                         unwrap: Sequence[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a pickled torch file (``weights_only=True``).

    A dict holding the weights under one of ``unwrap`` (e.g. ``{"state_dict": ...}``, as HPS
    checkpoints are saved) is unwrapped. Errors name the file.
    """
    p = require_path(path, what)
    if p.is_dir():
        raise RewardModelError(f"{what}: {p} is a directory; expected a checkpoint file")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            obj: Any = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise RewardModelError(f"{what}: {p} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError ... on corrupt files
            raise RewardModelError(f"{what}: {p} is not a readable PyTorch checkpoint "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(obj, Mapping):
        for key in unwrap:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise RewardModelError(f"{what}: {p} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise RewardModelError(f"{what}: {p} is not a state dict of tensors (e.g. entry {bad[0]!r})")
    return dict(obj)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop a prefix that every key carries (DataParallel / DDP checkpoints)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                source_name: "Callable[[str], str] | None" = None) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error naming every missing,
    unexpected or wrongly shaped key. ``source_name`` maps a model key to the checkpoint key it
    comes from, so that messages speak the checkpoint's naming."""
    expected = module.state_dict()

    def name(k: str) -> str:
        if source_name is None:
            return k
        src = source_name(k)
        return src if src == k else f"{src} (model key {k})"

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shape = [f"{name(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint: " + _short([name(k) for k in missing]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: " + _short([name(k) for k in unexpected]))
        if shape:
            parts.append(f"{len(shape)} shape mismatches: " + _short(shape))
        raise CheckpointKeyError(f"{what}: checkpoint does not match the model; " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def _short(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def find_one_file(folder: Path, patterns: Sequence[str], what: str) -> Path:
    """The single file in ``folder`` matching one of ``patterns`` (glob, top level only)."""
    hits = sorted({f for pat in patterns for f in folder.glob(pat) if f.is_file()})
    if len(hits) == 1:
        return hits[0]
    if not hits:
        hint = ""
        if (folder / "config.json").is_file():
            hint = " (it looks like a transformers model folder: config.json)"
        raise RewardModelError(f"{what}: no checkpoint file matching {list(patterns)} in {folder}{hint}; "
                               f"found {sorted(x.name for x in folder.iterdir())[:12]}")
    raise RewardModelError(f"{what}: several checkpoint files in {folder}: {[h.name for h in hits]}; "
                           f"pass the file itself as path")
