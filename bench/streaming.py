"""Driver memory of training on 1× and 10× the pairs at SD 1.5 latent size (4×64×64), in memory vs streamed.

``run_training`` never loads the pairs table on the driver: it checks the files' checksums and metadata and
hands the workers the Parquet parts, which they read themselves (in memory) or through Ray Data (streamed;
``pipeline/training/trainer.py``). This benchmark
measures that claim: each case runs ``run_training`` in a fresh subprocess (its own local Ray) for one epoch
of the pairs and samples, every 0.2 s, the driver's resident memory, the training worker's, and the object
store's use (Ray's memory summary). Cases: ``train.stream_pairs`` off (every worker holds the table) and on
(each worker streams its split), at 1× and 10× the pairs.

    python bench/streaming.py                       # writes bench/results/streaming.{md,json}
    python bench/streaming.py --pairs 160 --batch 16

The model is a small UNet with SD 1.5's text encoder layout shrunk to test size (``bench/gpu.py:
build_sd15_folder``, tiny, with a three-level UNet) working on 4×64×64 latents: the pairs' size, not the
model's, is what this measures.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPE = (4, 64, 64)
STREAM_BUFFER_MB = 128  # train.stream_buffer_mb here: a third of the 10× dataset (the default, 256, is for real sizes)


def write_pairs(folder: Path, n: int, seed: int = 0, rows_per_file: int = 512) -> Path:
    """``n`` pairs of random 4×64×64 latents in the pair schema (no PNG previews), in parts of ``rows_per_file``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.schema import PAIR_SCHEMA, SCHEMA_VERSION, make_pair_id

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = int(np.prod(SHAPE))
    for start in range(0, n, rows_per_file):
        rows = min(rows_per_file, n - start)
        lat = lambda: pa.FixedSizeListArray.from_arrays(rng.standard_normal(rows * size, dtype=np.float32), size)
        table = pa.table({
            "schema_version": pa.array([SCHEMA_VERSION] * rows, pa.int32()),
            "pair_id": [make_pair_id("bench", seed, start + i) for i in range(rows)],
            "prompt": ["a red circle"] * rows, "perturbed_prompt": [""] * rows, "strategy": ["onpolicy"] * rows,
            "round": pa.array([0] * rows, pa.int32()), "policy_version": ["bench"] * rows,
            "seed_w": list(range(rows)), "seed_l": list(range(rows)),
            "reward_w": [1.0] * rows, "reward_l": [0.0] * rows, "prompt_reward_mean": [0.5] * rows,
            "prompt_reward_std": [0.5] * rows, "prompt_num_samples": pa.array([2] * rows, pa.int32()),
            "latent_shape": pa.array([list(SHAPE)] * rows, pa.list_(pa.int32())),
            "latent_w": lat().cast(pa.list_(pa.float32())), "latent_l": lat().cast(pa.list_(pa.float32())),
            "png_w": [b""] * rows, "png_l": [b""] * rows,
        }, schema=PAIR_SCHEMA)
        pq.write_table(table, folder / f"part-{start // rows_per_file:05d}.parquet")
    return folder


def _plasma_bytes() -> int:
    """Bytes in this run's object store. Its own GCS address: without one, Ray's memory summary fails when other
    Ray instances run on the machine (and the sampler below would read 0)."""
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return int(m.group(1)) << 20 if m else 0


