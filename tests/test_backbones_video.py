"""Video backbones (Wan2.1, CogVideoX) on tiny random stand-ins built from the libraries' own classes.

Each stand-in is written by its diffusers pipeline's ``save_pretrained`` (``WanPipeline``, ``CogVideoXPipeline``) —
the layout a real local folder has — and loaded back through ``load_backbone``. A pixel-space Wan folder (no VAE,
the toy video world's kind) is written by ``WanBackbone.save_pretrained``. Tokenizers are the toy world's local
word-level tokenizer (``PreTrainedTokenizerFast``; nothing is downloaded).

Checked: the canonical layout (latents B, C, F, H, W; videos B, 3, F, H, W), each family's process, the product's
preference step (DPO + SDPO safeguard, SIPO) with finite loss and gradients, CFG sampling with transition
log-probabilities, that our η = 0 sampler reproduces the diffusers pipeline's own denoising loop (text encoding,
guidance, the CogVideoX permutes and rotary embeddings), LoRA, FSDP2 block sharding on a one-process gloo group,
and exports that ``WanPipeline`` / ``CogVideoXPipeline.from_pretrained`` load and sample from.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                       CogVideoXPipeline, CogVideoXTransformer3DModel, DDPMScheduler, DiffusionPipeline,
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from pipeline.backbones import CogVideoXBackbone, WanBackbone, backbone_class, load_backbone
from pipeline.export import export_model
from pipeline.objectives import Parameterization, preset
from pipeline.sampling import SamplerConfig, _ddim_scheduler, sample
from pipeline.toyworld.reference import build_tokenizer
from pipeline.training import PairBatch, preference_step
from pipeline.training.parallel import repeated_blocks
from pipeline.utils.atomic import COMPLETE_MARKER
from trained_weights import trained_weights

PROMPTS = ["two red circles on the left", "a blue square at the top"]
WAN_SIZE = (5, 32, 32)  # Wan's VAE: 4× in time, 8× in space → latents (4, 2, 4, 4)
PIXEL_SIZE = (3, 16, 16)


def text_config(cls, **kw):
    return cls(vocab_size=len(build_tokenizer()), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
               pad_token_id=0, **kw)


def wan_transformer(channels: int) -> WanTransformer3DModel:
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                 out_channels=channels, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan2.1's own folder scheduler: UniPC with flow sigmas and a flow shift."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=1000)


def set_video_size(path, size):
    index = json.loads((path / "model_index.json").read_text())
    index["_video_size"] = list(size)
    (path / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 2.0, 0.5, 1.0])
    path = tmp_path_factory.mktemp("video") / "wan"
    WanPipeline(tokenizer=build_tokenizer(), text_encoder=UMT5EncoderModel(text_config(UMT5Config)), vae=vae,
                scheduler=wan_scheduler(), transformer=wan_transformer(4)).save_pretrained(path)
    set_video_size(path, WAN_SIZE)
    return path


@pytest.fixture(scope="module")
def wan_pixel_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("video") / "wan_pixel"
    WanBackbone(build_tokenizer(), UMT5EncoderModel(text_config(UMT5Config)), wan_transformer(3),
                wan_scheduler(), video_size=PIXEL_SIZE).save_pretrained(path)
    return path


def cog_folder(path, scheduler_class=CogVideoXDDIMScheduler, **transformer_kw):
    """A CogVideoX folder; its clip size is the pipeline's default: 9 frames of 16×16 (latents 4, 3, 4, 4)."""
    torch.manual_seed(0)
    kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
              text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                                 block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4, sample_height=16, sample_width=16)
    scheduler = scheduler_class(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                clip_sample=False, set_alpha_to_one=True, snr_shift_scale=3.0)
    CogVideoXPipeline(tokenizer=build_tokenizer(), text_encoder=T5EncoderModel(text_config(T5Config)), vae=vae,
                      transformer=CogVideoXTransformer3DModel(**{**kw, **transformer_kw}),
                      scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory):
    """CogVideoX-5B style: rotary position embeddings."""
    return cog_folder(tmp_path_factory.mktemp("video") / "cog")


@pytest.fixture(scope="module")
def cog2b_dir(tmp_path_factory):
    """CogVideoX-2B style: sinusoidal position embeddings over exactly ``max_text_seq_length`` text tokens."""
    return cog_folder(tmp_path_factory.mktemp("video") / "cog2b", use_rotary_positional_embeddings=False)


@pytest.fixture(scope="module")
def cog15_dir(tmp_path_factory):
    """CogVideoX-1.5 style: a temporal patch of 2 (3 latent frames get padded to 4), DPM scheduler."""
    return cog_folder(tmp_path_factory.mktemp("video") / "cog15", CogVideoXDPMScheduler, patch_size_t=2,
                      patch_bias=False)


