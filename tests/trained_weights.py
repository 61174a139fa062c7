"""A trained denoiser's weights file for the export tests (image and video), made without training."""

import torch
from safetensors.torch import save_file

from pipeline.backbones import load_backbone


def trained_weights(base, path, lora_rank=0):
    """What the trainer would save: the full denoiser state (LoRA: base + adapter keys), changed."""
    bb = load_backbone(base, lora_rank=lora_rank)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in bb.denoiser.named_parameters():
            if not lora_rank or "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in bb.denoiser.state_dict().items()}, str(path))
    return path
