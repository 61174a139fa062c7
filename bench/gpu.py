"""The GPU path in one command: SD 1.5 architecture (random weights), bf16, 64×64×4 latents.

    python bench/gpu.py            # on a GPU machine: a few minutes, writes bench/results/gpu.{md,json}
    python bench/gpu.py --smoke    # CPU smoke test of the same code (tiny SD-layout model, few steps):
                                   # writes bench/results/gpu_cpu_smoke.{md,json} — not GPU numbers

Sections, each written to the results as soon as it finishes (a failing section records its error and the
rest still run, so one shot on a borrowed machine always leaves a report):

1. rollouts: the product's CFG sampler (``pipeline/sampling.py: sample``) on a backbone loaded in bf16
   (``load_backbone(dtype=bfloat16)``), VAE decode included; images/s and peak memory.
2. training, one GPU: the product's engine (``TrainEngine.train_step``) with Diffusion-DPO, bf16 autocast, the
   frozen reference stored in bf16; pairs/s and peak memory. In the same loop, rotated step by step so drift hits
   all alike: the same engine with the output-space SDPO safeguard (its objective swapped in), and the *floor* —
   the model work a DPO step cannot avoid, measured separately on the same batch: policy forward + backward and
   reference forward over winners and losers (``Backbone.predict``, the calls ``preference_step`` makes), no
   text encoding, noising, loss maths, clipping or optimizer. Reported: DPO step / floor (target ≤ 1.10) and
   SDPO / DPO (target ≤ 1.02), medians over the timed steps, plus AdamW's step alone for context.
3. FSDP2 over NCCL on all visible GPUs (gloo on CPU in the smoke test): one process per GPU, the engine with
   ``fsdp_mixed_precision`` (bf16 parameters, fp32 reduction), with and without activation checkpointing;
   global pairs/s and per-GPU peak memory. On a one-GPU machine this is a one-rank process group, where the
   engine still applies FSDP2 for its mixed-precision policy (``pipeline/training/parallel.py``).

Run time is bounded by the step counts (``--steps``, ``--rollout-batches``); ``--budget-s`` skips the sections
not yet started once it is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from pipeline.backbones import load_backbone
from pipeline.sampling import SamplerConfig, sample
from pipeline.training import PairBatch, TrainConfig, TrainEngine

PROMPTS = ["two red circles on the left", "one blue square at the top", "three green triangles on the right",
           "a yellow circle in the middle"]
DPO = {"name": "diffusion-dpo"}
SDPO = {"name": "diffusion-dpo", "safeguard": {"mu": 0.9, "space": "output"}}


# ---------------------------------------------------------------------------------------------- model
def build_sd15_folder(path: Path, *, tiny: bool = False, vae: bool = True) -> Path:
    """A model folder with SD 1.5's architecture and random weights: UNet2DConditionModel's default layout with
    768-d cross-attention, a 12-layer 768-wide CLIP text encoder over 77 tokens, SD's AutoencoderKL and its
    scheduler. ``tiny``: the same layout shrunk to smoke-test size (16×16 latents)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.backbones import UNetBackbone
    from pipeline.toyworld.reference import build_tokenizer, vocabulary

    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.model_max_length = 77
    ids = {w: i for i, w in enumerate(vocabulary())}
    width = 64 if tiny else 768
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2 if tiny else 12,
        num_attention_heads=4 if tiny else 12, max_position_embeddings=77, projection_dim=width,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"]))
    if tiny:
        unet = UNet2DConditionModel(sample_size=16, cross_attention_dim=width, block_out_channels=(32, 32, 64, 64),
                                    norm_num_groups=8, attention_head_dim=4)
    else:  # UNet2DConditionModel's defaults are the SD 1.x layout; SD 1.5 has 768-d text states
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    autoencoder = None
    if vae:
        blocks = (16, 16, 32, 32) if tiny else (128, 256, 512, 512)
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=blocks,
                                    layers_per_block=1 if tiny else 2, latent_channels=4,
                                    norm_num_groups=8 if tiny else 32, sample_size=128 if tiny else 512,
                                    scaling_factor=0.18215)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="epsilon")
    UNetBackbone(tok, text, unet, sched.config, autoencoder).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _pair_batch(n: int, shape: tuple[int, ...], seed: int) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randn(n, *shape, generator=gen), torch.randn(n, *shape, generator=gen),
                     [PROMPTS[i % len(PROMPTS)] for i in range(n)], pair_ids=[f"p{i}" for i in range(n)])


