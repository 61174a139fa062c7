"""Step time of Diffusion-DPO with and without the SDPO safeguard, measured side by side.

Every variant runs the product's own training step: :func:`pipeline.training.step.preference_step` on a
:class:`~pipeline.backbones.UNetBackbone` (text encoding, noising, policy forward, reference forward without
gradient, the objective, and for the parameter-space safeguard its λ), then backward and the optimizer step.
Variants run interleaved round by round in rotated order (A B C D, B C D A, …) so machine noise and order
effects hit all of them alike; the report gives the median step time of each and ratios to plain DPO (ratio
of medians and the median of per-round ratios).

Variants: plain DPO; SDPO in output space (Eq. 17); SDPO in parameter space (Eq. 14) by its three methods —
``jvp`` (one extra backward and a forward-mode product in the losers' forward; what
``safeguard_method="auto"`` picks on an unsharded model), ``split`` (winners and losers as two forwards, one
extra backward through each half's graph) and ``backward`` (two extra backward passes through the batched forward; the
FSDP2 method).

    python bench/objectives.py                      # both models, results to bench/results/objectives.md
    python bench/objectives.py --models toy --rounds 5

Models (random weights from diffusers configs, no downloads): a toy-size pixel UNet (attention only at 8×8)
and a UNet with the SD 1.5 architecture at 32×32 latents with 77-token, 768-wide text states. The text
encoder is a one-layer CLIP text model of the right width (SD 1.5's twelve-layer encoder would add the same
time to every variant and shrink the ratios). SD 1.5 uses plain SGD: AdamW's two state copies plus the
parameter-space gradients of an 860M-parameter model do not fit in 24 GB; SGD also makes the objective's share
of the step larger, so the overhead ratios are conservative.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.backbones import UNetBackbone
from pipeline.objectives import preset
from pipeline.toyworld.reference import build_tokenizer
from pipeline.training import PairBatch, preference_step

# name -> (safeguard space, parameter-space method)
VARIANTS = {
    "dpo": (None, None),
    "dpo+sdpo(output)": ("output", None),
    "dpo+sdpo(parameter, split)": ("parameter", "split"),
    "dpo+sdpo(parameter, jvp)": ("parameter", "jvp"),
    "dpo+sdpo(parameter, backward)": ("parameter", "backward"),
}
DEFAULT = "dpo+sdpo(parameter, jvp)"  # the parameter-space method preference_step uses on an unsharded model
NAMES = tuple(VARIANTS)
PROMPTS = ["a red circle on the left", "two blue squares at the top", "one green triangle", "three yellow circles"]


def toy_unet() -> tuple[UNet2DConditionModel, dict]:
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet, dict(channels=3, size=32, text_len=8, text_dim=64, pairs=16, optimizer="adamw")


def sd15_unet() -> tuple[UNet2DConditionModel, dict]:
    # UNet2DConditionModel's defaults are the SD 1.x block layout; SD 1.5 uses 768-d CLIP text states.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet, dict(channels=4, size=32, text_len=77, text_dim=768, pairs=1, optimizer="sgd")


MODELS = {"toy": toy_unet, "sd15": sd15_unet}


def build_backbone(name: str) -> tuple[UNetBackbone, dict]:
    """The model as the product loads it: tokenizer, CLIP text encoder, UNet and an SD 1.5 DDPM scheduler."""
    unet, spec = MODELS[name]()
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = spec["text_len"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec["text_dim"], intermediate_size=4 * spec["text_dim"],
        num_hidden_layers=1, num_attention_heads=8, max_position_embeddings=spec["text_len"],
        projection_dim=spec["text_dim"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return UNetBackbone(tokenizer, text_encoder, unet, scheduler.config), spec


def make_step(backbone, opt, spec, variant, seed):
    space, method = VARIANTS[variant]
    cfg = preset("diffusion-dpo")
    if space is not None:
        cfg = cfg.with_safeguard(mu=0.9, space=space)
    b, c, s = spec["pairs"], spec["channels"], spec["size"]
    data = torch.Generator().manual_seed(seed)
    batch = PairBatch(torch.randn(b, c, s, s, generator=data), torch.randn(b, c, s, s, generator=data),
                      [PROMPTS[i % len(PROMPTS)] for i in range(b)])
    noise = torch.Generator().manual_seed(seed + 1)  # same t and noise sequence for every variant
    kw = {} if method is None else dict(safeguard_method=method)

    def step():
        out = preference_step(backbone, cfg, batch, generator=noise, **kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return None if out.loser_scale is None else float(out.loser_scale)

    return step


def bench_model(name: str, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    backbone, spec = build_backbone(name)
    params = backbone.trainable_parameters()
    n_params = sum(p.numel() for p in params)
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-6)
    else:
        opt = torch.optim.SGD(params, lr=1e-8)
    steps = {v: make_step(backbone, opt, spec, v, seed=0) for v in NAMES}
    for _ in range(warmup):
        for v in NAMES:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in NAMES}
    lams: dict[str, list] = {v: [] for v in NAMES}
    for r in range(rounds):
        k = r % len(NAMES)
        for v in NAMES[k:] + NAMES[:k]:  # rotate so no variant always follows another
            t0 = time.perf_counter()
            lam = steps[v]()
            times[v].append(time.perf_counter() - t0)
            lams[v].append(lam)
        print(f"  [{name}] round {r + 1}/{rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in NAMES), flush=True)
    med = {v: statistics.median(times[v]) for v in NAMES}
    per_round = {v: statistics.median(a / b for a, b in zip(times[v], times["dpo"])) for v in NAMES}
    ref = lams["dpo+sdpo(parameter, backward)"]
    gaps = {v: max(abs(x - y) for x, y in zip(lams[v], ref)) for v in ("dpo+sdpo(parameter, split)",
                                                                       "dpo+sdpo(parameter, jvp)")}
    return dict(model=name, params=n_params, spec=spec, rounds=rounds, warmup=warmup, times=times, lambdas=lams,
                max_lambda_gap=gaps,
                median=med, ratio_of_medians={v: med[v] / med["dpo"] for v in NAMES}, median_round_ratio=per_round)


def report(results: list[dict]) -> str:
    lines = [
        "# Objective step time: DPO vs DPO+SDPO",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU fp32. Produced by `python bench/objectives.py`; every step is the product's "
        "`preference_step` on a `UNetBackbone`, then backward and the optimizer step.",
        "",
        "| model | params | pairs/step | variant | median step (s) | ratio of medians | median per-round ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for v in NAMES:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['spec']['pairs']} | {v} | {r['median'][v]:.3f} | "
                f"{r['ratio_of_medians'][v]:.3f} | {r['median_round_ratio'][v]:.3f} |"
            )
    lines += [
        "",
        "Rounds (interleaved) after warm-up: " + ", ".join(f"{r['model']}: {r['rounds']}" for r in results) + ".",
        "",
        "A ratio is a variant's step time over plain DPO's on the same model in the same run: 1.5 means the step "
        "takes 50 % longer than a DPO step. `parameter, jvp` is the default parameter-space method on an unsharded "
        "model (one extra backward over the winners and a forward-mode product in the losers' forward, which the "
        "loss reuses; attention on the math kernel there); `parameter, split` runs winners and losers as two "
        "forwards and backpropagates ∇θL_w and ∇θL_l each through its own half's graph (together one backward of "
        "the pair batch in FLOPs; the method for an activation-checkpointed denoiser); `parameter, backward` is "
        "the two-extra-backward method through the batched forward that FSDP2-sharded models use.",
        "",
        "Reading: " + " ".join(
            f"{r['model']}: the exact parameter-space λ costs {r['ratio_of_medians'][DEFAULT]:.2f}× a DPO step with "
            f"the default (JVP) method, {r['ratio_of_medians']['dpo+sdpo(parameter, split)']:.2f}× split and "
            f"{r['ratio_of_medians']['dpo+sdpo(parameter, backward)']:.2f}× with two backwards of the batch (ratio "
            f"of medians; output-space SDPO {r['ratio_of_medians']['dpo+sdpo(output)']:.2f}×)." for r in results),
        *[f"The target of ≤ 1.6× on the SD 1.5 architecture is "
          f"{'met' if min(r['ratio_of_medians'][v] for v in NAMES if 'parameter' in v) <= 1.6 else 'not met'} "
          f"(best method {min(r['ratio_of_medians'][v] for v in NAMES if 'parameter' in v):.2f}×; the paper "
          "reports 1.72× on GPU). At one pair per step on CPU a backward's cost is dominated by what does not "
          "shrink with the batch (reading every weight, writing a parameter-sized gradient): every exact method "
          "makes at least two parameter-sized gradients (∇θL_w and the step's own), so the split method's FLOP "
          "saving (1.5× in FLOPs) does not show there, while it does on the toy UNet at 16 pairs per step."
          for r in results if r["model"] == "sd15"],
        "",
        "Largest |λ − λ_backward| over the timed rounds (same data, t and noise; the weights move by one tiny "
        "optimizer step between variants): " + "; ".join(
            f"{r['model']}: " + ", ".join(f"{v.split(', ')[1].rstrip(')')} {g:.2e}" for v, g in r["max_lambda_gap"].items())
            for r in results) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,sd15", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per model (default: 30 toy, 5 sd15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "objectives"), help="output path stem (.md, .json)")
    ap.add_argument("--from-json", action="store_true", help="rewrite the .md from the saved .json without measuring")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        out.with_suffix(".md").write_text(report(json.loads(out.with_suffix(".json").read_text())))
        return
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"--models: unknown model {name!r}; expected a subset of {sorted(MODELS)}")
        rounds = args.rounds or (30 if name == "toy" else 5)
        print(f"benchmarking {name} ({rounds} rounds)", flush=True)
        results.append(bench_model(name, rounds, args.warmup))
    text = report(results)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
