"""Pretrain the toy world's reference model on deliberately noisy captions (deterministic, CPU, ~30 min).

    python jobs/pretrain_toy.py                       # writes pipeline/toyworld/reference_model/
    python jobs/pretrain_toy.py --steps 50 --out /tmp/toy   # a quick smoke run

Why noisy captions: a reference trained on perfect captions would leave preference optimization nothing
to fix. Each attribute of a training caption is replaced by a different random value with probability
``--corrupt-prob`` (default 0.2: 41 % of captions fully correct), so the reference learns a blurred
conditional — exactly the headroom that DPO/SIPO on the verifiable reward can recover. Captions are
dropped to "" with probability ``--caption-dropout`` so the model supports classifier-free guidance.
Held-out (colour, shape) combinations never appear, in images or captions.

Plain single-process torch on purpose: a 1.4M-parameter model gains nothing from Ray, and one process
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
from pipeline.utils.atomic import atomic_directory  # noqa: E402
from pipeline.utils.plots import plot_curves  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REFERENCE_DIR, help="output model folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay after warm-up)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--corrupt-prob", type=float, default=0.2, help="per-attribute caption corruption probability")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of an empty caption (for CFG)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=PREDICTION_TYPES[0],
                   help="v_prediction on zero-terminal-SNR betas (default) or the first reference's epsilon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for bit-for-bit reproducibility)")
    p.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("corrupt_prob", "caption_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must lie in [0, 1)")
    return args


def make_batch(rng: np.random.Generator, specs, args) -> tuple[torch.Tensor, list[str]]:
    idx = rng.integers(len(specs), size=args.batch_size)
    chosen = [specs[i] for i in idx]
    seeds = rng.integers(2**31, size=args.batch_size)
    images = to_tensor(render_batch(chosen, seeds.tolist(), IMAGE_SIZE))
    captions = []
    for spec in chosen:
        caption = corrupt_spec(spec, args.corrupt_prob, rng).text
        captions.append("" if rng.random() < args.caption_dropout else caption)
    return images, captions


def pretrain(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    tokenizer = build_tokenizer()
    text_encoder, unet, scheduler = build_text_encoder(len(tokenizer)), build_unet(), build_scheduler(args.prediction_type)
    process = DiffusionProcess.from_scheduler(scheduler)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + np.cos(np.pi * min(s / args.steps, 1.0)))
    )
    ema = EMAModel(params, decay=args.ema, use_ema_warmup=True)
    specs = train_specs()
    history = {"step": [], "loss": []}
    running, t0 = None, time.time()
    bar = tqdm(range(args.steps), desc="pretrain toy reference", unit="step")
    for step in bar:
        images, captions = make_batch(rng, specs, args)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(images.shape)
        t = process.sample_timesteps(args.batch_size)
        x_t = process.add_noise(images, noise, t)
        pred = unet(x_t, process.model_input_timesteps(t), encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
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
            bar.set_postfix(loss=f"{running:.4f}")
    ema.copy_to(params)
    backbone = UNetBackbone(tokenizer, text_encoder, unet, scheduler.config)
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "final_loss_ema": running, "seconds": round(time.time() - t0, 1),
               "params": {"unet": sum(p.numel() for p in unet.parameters()),
                          "text_encoder": sum(p.numel() for p in text_encoder.parameters())}}
    with atomic_directory(args.out, marker=True) as tmp:
        backbone.save_pretrained(tmp)
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "ToyWorldReference", "_note": "load with pipeline.backbones.UNetBackbone",
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        }, indent=1))
        (tmp / "pretraining.json").write_text(json.dumps({**summary, "history": history}, indent=1))
        plot_curves({"denoising loss (EMA)": (history["step"], history["loss"])}, tmp / "pretraining_loss.png",
                    xlabel="step", title="toy reference pretraining")
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