def _config(model: Path, args, **kw) -> TrainConfig:
    return TrainConfig(model=str(model), objective=DPO, lr=1e-6, max_steps=10**6, batch_size=args.batch,
                       bf16=True, grad_clip=1.0, torch_threads=args.threads, **kw)


# ---------------------------------------------------------------------------------------------- 1. rollouts
def rollouts(model: Path, args, device: torch.device) -> dict:
    backbone = load_backbone(model, device=device, dtype=torch.bfloat16)
    cfg = SamplerConfig(num_steps=args.sample_steps, guidance_scale=7.5, eta=1.0, batch_size=args.rollout_batch)
    n = args.rollout_batch
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    sample(backbone, prompts, list(range(n)), cfg)  # warm-up (kernels, allocator)
    _reset_peak(device)
    times = [_timed(lambda b=b: sample(backbone, prompts, list(range(b * n, (b + 1) * n)), cfg), device)
             for b in range(args.rollout_batches)]
    out = {"images_per_s": n / statistics.median(times), "batch_times_s": times, "batch": n,
           "sampling_steps": args.sample_steps, "guidance_scale": 7.5, "peak_gib": _peak_gib(device),
           "image_size": list(backbone.decode_latents(torch.zeros(1, *backbone.latent_shape(), device=device)).shape[1:])}
    return out  # the models are freed on return


