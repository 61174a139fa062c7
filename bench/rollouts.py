"""Rollout throughput of the Ray Data generation pipeline against a plain in-process loop, and the pipeline's
object-store peak at 1× and 10× the prompts under an object-store budget.

Work, on both sides: K rollouts per prompt (CFG sampling), scoring by the toy verifiable reward, best-vs-worst
pairs, written to Parquet with PNG previews (compared by ``pair_id``). The Ray side is ``generate``
(``pipeline/data/generate.py``); the loop, ``generate.rollout_pairs_in_process``, runs the same stage code
(``stages.GenerateImages``, ``stages.ScoreImages``, ``pairing.pairs_from_prompts``) batch by batch in one process, on
the same prompts and seeds, so the two write the same pairs (checked: pair ids and latents compared).

Each case runs in a fresh subprocess; its clock starts after the imports, so the Ray side's time includes
``ray.init``, the actors' own imports and model loading, the write and the read-back validation,
and the loop's includes loading the model and the reward. Throughput and the fixed start-up cost come from two
sizes, 1× and 10× the prompts: rate = (n₁₀ − n₁) / (t₁₀ − t₁), fixed = t₁ − n₁ / rate. The Ray cases sample the
object store's use (the raylet's store statistics, in bytes) every 0.25 s, and every case records the machine's
load average: the numbers are only comparable on an otherwise idle machine.

    python bench/rollouts.py                      # writes bench/results/rollouts.{md,json}
    python bench/rollouts.py --prompts 4 --steps 2 --no-unbudgeted    # a quick run

The model has SD 1.5's architecture shrunk to test size with random weights (``bench/gpu.py:
build_sd15_folder(tiny=True)``: CLIP text encoder, 8× AutoencoderKL, DDPM ε scheduler), with a two-level UNet of SD's
block kinds (cross-attention down/up blocks) on 8×8 latents: 64×64-px images. On 2 shared CPU cores the defaults
(8 and 80 prompts × 4 rollouts, 4 steps) keep the whole run to a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCALES = (1, 10)


def build_model(path: Path) -> Path:
    """The tiny SD 1.5-layout folder (``build_sd15_folder``: CLIP text encoder, 8× AutoencoderKL, DDPM ε scheduler)
    with a two-level cross-attention UNet on 8×8 latents: 64×64-px images."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.gpu import build_sd15_folder

    build_sd15_folder(path, tiny=True, vae=True)
    torch.manual_seed(1)  # SD 1.5's block kinds (cross-attention down/up blocks), two levels (tests/test_backbones_real.py)
    UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                         norm_num_groups=8).save_pretrained(path / "unet")
    return path


