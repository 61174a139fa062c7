"""From a Ray Train checkpoint to a policy file and a model folder in the base model's format.

Shared by ``jobs/train.py`` and the online rounds. ``policy_from_checkpoint`` picks the weights to ship
(the EMA when the run kept one); ``export_model`` writes the model folder. The folder is the base model's with the trained
denoiser in place of the original one (``unet/`` or ``transformer/``), so ``load_backbone(folder)`` is the
policy. With LoRA the adapter is **merged** into that denoiser, and the adapter alone is written as well,
in diffusers format, to ``<denoiser>_lora/`` (``unet_lora/`` for UNet models) — to apply it to the *base*
model, not to the exported one, which already contains it::

    base = load_backbone(base_model_dir)
    base.denoiser.load_lora_adapter(str(export_dir / "unet_lora"), prefix=None, use_safetensors=True)

The folder is written atomically: a reader sees the previous export or the complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .backbones import load_backbone
from .training.loop import EMA_FILE, HISTORY_FILE, WEIGHTS_FILE
from .utils.atomic import atomic_directory


def policy_from_checkpoint(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Write ``dest`` (atomically): the checkpoint's full denoiser, with its trainable parameters replaced
    by their EMA when the run kept one (``ema_decay > 0``) — the weights that get evaluated and exported."""
    from safetensors.torch import load_file, save_file

    checkpoint_dir, dest = Path(checkpoint_dir), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if (checkpoint_dir / EMA_FILE).exists():
            weights = load_file(str(checkpoint_dir / WEIGHTS_FILE))
            weights.update(load_file(str(checkpoint_dir / EMA_FILE)))
            save_file(weights, tmp)
        else:
            shutil.copyfile(checkpoint_dir / WEIGHTS_FILE, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def checkpoint_history(checkpoint_dir: str | Path) -> list[dict]:
    """Every report's metrics up to this checkpoint (``[]`` for checkpoints written before the history was)."""
    path = Path(checkpoint_dir) / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []


def denoiser_subfolder(backbone) -> str:
    """The model-folder name of the backbone's denoiser: ``transformer`` for SD3-style models, else ``unet``."""
    from .backbones import SD3Backbone

    return "transformer" if isinstance(backbone, SD3Backbone) else "unet"


def export_model(model: str | Path, weights: str | Path, out: str | Path, *, lora_rank: int = 0) -> Path:
    """Write ``out``: the base ``model`` folder with the denoiser from ``weights`` (a ``denoiser.safetensors``
    as the trainer saves it: the full denoiser, with LoRA base + adapter keys; ``""`` = the model unchanged).

    ``lora_rank`` must be the rank the weights were trained with. Returns ``out``.
    """
    out = Path(out)
    backbone = load_backbone(model, weights=weights, lora_rank=lora_rank)
    with atomic_directory(out) as tmp:
        if lora_rank:
            backbone.denoiser.save_lora_adapter(str(tmp / f"{denoiser_subfolder(backbone)}_lora"))
            # Merge the adapter and drop the peft wrappers: saving the wrapped denoiser would write
            # ``base_layer`` / ``lora_A`` keys that ``from_pretrained`` cannot load.
            backbone.denoiser.fuse_lora()
            backbone.denoiser.unload_lora()
        backbone.save_pretrained(tmp)
        index = Path(model) / "model_index.json"
        if index.exists():
            shutil.copy(index, tmp / "model_index.json")
    return out
