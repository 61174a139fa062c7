"""The toy world's reference text-to-image model: its architecture and where its trained weights live.

Components are standard library classes so the toy model goes through exactly the loading code a real
SD-style folder does (:class:`pipeline.backbones.unet.UNetBackbone`):

* tokenizer — a word-level ``tokenizers`` model over the grammar's words, saved as a transformers
  ``PreTrainedTokenizerFast`` (``AutoTokenizer`` loads it);
* text encoder — a 2-layer, 64-wide ``CLIPTextModel``;
* denoiser — a pixel-space ``UNet2DConditionModel`` at 32×32 with channels (16, 32, 64) and cross-attention
  only at 8×8 (attention at full resolution makes a CPU training step many times slower; docs/toyworld.md);
* scheduler — ``DDPMScheduler``, linear β rescaled to zero terminal SNR, v-prediction, "trailing" timestep
  spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": the last training
  step is pure noise, so sampling starts from what the model was trained on), x0 clipped to the image range.
  ``build_scheduler("epsilon")`` rebuilds the first reference's ε-prediction process (docs/toyworld.md).

``jobs/pretrain_toy.py`` trains it; the weights (a few MB) ship in ``reference_model/`` next to this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the builders import them: REFERENCE_DIR and the constants stay cheap to import
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

from .grammar import COLOURS, COUNT_WORDS, POSITION_PHRASES, SHAPES

#: Where the trained reference ships (package data).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference_model"
IMAGE_SIZE = 32
TEXT_LENGTH = 10  # <bos> + 6 words + <eos>, with room for a longer rewrite
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def vocabulary(phrases: dict[str, str] = POSITION_PHRASES) -> list[str]:
    """Every word the grammar can produce, in a fixed order (ids are part of the shipped weights); ``phrases``: the
    last attribute's phrases (the video world passes its motions)."""
    words = ["one", *COUNT_WORDS.values(), *COLOURS]
    for shape in SHAPES:
        words += [shape, shape + "s"]
    for phrase in phrases.values():
        words += phrase.split()
    return list(SPECIAL_TOKENS) + list(dict.fromkeys(words))


def build_tokenizer(words: list[str] | None = None, max_length: int = TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (default: this world's :func:`vocabulary`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words or vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {w: i for i, w in enumerate(vocabulary())}
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, projection_dim=64,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )


#: The shipped reference's parameterization; "epsilon" is the first reference's (ε on a linear schedule).
PREDICTION_TYPES = ("v_prediction", "epsilon")


def build_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    """v-prediction on zero-terminal-SNR betas (the default), or the ε-prediction linear schedule."""
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    v = prediction_type == "v_prediction"
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0,
        rescale_betas_zero_snr=v, timestep_spacing="trailing" if v else "leading",
    )