# fixture, backbone class, parameterization, latent shape (C, F, H, W), video shape (3, F, H, W)
CASES = {
    "wan": ("wan_dir", WanBackbone, Parameterization.FLOW, (4, 2, 4, 4), (3, 5, 32, 32)),
    "wan-pixel": ("wan_pixel_dir", WanBackbone, Parameterization.FLOW, (3, 3, 16, 16), (3, 3, 16, 16)),
    "cogvideox": ("cog_dir", CogVideoXBackbone, Parameterization.V_PREDICTION, (4, 3, 4, 4), (3, 9, 16, 16)),
    "cogvideox-2b": ("cog2b_dir", CogVideoXBackbone, Parameterization.V_PREDICTION, (4, 3, 4, 4), (3, 9, 16, 16)),
    "cogvideox-1.5": ("cog15_dir", CogVideoXBackbone, Parameterization.V_PREDICTION, (4, 3, 4, 4), (3, 9, 16, 16)),
}


@pytest.fixture(params=list(CASES))
def case(request):
    fixture, cls, param, latent, video = CASES[request.param]
    return request.param, request.getfixturevalue(fixture), cls, param, latent, video


def latent_pairs(shape, n=2, seed=0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g), PROMPTS[:n])


def test_load_layout_and_process(case):
    name, path, cls, param, latent, video = case
    assert backbone_class(path) is cls
    bb = load_backbone(path)
    assert type(bb) is cls and bb.is_video and bb.denoiser_subfolder == "transformer"
    assert bb.process.parameterization is param
    assert bb.latent_shape() == latent
    videos = torch.rand(2, *video, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = bb.encode_images(videos)
    assert z.shape == (2, *latent) and z.dtype == torch.float32
    out = bb.decode_latents(z)
    assert out.shape == videos.shape and float(out.abs().max()) <= 1.0
    if name == "wan-pixel":
        assert torch.equal(z, videos)
    with pytest.raises(ValueError, match=r"expected videos \(B, 3, F, H, W\)"):
        bb.encode_images(videos[:, :, 0])
    cond = bb.encode_prompts(PROMPTS)
    pred = bb.predict(torch.randn(2, *latent), torch.tensor([10, 900]), cond)
    assert pred.shape == (2, *latent) and torch.isfinite(pred).all()


def test_wan_process_is_flow_matching_with_the_folders_shift(wan_dir, wan_pixel_dir):
    bb = load_backbone(wan_dir)
    for folder in (wan_dir, wan_pixel_dir):  # both written with Wan's own sampler config, kept as it was
        saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert saved["_class_name"] == "UniPCMultistepScheduler" and saved["flow_shift"] == 3.0
    assert bb.folder_scheduler_config["_class_name"] == "UniPCMultistepScheduler"
    expected = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[:1000].flip(0).double()
    torch.testing.assert_close(bb.process.sigmas, expected)
    assert FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config).config.shift == 3.0
    # A Wan folder with a flow-matching Euler scheduler is taken as it is.
    from pipeline.backbones.wan import flow_scheduler

    assert flow_scheduler(dict(FlowMatchEulerDiscreteScheduler(shift=5.0).config)).config.shift == 5.0
    with pytest.raises(ValueError, match="flow-matching"):
        flow_scheduler(dict(DDPMScheduler().config))


