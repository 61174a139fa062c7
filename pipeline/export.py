"""From a Ray Train checkpoint to a policy file and a model folder in the base model's format.

Shared by ``jobs/train.py`` and the online rounds. ``policy_from_checkpoint`` picks the weights to ship
(the EMA when the run kept one); ``export_model`` writes the model folder. The folder is the base model's
folder with only the denoiser (``unet/`` or ``transformer/``) replaced by the trained one: everything else
— ``model_index.json``, the scheduler, VAE, text encoders, tokenizers, a safety checker and feature
extractor, any other file — is copied byte for byte, so the folder loads wherever the base model does
(``load_backbone(folder)`` is the policy; ``StableDiffusionPipeline.from_pretrained(folder)``,
``WanPipeline.from_pretrained(folder)``, ``CogVideoXPipeline.from_pretrained(folder)`` &c. sample from it).
With LoRA the adapter is **merged** into that denoiser, and the adapter alone is written as well,
in diffusers format, to ``<denoiser>_lora/`` (``unet_lora/`` for UNet models) — to apply it to the *base*
model, not to the exported one, which already contains it::

    base = load_backbone(base_model_dir)
    base.denoiser.load_lora_adapter(str(export_dir / "unet_lora"), prefix=None, use_safetensors=True)

A ``<denoiser>_lora/`` already in the base folder (the base is itself an export) is not copied: it was an
adapter for the denoiser that is being replaced.

The folder is written atomically: a reader sees the previous export or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .backbones import load_backbone
from .training.checkpoint import load_full
from .utils.atomic import COMPLETE_MARKER, atomic_directory


def check_finite(weights: dict, source: str | Path) -> None:
    """Refuse weights holding NaN or ±inf: such a policy is never published, evaluated or exported."""
    import torch

    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source}: non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
                         f"{' …' if len(bad) > 5 else ''}); the policy is not published")


def policy_from_checkpoint(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Write ``dest`` (atomically): the checkpoint's full denoiser, with its trainable parameters replaced
    by their EMA when the run kept one (``ema_decay > 0``) — the weights that get evaluated and exported.
    Non-finite weights are refused (:func:`check_finite`) and nothing is written."""
    from safetensors.torch import save_file

    checkpoint_dir, dest = Path(checkpoint_dir), Path(dest)
    parts = load_full(checkpoint_dir, {"model", "ema"})  # gathered here from the ranks' shards
    weights = {**parts["model"], **parts["ema"]}
    check_finite(weights, checkpoint_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(weights, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def optimizer_from_checkpoint(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Write ``dest`` (atomically): the checkpoint's full optimizer state, a next round's ``init_optimizer``."""
    import torch

    optim = load_full(checkpoint_dir, {"optim"})["optim"]
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(optim, tmp)
    os.replace(tmp, dest)
    return dest


def denoiser_subfolder(backbone) -> str:
    """The model-folder name of the backbone's denoiser: ``transformer`` for SD3-style and video models, else
    ``unet`` (each backbone class says, :attr:`~pipeline.backbones.Backbone.denoiser_subfolder`)."""
    return backbone.denoiser_subfolder


def export_model(model: str | Path, weights: str | Path, out: str | Path, *, lora_rank: int = 0) -> Path:
    """Write ``out``: the base ``model`` folder with the denoiser from ``weights`` (a ``denoiser.safetensors``
    as the trainer saves it: the full denoiser, with LoRA base + adapter keys; ``""`` = the model unchanged).

    Every entry of ``model`` other than the denoiser subfolder is copied unchanged (symlinks, as in a hub
    cache snapshot, are copied as the files they point to); the denoiser subfolder gets the trained weights
    and the base's ``config.json``. ``lora_rank`` must be the rank the weights were trained with. Returns ``out``.
    """
    model, out = Path(model), Path(out)
    backbone = load_backbone(model, weights=weights, lora_rank=lora_rank)
    subfolder = denoiser_subfolder(backbone)
    # The marker is atomic_directory's, written last (a source folder written by this project carries one).
    skip = {subfolder, f"{subfolder}_lora", COMPLETE_MARKER}
    with atomic_directory(out, marker=True) as tmp:
        for entry in sorted(model.iterdir()):
            if entry.name in skip or entry.resolve() in (tmp.resolve(), out.resolve()):  # ``out`` inside ``model``
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        if lora_rank:
            backbone.denoiser.save_lora_adapter(str(tmp / f"{subfolder}_lora"))
            # Merge the adapter and drop the peft wrappers: saving the wrapped denoiser would write
            # ``base_layer`` / ``lora_A`` keys that ``from_pretrained`` cannot load.
            backbone.denoiser.fuse_lora()
            backbone.denoiser.unload_lora()
        backbone.denoiser.save_pretrained(tmp / subfolder)
        # The architecture is the base's: keep its config file as it was (save_pretrained rewrites it with
        # this diffusers version and the path the model was loaded from).
        if (model / subfolder / "config.json").is_file():
            shutil.copy2(model / subfolder / "config.json", tmp / subfolder / "config.json")
    return out
