"""Training: the engine in a Ray Train worker against the same engine in-process, 2-worker FSDP2 correctness, a GPU row.

    python bench/training.py                          # (a) + (b) on CPU, (c) only with CUDA; ≈10 min on 2 cores
    python bench/training.py --sections a --rounds 2 --steps 10     # a quick look at (a)

(a) Throughput, 1 worker on CPU: the one training engine (``pipeline/training/engine.py``) inside a Ray
    Train worker (``run_training``: TorchTrainer, Train V2, pairs from a Ray Data shard, a checkpoint at the
    end) against the same engine in this process (``train_in_process``) — same model (the shipped toy
    reference), objective (SIPO), batch size, steps, data order and torch thread count. Sides alternate
    (R B, B R, …) round by round. Steady-state pairs/s: the engine's own ``pairs_per_s`` metric per
    ``log_every`` window on both sides (so it excludes Ray Train start-up, model loading and the final
    checkpoint). End to end: ``run_training``'s wall time (Ray itself already started) against model
    loading + the loop. The difference is what Ray Train costs, nothing else.
(b) Correctness, 2 workers × batch b/2 under FSDP2 (gloo) against 1 process × batch b, no FSDP. Both run
    the same pairs in the same order with the same timesteps and noise per pair (each pair's randomness
    comes from a generator seeded by (step, pair index), whichever worker holds it); each rank backpropagates
    its local mean loss and FSDP2 averages the gradients, which is the gradient of the global mean. So the
    per-step losses and the parameters after k AdamW steps (with gradient clipping on the global norm)
    must agree up to float rounding. A control (1 process, only the first half of every batch) shows how
    far apart two runs end when the data differ.
(c) GPU (only when CUDA is available): (a) again with an SD 1.5-architecture UNet (860M parameters,
    random weights, 64×64×4 latents, 77-token 768-d text states from a random 12-layer CLIP text encoder),
    bf16 autocast, 1 GPU worker, on synthetic latent pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import load_backbone
from pipeline.data.schema import read_pairs
from pipeline.toyworld.reference import REFERENCE_DIR
from pipeline.training import PairData, TrainConfig, TrainEngine, train_in_process

OBJECTIVE = "sipo"
LR = 1e-5


# ---------------------------------------------------------------------------------------------- data
def make_pairs(root: Path) -> Path:
    """On-policy best-vs-worst pairs of the shipped toy reference (the data the job trains on)."""
    from pipeline.data.generate import GenerationConfig, generate

    out = root / "pairs_toy"
    generate(GenerationConfig(prompt_limit=32, samples_per_prompt=4, batch_size=64, write_png=False,
                              sampler={"num_steps": 6, "guidance_scale": 3.0, "eta": 1.0, "batch_size": 64}), out)
    return out / "pairs"


# ---------------------------------------------------------------------------------------------- (a) / (c)
def _steady(windows: list[float]) -> float:
    """Pairs/s over every window but the first (equal windows: the harmonic mean of their rates)."""
    rest = windows[1:] or windows
    return len(rest) / sum(1.0 / r for r in rest)


def _config(model: str, steps: int, batch_size: int, window: int, *, use_gpu: bool = False,
            torch_threads: int = 0) -> TrainConfig:
    """The same TrainConfig for both sides: timing windows are the engine's ``log_every`` reports."""
    return TrainConfig(model=model, objective=OBJECTIVE, lr=LR, max_steps=steps, batch_size=batch_size,
                       log_every=window, checkpoint_every=steps, use_gpu=use_gpu, torch_threads=torch_threads)


def bare_loop(model: str, data: PairData, steps: int, batch_size: int, window: int, *, device: str = "cpu") -> dict:
    """The training engine in this process (no Ray); the same per-window ``pairs_per_s`` metric as the worker's,
    steady = all windows but the first; wall time includes loading the model."""
    t_start = time.perf_counter()
    engine = train_in_process(_config(model, steps, batch_size, window), data, device=device)
    windows = [float(h["pairs_per_s"]) for h in engine.history]
    return {"pairs_per_s": _steady(windows), "first_window": windows[0], "windows": windows,
            "wall_s": time.perf_counter() - t_start, "last_loss": engine.history[-1]["loss"]}


