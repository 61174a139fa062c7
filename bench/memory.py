"""Per-worker memory of full fine-tuning under FSDP2: parameters + AdamW state + frozen reference, 1 vs 2 workers.

    flock /tmp/heavy.lock .venv/bin/python bench/memory.py     # SD 1.5 architecture, random weights (≈15 GB RAM)
    .venv/bin/python bench/memory.py --tiny                    # the same code on a tiny SD-layout model

Each worker is a process in a gloo process group (as a Ray Train worker is) that builds the product's engine
(``TrainEngine``: loads the model, copies the frozen reference, shards both with ``shard_denoiser``, creates
AdamW) from a folder with SD 1.5's architecture (``bench/gpu.py: build_sd15_folder``, no VAE: training runs on
latents). AdamW's state is created the way AdamW creates it on its first step (a zero ``step`` and two moment
tensors shaped like each parameter — for a sharded parameter, like its shard), without running a step: a
backward would add the gradients (sharded like the parameters, so the ratio is the same) and the activations of
an 860M-parameter UNet to a 24 GB machine.

Measured per worker: the bytes of the distinct storages behind the local tensors — parameters (FSDP2's padded
shards), AdamW state, the reference's parameters — and, for context, the unsharded frozen text encoder and the
process's resident set now (VmRSS) and at its peak (VmHWM, which includes loading the full model before sharding).
The target: the 2-worker sum of parameters + AdamW + reference ≈ half the 1-worker sum. Results:
``bench/results/memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import _free_port, build_sd15_folder  # noqa: E402

GB = 1e9


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard's storage)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if hasattr(t, "to_local"):
            t = t.to_local()
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def materialise_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's per-parameter state as its first step creates it (zero step count, zero moments like the
    parameter), for every parameter it optimises."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(0.0),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(rank: int, world: int, port: int, model: str, out_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.training import TrainConfig, TrainEngine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t0 = time.perf_counter()
        engine = TrainEngine(TrainConfig(model=model, objective={"name": "diffusion-dpo"}, batch_size=1),
                             rank=rank, world=world)
        materialise_adamw_state(engine.optimizer)
        state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        res = {
            "rank": rank, "parallel": engine.parallel, "setup_s": time.perf_counter() - t0,
            "params_bytes": storage_bytes(engine.backbone.denoiser.parameters()),
            "adamw_bytes": storage_bytes(state),
            "reference_bytes": storage_bytes(engine.reference.parameters()),
            "text_encoder_bytes": storage_bytes(engine.backbone.text_encoder.parameters()),
            "params_numel_full": sum(p.numel() for p in engine.backbone.denoiser.parameters()),
            "rss_bytes": _status("VmRSS"), "peak_rss_bytes": _status("VmHWM"),
        }
        res["target_bytes"] = res["params_bytes"] + res["adamw_bytes"] + res["reference_bytes"]
        Path(out_dir, f"w{world}_r{rank}.json").write_text(json.dumps(res))
        dist.barrier()  # every rank measured before any frees its memory
    finally:
        dist.destroy_process_group()


def run(model: Path, world: int, work: Path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, _free_port(), str(model), str(work)), nprocs=world, join=True)
    return [json.loads((work / f"w{world}_r{r}.json").read_text()) for r in range(world)]


def report(res: dict) -> str:
    one, two = res["workers"]["1"], res["workers"]["2"]
    w1 = one[0]
    lines = [f"# Memory per worker under FSDP2: {res['model']}", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo, CPU, fp32. Produced by "
             f"`python bench/memory.py{(' ' + ' '.join(res['argv'])) if res['argv'] else ''}` in {res['seconds']:.0f} s.",
             "", f"UNet: {w1['params_numel_full'] / 1e6:.1f}M parameters, random weights. The product's engine "
             "(`TrainEngine`) in each worker; AdamW state created as its first step creates it, without a step "
             "(so no gradients are held: FSDP2 shards them like the parameters).", "",
             "| workers | rank | applied | parameters GB | AdamW state GB | reference GB | **sum GB** | text encoder GB (unsharded) | RSS GB | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w, rows in (("1", one), ("2", two)):
        for r in rows:
            lines.append(f"| {w} | {r['rank']} | {r['parallel']} | {r['params_bytes'] / GB:.3f} | {r['adamw_bytes'] / GB:.3f} | "
                         f"{r['reference_bytes'] / GB:.3f} | **{r['target_bytes'] / GB:.3f}** | "
                         f"{r['text_encoder_bytes'] / GB:.3f} | {r['rss_bytes'] / GB:.2f} | {r['peak_rss_bytes'] / GB:.2f} |")
    lines += ["", f"**Ratio, 2 workers / 1 worker (largest rank's parameters + AdamW + reference): {res['ratio']:.6f}** "
              "(target ≈ 0.5; above 0.5 only by FSDP2's padding of each shard to an equal size).", "",
              "Bytes are those of the distinct storages behind each worker's local tensors (FSDP2's padded shards "
              "included). RSS adds the frozen text encoder, torch and the libraries; the peak RSS includes loading "
              "the full model and copying the reference before sharding (each worker loads the whole model once)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny SD-layout model (a smoke test of this script)")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/memory; --tiny: bench/work/memory_tiny)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else (Path(__file__).parent / "work" / "memory_tiny") if args.tiny else Path(__file__).parent / "results" / "memory"
    t0 = time.time()
    res: dict = {"argv": argv, "model": "tiny SD-layout UNet" if args.tiny else "SD 1.5 architecture", "workers": {}}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        print("building the model folder (random weights)", flush=True)
        model = build_sd15_folder(work / "model", tiny=args.tiny, vae=False)
        for world in (1, 2):
            print(f"{world} worker(s) …", flush=True)
            res["workers"][str(world)] = run(model, world, work)
            for r in res["workers"][str(world)]:
                print(f"  rank {r['rank']}: params {r['params_bytes'] / GB:.3f} GB, AdamW {r['adamw_bytes'] / GB:.3f} GB, "
                      f"reference {r['reference_bytes'] / GB:.3f} GB, RSS {r['rss_bytes'] / GB:.2f} GB "
                      f"(peak {r['peak_rss_bytes'] / GB:.2f} GB); {r['parallel']}", flush=True)
    res["ratio"] = max(r["target_bytes"] for r in res["workers"]["2"]) / res["workers"]["1"][0]["target_bytes"]
    res["seconds"] = time.time() - t0
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
