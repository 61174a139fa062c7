"""The toy video world's reference text-to-video model: its architecture and where its trained weights live.

A genuine Wan-class folder in pixel space (``model_index.json``: ``_class_name`` ``WanPipeline``, no ``vae/``,
``_video_size`` ``[8, 32, 32]``), so it loads through exactly the code a Wan2.1 folder does
(:func:`pipeline.backbones.load_backbone` → :class:`pipeline.backbones.wan.WanBackbone`):

* tokenizer — the image world's word-level tokenizer (:func:`pipeline.toyworld.reference.build_tokenizer`'s
  recipe) over the video grammar's words (the image words plus the motion phrases), saved as a transformers
  ``PreTrainedTokenizerFast``;
* text encoder — a 2-layer, 64-wide ``CLIPTextModel`` (``WanBackbone`` loads it by its ``model_type``; it runs it
  with the attention mask and zeroes the padded positions, as ``WanPipeline`` does with UMT5);
* denoiser — a small ``WanTransformer3DModel`` (4 blocks of width 128) on 8 × 32 × 32 RGB clips with patch size
  (2, 4, 4) — 4 × 8 × 8 = 256 tokens, each two frames of a 4 × 4 patch — 3-D RoPE over (frame, row, column), text
  cross-attention in every block; sized by measured step time on the 2-core machine (docs/toyworld.md);
* scheduler — ``FlowMatchEulerDiscreteScheduler`` (rectified flow, velocity ``ε − x0``; Wan's parameterization),
  ``shift`` 1: at σ = 1 sampling starts from pure noise, which the model was trained on, so backgrounds come out
  black without the zero-terminal-SNR fix the image reference needed.

``jobs/pretrain_toy.py --world video`` trains it; the weights (a few MB) ship in ``reference_model/`` next to
this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the builders import them: VIDEO_REFERENCE_DIR and the constants stay cheap to import
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

from .. import reference as image_reference
from .grammar import MOTION_PHRASES
from .renderer import FRAMES

#: Where the trained video reference ships (package data).
VIDEO_REFERENCE_DIR = Path(__file__).resolve().parent / "reference_model"
IMAGE_SIZE = 32
#: (frames, height, width) the reference generates and trains at (``_video_size`` in its model_index.json)
VIDEO_SIZE = (FRAMES, IMAGE_SIZE, IMAGE_SIZE)
TEXT_LENGTH = 8  # <bos> + 5 words + <eos>, one to spare
PATCH_SIZE = (2, 4, 4)
#: the denoiser's size (measured on the 2-core machine; docs/toyworld.md "Video world")
TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, ffn_dim=512, freq_dim=64)
TEXT_WIDTH = 64
FLOW_SHIFT = 1.0


def vocabulary() -> list[str]:
    """Every word the video grammar can produce, in a fixed order (ids are part of the shipped weights)."""
    return image_reference.vocabulary(MOTION_PHRASES)


def build_tokenizer() -> PreTrainedTokenizerFast:
    return image_reference.build_tokenizer(vocabulary(), TEXT_LENGTH)


def build_text_encoder(vocab_size: int | None = None) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {w: i for i, w in enumerate(vocabulary())}
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(ids), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=TEXT_WIDTH,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
    )
    return CLIPTextModel(config)


def build_transformer(**overrides) -> WanTransformer3DModel:
    """The pixel-space denoiser; ``overrides`` change the size (throughput measurements, tiny test models)."""
    from diffusers import WanTransformer3DModel

    kw = {**TRANSFORMER, **overrides}
    return WanTransformer3DModel(
        patch_size=PATCH_SIZE, in_channels=3, out_channels=3, text_dim=TEXT_WIDTH, rope_max_seq_len=32, **kw,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
