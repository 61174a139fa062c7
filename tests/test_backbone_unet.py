"""UNetBackbone loads a model folder through the libraries' own from_pretrained and behaves as the interface says."""

import pytest
import torch

from pipeline.backbones import UNetBackbone, cat_conditioning, index_conditioning
from pipeline.objectives import Parameterization
from pipeline.toyworld.reference import vocabulary


def test_loads_and_predicts(tiny_toy_backbone):
    bb = tiny_toy_backbone
    cond = bb.encode_prompts(["two red circles on the left", ""])
    assert cond["encoder_hidden_states"].shape == (2, 10, 64)
    assert bb.latent_shape() == (3, 32, 32)
    assert bb.process.parameterization is Parameterization.EPSILON
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 900])
    pred = bb.predict(x, t, cond)
    assert pred.shape == x.shape and pred.requires_grad
    ref = bb.predict(x, t, cond, reference=True)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, pred.detach())  # the reference starts as a frozen copy


def test_reference_stays_frozen_while_policy_trains(tiny_toy_backbone):
    bb = tiny_toy_backbone
    x, t, cond = torch.randn(1, 3, 32, 32), torch.tensor([500]), bb.encode_prompts(["a blue square at the top"])
    before = bb.predict(x, t, cond, reference=True)
    with torch.no_grad():
        for p in bb.denoiser.parameters():
            p.add_(0.01)
    torch.testing.assert_close(bb.predict(x, t, cond, reference=True), before)
    assert not torch.allclose(bb.predict(x, t, cond).detach(), before)


def test_prompts_tokenize_to_known_words(tiny_toy_backbone):
    ids = tiny_toy_backbone.tokenizer(["three magenta triangles at the bottom"]).input_ids[0]
    words = vocabulary()
    assert [words[i] for i in ids] == ["<bos>", "three", "magenta", "triangles", "at", "the", "bottom", "<eos>"]
    unk = tiny_toy_backbone.tokenizer(["a purple blob"]).input_ids[0]
    assert words.index("<unk>") in unk


def test_pixel_space_images_are_latents(tiny_toy_backbone):
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tiny_toy_backbone.encode_images(img), img)
    assert float(tiny_toy_backbone.decode_latents(img * 3).abs().max()) <= 1.0


def test_save_roundtrip(tiny_toy_backbone, tmp_path):
    tiny_toy_backbone.save_pretrained(tmp_path / "copy")
    again = UNetBackbone.from_pretrained(tmp_path / "copy")
    for a, b in zip(tiny_toy_backbone.denoiser.state_dict().values(), again.denoiser.state_dict().values()):
        assert torch.equal(a, b)


def test_conditioning_helpers():
    a = {"encoder_hidden_states": torch.zeros(2, 3, 4)}
    b = {"encoder_hidden_states": torch.ones(1, 3, 4)}
    both = cat_conditioning([a, b])
    assert both["encoder_hidden_states"].shape == (3, 3, 4)
    assert torch.equal(index_conditioning(both, slice(2, 3))["encoder_hidden_states"], b["encoder_hidden_states"])


def test_clear_errors_for_bad_folders(tmp_path, tiny_toy_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UNetBackbone.from_pretrained(tmp_path / "nowhere")
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match="model.safetensors"):
        UNetBackbone.from_pretrained(afile)
    partial = tmp_path / "partial"
    (partial / "tokenizer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/, unet/, scheduler/"):
        UNetBackbone.from_pretrained(partial)