def ray_loop(model: str, pairs: Path, steps: int, batch_size: int, window: int, storage: Path, name: str, *,
             use_gpu: bool = False) -> dict:
    """The production path: the same engine inside a Ray Train worker; its ``pairs_per_s`` per log window
    (the one checkpoint, at the end, falls after the last window)."""
    from pipeline.training.checkpoint import checkpoint_history
    from pipeline.training.trainer import run_training

    t0 = time.perf_counter()
    result = run_training(_config(model, steps, batch_size, window, use_gpu=use_gpu), pairs, storage, name)
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        windows = [float(h["pairs_per_s"]) for h in checkpoint_history(d)]
    return {"pairs_per_s": _steady(windows), "first_window": windows[0], "windows": windows, "wall_s": wall,
            "last_loss": float(result.metrics["loss"])}


def ab_rounds(label: str, rounds: int, run_ray, run_bare) -> dict:
    """Alternate the two sides round by round (R B, B R, …)."""
    res: dict[str, list[dict]] = {"ray": [], "bare": []}
    for r in range(rounds):
        for side in (("ray", "bare") if r % 2 == 0 else ("bare", "ray")):
            res[side].append(run_ray(r) if side == "ray" else run_bare(r))
        ray_r, bare_r = res["ray"][-1], res["bare"][-1]
        print(f"  [{label}] round {r + 1}/{rounds}: steady pairs/s Ray {ray_r['pairs_per_s']:.2f} (first window "
              f"{ray_r['first_window']:.2f}, {ray_r['wall_s']:.1f} s end to end), bare {bare_r['pairs_per_s']:.2f} "
              f"(first window {bare_r['first_window']:.2f}, {bare_r['wall_s']:.1f} s)", flush=True)
    med = {s: {k: statistics.median(x[k] for x in res[s]) for k in ("pairs_per_s", "first_window", "wall_s")} for s in res}
    return {
        "rounds": res, "median": med,
        "steady_ratio_of_medians": med["ray"]["pairs_per_s"] / med["bare"]["pairs_per_s"],
        "steady_median_round_ratio": statistics.median(a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(res["ray"], res["bare"])),
        "wall_ratio_of_medians": med["ray"]["wall_s"] / med["bare"]["wall_s"],
    }


def section_a(args, pairs: Path, work: Path) -> dict:
    data = PairData.from_table(read_pairs(pairs))
    torch.set_num_threads(args.threads)
    out = ab_rounds("a", args.rounds,
                    lambda r: ray_loop(str(REFERENCE_DIR), pairs, args.steps, args.batch_size, args.window,
                                       work / "ray_a", f"a{r}"),
                    lambda r: bare_loop(str(REFERENCE_DIR), data, args.steps, args.batch_size, args.window))
    return {**out, "num_pairs": len(data), "steps": args.steps, "window": args.window,
            "batch_size": args.batch_size, "threads": args.threads}