def config(model: str, prompts: int, args, budget_mb: int):
    from pipeline.data.generate import GenerationConfig

    return GenerationConfig(model=model, prompts="toy:train", prompt_limit=min(prompts, 168),
                            prompt_repeat=-(-prompts // 168), samples_per_prompt=args.samples, batch_size=args.batch,
                            sampler={"num_steps": args.steps, "guidance_scale": 3.0, "eta": 1.0,
                                     "batch_size": args.batch},
                            num_actors=args.actors, torch_threads=1, object_store_mb=budget_mb)


def digest(pairs_dir: Path) -> dict:
    """What identifies the pairs written: their ids (sorted) and a hash of the winners' and losers' latents."""
    import numpy as np

    from pipeline.data.schema import latents_of, read_pairs

    table = read_pairs(pairs_dir).sort_by("pair_id")
    h = hashlib.sha256()
    for column in ("latent_w", "latent_l"):
        h.update(np.ascontiguousarray(latents_of(table, column)).tobytes())
    return {"pairs": table.num_rows, "pair_ids": hashlib.sha256("\n".join(table.column("pair_id").to_pylist()).encode()).hexdigest(),
            "latents": h.hexdigest()}


def loop(cfg, out: Path) -> float:
    """The pipeline's work in one process, batch by batch; returns the start-up seconds (model and reward loading)."""
    from dataclasses import asdict

    import pyarrow.parquet as pq

    from pipeline.data import stages
    from pipeline.data.generate import rollout_pairs_in_process

    t0 = time.perf_counter()
    generate = stages.GenerateImages(model=cfg.model, sampler=asdict(cfg.sampler), columns={"": "prompt"},
                                     write_png=cfg.write_png)
    score = stages.ScoreImages(cfg.reward)
    startup = time.perf_counter() - t0
    out.mkdir(parents=True)
    pq.write_table(rollout_pairs_in_process(cfg, generate, score), out / "part-0.parquet")
    return startup


def _plasma_bytes(state) -> int:
    """Bytes in the object store now (the raylet's store stats, which Ray's memory summary prints in whole MiB)."""
    from ray._private.internal_api import get_memory_info_reply

    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def case(kind: str, model: str, prompts: int, budget_mb: int, args, out: Path) -> None:
    """One measured run (in its own process)."""
    import torch

    from pipeline.data.generate import generate

    cfg = config(model, prompts, args, budget_mb)
    work = out.with_suffix("")
    result: dict = {"kind": kind, "prompts": prompts, "rollouts": prompts * args.samples, "object_store_mb": budget_mb,
                    "load_average_1min_before": __import__("os").getloadavg()[0]}
    if kind == "loop":
        torch.set_num_threads(args.actors)  # the cores the Ray side's actors use, one thread each
        t0 = time.perf_counter()
        result["startup_s"] = loop(cfg, work / "pairs")
        result["seconds"] = time.perf_counter() - t0
    else:
        import ray

        peak = {"object_store": 0}
        done = threading.Event()

        def sample():
            from ray._private.internal_api import get_state_from_address

            # this run's own cluster: with other local Ray instances on the machine, no address is ambiguous
            state, errors = get_state_from_address(ray.get_runtime_context().gcs_address), 0
            while not done.is_set():
                try:
                    peak["object_store"] = max(peak["object_store"], _plasma_bytes(state))
                except Exception:  # best-effort while the cluster starts; counted
                    errors += 1
                done.wait(0.25)
            peak["sample_errors"] = errors

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        generate(cfg, work)
        result["seconds"] = time.perf_counter() - t0
        done.set()
        thread.join()
        result["object_store_peak"] = peak["object_store"]
        result["object_store_sample_errors"] = peak.get("sample_errors", 0)
        ray.shutdown()
    result["load_average_1min"] = __import__("os").getloadavg()[0]  # other work on the machine (2 cores)
    result.update(digest(work / "pairs"))
    out.write_text(json.dumps(result))


def fit(small: dict, large: dict) -> tuple[float, float] | None:
    """(rollouts/s, fixed seconds) from two sizes; None when the larger run was not slower by a clear margin (the
    machine's load changed between the runs: the two points say nothing)."""
    dt = large["seconds"] - small["seconds"]
    if dt <= 0.1 * large["seconds"]:
        return None
    rate = (large["rollouts"] - small["rollouts"]) / dt
    return rate, small["seconds"] - small["rollouts"] / rate


def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "model_index.json").is_file():
        build_model(model)
    cases = [("loop", s, 0) for s in SCALES] + [("ray", s, args.budget_mb) for s in SCALES]
    if args.unbudgeted:
        cases.append(("ray", SCALES[-1], 0))
    if args.large:  # the budget's bound: the peak should stay where it was at 10×
        cases.append(("ray", args.large, args.budget_mb))
    rows = []
    for kind, scale, budget in cases:
        prompts = args.prompts * scale
        out = work / f"{kind}_{scale}x_{budget}mb_{args.prompts}p{args.samples}k{args.steps}s{args.batch}b{args.actors}a.json"
        if not out.is_file():  # a finished case is kept: an interrupted run resumes (same sizes)
            if out.with_suffix("").exists():
                import shutil

                shutil.rmtree(out.with_suffix(""))
            cmd = [sys.executable, __file__, "case", kind, str(model), str(prompts), str(budget), str(out),
                   *sys.argv[1:]]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = {**json.loads(out.read_text()), "scale": scale}
        rows.append(res)
        store = f", object store peak {res['object_store_peak'] / 2**20:.0f} MiB" if kind == "ray" else ""
        print(f"{kind} {scale}× ({res['rollouts']} rollouts, budget {budget or 'default'}): {res['seconds']:.1f} s, "
              f"{res['pairs']} pairs{store}", flush=True)
    return {"machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "),
            "cores": len(__import__("os").sched_getaffinity(0)), "prompts": args.prompts, "samples": args.samples,
            "steps": args.steps, "batch": args.batch, "actors": args.actors, "budget_mb": args.budget_mb,
            "image_px": 64, "rows": rows}


