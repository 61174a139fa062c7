"""Train a policy on a preference-pairs dataset with Ray Train (FSDP2), then export it.

    python jobs/generate_pairs.py --out runs/pairs --set prompt_limit=16 sampler.num_steps=10 && python jobs/train.py --pairs runs/pairs --out runs/train --set max_steps=20 checkpoint_every=5
    python jobs/train.py --pairs runs/pairs --out runs/train --set max_steps=40 checkpoint_every=5     # resumes at step 20
    python jobs/train.py --pairs runs/pairs --out runs/train-lora --set lora_rank=4 lr=1e-4 max_steps=20
    ray job submit --working-dir . -- python jobs/train.py --config train.yaml --pairs /shared/pairs --out /shared/runs/x

``--pairs`` is a folder written by ``jobs/generate_pairs.py --out`` (or the Parquet folder ``pairs/`` inside
it). Config: the ``TrainConfig`` tree (pipeline/training/config.py: model, objective → {name, family, beta, …,
safeguard → {mu, space, scope}}, lora_rank, lr, max_steps, batch_size, log_every, num_workers, …) from
``--config`` (JSON or YAML), then ``--set key=value`` overrides by dotted path (``objective.beta=2000``,
``objective.safeguard.mu=0.9``); ``--print-config`` shows the result. Unset fields keep their defaults: the
shipped toy reference model, SIPO, 100 steps of batch 8 on one CPU worker.

Writes to ``--out``:

    policy.safetensors       the trained denoiser (the EMA weights if ema_decay > 0); load it with
                             load_backbone(model, weights=..., lora_rank=...)
    model/                   the base model folder with the trained denoiser: load_backbone("OUT/model")
                             is the policy; with LoRA the adapter is merged there and also saved alone
                             in model/unet_lora/ (diffusers format, to apply to the base model)
    metrics.json, metrics.csv  the metrics of every report (every log_every steps)
    tensorboard/             TensorBoard event files (a point every log_every steps) and progress.jsonl
    curves.png               training curves (loss, implicit accuracy, λ, importance weight)
    train.json               the config, the pairs path, the Ray Train run path and the last metrics

Checkpoints live in Ray Train storage: ``--storage`` (default OUT/ray_storage) and ``--name`` (default
"train"). Rerunning with the same storage and name resumes from the latest checkpoint (or, if the run
already reached max_steps, just re-exports it); raising ``max_steps`` continues training. A run's
storage refuses a different config or pairs dataset, naming the fields that differ (only max_steps,
checkpoint_every, log_every, num_workers, use_gpu and torch_threads may change between reruns): pick another
``--name``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

#: fields that may change between reruns on the same storage (resume, extend, rescale)
RESUMABLE_CHANGES = ("train.max_steps", "train.checkpoint_every", "train.log_every", "train.num_workers",
                     "train.use_gpu", "train.worker_resources", "train.worker_labels", "train.torch_threads",
                     "train.report_to", "train.mlflow_uri", "train.async_checkpoint_upload")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=Path, required=True,
                   help="pairs dataset: a jobs/generate_pairs.py output folder, or its pairs/ Parquet folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (policy, model/, metrics, curves)")
    from pipeline.cli import add_config_args

    add_config_args(p, default_recipe="defaults", section="train")
    p.add_argument("--storage", type=Path, help="Ray Train storage folder (default: OUT/ray_storage)")
    p.add_argument("--name", default="train", help="Ray Train run name inside the storage (default: train)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (ignored on a cluster)")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """The TrainConfig tree; bad fields or values exit with a message naming their dotted path."""
    from pipeline.cli import resolve
    from pipeline.training import TrainConfig

    return resolve(args, TrainConfig)


def resolve_pairs(path: Path) -> Path:
    """The Parquet folder: ``path`` itself, or ``path/pairs`` for a generate_pairs.py output folder."""
    if not path.exists():
        raise SystemExit(f"--pairs {path}: no such file or folder; make one with "
                         f"`python jobs/generate_pairs.py --out {path}`")
    if path.is_dir() and not any(path.glob("*.parquet")) and (path / "pairs").is_dir():
        return path / "pairs"
    return path


def check_inputs(cfg, pairs: Path) -> int:
    """Validate the pairs (checksums, schema, size) and that their latents fit the model, before Ray starts,
    without loading them (the workers read the files and check the values)."""
    from pipeline.data.schema import scan_pairs
    from pipeline.preflight import check_train

    check_train(cfg)
    model = Path(cfg.model)
    try:
        info = scan_pairs(pairs, values=False)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:  # SchemaError is a ValueError
        raise SystemExit(f"error: {err}") from err
    need = cfg.batch_size * cfg.num_workers
    if info.num_rows < need:
        raise SystemExit(f"error: {pairs} holds {info.num_rows} pairs, fewer than one batch per worker "
                         f"(batch_size {cfg.batch_size} × {cfg.num_workers} workers)")
    shape = info.latent_shape
    for sub in ("unet", "transformer"):
        conf = model / sub / "config.json"
        if conf.is_file():
            c = json.loads(conf.read_text())
            expected = (c.get("in_channels"), c.get("sample_size"), c.get("sample_size"))
            if None not in expected and shape != expected:
                raise SystemExit(f"error: {pairs} holds latents of shape {shape} but the model {model} works on "
                                 f"{expected}; generate the pairs with this model (generate_pairs.py --set model=...)")
    return info.num_rows


def check_run_record(run_dir: Path, cfg, pairs: Path) -> None:
    """Refuse to resume a run with another config or dataset; record this one for the next rerun."""
    from pipeline.utils.run_record import guard_run_dir

    guard_run_dir(run_dir, {"train": cfg, "pairs": str(pairs.resolve())}, job="train", resumable=RESUMABLE_CHANGES)


def write_outputs(cfg, result, out: Path) -> dict:
    from pipeline.export import export_model, policy_from_checkpoint
    from pipeline.training.checkpoint import checkpoint_history
    from pipeline.utils.atomic import atomic_write_bytes
    from pipeline.reporting import csv_table
    from pipeline.utils.plots import plot_training_curves

    if result.checkpoint is None:
        raise SystemExit(f"error: Ray Train run {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        policy = policy_from_checkpoint(d, out / "policy.safetensors")
        history = checkpoint_history(d) or [json.loads((Path(d) / "metrics.json").read_text())]
    export_model(cfg.model, policy, out / "model", lora_rank=cfg.lora_rank)
    atomic_write_bytes(out / "metrics.json", json.dumps(history, indent=1).encode())
    keys = list(dict.fromkeys(["step"] + [k for h in history for k in h]))
    atomic_write_bytes(out / "metrics.csv", csv_table(history, keys).encode())
    name = getattr(cfg.objective, "name", cfg.objective)
    plot_training_curves([history], out / "curves.png", xlabel="optimizer step", safeguard=cfg.safeguard_on,
                         title=f"{name}{' + SDPO' if cfg.safeguard_on else ''}, lr {cfg.lr:g}, batch {cfg.batch_size}")
    return history[-1]


def main(argv=None) -> int:
    from contextlib import ExitStack

    from pipeline.utils.driver import offline_mode

    offline_mode()  # before torch / diffusers / transformers / Ray are imported
    args = parse_args(argv)
    cfg = build(args)
    pairs = resolve_pairs(args.pairs)
    num_pairs = check_inputs(cfg, pairs)
    storage = (args.storage or args.out / "ray_storage").resolve()

    from pipeline.utils.runlock import run_lock

    # one job per output folder and per Ray Train run folder (runs with other --out may share a --storage)
    with ExitStack() as locks:
        for folder in dict.fromkeys([args.out.resolve(), storage / args.name]):
            locks.enter_context(run_lock(folder))
        return _train(args, cfg, pairs, num_pairs, storage)


def _train(args: argparse.Namespace, cfg, pairs: Path, num_pairs: int, storage: Path) -> int:
    """Train and export, holding the run locks."""
    check_run_record(storage / args.name, cfg, pairs)

    from pipeline.training.trainer import run_training
    from pipeline.utils.atomic import atomic_write_bytes
    from pipeline.utils.driver import start_ray

    start_ray(args.num_cpus)
    t0 = time.time()
    print(f"training {cfg.objective.name} on {num_pairs} pairs from {pairs}: {cfg.max_steps} steps × batch "
          f"{cfg.batch_size} × {cfg.num_workers} worker(s); Ray Train run {storage / args.name}", flush=True)
    result = run_training(cfg, pairs, storage, args.name, logdir=args.out / "tensorboard")
    seconds = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    last = write_outputs(cfg, result, args.out)
    from pipeline.config import to_dict

    atomic_write_bytes(args.out / "train.json", json.dumps(
        {"config": to_dict(cfg), "pairs": str(pairs.resolve()), "num_pairs": num_pairs, "ray_run": str(result.path),
         "seconds": round(seconds, 1), "last": last}, indent=1).encode())
    shown = {k: round(last[k], 4) for k in ("step", "loss", "implicit_acc", "margin", "pairs_per_s") if k in last}
    print(f"done in {seconds:.0f} s: {shown}")
    print(f"wrote {args.out}/policy.safetensors, model/, metrics.json, metrics.csv, curves.png, train.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