def test_cogvideox_process_keeps_the_snr_shift(cog_dir):
    bb = load_backbone(cog_dir)
    scheduler = CogVideoXDDIMScheduler.from_config(bb.scheduler_config)
    torch.testing.assert_close(bb.process.alphas.pow(2), scheduler.alphas_cumprod.double())
    assert float(bb.process.alphas[-1]) == 0.0  # zero terminal SNR
    plain = DDPMScheduler.from_config(bb.scheduler_config)  # would lose the shift
    assert not torch.allclose(plain.alphas_cumprod.double(), scheduler.alphas_cumprod.double())
    ddim = _ddim_scheduler(bb)  # the sampler steps on the trained table
    torch.testing.assert_close(ddim.alphas_cumprod.double(), bb.process.alphas.pow(2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("objective", [preset("diffusion-dpo").with_safeguard(mu=0.5), preset("sipo")],
                         ids=["dpo+sdpo", "sipo"])
def test_preference_step_on_video_latents(case, objective):
    _, path, _, _, latent, _ = case
    bb = load_backbone(path)
    out = preference_step(bb, objective, latent_pairs(latent), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in bb.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0
    if objective.weighting == "sipo":
        assert torch.isfinite(out.metrics["iw_mean"]) and float(out.metrics["iw_logit_weight_mean"]) > 0
    else:
        assert 0.0 <= float(out.metrics["lambda_mean"]) <= 1.0


def test_parameter_space_safeguard_on_wan(wan_dir):
    """The exact (JVP) SDPO λ runs through Wan's attention and RoPE."""
    bb = load_backbone(wan_dir)
    cfg = preset("diffusion-dpo").with_safeguard(mu=0.5, space="parameter")
    out = preference_step(bb, cfg, latent_pairs(bb.latent_shape()), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0.0 <= float(out.loser_scale) <= 1.0


def test_cfg_sampling_with_log_probs(case):
    _, path, _, _, latent, video = case
    bb = load_backbone(path)
    cfg = SamplerConfig(num_steps=3, guidance_scale=2.0, eta=1.0)
    out = sample(bb, PROMPTS, [0, 1], cfg)
    assert out.images.shape == (2, *video) and torch.isfinite(out.images).all()
    assert out.latents.shape == (2, *latent)
    assert out.log_probs.shape == (2, 3) and torch.isfinite(out.log_probs).all()
    assert bool((out.log_probs[:, 0] != 0).all())
    again = sample(bb, PROMPTS[:1], [0], cfg)  # a (prompt, seed) gives the same video in any batch
    torch.testing.assert_close(again.latents[0], out.latents[0], atol=1e-5, rtol=1e-5)


def _initial_noise(shape, seeds):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_deterministic_sampler_is_the_wan_pipeline_loop(wan_dir):
    """η = 0 with the flow Euler grid is ``WanPipeline`` with ``FlowMatchEulerDiscreteScheduler``: same text
    encoding, guidance and network calls (latents compared before decoding)."""
    bb = load_backbone(wan_dir)
    ours = sample(bb, PROMPTS, [3, 4], SamplerConfig(num_steps=3, guidance_scale=2.0, eta=0.0))
    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config)
    frames, height, width = bb.video_size
    theirs = pipe(PROMPTS, num_frames=frames, height=height, width=width, num_inference_steps=3, guidance_scale=2.0,
                  latents=_initial_noise(bb.latent_shape(), [3, 4]), output_type="latent",
                  max_sequence_length=bb.max_sequence_length).frames
    torch.testing.assert_close(ours.latents, theirs.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["cog_dir", "cog2b_dir"])
def test_deterministic_sampler_is_the_cogvideox_pipeline_loop(fixture, request):
    """η = 0 is ``CogVideoXPipeline``'s DDIM loop on the same scheduler: the backbone's permutes, rotary
    embeddings and text padding are the pipeline's."""
    path = request.getfixturevalue(fixture)
    bb = load_backbone(path)
    ours = sample(bb, PROMPTS, [3, 4], SamplerConfig(num_steps=3, guidance_scale=2.0, eta=0.0))
    pipe = CogVideoXPipeline.from_pretrained(path, local_files_only=True)
    frames, height, width = bb.video_size
    noise = _initial_noise(bb.latent_shape(), [3, 4]).permute(0, 2, 1, 3, 4)
    theirs = pipe(PROMPTS, num_frames=frames, height=height, width=width, num_inference_steps=3, guidance_scale=2.0,
                  latents=noise, output_type="latent", max_sequence_length=bb.max_sequence_length).frames
    torch.testing.assert_close(ours.latents, theirs.float().permute(0, 2, 1, 3, 4), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["wan_dir", "cog_dir"])
def test_lora_step_changes_only_the_adapters(fixture, request):
    bb = load_backbone(request.getfixturevalue(fixture), lora_rank=2)
    named = dict(bb.denoiser.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for target in ("to_q", "to_k", "to_v", "to_out.0"):  # every target module got an adapter
        assert any(f".{target}.lora_A." in n for n in trainable), target
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.SGD(bb.trainable_parameters(), lr=0.1)
    batch = latent_pairs(bb.latent_shape())
    out = preference_step(bb, preset("diffusion-dpo"), batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    opt.step()
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    # The reference is the base model (adapters off), and adapters are back on afterwards.
    x, t, cond = torch.randn(1, *bb.latent_shape()), torch.tensor([500]), bb.encode_prompts(PROMPTS[:1])
    base = load_backbone(request.getfixturevalue(fixture))
    torch.testing.assert_close(bb.predict(x, t, cond, reference=True), base.predict(x, t, cond).detach())
    assert not torch.allclose(bb.predict(x, t, cond).detach(), base.predict(x, t, cond).detach())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_fsdp2_shards_the_video_transformer_blocks(wan_dir, cog_dir):
    """``repeated_blocks`` finds Wan's ``blocks`` and CogVideoX's ``transformer_blocks``; the product's sharding
    (FSDP2 with CPU offload, which shards even on one rank) trains through a preference step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pipeline.training.parallel import shard_denoiser

    wan, cog = load_backbone(wan_dir), load_backbone(cog_dir)
    assert repeated_blocks(wan.denoiser) == list(wan.denoiser.blocks) and len(wan.denoiser.blocks) == 2
    assert repeated_blocks(cog.denoiser) == list(cog.denoiser.transformer_blocks)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        for bb in (wan, cog):
            bb.predict(torch.zeros(1, *bb.latent_shape()), torch.tensor([1]), bb.encode_prompts(PROMPTS[:1]),
                       reference=True)  # take the frozen reference copy before sharding
            assert "FSDP2 over 1 rank(s)" in shard_denoiser(bb.denoiser, torch.device("cpu"), cpu_offload=True)
            assert all(isinstance(p, DTensor) for p in bb.denoiser.parameters())
            out = preference_step(bb, preset("sipo"), latent_pairs(bb.latent_shape()),
                                  generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            assert torch.isfinite(out.loss)
            assert all(p.grad is not None and torch.isfinite(p.grad.full_tensor()).all()
                       for p in bb.denoiser.parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fixture, pipeline_class, lora_rank",
                         [("wan_dir", WanPipeline, 2), ("cog_dir", CogVideoXPipeline, 0)], ids=["wan-lora", "cogvideox"])
def test_export_loads_and_samples_in_diffusers(fixture, pipeline_class, lora_rank, request, tmp_path):
    base = request.getfixturevalue(fixture)
    weights = trained_weights(base, tmp_path / "denoiser.safetensors", lora_rank)
    out = export_model(base, weights, tmp_path / "export", lora_rank=lora_rank)
    assert (out / COMPLETE_MARKER).is_file()
    for f in base.rglob("*"):  # everything but the denoiser is the base's, byte for byte
        rel = f.relative_to(base)
        if f.is_file() and rel.parts[0] != "transformer":
            assert (out / rel).read_bytes() == f.read_bytes(), rel
    assert (out / "transformer" / "config.json").read_bytes() == (base / "transformer" / "config.json").read_bytes()
    assert (out / "transformer_lora").is_dir() == bool(lora_rank)

    trained = load_backbone(base, weights=weights, lora_rank=lora_rank)
    if lora_rank:
        trained.denoiser.fuse_lora()
        trained.denoiser.unload_lora()
    expected = trained.denoiser.state_dict()

    pipe = pipeline_class.from_pretrained(out, local_files_only=True)
    assert type(DiffusionPipeline.from_pretrained(out, local_files_only=True)) is pipeline_class
    got = pipe.transformer.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6 if lora_rank else 0, msg=k)
    ours = load_backbone(out)
    assert ours.video_size == load_backbone(base).video_size
    frames, height, width = ours.video_size
    result = pipe(PROMPTS[0], num_frames=frames, height=height, width=width, num_inference_steps=2, guidance_scale=2.0,
                  output_type="np", generator=torch.Generator().manual_seed(0),
                  max_sequence_length=ours.max_sequence_length).frames
    assert result.shape == (1, frames, height, width, 3) and bool(torch.isfinite(torch.as_tensor(result)).all())


def test_video_size(wan_dir, wan_pixel_dir, cog_dir, tiny_toy_model_dir):
    assert load_backbone(wan_dir, video_size=(9, 16, 48)).latent_shape() == (4, 3, 2, 6)
    assert load_backbone(cog_dir, video_size=(5, 32, 16)).latent_shape() == (4, 2, 8, 4)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        load_backbone(wan_dir, video_size=(6, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        load_backbone(wan_dir, video_size=(5, 24, 32))
    with pytest.raises(ValueError, match="image model"):
        load_backbone(tiny_toy_model_dir, video_size=(5, 32, 32))
    pixel = load_backbone(wan_pixel_dir)
    assert pixel.vae is None and pixel.video_size == PIXEL_SIZE and pixel.vae_temporal_scale_factor == 1
    with pytest.raises(ValueError, match="no default clip size"):
        WanBackbone(pixel.tokenizer, pixel.text_encoder, pixel.denoiser, pixel.folder_scheduler_config)
    # Without a model_index.json the transformer's class picks the backbone.
    (wan_pixel_copy := wan_pixel_dir.parent / "no_index").mkdir()
    for sub in ("transformer",):
        (wan_pixel_copy / sub).mkdir()
        (wan_pixel_copy / sub / "config.json").write_bytes((wan_pixel_dir / sub / "config.json").read_bytes())
    assert backbone_class(wan_pixel_copy) is WanBackbone
