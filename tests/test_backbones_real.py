"""SD 1.x / SDXL / SD3-style backbones on tiny random stand-ins built from the real classes.

Each stand-in is saved in the diffusers folder layout and loaded back through ``load_backbone`` — the
code path a real local model folder takes — then runs a DPO step and a CFG sampling loop.
"""

import json

import pytest
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipeline.backbones import SD3Backbone, SDXLBackbone, UNetBackbone, backbone_class, load_backbone
from pipeline.objectives import Parameterization, preference_loss, preset
from pipeline.sampling import SamplerConfig, _flow_step, sample
from pipeline.toyworld.reference import build_tokenizer

PROMPTS = ["two red circles on the left", "a blue square at the top"]


def clip_config(hidden=32, proj=32):
    return CLIPTextConfig(vocab_size=len(build_tokenizer()), hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                          projection_dim=proj, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_vae(latent_channels=4, **kw):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=16, **kw)


def save_folder(path, pipeline_class, components):
    path.mkdir(parents=True)
    for name, comp in components.items():
        comp.save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return path


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return save_folder(tmp_path_factory.mktemp("m") / "sd15", "StableDiffusionPipeline", {
        "tokenizer": build_tokenizer(), "text_encoder": CLIPTextModel(clip_config()), "unet": unet, "vae": tiny_vae(),
        "scheduler": DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012, clip_sample=False)})


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8)
    return save_folder(tmp_path_factory.mktemp("m") / "sdxl", "StableDiffusionXLPipeline", {
        "tokenizer": build_tokenizer(), "tokenizer_2": build_tokenizer(),
        "text_encoder": CLIPTextModel(clip_config()), "text_encoder_2": CLIPTextModelWithProjection(clip_config()),
        "unet": unet, "vae": tiny_vae(), "scheduler": DDPMScheduler(clip_sample=False)})


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    t5 = T5EncoderModel(T5Config(vocab_size=len(build_tokenizer()), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=2, pad_token_id=0))
    return save_folder(tmp_path_factory.mktemp("m") / "sd3", "StableDiffusion3Pipeline", {
        "tokenizer": build_tokenizer(), "tokenizer_2": build_tokenizer(), "tokenizer_3": build_tokenizer(),
        "text_encoder": CLIPTextModelWithProjection(clip_config(16, 16)),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config(16, 16)), "text_encoder_3": t5,
        "transformer": transformer, "vae": tiny_vae(shift_factor=0.06, scaling_factor=1.5),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)})


def dpo_step(bb):
    """One Diffusion-DPO+SDPO step through the interface; returns the denoiser's gradient norm."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    x0 = bb.encode_images(images)
    assert x0.shape[1:] == bb.latent_shape()
    t = bb.process.sample_timesteps(2, generator=g, min_index=1)
    pair = bb.process.noise_pair(x0[:2], x0[2:], t, generator=g)
    cond = bb.encode_prompts(PROMPTS)
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    x_t, tt = torch.cat([pair.x_t_w, pair.x_t_l]), t.repeat(2)
    pred = bb.predict(x_t, tt, both)
    ref = bb.predict(x_t, tt, both, reference=True)
    out = preference_loss(preset("diffusion-dpo").with_safeguard(mu=0.5), policy_w=pred[:2], policy_l=pred[2:],
                          ref_w=ref[:2], ref_l=ref[2:], target_w=pair.target_w, target_l=pair.target_l)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    return sum(float(p.grad.norm()) for p in bb.trainable_parameters() if p.grad is not None)


@pytest.mark.parametrize("fixture, cls, param", [("sd15_dir", UNetBackbone, Parameterization.V_PREDICTION),
                                                  ("sdxl_dir", SDXLBackbone, Parameterization.EPSILON),
                                                  ("sd3_dir", SD3Backbone, Parameterization.FLOW)])
def test_backbone_trains_and_samples(fixture, cls, param, request):
    path = request.getfixturevalue(fixture)
    assert backbone_class(path) is cls
    bb = load_backbone(path)
    assert type(bb) is cls and bb.process.parameterization is param
    assert dpo_step(bb) > 0
    out = sample(bb, PROMPTS, [0, 1], SamplerConfig(num_steps=3, guidance_scale=2.0))
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    assert torch.isfinite(out.log_probs).all() and bool((out.log_probs[:, 0] != 0).all())
    again = sample(bb, PROMPTS, [0, 1], SamplerConfig(num_steps=3, guidance_scale=2.0))
    assert torch.equal(out.images, again.images)


def test_vae_round_trip_applies_scale_and_shift(sd3_dir):
    bb = load_backbone(sd3_dir)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    raw = bb.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(bb.encode_images(images), (raw - 0.06) * 1.5)
    assert bb.decode_latents(bb.encode_images(images)).shape == images.shape


def test_lora_reference_is_the_base_model_with_adapters_off(tiny_toy_model_dir):
    bb = load_backbone(tiny_toy_model_dir, lora_rank=4)
    n_train = sum(p.numel() for p in bb.trainable_parameters())
    n_all = sum(p.numel() for p in bb.denoiser.parameters())
    assert bb.uses_lora and 0 < n_train < 0.2 * n_all
    base = UNetBackbone.from_pretrained(tiny_toy_model_dir)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 700])
    cond = bb.encode_prompts(PROMPTS)
    torch.testing.assert_close(bb.predict(x, t, cond).detach(), base.predict(x, t, cond).detach())  # B = 0 at init
    opt = torch.optim.SGD(bb.trainable_parameters(), lr=1.0)
    bb.predict(x, t, cond).pow(2).mean().backward()
    opt.step()
    policy, ref = bb.predict(x, t, cond).detach(), bb.predict(x, t, cond, reference=True)
    assert not torch.allclose(policy, ref)
    torch.testing.assert_close(ref, base.predict(x, t, cond).detach())  # adapters off = the base weights
    assert bb._reference is None  # no second copy of the model was made
    assert bb.predict(x, t, cond).requires_grad  # adapters are back on after the reference call


def test_flow_step_with_eta_zero_is_diffusers_flow_euler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(sched.timesteps):
        sched._step_index = i
        expected = sched.step(v, t, x).prev_sample
        mine, std = _flow_step(x, v, float(sched.sigmas[i]), float(sched.sigmas[i + 1]), 0.0, torch.randn_like(x))
        assert std == 0.0
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        load_backbone(bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_backbone(bad)
