"""Video pairs in the pair schema (version 2): latents (C, F, H, W) round-trip to the trainer's (N, C, F, H, W),
frame-strip previews, version-1 files still read, and bad latent ranks are named (no Ray needed)."""

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.pairing import pair_row, pairs_from_rollouts, rows_to_table
from pipeline.data.preview import MAX_PREVIEW_FRAMES, frame_strip, preview_png, to_uint8, video_gif
from pipeline.data.schema import (PAIR_SCHEMA, SCHEMA_VERSION, SchemaError, latents_of, read_pairs, scan_pairs,
                                  validate_table)

C, F, H, W = 4, 3, 6, 5  # latent (C, F, H, W); the toy "decoded" videos below are (3, F, 8, 10)


def _video(seed: int, frames: int = F, h: int = 8, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (3, frames, h, w)).astype(np.float32)


def video_group(rewards):
    k = len(rewards)
    return {
        "prompt_id": np.zeros(k, int), "prompt": np.array(["a red ball rolls to the left"] * k, dtype=object),
        "sample_idx": np.arange(k), "seed": np.arange(k) + 100, "reward": np.array(rewards, float),
        "latent": np.stack([np.full((C, F, H, W), i, np.float32) + np.arange(F, dtype=np.float32)[:, None, None]
                            for i in range(k)]),
        "png": np.array([preview_png(_video(i)) for i in range(k)], dtype=object),
    }


def test_video_pairs_round_trip_to_the_trainer(tmp_path):
    from pipeline.training import PairData

    t = pairs_from_rollouts(video_group([0.2, 0.9, 0.5, 0.1]), pairing="all", min_gap=0.0, round_=1,
                            policy_version="r0")
    assert t.num_rows == 6 and set(t.column("schema_version").to_pylist()) == {SCHEMA_VERSION}
    assert t.column("latent_shape")[0].as_py() == [C, F, H, W]
    (tmp_path / "pairs").mkdir()
    pq.write_table(t, tmp_path / "pairs" / "part-0.parquet")
    back = read_pairs(tmp_path / "pairs")
    assert back.schema == PAIR_SCHEMA and latents_of(back, "latent_w").shape == (6, C, F, H, W)
    for values in (True, False):
        info = scan_pairs(tmp_path / "pairs", values=values)
        assert info.num_rows == 6 and info.latent_shape == (C, F, H, W) and info.is_video
    # the training reader's columns (no previews), as a worker's stream batch is checked and converted
    data = PairData.from_table(validate_table(back.drop(["png_w", "png_l"]), "stream", images=False))
    assert data.x0_w.shape == data.x0_l.shape == (6, C, F, H, W)
    row = back.sort_by("pair_id").to_pylist()[0]
    np.testing.assert_array_equal(data.x0_w[0].numpy(), np.asarray(row["latent_w"]).reshape(C, F, H, W))
    # frame f of sample i holds i + f: the frame axis survived the flat storage in order
    w = int(data.x0_w[0, 0, 0, 0, 0])
    np.testing.assert_array_equal(data.x0_w[0, 0, :, 0, 0].numpy(), w + np.arange(F))
    strip = Image.open(io.BytesIO(row["png_w"]))
    assert strip.size == (F * 10, 8)


def test_version_1_files_still_read(tmp_path):
    """A file written by the version-1 writer: the same columns, schema_version 1, image latents (C, H, W)."""
    n, shape = 2, [3, 4, 4]
    old = pa.table({
        "schema_version": pa.array([1] * n, pa.int32()), "pair_id": ["a1", "a2"], "prompt": ["a cat"] * n,
        "perturbed_prompt": [""] * n, "strategy": ["onpolicy"] * n, "round": pa.array([0] * n, pa.int32()),
        "policy_version": ["reference"] * n, "seed_w": [1, 2], "seed_l": [3, 4], "reward_w": [0.9, 0.8],
        "reward_l": [0.1, 0.2], "prompt_reward_mean": [0.5] * n, "prompt_reward_std": [0.4] * n,
        "prompt_num_samples": pa.array([2] * n, pa.int32()),
        "latent_shape": pa.array([shape] * n, pa.list_(pa.int32())),
        "latent_w": pa.array([np.full(48, 0.5, np.float32)] * n, pa.list_(pa.float32())),
        "latent_l": pa.array([np.full(48, -0.5, np.float32)] * n, pa.list_(pa.float32())),
        "png_w": [b""] * n, "png_l": [b""] * n,
    })
    pq.write_table(old, tmp_path / "v1.parquet")
    back = read_pairs(tmp_path / "v1.parquet")
    assert back.column("schema_version").to_pylist() == [1, 1]  # kept as written: provenance
    assert latents_of(back, "latent_l").shape == (2, 3, 4, 4)
    info = scan_pairs(tmp_path / "v1.parquet", values=False)
    assert info.latent_shape == (3, 4, 4) and not info.is_video
    # version-1 and version-2 parts read together (replayed rounds from before and after the bump)
    new = rows_to_table([pair_row(strategy="onpolicy", round_=1, policy_version="r", prompt="a dog", perturbed="",
                                  seed_w=5, seed_l=6, reward_w=1.0, reward_l=0.0, stats=(0.5, 0.5, 2),
                                  latent_w=np.zeros((3, 4, 4), np.float32), latent_l=np.ones((3, 4, 4), np.float32),
                                  png_w=b"", png_l=b"")])
    (tmp_path / "mixed").mkdir()
    pq.write_table(old, tmp_path / "mixed" / "part-0.parquet")
    pq.write_table(new, tmp_path / "mixed" / "part-1.parquet")
    assert sorted(read_pairs(tmp_path / "mixed").column("schema_version").to_pylist()) == [1, 1, 2]
    # version 1 never held videos
    video_v1 = old.set_column(old.schema.get_field_index("latent_shape"), "latent_shape",
                              pa.array([[3, 1, 4, 4]] * n, pa.list_(pa.int32())))
    with pytest.raises(SchemaError, match=r"row 0 \(pair_id a1\) column latent_shape is \[3, 1, 4, 4\] \(rank 4\); "
                                          r"expected \(C, H, W\): schema_version 1 holds images only"):
        validate_table(video_v1, "v1-video")
    future = old.set_column(0, "schema_version", pa.array([3] * n, pa.int32()))
    with pytest.raises(SchemaError, match=r"schema_version \[3\]; this reader supports \[1, 2\]"):
        validate_table(future, "v3")
    pq.write_table(future, tmp_path / "v3.parquet")
    with pytest.raises(SchemaError, match=r"v3.parquet: schema_version \[3\]"):
        scan_pairs(tmp_path / "v3.parquet", values=False)


