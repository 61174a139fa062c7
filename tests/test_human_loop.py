"""Human labels back into training, end to end on the toy world: the reference's samples are paired, scripted
annotators answer over HTTP from the PNGs the server sends, the job aggregates and exports the labels as pairs, and
the project's engine trains on them. Plus the job's commands on a small study."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import build
from pipeline.human.study import StudyConfig, create_study, open_study

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "human_study.py")]


def run_job(*args: str) -> str:
    out = subprocess.run([*JOB, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_job_commands_on_a_small_study(rendered_study, tmp_path):
    folder, store = rendered_study
    out = run_job("create", "--out", str(tmp_path / "x"), "--print-config", "--set", "groups=2", "sampler.num_steps=5")
    assert "groups: 2" in out and "num_steps: 5" in out and not (tmp_path / "x").exists()
    bad = subprocess.run([*JOB, "create", "--out", str(tmp_path / "y"), "--set", "grups=2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "grups" in bad.stderr and "groups" in bad.stderr
    again = subprocess.run([*JOB, "create", "--out", str(folder), "--set", "source=pairs", "pairs=nowhere"],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "never overwritten" in again.stderr  # a study holding votes is never replaced
    for name in ("serve", "report", "export-pairs", "labelstudio-export", "labelstudio-import"):
        assert "usage" in run_job(name, "--help")

    # every annotator of groups 1–2 prefers the dataset winner; group 3 prefers the loser: 2 of 3 groups → A
    for a in store.annotators():
        picks = "A" if a["group"] < 2 else "B"
        store.import_votes(a["name"], [(i["item_key"], picks) for i in store.items()])
    out = run_job("report", "--study", str(folder))
    assert "win rate" in out and (folder / "report" / "report.md").is_file() and (folder / "report" / "report.png").is_file()
    result = json.loads((folder / "report" / "result.json").read_text())
    assert result["win_rate"]["mean"] == 1.0 and set(result["final_labels"].values()) == {"A"}

    run_job("export-pairs", "--study", str(folder), "--out", str(tmp_path / "human_pairs"))
    from pipeline.data.schema import latents_of, read_pairs

    pairs = read_pairs(tmp_path / "human_pairs")  # the reader jobs/train.py uses, checksums verified
    source = read_pairs(tmp_path / "pairs").sort_by("prompt")
    pairs = pairs.sort_by("prompt")
    assert pairs.num_rows == 6 and set(pairs.column("strategy").to_pylist()) == {"human"}
    assert np.array_equal(latents_of(pairs, "latent_w"), latents_of(source, "latent_w"))  # the winners stayed winners
    manifest = json.loads((tmp_path / "human_pairs" / "manifest.json").read_text())
    assert manifest["labels"] == {"A": 6, "B": 0, "tie": 0, "unlabelled": 0} and manifest["reward_agreement"] == 1.0


def _toy_rollout_pairs(folder: Path, prompts: int, per_prompt: int):
    """The shipped reference's own samples on training prompts, every two of a prompt whose rewards differ by more
    than 0.1 paired (pair schema, the order by reward as generate_pairs.py writes it)."""
    import itertools

    import pyarrow.parquet as pq

    from pipeline.backbones import load_backbone
    from pipeline.data.pairing import pair_row, rows_to_table
    from pipeline.human.study import png_bytes
    from pipeline.sampling import SamplerConfig, sample
    from pipeline.toyworld import fit_specs, from_tensor, score
    from pipeline.toyworld.reference import REFERENCE_DIR

    texts = [s.text for s in fit_specs()[:prompts] for _ in range(per_prompt)]
    seeds = list(range(5000, 5000 + len(texts)))
    out = sample(load_backbone(REFERENCE_DIR), texts, seeds, SamplerConfig(num_steps=10), progress=False)
    rewards = np.asarray(score(out.images, texts).reward)
    pixels, lat = from_tensor(out.images), out.latents.numpy()
    rows = []
    for p in range(prompts):
        for a, b in itertools.combinations(range(p * per_prompt, (p + 1) * per_prompt), 2):
            if abs(rewards[a] - rewards[b]) > 0.1:
                w, l = (a, b) if rewards[a] > rewards[b] else (b, a)
                rows.append(pair_row(strategy="onpolicy", round_=0, policy_version="reference", prompt=texts[w],
                                     perturbed="", seed_w=seeds[w], seed_l=seeds[l], reward_w=rewards[w],
                                     reward_l=rewards[l], stats=(0.0, 0.0, per_prompt), latent_w=lat[w], latent_l=lat[l],
                                     png_w=png_bytes(pixels[w]), png_l=png_bytes(pixels[l])))
    folder.mkdir(parents=True)
    pq.write_table(rows_to_table(rows), folder / "part-0.parquet")
    return texts


@pytest.mark.slow
def test_training_on_human_labels_moves_the_policys_preference_their_way(tmp_path):
    import io

    from PIL import Image

    from pipeline.data.schema import read_pairs
    from pipeline.human.aggregate import QualityControl, aggregate
    from pipeline.human.export import export_pairs
    from pipeline.toyworld import score, to_tensor
    from pipeline.training import TrainConfig
    from pipeline.training.engine import PairData, train_in_process
    from human_app import Server, request, tokens, vote

    prompts, per_prompt = 12, 4
    _toy_rollout_pairs(tmp_path / "pairs", prompts, per_prompt)
    # the pairs' own order is hidden from the annotators (A = the dataset's winner, sides random)
    create_study(build(StudyConfig, {"name": "loop", "source": "pairs", "pairs": str(tmp_path / "pairs"),
                                     "max_items": 0}), tmp_path / "study")
    people = tokens(tmp_path / "study")
    server = Server(tmp_path / "study")
    lazy = "g2-a3"  # always answers "left": quality control must drop them

    def annotate(name: str, token: str) -> None:
        while True:
            nxt = request(f"{server.base}/annotate/{token}/next")[1]
            if nxt["item"] is None:
                return
            if name == lazy:
                choice = "left"
            else:
                images = [np.asarray(Image.open(io.BytesIO(request(server.base + nxt[s])[1])).convert("RGB"))
                          for s in ("left", "right")]
                left, right = score(to_tensor(np.stack(images)), [nxt["prompt"]] * 2).reward
                choice = "tie" if abs(left - right) < 0.05 else ("left" if left > right else "right")
            assert vote(server.base, token, nxt["item"], choice)[0] == 200

    try:
        with ThreadPoolExecutor(len(people)) as pool:
            list(pool.map(lambda kv: annotate(*kv), people.items()))
    finally:
        server.stop()
    store = open_study(tmp_path / "study")
    result = aggregate(store.votes(), store.assignments(), store.items(), qc=QualityControl())
    assert result["qc"]["excluded"] == [lazy]
    assert result["reward_agreement"]["fraction"] == 1.0 and result["win_rate"]["mean"] > 0.9  # they follow the reward
    export_pairs(store, result, tmp_path / "human_pairs")
    table = read_pairs(tmp_path / "human_pairs")
    assert table.num_rows >= 20 and set(table.column("strategy").to_pylist()) == {"human"}

    # train on the labels, and on the same pairs with the labels reversed (same steps, same seeds), then ask each
    # policy's implicit reward (DPO: how much better than the reference it explains a sample, what the objective
    # raises for winners) which sample of each pair is better. A side, label or export flipped anywhere between
    # the browser and the trainer turns the sign. (At this budget the sampled toy reward does not move
    # measurably either way — docs/human_eval.md.)
    data = PairData.from_table(table)
    cfg = build(TrainConfig, {"objective": {"name": "sipo", "beta": 1000.0, "safeguard": {"mu": 0.9}}, "lr": 1e-4,
                              "max_steps": 30, "batch_size": 8, "torch_threads": 2, "report_to": []})
    everything = np.arange(len(data))
    margins = [implicit_margin(train_in_process(cfg, subset(data, everything, reverse=r)), data) for r in (False, True)]
    print(f"{table.num_rows} pairs; implicit-reward margin of the human winners: {margins} (labels, reversed labels)")
    assert margins[0] > 0 > margins[1], margins


def subset(data, idx, reverse: bool = False):
    from pipeline.training.engine import PairData

    w, l = (data.x0_l, data.x0_w) if reverse else (data.x0_w, data.x0_l)
    return PairData(w[idx], l[idx], [data.prompts[i] for i in idx], None, [data.pair_ids[i] for i in idx])


def implicit_margin(engine, data, draws: int = 16) -> float:
    """Mean over pairs and ``draws`` fixed (timestep, noise) draws of (reference error − policy error) on the winner
    minus the same on the loser: > 0 when the policy's implicit reward prefers the pairs' winners."""
    import torch

    from pipeline.training.step import preference_step

    batch = data.batch(np.arange(len(data)))
    with torch.no_grad():
        return float(np.mean([float(preference_step(engine.backbone, engine.objective, batch, reference=engine.reference,
                                                    generator=torch.Generator().manual_seed(k)).metrics["margin"])
                              for k in range(draws)]))


def test_a_study_of_two_models_samples_both_on_the_same_prompts_and_seeds(tiny_toy_model_dir, tmp_path):
    import shutil

    from pipeline.evaluation import eval_seeds
    from pipeline.human.store import StudyError

    run_dir = tmp_path / "run"  # a run directory as jobs/iterative_sipo.py leaves it: the model in final_model/
    shutil.copytree(tiny_toy_model_dir, run_dir / "final_model")
    cfg = build(StudyConfig, {"name": "models", "model_a": str(run_dir), "model_b": str(tiny_toy_model_dir),
                              "max_prompts": 3, "seeds_per_prompt": 2, "sampler": {"num_steps": 2}})
    meta = create_study(cfg, tmp_path / "study")
    assert meta["systems"]["A"] == {"name": "run", "source": str((run_dir / "final_model").resolve())}
    assert meta["num_items"] == 6 and meta["num_prompts"] == 3
    store = open_study(tmp_path / "study")
    items = store.items()
    assert [(i["seed_a"], i["seed_b"]) for i in items] == [(s, s) for s in eval_seeds(3, 2)]
    assert [i["prompt_index"] for i in items] == [0, 0, 1, 1, 2, 2]
    a, b = store.sample(items[0]["item_id"], "A"), store.sample(items[0]["item_id"], "B")
    assert a["latent"].shape == (3, 32, 32) and a["png"][:4] == b"\x89PNG"
    # the same weights and the same seed give the same image: the comparison is paired
    assert np.array_equal(a["latent"], b["latent"]) and a["reward"] == b["reward"] is not None
    with pytest.raises(StudyError, match="not a model folder"):
        create_study(build(StudyConfig, {"model_a": str(tmp_path)}), tmp_path / "other")
    assert not (tmp_path / "other").exists()