# ---------------------------------------------------------------------------------------------- (b)
def fsdp_run(config: dict) -> dict:
    """k engine steps on fixed batches; under Ray Train (2 workers) each rank takes its half of every batch.
    Every pair is its own micro-batch with its own generator, seeded by (step, pair position), so its
    timestep and noise are the same whichever worker holds it; the engine averages the micro-batch losses
    and FSDP2 the ranks' gradients, which is the gradient of the global mean."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = TrainConfig(model=config["model"], objective=OBJECTIVE, lr=config["lr"], grad_clip=config["grad_clip"],
                      max_steps=config["steps"], batch_size=1)
    engine = TrainEngine(cfg, rank=rank, world=world)
    data = PairData.from_table(read_pairs(Path(config["pairs"])))
    b, n = config["batch_size"], len(data)
    keep = config.get("keep", b)  # the control keeps only the first part of every batch
    rng = np.random.default_rng(0)  # the same pair order in every process: epochs of permutations
    order = np.concatenate([rng.permutation(n) for _ in range(config["steps"] * b // n + 1)])
    losses, grad_norms = [], []
    for step in range(config["steps"]):
        rows = list(range(step * b, step * b + keep))
        mine = rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]
        batches = [data.batch(np.array([int(order[j])])) for j in mine]
        gens = [torch.Generator().manual_seed(1_000_003 * step + j) for j in mine]
        m = engine.train_step(batches, gens)
        local = torch.tensor(m["loss"], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(local)
            local /= world
        losses.append(float(local))
        grad_norms.append(m["grad_norm"])
    state = engine.policy_weights()
    out = {"losses": losses, "grad_norms": grad_norms, "world": world, "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if rank == 0 and config.get("out"):
        torch.save({"state": state, **out}, config["out"])
    return {"state": state, **out}


def fsdp_worker(config: dict) -> None:
    fsdp_run(config)


def section_b(args, pairs: Path, work: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    base = {"model": str(REFERENCE_DIR), "pairs": str(pairs), "steps": args.fsdp_steps, "batch_size": args.fsdp_batch,
            "lr": args.fsdp_lr, "grad_clip": 1.0}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    single = fsdp_run(base)
    t_single = time.perf_counter() - t0
    control = fsdp_run({**base, "keep": args.fsdp_batch // 2})
    out_file = work / "fsdp_two_workers.pt"
    t0 = time.perf_counter()
    TorchTrainer(fsdp_worker, train_loop_config={**base, "out": str(out_file)},
                 scaling_config=ScalingConfig(num_workers=2), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name="fsdp", storage_path=str(work / "ray_b"))).fit()
    t_two = time.perf_counter() - t0
    two = torch.load(out_file, weights_only=True)
    initial = load_backbone(str(REFERENCE_DIR)).denoiser.state_dict()

    def max_diff(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    assert set(two["state"]) == set(single["state"]), "2-worker state dict keys differ from the single process"
    res = {
        "steps": args.fsdp_steps, "batch_size": args.fsdp_batch, "lr": args.fsdp_lr,
        "single_losses": single["losses"], "two_worker_losses": two["losses"], "control_losses": control["losses"],
        "single_grad_norms": single["grad_norms"], "two_worker_grad_norms": two["grad_norms"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(single["losses"], two["losses"])),
        "max_grad_norm_rel_diff": max(abs(a - b) / a for a, b in zip(single["grad_norms"], two["grad_norms"])),
        "max_param_diff": max_diff(single["state"], two["state"]),
        "max_param_change": max_diff(single["state"], initial),
        "control_max_param_diff": max_diff(single["state"], control["state"]),
        "worker_torch_threads": two["torch_threads"], "worker_omp_num_threads": two["omp_num_threads"],
        "seconds_single": t_single, "seconds_two_workers": t_two,
    }
    print(f"  [b] max |Δloss| {res['max_loss_diff']:.2e}, max |Δθ| {res['max_param_diff']:.2e} "
          f"(θ moved up to {res['max_param_change']:.2e}; control {res['control_max_param_diff']:.2e}); "
          f"Ray worker torch threads: {res['worker_torch_threads']}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------- (c)
def build_sd15_folder(path: Path, *, tiny: bool = False) -> None:
    """An SD 1.5-architecture model folder with random weights (no VAE: trained on latents directly)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu import build_sd15_folder as build

    build(path, tiny=tiny, vae=False)


def synthetic_pairs(path: Path, n: int, shape: tuple[int, int, int]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.schema import PAIR_SCHEMA, SCHEMA_VERSION

    rng = np.random.default_rng(0)
    size = int(np.prod(shape))
    cols = {
        "schema_version": [SCHEMA_VERSION] * n, "pair_id": [f"p{i}" for i in range(n)],
        "prompt": ["two red circles on the left"] * n, "perturbed_prompt": [""] * n, "strategy": ["onpolicy"] * n,
        "round": [0] * n, "policy_version": ["bench"] * n, "seed_w": list(range(n)), "seed_l": list(range(n, 2 * n)),
        "reward_w": [1.0] * n, "reward_l": [0.0] * n, "prompt_reward_mean": [0.5] * n, "prompt_reward_std": [0.5] * n,
        "prompt_num_samples": [2] * n, "latent_shape": [list(shape)] * n,
        "latent_w": [rng.standard_normal(size, dtype=np.float32) for _ in range(n)],
        "latent_l": [rng.standard_normal(size, dtype=np.float32) for _ in range(n)],
        "png_w": [b""] * n, "png_l": [b""] * n,
    }
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(cols, schema=PAIR_SCHEMA), path / "part-0.parquet")
    read_pairs(path)  # validate
    return path


