"""Fault-injection suite (``-m faults``): bad inputs and corruptions end in a clear error that names the field or
file, user data is never deleted, and nothing non-finite is ever trained on or published. The counts are
recorded in docs/reliability.md."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pipeline.data.schema import MAX_ABS_LATENT, SchemaError, read_pairs
from pipeline.training.config import TrainConfig
from pipeline.utils.atomic import NotOurOutput, atomic_directory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults


# ------------------------------------------------------------------------------------------------ helpers
def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def rewrite_value(src: Path, dst: Path, column: str, row: int, index: int, value: float) -> None:
    """A copy of a Parquet file or folder (as one file) with one latent value replaced (a valid file: only the
    value is wrong)."""
    table = pq.read_table(src) if src.is_file() else pa.concat_tables(pq.read_table(f) for f in parts(src))
    rows = table.column(column).to_pylist()
    rows[row][index] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(rows, type=pa.list_(pa.float32())))
    pq.write_table(table, dst)


@pytest.fixture()
def dataset(tiny_pairs, tmp_path):
    """A private copy of a finished dataset (manifest.json + pairs/), so a test may corrupt it."""
    import shutil

    dst = tmp_path / "dataset"
    shutil.copytree(Path(tiny_pairs).parent, dst)
    return dst


# ------------------------------------------------------------------------------------------------ user data
def test_an_output_folder_that_is_not_ours_is_never_removed(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(NotOurOutput, match=r"mine already exists and is not a finished output.*thesis\.tex"):
        with atomic_directory(user, marker=True) as tmp:
            (tmp / "x").write_text("new")
    assert (user / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left behind either


def test_generate_pairs_job_refuses_an_existing_user_folder_before_starting_ray(tmp_path):
    user = tmp_path / "out"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate_pairs.py"), "--out", str(user),
                          "--set", "prompt_limit=2"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "notes.txt" in run.stderr and str(user) in run.stderr and "nothing was removed" in run.stderr
    assert "Traceback" not in run.stderr
    assert (user / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ pairs files
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -6.35e25])
def test_non_finite_or_out_of_range_latents_are_rejected_on_read(tiny_pairs, tmp_path, value):
    bare = tmp_path / "bare"
    bare.mkdir()
    rewrite_value(Path(tiny_pairs), bare / "part-0.parquet", "latent_l", row=1, index=5, value=value)
    with pytest.raises(SchemaError, match=rf"latent_l of 1 pair\(s\).*row 1, pair_id \w+.*±{MAX_ABS_LATENT:g}"):
        read_pairs(bare)


def test_a_changed_file_fails_its_manifest_checksum(dataset):
    part = parts(dataset / "pairs")[0]
    rewrite_value(part, part, "latent_w", row=0, index=0, value=0.123)  # plausible value, valid Parquet
    with pytest.raises(SchemaError, match=r"checksum .* does not match the manifest"):
        read_pairs(dataset / "pairs")


def test_a_flipped_byte_that_keeps_the_footer_readable_is_caught(dataset):
    part = parts(dataset / "pairs")[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the column data, far from the footer
    part.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match=part.name):
        read_pairs(dataset)


def test_an_extra_or_missing_part_is_caught(dataset):
    part = parts(dataset / "pairs")[0]
    (dataset / "pairs" / "extra.parquet").write_bytes(part.read_bytes())
    with pytest.raises(SchemaError, match="differ from those its manifest lists"):
        read_pairs(dataset / "pairs")


def test_infinite_rewards_are_rejected_but_nan_means_unscored(tiny_pairs, tmp_path):
    table = read_pairs(tiny_pairs)
    assert np.isnan(table.column("reward_w").to_numpy()).all()  # label-free DDSPO pairs: NaN is valid
    rewards = table.column("reward_w").to_numpy().copy()
    rewards[2] = np.inf
    bad = table.set_column(table.schema.get_field_index("reward_w"), "reward_w", pa.array(rewards))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"row 2 .* reward_w = inf"):
        read_pairs(tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("mu", [-0.5, 1.0, 1.5, -2.0])
def test_sdpo_mu_outside_its_range_is_an_error_not_off(mu):
    with pytest.raises(ValueError, match=r"train\.sdpo_mu=.*expected a slack in \[0, 1\), or -1"):
        TrainConfig(sdpo_mu=mu)
    assert not TrainConfig(sdpo_mu=-1).safeguard_on and TrainConfig(sdpo_mu=0.0).safeguard_on


# ------------------------------------------------------------------------------------------------ publication
def test_non_finite_weights_are_never_published(tmp_path):
    from pipeline.export import policy_from_checkpoint
    from pipeline.training.worker import WEIGHTS_FILE

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"non-finite .*\bb\b"):
        policy_from_checkpoint(ckpt, tmp_path / "policy.safetensors")
    assert not (tmp_path / "policy.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.slow
def test_nan_pairs_stop_the_train_job_without_publishing(tiny_pairs, tiny_toy_model_dir, tmp_path):
    """Pairs that slipped past the reader (here: NaN latents in memory) stop training at the first step."""
    from pipeline.training import PairData, TrainEngine, TrainingDiverged

    data = PairData.from_table(read_pairs(tiny_pairs))
    data.x0_l[3] = float("nan")
    engine = TrainEngine(TrainConfig(model=str(tiny_toy_model_dir), objective="diffusion-dpo", batch_size=8,
                                     max_steps=2))
    with pytest.raises(TrainingDiverged, match=r"optimizer step 1: non-finite loss .*pair ids \[.*'" + data.pair_ids[3]):
        engine.run(data)