def report(res: dict) -> str:
    rows = res["rows"]
    by = {(r["kind"], r["scale"], r["object_store_mb"]): r for r in rows}
    loop1, loop10 = by[("loop", 1, 0)], by[("loop", 10, 0)]
    ray1, ray10 = by[("ray", 1, res["budget_mb"])], by[("ray", 10, res["budget_mb"])]
    loop_fit, ray_fit = fit(loop1, loop10), fit(ray1, ray10)
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    lines = ["# Rollouts: Ray Data generation pipeline vs an in-process loop (bench/rollouts.py)", "",
             f"{res['machine']}, {res['cores']} CPU cores (shared); tiny SD 1.5-architecture model with random weights "
             f"at {res['image_px']}×{res['image_px']} px (8×8×4 latents, VAE decode), {res['steps']} DDIM steps with CFG "
             f"(η = 1), batch {res['batch']}, K = {res['samples']} rollouts per toy training prompt, toy verifiable "
             f"reward, best-vs-worst pairs with PNG previews, written to Parquet. Ray: a local Ray with 2 CPUs, "
             f"{res['actors']} generation actors with one torch thread each, one reward actor; the loop: one process "
             f"with {res['actors']} torch threads. Each case in a fresh process, clock started after the imports (the "
             f"backbone's own, diffusers, happens in the generation stage's constructor, on both sides).", "",
             "| side | prompts | rollouts | object-store budget | wall s | rollouts/s | object-store peak | pairs | same pairs as the loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loop_r = by.get(("loop", r["scale"], 0))
        same = "–" if r["kind"] == "loop" or loop_r is None else (
            "yes" if (r["pair_ids"], r["latents"]) == (loop_r["pair_ids"], loop_r["latents"]) else
            ("same ids, latents differ" if r["pair_ids"] == loop_r["pair_ids"] else "no"))
        lines.append(f"| {'Ray Data' if r['kind'] == 'ray' else 'in-process loop'} | {r['prompts']} | {r['rollouts']} | "
                     f"{(str(r['object_store_mb']) + ' MiB') if r['kind'] == 'ray' and r['object_store_mb'] else ('default' if r['kind'] == 'ray' else '–')} | "
                     f"{r['seconds']:.1f} | {r['rollouts'] / r['seconds']:.1f} | "
                     f"{mib(r['object_store_peak']) if r['kind'] == 'ray' else '–'} | {r['pairs']} | {same} |")
    cell = lambda f, i: "n/a (load changed)" if f is None else f"{f[i]:.1f}"
    lines += ["", "From the two sizes (rate = Δrollouts / Δseconds, fixed = t₁ − n₁ / rate):", "",
              "| side | rollouts/s | fixed start-up s |", "|---|---|---|",
              f"| in-process loop | {cell(loop_fit, 0)} | {cell(loop_fit, 1)} (model + reward loading measured "
              f"directly: {loop1['startup_s']:.1f}) |",
              f"| Ray Data | {cell(ray_fit, 0)} | {cell(ray_fit, 1)} |", ""]
    if loop_fit and ray_fit:
        lines.append(f"- throughput, Ray / loop: **{ray_fit[0] / loop_fit[0]:.2f}**; fixed start-up, Ray − loop: "
                     f"**{ray_fit[1] - loop_fit[1]:+.1f} s**.")
    lines += [f"- whole run, Ray / loop wall: {ray1['seconds'] / loop1['seconds']:.2f} at 1×, "
              f"{ray10['seconds'] / loop10['seconds']:.2f} at 10×.",
              f"- object-store peak under `object_store_mb = {res['budget_mb']}`, 10× / 1× prompts: "
              f"{mib(ray1['object_store_peak'])} → {mib(ray10['object_store_peak'])} "
              f"(**{ray10['object_store_peak'] / max(ray1['object_store_peak'], 1):.2f}×**)."]
    large = [r for r in rows if r["kind"] == "ray" and r["scale"] not in SCALES]
    for r in large:
        lines.append(f"- {r['scale']}× ({r['rollouts']} rollouts) under the same budget: object-store peak "
                     f"{mib(r['object_store_peak'])}, **{r['object_store_peak'] / max(ray10['object_store_peak'], 1):.2f}×"
                     f"** the 10× peak; {r['rollouts'] / r['seconds']:.1f} rollouts/s.")
    free = by.get(("ray", 10, 0))
    if free:
        lines.append(f"- 10× without a budget (Ray Data's default): object-store peak {mib(free['object_store_peak'])}, "
                     f"{free['seconds']:.1f} s (budgeted / default peak: "
                     f"{ray10['object_store_peak'] / max(free['object_store_peak'], 1):.2f}).")
    loads = [r.get("load_average_1min_before", float("nan")) for r in rows] + [r.get("load_average_1min", float("nan")) for r in rows]
    lines += ["", "The object-store column is the raylet's store statistics (bytes used) sampled every 0.25 s (a block "
              "that lives for less than a sample can be missed). The machine's 1-minute load average around the cases "
              f"ranged {min(loads):.1f}–{max(loads):.1f} on {res['cores']} cores: above ~2, other work shares the "
              "cores and the timings are not comparable between cases."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts at 1× (10× is ten times as many)")
    parser.add_argument("--samples", type=int, default=4, help="rollouts per prompt (K)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2, help="generation actors (loop: torch threads)")
    parser.add_argument("--budget-mb", type=int, default=8, help="object_store_mb of the budgeted Ray cases")
    parser.add_argument("--large", type=int, default=40,
                        help="a budgeted Ray case at this many times the prompts (0: none): is the peak bounded?")
    parser.add_argument("--no-unbudgeted", dest="unbudgeted", action="store_false",
                        help="skip the 10× Ray case under Ray Data's default budget")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "rollouts"),
                        help="model and finished cases (reused by a rerun with the same sizes)")
    if argv and argv[0] == "case":
        kind, model, prompts, budget, out = argv[1:6]
        case(kind, model, int(prompts), int(budget), parser.parse_args(argv[6:]), Path(out))
        return 0
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["bench_seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rollouts.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "rollouts.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
