"""Shared fixtures. Tests never reach a model hub: any attempt fails fast."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_toy_model_dir(tmp_path_factory):
    """The toy reference architecture with random weights, saved in the model-folder format."""
    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_scheduler, build_text_encoder, build_tokenizer, build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_toy_model")
    tokenizer = build_tokenizer()
    UNetBackbone(tokenizer, build_text_encoder(len(tokenizer)), build_unet(), build_scheduler().config).save_pretrained(path)
    return path


@pytest.fixture()
def tiny_toy_backbone(tiny_toy_model_dir):
    from pipeline.backbones import UNetBackbone

    return UNetBackbone.from_pretrained(tiny_toy_model_dir)