def section_c(args, work: Path, device: str) -> dict:
    model = work / "sd15_random"
    tiny = device == "cpu"  # only the smoke test runs this section on CPU
    build_sd15_folder(model, tiny=tiny)
    shape = (4, 16, 16) if tiny else (4, 64, 64)
    pairs = synthetic_pairs(work / "pairs_sd15", max(64, 4 * args.gpu_batch), shape)
    data = PairData.from_table(read_pairs(pairs))
    out = ab_rounds("c", args.gpu_rounds,
                    lambda r: ray_loop(str(model), pairs, args.gpu_steps, args.gpu_batch, args.gpu_window,
                                       work / "ray_c", f"c{r}", use_gpu=device != "cpu"),
                    lambda r: bare_loop(str(model), data, args.gpu_steps, args.gpu_batch, args.gpu_window,
                                        device=device))
    return {**out, "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu (smoke test)",
            "steps": args.gpu_steps, "window": args.gpu_window, "latent_shape": list(shape), "batch_size": args.gpu_batch, "params": sum(
                p.numel() for p in load_backbone(str(model)).denoiser.parameters())}


# ---------------------------------------------------------------------------------------------- report
def _ab_table(res: dict) -> list[str]:
    m = res["median"]
    rows = [
        "| side | median steady pairs/s | steady ratio of medians | median per-round steady ratio | median first-window pairs/s | median end-to-end s | end-to-end time ratio |",
        "|---|---|---|---|---|---|---|",
        f"| the engine in this process (`train_in_process`) | {m['bare']['pairs_per_s']:.2f} | 1.00 | 1.00 | {m['bare']['first_window']:.2f} | {m['bare']['wall_s']:.1f} | 1.00 |",
        f"| the engine in a Ray Train worker (`run_training`) | {m['ray']['pairs_per_s']:.2f} | **{res['steady_ratio_of_medians']:.2f}** | "
        f"{res['steady_median_round_ratio']:.2f} | {m['ray']['first_window']:.2f} | {m['ray']['wall_s']:.1f} | {res['wall_ratio_of_medians']:.2f} |",
        "",
        "Per round steady pairs/s (Ray / in-process): " + ", ".join(
            f"{a['pairs_per_s']:.2f} / {b['pairs_per_s']:.2f}" for a, b in zip(res["rounds"]["ray"], res["rounds"]["bare"])),
        "",
        "Per round end-to-end seconds (Ray / in-process): " + ", ".join(
            f"{a['wall_s']:.1f} / {b['wall_s']:.1f}" for a, b in zip(res["rounds"]["ray"], res["rounds"]["bare"])),
    ]
    return rows


