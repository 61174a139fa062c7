"""Pretrain a toy world's reference model on deliberately noisy captions (deterministic, CPU, ~30–40 min).

    python jobs/pretrain_toy.py                       # writes pipeline/toyworld/reference_model/
    python jobs/pretrain_toy.py --steps 50 --out /tmp/toy   # a quick smoke run
    python jobs/pretrain_toy.py --world video         # writes pipeline/toyworld/video/reference_model/

``--world image`` (the default) trains the image world's UNet (v-prediction, zero terminal SNR;
:mod:`pipeline.toyworld.reference`); ``--world video`` the video world's pixel-space Wan transformer (flow
matching; :mod:`pipeline.toyworld.video.reference`), written as a ``WanPipeline`` folder that
``pipeline.backbones.load_backbone`` loads. Options left unset take the world's defaults (``--print-config``
shows them).

Why noisy captions: a reference trained on perfect captions would leave preference optimization nothing
to fix. Each attribute of a training caption is replaced by a different random value with probability
``--corrupt-prob`` (default 0.2: 41 % of captions fully correct), so the reference learns a blurred
conditional — exactly the headroom that DPO/SIPO on the verifiable reward can recover. Captions are
dropped to "" with probability ``--caption-dropout`` so the model supports classifier-free guidance.
Held-out combinations never appear, in samples or captions (images: (colour, shape); videos: (colour, shape)
and (colour, direction)). In the video world the motion is one of the corrupted attributes.

Plain single-process torch on purpose: a model of a million or two parameters gains nothing from Ray, and one process
with a fixed thread count is bit-for-bit reproducible. The output folder is written atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.utils.driver import offline_mode  # noqa: E402

offline_mode()  # before diffusers / transformers are imported (below)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.backbones.unet import UNetBackbone  # noqa: E402
from pipeline.objectives import DiffusionProcess  # noqa: E402
from pipeline.toyworld import corrupt_spec, render_batch, to_tensor, train_specs  # noqa: E402
from pipeline.toyworld.reference import (  # noqa: E402
    IMAGE_SIZE, PREDICTION_TYPES, REFERENCE_DIR, build_scheduler, build_text_encoder, build_tokenizer, build_unet,
)
from pipeline.toyworld.video.reference import VIDEO_REFERENCE_DIR, VIDEO_SIZE  # noqa: E402
from pipeline.utils.atomic import atomic_directory  # noqa: E402
from pipeline.utils.plots import plot_curves  # noqa: E402

#: the shipped video reference's step count (sized to ~35–40 min on the 2-core machine; docs/toyworld.md)
VIDEO_STEPS = 2000


#: per-world defaults of the options left unset (the shipped references were trained with these)
WORLD_DEFAULTS = {
    "image": dict(steps=1800, batch_size=64, lr=1e-3, warmup=100, ema=0.999, threads=2),
    "video": dict(steps=VIDEO_STEPS, batch_size=32, lr=1e-3, warmup=50, ema=0.995, threads=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=sorted(WORLD_DEFAULTS), default="image",
                   help="which toy world's reference to train (image: UNet; video: pixel-space Wan transformer)")
    p.add_argument("--out", type=Path, default=None, help="output model folder (default: the world's shipped one)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (image 1800, video %d)" % VIDEO_STEPS)
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (image 64, video 32)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (cosine decay after warm-up; 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (image 100, video 50)")
    p.add_argument("--corrupt-prob", type=float, default=0.2, help="per-attribute caption corruption probability")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of an empty caption (for CFG)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the saved weights (image 0.999, video 0.995)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=PREDICTION_TYPES[0],
                   help="image world: v_prediction on zero-terminal-SNR betas (default) or the first reference's "
                        "epsilon (the video world is flow matching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, fixed for bit-for-bit reproducibility (2; on a busy machine 1 is steadier)")
    p.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    args = p.parse_args(argv)
    for name, value in WORLD_DEFAULTS[args.world].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = REFERENCE_DIR if args.world == "image" else VIDEO_REFERENCE_DIR
    if args.world == "video" and args.prediction_type != PREDICTION_TYPES[0]:
        p.error("--prediction-type is the image world's; the video reference is flow matching")
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("corrupt_prob", "caption_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1)")
    return args


def make_batch(rng: np.random.Generator, specs, args, world=None) -> tuple[torch.Tensor, list[str]]:
    """A batch of ground-truth renders of training specs and their noisy captions (``world``: the image world's
    functions by default, :class:`VideoWorld` for clips)."""
    world = world or ImageWorld
    idx = rng.integers(len(specs), size=args.batch_size)
    chosen = [specs[i] for i in idx]
    seeds = rng.integers(2**31, size=args.batch_size)
    images = world.render(chosen, seeds.tolist())
    captions = []
    for spec in chosen:
        caption = world.corrupt(spec, args.corrupt_prob, rng).text
        captions.append("" if rng.random() < args.caption_dropout else caption)
    return images, captions


class ImageWorld:
    """The image world: a pixel-space UNet conditioned on a CLIP text encoder's last hidden states."""

    title = "toy reference"
    denoiser_name = "unet"

    @staticmethod
    def specs():
        return train_specs()

    @staticmethod
    def corrupt(spec, prob, rng):
        return corrupt_spec(spec, prob, rng)

    @staticmethod
    def render(specs, seeds) -> torch.Tensor:
        return to_tensor(render_batch(specs, seeds, IMAGE_SIZE))

    @staticmethod
    def build(args):
        tokenizer = build_tokenizer()
        return tokenizer, build_text_encoder(len(tokenizer)), build_unet(), build_scheduler(args.prediction_type)

    @staticmethod
    def forward(denoiser, text_encoder, tokenizer, x_t, timesteps, captions) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return denoiser(x_t, timesteps, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample

    @staticmethod
    def save(tmp: Path, tokenizer, text_encoder, denoiser, scheduler) -> None:
        UNetBackbone(tokenizer, text_encoder, denoiser, scheduler.config).save_pretrained(tmp)
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "ToyWorldReference", "_note": "load with pipeline.backbones.UNetBackbone",
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        }, indent=1))