# ---------------------------------------------------------------------------------------------- 2. training
def training(model: Path, args, device: torch.device) -> dict:
    from pipeline.backbones.base import cat_conditioning

    engine = TrainEngine(_config(model, args), device=device)
    backbone, shape = engine.backbone, engine.backbone.latent_shape()
    dpo, sdpo = engine.objective, TrainConfig(objective=SDPO).objective_config()
    batch = _pair_batch(args.batch, shape, seed=0)
    n = args.batch
    cond = cat_conditioning([backbone.encode_prompts(batch.prompts)] * 2)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(2 * n, *shape, generator=gen).to(device)
    t = torch.randint(0, backbone.process.num_timesteps, (2 * n,), generator=gen).to(device)

    def step(objective):
        engine.objective = objective
        engine.train_step([batch], [torch.Generator().manual_seed(2)])

    def floor():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=engine._autocast):
            pred = backbone.predict(x_t, t, cond)
            pred.float().pow(2).mean().backward()
            backbone.predict(x_t, t, cond, reference=engine.reference)
        engine.optimizer.zero_grad(set_to_none=True)

    def optimizer_only():
        for p in engine.params:
            p.grad = torch.zeros_like(p)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)

    parts = {"dpo": lambda: step(dpo), "sdpo": lambda: step(sdpo), "floor": floor, "adamw": optimizer_only}
    for _ in range(args.warmup):
        for fn in parts.values():
            fn()
    _reset_peak(device)
    times: dict[str, list[float]] = {k: [] for k in parts}
    names = list(parts)
    for i in range(args.steps):  # rotated order: drift and order effects hit every part alike
        for k in names[i % len(names):] + names[:i % len(names)]:
            times[k].append(_timed(parts[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"batch_pairs": n, "latent_shape": list(shape), "steps": args.steps, "warmup": args.warmup,
           "median_s": med, "times_s": times, "pairs_per_s_dpo": n / med["dpo"], "pairs_per_s_sdpo": n / med["sdpo"],
           "dpo_over_floor": med["dpo"] / med["floor"], "sdpo_over_dpo": med["sdpo"] / med["dpo"],
           "median_round_sdpo_over_dpo": statistics.median(a / b for a, b in zip(times["sdpo"], times["dpo"])),
           "median_round_dpo_over_floor": statistics.median(a / b for a, b in zip(times["dpo"], times["floor"])),
           "peak_gib": _peak_gib(device), "parallel": engine.parallel,
           "params": sum(p.numel() for p in backbone.denoiser.parameters()),
           "reference_dtype": str(next(engine.reference.parameters()).dtype)}
    return out  # the models are freed on return


# ---------------------------------------------------------------------------------------------- 3. FSDP2
VARIANTS = {"fsdp2 + mixed precision": {}, "fsdp2 + mixed precision + activation checkpointing":
            {"activation_checkpointing": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(rank: int, world: int, port: int, model: str, args_dict: dict, out_dir: str) -> None:
    import torch.distributed as dist

    args = argparse.Namespace(**args_dict)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:  # the smoke test's processes share the machine's cores
        torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    try:
        res = {}
        for name, kw in VARIANTS.items():
            engine = TrainEngine(_config(Path(model), args, fsdp_mixed_precision=True, **kw), device=device,
                                 rank=rank, world=world)
            batch = _pair_batch(args.batch, engine.backbone.latent_shape(), seed=rank)
            for _ in range(args.warmup):
                engine.train_step([batch])
            _reset_peak(device)
            times, losses = [], []
            for _ in range(args.steps):
                dist.barrier()
                times.append(_timed(lambda: losses.append(engine.train_step([batch])["loss"]), device))
            t = torch.tensor([statistics.median(times)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank's does
            peak = torch.tensor([_peak_gib(device) or 0.0], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            res[name] = {"median_step_s": float(t), "pairs_per_s": args.batch * world / float(t),
                         "peak_gib_max_rank": float(peak) if cuda else None, "parallel": engine.parallel,
                         "last_loss": losses[-1]}
            engine = None  # freed before the next variant loads its own
            if cuda:
                torch.cuda.empty_cache()
        if rank == 0:
            Path(out_dir, "fsdp.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def fsdp(model: Path, args, device: torch.device, work: Path) -> dict:
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if device.type == "cuda" else 2
    mp.spawn(fsdp_worker, args=(world, _free_port(), str(model), vars(args), str(work)), nprocs=world, join=True)
    return {"world": world, "backend": "nccl" if device.type == "cuda" else "gloo", "batch_pairs_per_rank": args.batch,
            "variants": json.loads((work / "fsdp.json").read_text())}


# ---------------------------------------------------------------------------------------------- report
def _f(x, fmt=".2f"):
    return "–" if x is None else format(x, fmt)


def _peak(gib) -> str:
    return "peak memory: GPU only" if gib is None else f"peak memory {gib:.2f} GiB"


def report(res: dict) -> str:
    smoke = res["smoke"]
    title = ("# GPU path — CPU SMOKE TEST (not GPU numbers)" if smoke else "# GPU path: SD 1.5 architecture, bf16")
    lines = [title, ""]
    if smoke:
        lines += ["This file only shows that `bench/gpu.py` runs end to end: a tiny SD-layout model (16×16 latents) on "
                  "CPU, a few steps, fp32 (bf16 autocast and mixed precision are GPU-only). Its timings and ratios say "
                  "nothing about a GPU; run `python bench/gpu.py` on one for `bench/results/gpu.md`.", ""]
    lines += [f"Device: {res['device_name']}; torch {res['torch']}; {platform.machine()}, {os.cpu_count()} CPU cores. "
              f"Produced by `python bench/gpu.py{(' ' + ' '.join(res['argv'])) if res['argv'] else ''}` in "
              f"{res['seconds']:.0f} s.", ""]
    r = res.get("rollouts")
    lines += ["## 1. Rollouts (CFG sampling + VAE decode, backbone in bf16)", ""]
    if r and "error" not in r:
        lines += [f"{r['batch']} images per batch, {r['sampling_steps']} steps, guidance {r['guidance_scale']}, "
                  f"images {'×'.join(map(str, r['image_size']))}: **{r['images_per_s']:.2f} images/s** (median of "
                  f"{len(r['batch_times_s'])} batches), {_peak(r['peak_gib'])}.", ""]
    elif r:
        lines += [f"Failed: `{r['error']}`", ""]
    t = res.get("training")
    lines += ["## 2. Training, one device: the engine's step (`TrainEngine.train_step`)", ""]
    if t and "error" not in t:
        m = t["median_s"]
        lines += [f"{t['params'] / 1e6:.0f}M-parameter UNet, {t['batch_pairs']} pairs per step, latents "
                  f"{'×'.join(map(str, t['latent_shape']))}, AdamW, clipping at 1.0, reference {t['reference_dtype']} "
                  f"({t['parallel']}); medians of {t['steps']} rotated rounds after {t['warmup']} warm-up rounds. "
                  f"{_peak(t['peak_gib'])[0].upper()}{_peak(t['peak_gib'])[1:]}.", "",
                  "| part | median s | pairs/s | ratio | target |", "|---|---|---|---|---|",
                  f"| Diffusion-DPO step | {m['dpo']:.4f} | **{t['pairs_per_s_dpo']:.2f}** | – | – |",
                  f"| floor: policy fwd+bwd + reference fwd | {m['floor']:.4f} | – | DPO / floor **{t['dpo_over_floor']:.3f}** "
                  f"(per round {t['median_round_dpo_over_floor']:.3f}) | ≤ 1.10 |",
                  f"| DPO + SDPO safeguard (output space) | {m['sdpo']:.4f} | {t['pairs_per_s_sdpo']:.2f} | SDPO / DPO "
                  f"**{t['sdpo_over_dpo']:.3f}** (per round {t['median_round_sdpo_over_dpo']:.3f}) | ≤ 1.02 |",
                  f"| AdamW step alone (context: inside the DPO step, outside the floor) | {m['adamw']:.4f} | – | – | – |",
                  ""]
    elif t:
        lines += [f"Failed: `{t['error']}`", ""]
    f = res.get("fsdp")
    lines += ["## 3. FSDP2 across processes", ""]
    if f and "error" not in f:
        lines += [f"{f['world']} process(es), {f['backend']}, {f['batch_pairs_per_rank']} pairs per rank per step.", "",
                  "| variant | applied | median step s | global pairs/s | peak GiB (max over ranks) | last loss |",
                  "|---|---|---|---|---|---|"]
        for name, v in f["variants"].items():
            lines.append(f"| {name} | {v['parallel']} | {v['median_step_s']:.4f} | {v['pairs_per_s']:.2f} | "
                         f"{_f(v['peak_gib_max_rank'])} | {v['last_loss']:.6f} |")
        lines += ["", "Same seeds and batches in both variants: activation checkpointing should leave the loss unchanged.", ""]
    elif f:
        lines += [f"Failed: `{f['error']}`", ""]
    for k in ("rollouts", "training", "fsdp"):
        if k in res.get("skipped", {}):
            lines += [f"Section {k} skipped: {res['skipped'][k]}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, on CPU unless --device cuda")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda, or cpu with --smoke")
    ap.add_argument("--sections", default="rollouts,training,fsdp")
    ap.add_argument("--batch", type=int, default=None, help="pairs per training step per device (8; smoke 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed training rounds (20; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up training rounds (3; smoke 1)")
    ap.add_argument("--rollout-batch", type=int, default=None, help="images per sampling batch (16; smoke 2)")
    ap.add_argument("--rollout-batches", type=int, default=None, help="timed sampling batches (3; smoke 1)")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampling steps per image (20; smoke 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--budget-s", type=float, default=480, help="sections not started once this is spent are skipped")
    ap.add_argument("--model", default="", help="an existing SD 1.5-layout folder (default: build one, random weights)")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/gpu, or gpu_cpu_smoke)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    small = dict(batch=2, steps=3, warmup=1, rollout_batch=2, rollout_batches=1, sample_steps=2)
    full = dict(batch=8, steps=20, warmup=3, rollout_batch=16, rollout_batches=3, sample_steps=20)
    for k, v in (small if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke (CPU) or on a GPU machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results_dir = Path(__file__).parent / "results"
    out = Path(args.out) if args.out else results_dir / ("gpu_cpu_smoke" if args.device == "cpu" else "gpu")
    t_start = time.time()
    res: dict = {"smoke": args.smoke or args.device == "cpu", "argv": argv, "args": vars(args), "torch": torch.__version__,
                 "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "skipped": {},
                 "gpus": torch.cuda.device_count() if args.device == "cuda" else 0}

    def write():
        res["seconds"] = time.time() - t_start
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(report(res))

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            print("building the model folder (random weights)", flush=True)
            model = build_sd15_folder(work / "sd15", tiny=args.smoke)
        for name, fn in (("rollouts", lambda: rollouts(model, args, device)),
                         ("training", lambda: training(model, args, device)),
                         ("fsdp", lambda: fsdp(model, args, device, work))):
            if name not in args.sections.split(","):
                continue
            if time.time() - t_start > args.budget_s:
                res["skipped"][name] = f"the {args.budget_s:.0f} s budget was spent"
                continue
            print(f"{name} …", flush=True)
            t0 = time.time()
            try:
                res[name] = fn()
            except Exception as err:  # one shot: record it and go on to the next section
                traceback.print_exc()
                res[name] = {"error": f"{type(err).__name__}: {err}"}
            res[name]["seconds"] = time.time() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
            print(json.dumps({k: v for k, v in res[name].items() if k not in ("times_s", "batch_times_s")}), flush=True)
    write()
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