def case(model: str, pairs: str, stream: bool, batch: int, steps: int, out: str) -> None:
    """One measured ``run_training`` (runs in its own process)."""
    import psutil
    import ray

    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import run_training

    me = psutil.Process()
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    peaks = {"driver_rss": me.memory_info().rss, "worker_rss": 0, "object_store": 0}
    baseline = dict(peaks)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peaks["driver_rss"] = max(peaks["driver_rss"], me.memory_info().rss)
            for p in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])):
                    try:
                        peaks["worker_rss"] = max(peaks["worker_rss"], p.memory_info().rss)
                    except psutil.Error:
                        pass
            try:
                peaks["object_store"] = max(peaks["object_store"], _plasma_bytes())
            except Exception:  # the summary is best-effort while the cluster starts
                pass
            done.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cfg = TrainConfig(model=model, objective={"name": "diffusion-dpo"}, lr=1e-5, max_steps=steps, batch_size=batch,
                      checkpoint_every=steps, log_every=max(1, steps // 4), stream_pairs=stream, shuffle_buffer=4 * batch, stream_buffer_mb=STREAM_BUFFER_MB,
                      torch_threads=1)
    t0 = time.time()
    result = run_training(cfg, pairs, Path(out).parent / "storage", Path(out).stem, progress=False)
    seconds = time.time() - t0
    done.set()
    thread.join()
    Path(out).write_text(json.dumps({"peaks": peaks, "baseline_driver_rss": baseline["driver_rss"],
                                     "seconds": seconds, "step": result.metrics["step"]}))
    ray.shutdown()


def run(args) -> dict:
    from diffusers import UNet2DConditionModel

    from bench.gpu import build_sd15_folder
    from pipeline.data.schema import scan_pairs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "model_index.json").is_file():
        build_sd15_folder(model, tiny=True, vae=False)
        # attention only at the 16×16 level: at 64×64 a batch's self-attention maps alone take gigabytes
        UNet2DConditionModel(sample_size=64, cross_attention_dim=64, block_out_channels=(16, 16, 32),
                             down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1,
                             norm_num_groups=8, attention_head_dim=8).save_pretrained(model / "unet")
    rows = []
    for scale in (1, 10):
        n = args.pairs * scale
        pairs = work / f"pairs_{scale}x"
        if len(list(pairs.glob("*.parquet"))) != -(-n // 512):
            write_pairs(pairs, n)
        size = sum(f.stat().st_size for f in scan_pairs(pairs, values=False).files)
        for stream in (False, True):
            out = work / f"case_{scale}x_{'stream' if stream else 'memory'}.json"
            cmd = [sys.executable, __file__, "case", str(model), str(pairs), str(int(stream)), str(args.batch),
                   str(n // args.batch), str(out)]
            if not out.is_file():  # a finished case is kept: an interrupted run resumes (same --pairs/--batch)
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            res = json.loads(out.read_text())
            rows.append({"scale": scale, "pairs": n, "parquet_bytes": size, "stream": stream, **res})
            print(f"{scale}× ({n} pairs) {'stream' if stream else 'memory'}: driver {res['peaks']['driver_rss'] / 2**30:.2f} GiB, "
                  f"worker {res['peaks']['worker_rss'] / 2**30:.2f} GiB, object store {res['peaks']['object_store'] / 2**30:.2f} GiB, "
                  f"{res['seconds']:.0f} s", flush=True)
    return {"machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "), "batch": args.batch,
            "stream_buffer_mb": STREAM_BUFFER_MB,
            "latent_shape": list(SHAPE), "rows": rows}


def report(res: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    rows = res["rows"]
    by = {(r["scale"], r["stream"]): r for r in rows}
    lines = ["# Training input at scale: driver, worker and object-store memory (bench/streaming.py)", "",
             f"{res['machine']}; SD 1.5 latent size {'×'.join(map(str, res['latent_shape']))}, fp32; one epoch of "
             f"batches of {res['batch']} pairs per case, each `run_training` in a fresh process with its own local Ray "
             "(2 CPUs); peaks sampled every 0.2 s.", "",
             "| pairs | Parquet | input mode | driver peak RSS | training worker peak RSS | object store peak | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["peaks"]
        lines.append(f"| {r['pairs']} | {gib(r['parquet_bytes'])} GiB | {'streamed' if r['stream'] else 'in memory'} | "
                     f"{gib(p['driver_rss'])} GiB | {gib(p['worker_rss'])} GiB | {gib(p['object_store'])} GiB | "
                     f"{r['seconds']:.0f} |")
    lines.append("")
    for stream in (False, True):
        a, b = by[(1, stream)], by[(10, stream)]
        mode = "streamed" if stream else "in memory"
        lines.append(f"- {mode}: driver peak RSS 10× / 1× = **{b['peaks']['driver_rss'] / a['peaks']['driver_rss']:.2f}** "
                     f"(target ≤ 1.2); training worker 10× / 1× = {b['peaks']['worker_rss'] / a['peaks']['worker_rss']:.2f}; "
                     f"object store peak {gib(a['peaks']['object_store'])} → {gib(b['peaks']['object_store'])} GiB.")
    lines += ["", f"Streamed cases read with `train.stream_buffer_mb = {res.get('stream_buffer_mb', '?')}` (Ray Data's object-store "
              "budget for the training read: how far it may read ahead of the workers). The driver reads only the "
              "files' metadata and checksums in both modes. In memory, each worker materialises the whole table (exact "
              "resume, the in-process order). The object-store column is Ray's memory summary in whole MiB, sampled "
              "every 0.2 s: a block that lives for less than a sample can be missed."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "case":
        model, pairs, stream, batch, steps, out = argv[1:]
        case(model, pairs, stream == "1", int(batch), int(steps), out)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=320, help="pairs at 1× (10× is ten times as many)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "streaming"),
                        help="model, pairs and finished cases (reused by a rerun with the same sizes)")
    args = parser.parse_args(argv)
    res = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "streaming.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