class VideoWorld:
    """The video world: a pixel-space ``WanTransformer3DModel`` on 8×32×32 clips, prompts encoded as
    ``WanBackbone.encode_prompts`` does (attention mask, padded positions zeroed) but with gradients, since the
    small text encoder is trained too."""

    title = "toy video reference"
    denoiser_name = "transformer"

    @staticmethod
    def specs():
        from pipeline.toyworld import video

        return video.train_specs()

    @staticmethod
    def corrupt(spec, prob, rng):
        from pipeline.toyworld import video

        return video.corrupt_spec(spec, prob, rng)

    @staticmethod
    def render(specs, seeds) -> torch.Tensor:
        from pipeline.toyworld import video

        return video.to_tensor(video.render_batch(specs, seeds, VIDEO_SIZE[1], VIDEO_SIZE[0]))

    @staticmethod
    def build(args):
        from pipeline.toyworld.video import reference as ref

        tokenizer = ref.build_tokenizer()
        return tokenizer, ref.build_text_encoder(len(tokenizer)), ref.build_transformer(), ref.build_scheduler()

    @staticmethod
    def forward(denoiser, text_encoder, tokenizer, x_t, timesteps, captions) -> torch.Tensor:
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        states = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        states = states * tokens.attention_mask.unsqueeze(-1).to(states.dtype)
        return denoiser(hidden_states=x_t, timestep=timesteps.float(), encoder_hidden_states=states).sample

    @staticmethod
    def save(tmp: Path, tokenizer, text_encoder, denoiser, scheduler) -> None:
        from pipeline.backbones.wan import WanBackbone

        WanBackbone(tokenizer, text_encoder, denoiser, scheduler, video_size=VIDEO_SIZE).save_pretrained(tmp)


WORLDS = {"image": ImageWorld, "video": VideoWorld}


def pretrain(args: argparse.Namespace) -> dict:
    world = WORLDS[getattr(args, "world", "image")]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    tokenizer, text_encoder, denoiser, scheduler = world.build(args)
    process = DiffusionProcess.from_scheduler(scheduler)
    params = list(denoiser.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * min(s / args.steps, 1.0)))
    )
    ema = EMAModel(params, decay=args.ema, use_ema_warmup=True)
    specs = world.specs()
    history = {"step": [], "loss": [], "seconds": []}
    running, t0 = None, time.time()
    bar = tqdm(range(args.steps), desc=f"pretrain {world.title}", unit="step")
    for step in bar:
        images, captions = make_batch(rng, specs, args, world)
        noise = torch.randn(images.shape)
        t = process.sample_timesteps(args.batch_size)
        x_t = process.add_noise(images, noise, t)
        pred = world.forward(denoiser, text_encoder, tokenizer, x_t, process.model_input_timesteps(t), captions)
        loss = F.mse_loss(pred.float(), process.target(images, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0 or step == args.steps - 1:
            history["step"].append(step)
            history["loss"].append(running)
            history["seconds"].append(round(time.time() - t0, 1))
            bar.set_postfix(loss=f"{running:.4f}")
    ema.copy_to(params)
    summary = {"world": getattr(args, "world", "image"),
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "final_loss_ema": running, "seconds": round(time.time() - t0, 1),
               "params": {world.denoiser_name: sum(p.numel() for p in denoiser.parameters()),
                          "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
               "torch": torch.__version__}
    with atomic_directory(args.out, marker=True) as tmp:
        world.save(tmp, tokenizer, text_encoder, denoiser, scheduler)
        (tmp / "pretraining.json").write_text(json.dumps({**summary, "history": history}, indent=1))
        plot_curves({"denoising loss (EMA)": (history["step"], history["loss"])}, tmp / "pretraining_loss.png",
                    xlabel="step", title=f"{world.title} pretraining")
    return summary


def main(argv=None) -> int:
    from pipeline.cli import print_options_if_asked

    args = parse_args(argv)
    print_options_if_asked(args)
    summary = pretrain(args)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