def test_bad_latent_ranks_are_named(tmp_path):
    t = pairs_from_rollouts(video_group([0.1, 0.8]), pairing="best-worst", min_gap=0, round_=0, policy_version="r")
    idx = t.schema.get_field_index("latent_shape")
    pid = t.column("pair_id")[0].as_py()
    size = C * F * H * W
    for shape in ([size // 2, 2], [1, C, F, H, W], [C, F, H * W, 0, 1]):  # rank 2; a stored batch axis; a zero size
        bad = t.set_column(idx, "latent_shape", pa.array([shape], pa.list_(pa.int32())))
        with pytest.raises(SchemaError, match=rf"bad: row 0 \(pair_id {pid}\) column latent_shape is "
                                              rf"{re.escape(str(shape))} \(rank {len(shape)}\); expected "
                                              r"\(C, H, W\) for an image or \(C, F, H, W\) for a video"):
            validate_table(bad, "bad")
        pq.write_table(bad, tmp_path / "bad.parquet")
        for values in (True, False):
            with pytest.raises(SchemaError, match="bad.parquet: row 0.*column latent_shape"):
                scan_pairs(tmp_path / "bad.parquet", values=values)
    with pytest.raises(ValueError, match=r"winner latent \(4, 3, 6, 5\) and loser latent \(4, 6, 5\) differ"):
        pair_row(strategy="onpolicy", round_=0, policy_version="r", prompt="p", perturbed="", seed_w=0, seed_l=1,
                 reward_w=1.0, reward_l=0.0, stats=(0, 0, 2), latent_w=np.zeros((C, F, H, W), np.float32),
                 latent_l=np.zeros((C, H, W), np.float32), png_w=b"", png_l=b"")


def test_preview_png_for_images_and_frame_strips_for_videos():
    image = _video(1)[:, 0]  # (3, H, W)
    png = preview_png(image)
    # an image's preview is what the version-1 writer produced, byte for byte
    old = io.BytesIO()
    Image.fromarray(np.clip((image.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)).save(old, "PNG")
    assert png == old.getvalue()
    video = _video(2, frames=5, h=6, w=7)
    strip = np.asarray(Image.open(io.BytesIO(preview_png(video))))
    assert strip.shape == (6, 5 * 7, 3)  # width F × frame width
    for f in range(5):
        np.testing.assert_array_equal(strip[:, f * 7:(f + 1) * 7], to_uint8(video[:, f].transpose(1, 2, 0)))
    long = _video(3, frames=40, h=4, w=3)
    assert frame_strip(long).shape == (4, MAX_PREVIEW_FRAMES * 3, 3)
    np.testing.assert_array_equal(frame_strip(long)[:, -3:], to_uint8(long[:, -1].transpose(1, 2, 0)))  # last kept
    assert frame_strip(long, max_frames=0).shape == (4, 40 * 3, 3)
    gif = Image.open(io.BytesIO(video_gif(video)))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (7, 6)
    with pytest.raises(ValueError, match=r"expected an image \(3, H, W\) or a video \(3, F, H, W\).*\(1, 3, 5, 6, 7\)"):
        preview_png(video[None])
    with pytest.raises(ValueError, match=r"video_gif: expected a video \(3, F, H, W\)"):
        video_gif(image)


def test_scoring_stage_takes_videos_with_a_video_reward():
    """ScoreImages is unchanged for videos: the batch's (N, 3, F, H, W) column goes to a video scorer."""
    import torch

    from pipeline.data.stages import ScoreImages
    from pipeline.toyworld import render, to_tensor

    prompts = ["two red circles on the left", "a blue square at the top"]
    frames = [to_tensor(np.stack([render(p, s) for s in range(3)])) for p in prompts]  # (3 frames, 3, H, W)
    videos = torch.stack(frames).transpose(1, 2).numpy()  # (2, 3, F, H, W)
    stage = ScoreImages({"name": "frame_average", "inner": {"name": "toy"}})
    out = stage({"image": videos, "prompt": np.array(prompts, dtype=object)})
    toy = ScoreImages({"name": "toy"})
    per_frame = [toy({"image": videos[:, :, f], "prompt": np.array(prompts, dtype=object)})["reward"]
                 for f in range(3)]
    np.testing.assert_allclose(out["reward"], np.mean(per_frame, axis=0), rtol=1e-6)
