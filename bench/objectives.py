"""Step time of Diffusion-DPO with and without the SDPO safeguard, measured side by side.

One training step = policy forward on winners+losers (one batched call), reference forward under
``inference_mode``, the objective, backward, optimizer step. Variants run interleaved round by round
(A B C, B C A, C A B, …) so machine noise and order effects hit all of them alike; the report gives the median step time of each
and ratios to plain DPO (ratio of medians and the median of per-round ratios).

    python bench/objectives.py                      # both models, results to bench/results/objectives.md
    python bench/objectives.py --models toy --rounds 5

Models (random weights from diffusers configs): a toy-size pixel UNet (attention only at 8×8) and a UNet
with the SD 1.5 architecture at 32×32 latents. SD 1.5 uses plain SGD: AdamW's two state copies plus the
parameter-space gradients of an 860M-parameter model do not fit in 24 GB; SGD also makes the objective's
share of the step larger, so the overhead ratios are conservative.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipeline.objectives import DiffusionProcess, parameter_space_lambda, preference_loss, preset

VARIANTS = ("dpo", "dpo+sdpo(output)", "dpo+sdpo(parameter)")


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


def make_step(unet, ref, opt, process, spec, variant, generator):
    cfg = preset("diffusion-dpo")
    if variant != "dpo":
        cfg = cfg.with_safeguard(mu=0.9, space="parameter" if variant.endswith("(parameter)") else "output")
    b, c, s = spec["pairs"], spec["channels"], spec["size"]
    x_w, x_l = torch.randn(b, c, s, s, generator=generator), torch.randn(b, c, s, s, generator=generator)
    text = torch.randn(b, spec["text_len"], spec["text_dim"], generator=generator)
    t = process.sample_timesteps(b, generator=generator)

    def step():
        pair = process.noise_pair(x_w, x_l, t, generator=generator)
        x_t = torch.cat([pair.x_t_w, pair.x_t_l])
        tt, cond = process.model_input_timesteps(t).repeat(2), text.repeat(2, 1, 1)
        pred = unet(x_t, tt, encoder_hidden_states=cond).sample
        with torch.inference_mode():
            ref_pred = ref(x_t, tt, encoder_hidden_states=cond).sample
        ref_pred = ref_pred.clone()  # leave inference mode for the objective
        policy_w, policy_l = pred.chunk(2)
        ref_w, ref_l = ref_pred.chunk(2)
        lam = None
        if cfg.safeguard is not None and cfg.safeguard.space == "parameter":
            lam = parameter_space_lambda(policy_w, pair.target_w, policy_l, pair.target_l, unet.parameters(), mu=0.9)
        out = preference_loss(
            cfg, policy_w=policy_w, policy_l=policy_l, ref_w=ref_w, ref_l=ref_l,
            target_w=pair.target_w, target_l=pair.target_l, loser_scale=lam,
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return step


def bench_model(name: str, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    unet, spec = MODELS[name]()
    ref = copy.deepcopy(unet).requires_grad_(False).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    else:
        opt = torch.optim.SGD(unet.parameters(), lr=1e-8)
    process = DiffusionProcess.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    g = torch.Generator().manual_seed(0)
    steps = {v: make_step(unet, ref, opt, process, spec, v, g) for v in VARIANTS}
    for _ in range(warmup):
        for v in VARIANTS:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[: r % 3]  # rotate so no variant always follows another
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
        print(f"  [{name}] round {r + 1}/{rounds}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in VARIANTS), flush=True)
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    per_round = {v: statistics.median(a / b for a, b in zip(times[v], times["dpo"])) for v in VARIANTS}
    return dict(model=name, params=n_params, spec=spec, rounds=rounds, warmup=warmup, times=times,
                median=med, ratio_of_medians={v: med[v] / med["dpo"] for v in VARIANTS}, median_round_ratio=per_round)


def report(results: list[dict]) -> str:
    lines = [
        "# Objective step time: DPO vs DPO+SDPO",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU fp32. Produced by `python bench/objectives.py`.",
        "",
        "| model | params | pairs/step | variant | median step (s) | ratio of medians | median per-round ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for v in VARIANTS:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['spec']['pairs']} | {v} | {r['median'][v]:.3f} | "
                f"{r['ratio_of_medians'][v]:.3f} | {r['median_round_ratio'][v]:.3f} |"
            )
    lines += ["", "Rounds (interleaved) after warm-up: " + ", ".join(f"{r['model']}: {r['rounds']}" for r in results)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,sd15", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per model (default: 30 toy, 4 sd15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "objectives"), help="output path stem (.md, .json)")
    args = ap.parse_args(argv)
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"--models: unknown model {name!r}; expected a subset of {sorted(MODELS)}")
        rounds = args.rounds or (30 if name == "toy" else 4)
        print(f"benchmarking {name} ({rounds} rounds)", flush=True)
        results.append(bench_model(name, rounds, args.warmup))
    text = report(results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
