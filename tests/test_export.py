"""``export_model`` writes a folder that diffusers itself loads and samples from.

The bases are complete diffusers folders written by each family's own pipeline ``save_pretrained``
(``model_index.json`` naming every component, the family's own scheduler, SD 1.5's safety checker and
feature extractor), built on the tiny stand-ins of ``test_backbones_real.py`` plus real ``CLIPTokenizer`` /
``T5Tokenizer`` classes over a tiny local vocabulary. Each is exported with changed denoiser weights (SD3
with LoRA), then loaded back with the family's pipeline class and with ``DiffusionPipeline``: every
non-denoiser file must be byte-identical to the base's, the denoiser must be the trained one, and a
two-step sample must come out.
"""

import json
import os

import pytest
import torch
from diffusers import (DiffusionPipeline, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer, T5Tokenizer

from pipeline.backbones import load_backbone
from pipeline.export import export_model
from pipeline.utils.atomic import COMPLETE_MARKER
# The tiny stand-in folders (module-scoped fixtures) are shared with the backbone tests, not rebuilt here.
from test_backbones_real import PROMPTS, sd3_dir, sd15_dir, sdxl_dir  # noqa: F401
from trained_weights import trained_weights

WORDS = sorted({w for p in PROMPTS for w in p.split()})
SIZE = 16  # pixels: 8×8 latents with the tiny VAE (scale factor 2)


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell out ``WORDS``; special-token ids match ``clip_config``
    (pad 0, bos 2, eos 3)."""
    vocab = {"<pad>": 0, "<unk>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        for part in parts:
            vocab.setdefault(part, len(vocab))
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token="<unk>", pad_token="<pad>",
                         model_max_length=16)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(encoder, tokenizer):
    encoder.resize_token_embeddings(len(tokenizer))
    return encoder


def safety_checker() -> StableDiffusionSafetyChecker:
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    return StableDiffusionSafetyChecker(config).eval()


def save_pipeline(pipe, path):
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd15_pipeline_dir(sd15_dir, tmp_path_factory):  # noqa: F811
    """An SD 1.5-layout folder: PNDM scheduler (SD 1.5's own config), safety checker, feature extractor."""
    torch.manual_seed(1)
    bb, tok = load_backbone(sd15_dir), clip_tokenizer()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=bb.vae, text_encoder=clip_encoder(bb.text_encoder, tok), tokenizer=tok, unet=bb.denoiser,
        scheduler=scheduler, safety_checker=safety_checker(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    return save_pipeline(pipe, tmp_path_factory.mktemp("base") / "sd15")


@pytest.fixture(scope="module")
def sdxl_pipeline_dir(sdxl_dir, tmp_path_factory):  # noqa: F811
    torch.manual_seed(1)
    bb, tok, tok_2 = load_backbone(sdxl_dir), clip_tokenizer(), clip_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=bb.vae, text_encoder=clip_encoder(bb.text_encoder, tok), text_encoder_2=clip_encoder(bb.text_encoder_2, tok_2),
        tokenizer=tok, tokenizer_2=tok_2, unet=bb.denoiser, scheduler=scheduler)
    return save_pipeline(pipe, tmp_path_factory.mktemp("base") / "sdxl")


@pytest.fixture(scope="module")
def sd3_pipeline_dir(sd3_dir, tmp_path_factory):  # noqa: F811
    torch.manual_seed(1)
    bb, tok, tok_2 = load_backbone(sd3_dir), clip_tokenizer(), clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=bb.denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config), vae=bb.vae,
        text_encoder=clip_encoder(bb.text_encoders[0], tok), tokenizer=tok,
        text_encoder_2=clip_encoder(bb.text_encoders[1], tok_2), tokenizer_2=tok_2,
        text_encoder_3=bb.text_encoders[2], tokenizer_3=t5_tokenizer())
    return save_pipeline(pipe, tmp_path_factory.mktemp("base") / "sd3")


def files(folder, skip=()):
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
            and p.relative_to(folder).parts[0] not in skip}