def report(results: dict, argv: list[str]) -> str:
    lines = ["# Training: the engine in a Ray Train worker vs in-process, FSDP2 correctness, GPU", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while this ran), torch "
             f"{torch.__version__}, Ray {results['ray_version']}. Produced by `python bench/training.py"
             f"{(' ' + ' '.join(argv)) if argv else ''}` in {results['seconds']:.0f} s.", ""]
    if "a" in results:
        a = results["a"]
        lines += [f"## (a) Throughput, 1 worker, CPU: the shipped toy reference (1.44M-parameter pixel UNet, 32×32), "
                  f"{OBJECTIVE}, batch {a['batch_size']} pairs, {a['steps']} steps timed in windows of {a['window']}, "
                  f"{a['num_pairs']} on-policy pairs, "
                  f"{a['threads']} torch thread(s) on both sides, {len(a['rounds']['ray'])} alternating rounds", ""]
        lines += _ab_table(a)
        lines += ["", "*Steady* pairs/s excludes start-up on both sides. Both sides are the training engine's own `pairs_per_s` "
                  "metric, reported every `log_every` steps and timed inside the engine from after one report to "
                  "the next: it never includes Ray Train start-up, model loading or the checkpoint writes. Its *first* "
                  "window also holds the Ray Data shard's start-up (the first batch) and the first steps' warm-up, so "
                  "steady = all windows but the first (pairs over time); the in-process engine is timed in the same windows. "
                  "*End to end* is `run_training`'s wall time — Ray Train controller and worker start-up, gloo process "
                  "group, dataset, model loading in the worker, training, the checkpoints — with `ray.init` already done, "
                  "against model loading + the loop for the in-process side.", ""]
    if "b" in results:
        b = results["b"]
        lines += [f"## (b) FSDP2, 2 workers × batch {b['batch_size'] // 2} (gloo) vs 1 process × batch {b['batch_size']}",
                  "", f"{b['steps']} AdamW steps (lr {b['lr']:g}, gradient clipping at 1.0 on the global norm), "
                  f"{OBJECTIVE}, the toy reference, identical pairs, timesteps and noise per pair.", "",
                  "| quantity | value |", "|---|---|",
                  f"| max \\|Δ per-step loss\\| (2 workers vs 1 process) | {b['max_loss_diff']:.2e} |",
                  f"| max relative Δ of the pre-clip gradient norm | {b['max_grad_norm_rel_diff']:.2e} |",
                  f"| **max \\|Δθ\\| after {b['steps']} steps** (2 workers vs 1 process) | **{b['max_param_diff']:.2e}** |",
                  f"| max \\|θ_k − θ_0\\| (how far training moved the weights) | {b['max_param_change']:.2e} |",
                  f"| control: max \\|Δθ\\| vs 1 process on half of every batch | {b['control_max_param_diff']:.2e} |",
                  "", "Per-step loss, 1 process: " + ", ".join(f"{x:.6f}" for x in b["single_losses"]),
                  "", "Per-step loss, 2 workers: " + ", ".join(f"{x:.6f}" for x in b["two_worker_losses"]),
                  "", f"Ray Train workers ran with {b['worker_torch_threads']} torch thread(s) "
                  f"(OMP_NUM_THREADS={b['worker_omp_num_threads']}).", ""]
    c = results.get("c")
    lines += ["## (c) GPU: SD 1.5-architecture UNet, bf16", ""]
    if c is None:
        lines += [f"Skipped: {results.get('c_skipped', 'no CUDA device')}. Run `python bench/training.py --sections c` on a "
                  "machine with a GPU to fill this section.", ""]
    else:
        lines += [f"{c['device']}, {c['params'] / 1e6:.0f}M-parameter UNet, batch {c['batch_size']} pairs, {c['steps']} steps "
                  f"in windows of {c['window']}, "
                  f"synthetic {'×'.join(map(str, c['latent_shape']))} latent pairs, 1 worker.", ""] + _ab_table(c) + [""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="a,b,c", help="comma-separated subset of a,b,c (c runs only with CUDA)")
    ap.add_argument("--rounds", type=int, default=4, help="(a) alternating rounds")
    ap.add_argument("--steps", type=int, default=40, help="(a) optimizer steps per run")
    ap.add_argument("--window", type=int, default=10, help="(a) steps per timing window (the Ray side's checkpoint_every)")
    ap.add_argument("--batch-size", type=int, default=8, help="(a) pairs per step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the in-process side (a Ray Train worker with 1 CPU gets 1)")
    ap.add_argument("--fsdp-steps", type=int, default=5, help="(b) optimizer steps")
    ap.add_argument("--fsdp-batch", type=int, default=8, help="(b) pairs per step in total (even)")
    ap.add_argument("--fsdp-lr", type=float, default=1e-4, help="(b) learning rate (large enough to move the weights)")
    ap.add_argument("--gpu-rounds", type=int, default=3, help="(c) alternating rounds")
    ap.add_argument("--gpu-steps", type=int, default=40, help="(c) optimizer steps per run")
    ap.add_argument("--gpu-window", type=int, default=10, help="(c) steps per timing window")
    ap.add_argument("--gpu-batch", type=int, default=8, help="(c) pairs per step")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs for the private local Ray instance")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "training"), help="output path stem (.md, .json)")
    ap.add_argument("--smoke-gpu-section-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - {"a", "b", "c"} or args.fsdp_batch % 2:
        ap.error("--sections takes a subset of a,b,c; --fsdp-batch must be even")
    import ray

    t_start = time.time()
    results: dict = {"ray_version": ray.__version__, "args": vars(args)}
    ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
            work = Path(tmp)
            if sections & {"a", "b"}:
                print("generating toy pairs", flush=True)
                pairs = make_pairs(work)
            if "a" in sections:
                print(f"(a) Ray Train loop vs bare loop, {args.rounds} rounds × {args.steps} steps", flush=True)
                results["a"] = section_a(args, pairs, work)
            if "b" in sections:
                print("(b) 2-worker FSDP2 vs 1 process", flush=True)
                results["b"] = section_b(args, pairs, work)
            if "c" in sections:
                if torch.cuda.is_available():
                    print("(c) GPU: SD 1.5-architecture UNet, bf16", flush=True)
                    results["c"] = section_c(args, work, "cuda")
                elif args.smoke_gpu_section_on_cpu:
                    results["c"] = section_c(args, work, "cpu")
                else:
                    results["c_skipped"] = "no CUDA device on this machine (torch.cuda.is_available() is False)"
                    print(f"(c) skipped: {results['c_skipped']}", flush=True)
    finally:
        ray.shutdown()
    results["seconds"] = time.time() - t_start
    text = report(results, sys.argv[1:] if argv is None else list(argv))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