def assert_copied_unchanged(base, out, denoiser):
    """Every file of the base except the denoiser's (its folder, an adapter for it, the completion marker) is
    in the export, byte for byte, and nothing else is."""
    replaced = (denoiser, f"{denoiser}_lora", COMPLETE_MARKER)
    kept = files(base, skip=replaced)
    assert kept and files(out, skip=replaced) == kept
    for rel in kept:
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert {p.name for p in (out / denoiser).iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert (out / denoiser / "config.json").read_bytes() == (base / denoiser / "config.json").read_bytes()


CASES = [
    ("sd15_pipeline_dir", StableDiffusionPipeline, "unet", PNDMScheduler, 0),
    ("sdxl_pipeline_dir", StableDiffusionXLPipeline, "unet", EulerDiscreteScheduler, 0),
    ("sd3_pipeline_dir", StableDiffusion3Pipeline, "transformer", FlowMatchEulerDiscreteScheduler, 2),
]


@pytest.mark.parametrize("fixture, pipeline_class, denoiser, scheduler_class, lora_rank", CASES,
                         ids=["sd15", "sdxl", "sd3-lora"])
def test_export_is_the_base_folder_with_the_trained_denoiser(fixture, pipeline_class, denoiser, scheduler_class,
                                                           lora_rank, request, tmp_path):
    base = request.getfixturevalue(fixture)
    weights = trained_weights(base, tmp_path / "denoiser.safetensors", lora_rank)
    out = export_model(base, weights, tmp_path / "export", lora_rank=lora_rank)

    assert_copied_unchanged(base, out, denoiser)
    assert (out / COMPLETE_MARKER).is_file()

    # What the denoiser must hold: the trained weights (LoRA: merged into the base weights).
    trained = load_backbone(base, weights=weights, lora_rank=lora_rank)
    if lora_rank:
        trained.denoiser.fuse_lora()
        trained.denoiser.unload_lora()
    expected = trained.denoiser.state_dict()
    original = load_backbone(base).denoiser.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in expected.items())

    pipe = pipeline_class.from_pretrained(out, local_files_only=True)
    generic = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(generic) is pipeline_class
    base_scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    for p in (pipe, generic):
        assert type(p.scheduler).__name__ == base_scheduler["_class_name"]
        assert {k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} == \
            {k: v for k, v in base_scheduler.items() if not k.startswith("_")}
        got = getattr(p, denoiser).state_dict()
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6 if lora_rank else 0, msg=k)
    assert type(pipe.scheduler) is scheduler_class
    if pipeline_class is StableDiffusionPipeline:
        assert pipe.safety_checker is not None and pipe.feature_extractor is not None

    kw = {"max_sequence_length": 16} if pipeline_class is StableDiffusion3Pipeline else {}
    result = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=2.0, height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(0), **kw)
    images = result.images
    if pipeline_class is StableDiffusionPipeline:  # the copied safety checker ran on the sample
        assert result.nsfw_content_detected is not None
    assert images.shape == (1, SIZE, SIZE, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())

    # The pipeline's own loader and ours agree on the export.
    ours = load_backbone(out)
    assert ours.scheduler_config == load_backbone(base).scheduler_config
    mine = ours.denoiser.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=1e-6 if lora_rank else 0)
    if lora_rank:  # the adapter alone, on the base model, is the exported model
        assert (out / f"{denoiser}_lora" / "pytorch_lora_weights.safetensors").is_file()
        adapted = load_backbone(base)
        adapted.denoiser.load_lora_adapter(str(out / f"{denoiser}_lora"), prefix=None, use_safetensors=True)
        torch.manual_seed(0)
        x, t = torch.randn(2, *ours.latent_shape()), torch.tensor([100, 700])
        cond = ours.encode_prompts(PROMPTS)
        with torch.no_grad():
            torch.testing.assert_close(adapted.predict(x, t, cond), ours.predict(x, t, cond), atol=1e-5, rtol=1e-4)


def test_export_of_an_export_and_of_a_linked_folder(tiny_toy_model_dir, tmp_path):
    """A hub-cache-style base (files are symlinks) is exported as real files; exporting an export drops its
    stale adapter and marker and keeps the rest; an export is replaced in place on a rerun."""
    linked = tmp_path / "linked"
    for src in tiny_toy_model_dir.rglob("*"):
        if src.is_file():
            (linked / src.relative_to(tiny_toy_model_dir)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, linked / src.relative_to(tiny_toy_model_dir))
    (tmp_path / "README.md").write_text("base model card\n")
    os.symlink(tmp_path / "README.md", linked / "README.md")

    weights = trained_weights(linked, tmp_path / "lora.safetensors", lora_rank=2)
    first = export_model(linked, weights, tmp_path / "first", lora_rank=2)
    assert not any(p.is_symlink() for p in first.rglob("*"))
    assert (first / "README.md").read_text() == "base model card\n" and (first / "unet_lora").is_dir()
    assert_copied_unchanged(linked, first, "unet")

    full = trained_weights(first, tmp_path / "full.safetensors")
    second = export_model(first, full, tmp_path / "second")
    assert not (second / "unet_lora").exists()  # an adapter for the replaced denoiser is not carried over
    assert_copied_unchanged(first, second, "unet")
    policy = load_file(str(full))
    assert all(torch.equal(v, policy[k]) for k, v in load_backbone(second).denoiser.state_dict().items())

    again = export_model(first, "", tmp_path / "second")  # a rerun replaces the previous export
    assert again == second and (second / COMPLETE_MARKER).is_file()
    merged = load_backbone(first).denoiser.state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in load_backbone(second).denoiser.state_dict().items())
