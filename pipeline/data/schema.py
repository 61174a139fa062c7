"""The preference-pair Parquet schema (version 2) and its validating reader.

One row is one training pair of images or of videos. Samples are stored twice, on purpose:

* ``latent_w`` / ``latent_l`` (flat float32 lists + ``latent_shape``) are what the trainer consumes: exactly
  the tensors the generating model produced, so training needs no VAE pass and no lossy decode/encode
  round trip (for the pixel-space toy world they *are* the images). ``latent_shape`` is (C, H, W) for an image
  and (C, F, H, W) for a video (the project's video latent layout without the batch axis);
* ``png_w`` / ``png_l`` are for people: open the Parquet file, look at the pairs — a PNG of the image, or a
  frame strip of the video (:mod:`pipeline.data.preview`). They can be turned off (empty bytes) for very
  large runs.

Version 2 (video) keeps version 1's columns and types; what changed is that ``latent_shape`` may have rank 4.
The version was bumped so that a version-1 reader refuses a video dataset by its version instead of handing
5-D latents to an image trainer. Version-1 files still read: their rows are image pairs, (C, H, W) only.

``perturbed_prompt`` is c⁻ for DDSPO strategies ("" otherwise). Rewards are NaN where a strategy does not
score (label-free DDSPO). ``prompt_*`` columns keep per-prompt statistics of the scored samples the pair
was built from. ``pair_id`` is a deterministic hash of how the pair was made, so reruns never duplicate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 2

#: the latent ranks each readable schema version allows: 3 = image (C, H, W), 4 = video (C, F, H, W)
LATENT_RANKS = {1: (3,), 2: (3, 4)}
SUPPORTED_VERSIONS = tuple(sorted(LATENT_RANKS))

#: how a pair was made: the generation strategies (jobs/generate_pairs.py) and "human" (labels from a human study,
#: pipeline/human/export.py)
GENERATED_STRATEGIES = ("ddspo-paired", "rand-positive", "not-paired", "onpolicy")
STRATEGIES = (*GENERATED_STRATEGIES, "human")

PAIR_SCHEMA = pa.schema([
    ("schema_version", pa.int32()),
    ("pair_id", pa.string()),
    ("prompt", pa.string()),
    ("perturbed_prompt", pa.string()),
    ("strategy", pa.string()),
    ("round", pa.int32()),
    ("policy_version", pa.string()),
    ("seed_w", pa.int64()),
    ("seed_l", pa.int64()),
    ("reward_w", pa.float64()),
    ("reward_l", pa.float64()),
    ("prompt_reward_mean", pa.float64()),
    ("prompt_reward_std", pa.float64()),
    ("prompt_num_samples", pa.int32()),
    ("latent_shape", pa.list_(pa.int32())),
    ("latent_w", pa.list_(pa.float32())),
    ("latent_l", pa.list_(pa.float32())),
    ("png_w", pa.binary()),
    ("png_l", pa.binary()),
])

#: the columns training reads (the PNG previews are for people)
TRAIN_SCHEMA = pa.schema([f for f in PAIR_SCHEMA if f.name not in ("png_w", "png_l")])

#: Largest magnitude a stored latent may have. Pixel-space images live in [-1, 1] and VAE latents (scaled by the
#: VAE's scaling factor) within a few tens; anything near this bound is corruption, not data.
MAX_ABS_LATENT = 1e4

MANIFEST = "manifest.json"  # beside the Parquet folder: the dataset's config, counts and per-file checksums


class SchemaError(ValueError):
    """A pairs file that is not a valid pairs dataset; the message names the file and the problem."""


def make_pair_id(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def validate_table(table: pa.Table, source: str = "<table>", *, images: bool = True, first_row: int = 0) -> pa.Table:
    """Check columns, types and invariants; return the table with columns in schema order.

    ``images=False`` checks the training columns only (:data:`TRAIN_SCHEMA`); ``first_row`` is the table's
    offset in its file, so that an error in a streamed batch names the file's row."""
    schema = PAIR_SCHEMA if images else TRAIN_SCHEMA
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{source}: missing column(s) {missing}; expected the version-{SCHEMA_VERSION} pair schema "
                          f"(see docs/data.md)")
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaError(f"{source}: column types do not match the pair schema: {err}") from err
    if table.num_rows == 0:
        return table
    versions = table.column("schema_version").to_pylist()
    if not set(versions) <= set(SUPPORTED_VERSIONS):
        raise SchemaError(f"{source}: schema_version {sorted(set(versions), key=str)}; this reader supports "
                          f"{list(SUPPORTED_VERSIONS)}")
    bad = set(table.column("strategy").to_pylist()) - set(STRATEGIES)
    if bad:
        raise SchemaError(f"{source}: unknown strategy {sorted(bad)}; expected one of {STRATEGIES}")
    shapes = table.column("latent_shape").to_pylist()
    _check_latent_shapes(shapes, versions, table.column("pair_id"), source, first_row)
    sizes = pc.list_value_length(table.column("latent_w")).to_numpy()
    sizes_l = pc.list_value_length(table.column("latent_l")).to_numpy()
    expected = np.array([int(np.prod(s)) for s in shapes])
    if not (np.array_equal(sizes, expected) and np.array_equal(sizes_l, expected)):
        row = int(np.argmax((sizes != expected) | (sizes_l != expected)))
        raise SchemaError(f"{source}: row {first_row + row} latent length {sizes[row]}/{sizes_l[row]} does not match "
                          f"latent_shape {table.column('latent_shape')[row].as_py()}")
    for name in ("latent_w", "latent_l"):
        _check_values(table, name, source, first_row)
    for name in ("reward_w", "reward_l"):  # NaN means "not scored" (label-free strategies); ±inf is never valid
        inf = np.isinf(table.column(name).to_numpy(zero_copy_only=False))
        if inf.any():
            row = int(np.argmax(inf))
            raise SchemaError(f"{source}: row {first_row + row} (pair_id {table.column('pair_id')[row].as_py()}) has {name} = "
                              f"{table.column(name)[row].as_py()}; expected a finite reward or NaN (not scored)")
    return table


def _check_latent_shapes(shapes: list, versions: list, pair_ids: "pa.ChunkedArray | None", source: str,
                         first_row: int = 0) -> None:
    """Every row's ``latent_shape`` has a rank its schema version allows — (C, H, W) for an image, (C, F, H, W) for
    a video (version 2) — and positive sizes: a flat latent can only be reshaped for the trainer if it does."""
    for row, (shape, version) in enumerate(zip(shapes, versions)):
        ranks = LATENT_RANKS[version]
        if shape is not None and len(shape) in ranks and all(s is not None and s > 0 for s in shape):
            continue
        pid = f" (pair_id {pair_ids[row].as_py()})" if pair_ids is not None else ""
        allowed = "(C, H, W) for an image or (C, F, H, W) for a video" if 4 in ranks else \
            f"(C, H, W): schema_version {version} holds images only"
        got = "null" if shape is None else f"{shape} (rank {len(shape)})"
        raise SchemaError(f"{source}: row {first_row + row}{pid} column latent_shape is {got}; expected {allowed}, "
                          f"with positive sizes")


def _check_values(table: pa.Table, column: str, source: str, first_row: int = 0) -> None:
    """Every latent value finite and within ±MAX_ABS_LATENT; the error names the first offending pair."""
    chunked = table.column(column).combine_chunks()
    flat = chunked.flatten().to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(flat) | (np.abs(flat) > MAX_ABS_LATENT)
    if not bad.any():
        return
    first = int(np.argmax(bad))
    offsets = chunked.offsets.to_numpy()
    row = int(np.searchsorted(offsets, first, side="right") - 1)
    rows = np.unique(np.searchsorted(offsets, np.flatnonzero(bad), side="right") - 1)
    ids = table.column("pair_id").take(pa.array(rows[:5])).to_pylist()
    raise SchemaError(f"{source}: {column} of {len(rows)} pair(s) holds non-finite or out-of-range values "
                      f"(first: row {first_row + row}, pair_id {table.column('pair_id')[row].as_py()}, value {flat[first]!r}; "
                      f"expected finite values within ±{MAX_ABS_LATENT:g}); pair ids {ids}"
                      f"{' …' if len(rows) > 5 else ''}")


def file_checksum(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the manifest records one per Parquet part)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_checksums(folder: str | Path) -> dict[str, str]:
    """``{file name: sha256}`` of every Parquet part in a folder."""
    return {f.name: file_checksum(f) for f in sorted(Path(folder).glob("*.parquet"))}


def _manifest_of(folder: Path) -> dict | None:
    """The dataset manifest beside a Parquet folder, when it records checksums (``None`` for bare files)."""
    path = folder.parent / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path}: not valid JSON ({err})") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return manifest if isinstance(files, dict) and manifest.get("parquet_dir") == folder.name else None


def verify_checksums(folder: Path, manifest: dict) -> None:
    """The Parquet parts are exactly the ones the manifest lists, byte for byte."""
    expected = manifest["files"]
    found = {f.name for f in folder.glob("*.parquet")}
    if found != set(expected):
        raise SchemaError(f"{folder}: Parquet files {sorted(found)} differ from those its manifest lists "
                          f"{sorted(expected)} ({folder.parent / MANIFEST})")
    for name, digest in expected.items():
        actual = file_checksum(folder / name)
        if actual != digest:
            raise SchemaError(f"{folder / name}: checksum {actual[:12]}… does not match the manifest's "
                              f"{digest[:12]}… — the file changed or is corrupt since it was written")


def pair_files(path: str | Path) -> list[Path]:
    """The Parquet parts of a pairs file, a folder of parts, or a dataset folder (``manifest.json`` + ``pairs/``),
    verified against the manifest's checksums when it records them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs dataset {path} does not exist")
    if path.is_dir() and not any(path.glob("*.parquet")) and (path / "pairs").is_dir():
        path = path / "pairs"  # a dataset folder (manifest.json + pairs/)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise SchemaError(f"{path}: no .parquet files in this folder")
    manifest = _manifest_of(path) if path.is_dir() else None
    if manifest is not None:
        verify_checksums(path, manifest)
    return files


def _parquet_file(f: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"{f}: not a readable Parquet file ({err})") from err


@dataclass(frozen=True)
class PairsInfo:
    """What :func:`scan_pairs` learned about a dataset without holding it in memory."""

    files: list[Path]
    num_rows: int
    latent_shape: tuple[int, ...] | None  # (C, H, W) or, for videos, (C, F, H, W); None for an empty dataset

    @property
    def is_video(self) -> bool:
        """Video pairs: per-row latents (C, F, H, W), batches (N, C, F, H, W)."""
        return self.latent_shape is not None and len(self.latent_shape) == 4


def scan_pairs(path: str | Path, *, values: bool = True, batch_rows: int = 1024,
               on_batch: Callable[[pa.Table], None] | None = None) -> PairsInfo:
    """Validate a pairs dataset file by file and batch by batch, in memory bounded by one batch — how the
    driver checks a dataset it must not load (a cluster-scale pairs table does not fit in its memory).

    ``values=False`` checks the checksums, the files' schema and the row counts from the Parquet metadata
    only, and reads the latent shapes from the first row of each file; the trainer's workers check the
    values of what they read. ``on_batch`` (with ``values``) gets every validated batch: statistics of the
    dataset in the same single pass."""
    files = pair_files(path)
    rows, shapes = 0, set()
    for f in files:
        pf = _parquet_file(f)
        validate_table(pf.schema_arrow.empty_table(), str(f))
        if not values:
            rows += pf.metadata.num_rows
            if pf.metadata.num_rows:
                first = next(pf.iter_batches(batch_size=1, columns=["schema_version", "latent_shape"]))
                version, shape = first.column(0)[0].as_py(), first.column(1)[0].as_py()
                if version not in LATENT_RANKS:
                    raise SchemaError(f"{f}: schema_version [{version}]; this reader supports {list(SUPPORTED_VERSIONS)}")
                _check_latent_shapes([shape], [version], None, str(f))
                shapes.add(tuple(shape))
            continue
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                table = validate_table(pa.Table.from_batches([batch]), str(f), first_row=rows)
                shapes.update(tuple(s) for s in table.column("latent_shape").to_pylist())
                rows += table.num_rows
                if on_batch is not None:
                    on_batch(table)
        except (pa.ArrowInvalid, OSError) as err:
            raise SchemaError(f"{f}: not a readable Parquet file ({err})") from err
    if len(shapes) > 1:
        raise SchemaError(f"{path}: latent shapes differ within the dataset: {sorted(shapes)}")
    return PairsInfo(files, rows, shapes.pop() if shapes else None)


def read_parts(files: Sequence[str | Path], columns: Sequence[str] | None = None) -> list[pa.Table]:
    """Each Parquet part read whole (``columns``: only those); an unreadable part is a :class:`SchemaError`
    naming it."""
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=list(columns) if columns is not None else None))
        except (pa.ArrowInvalid, OSError) as err:
            raise SchemaError(f"{f}: not a readable Parquet file ({err})") from err
    return tables


def read_pairs(path: str | Path) -> pa.Table:
    """Read and validate a whole pairs dataset into memory (see :func:`pair_files` for what ``path`` may be);
    for datasets that may not fit, :func:`scan_pairs` validates without loading."""
    files = pair_files(path)
    tables = read_parts(files)
    return validate_table(pa.concat_tables([validate_table(t, str(f)) for t, f in zip(tables, files)]), str(path))


def latents_of(table: pa.Table, column: str) -> np.ndarray:
    """A latent column as an (N, C, H, W) — for videos (N, C, F, H, W) — float32 array (all rows share one shape
    within a dataset)."""
    shapes = table.column("latent_shape").to_pylist()
    if len({tuple(s) for s in shapes}) > 1:
        raise SchemaError(f"latent shapes differ within the dataset: {sorted({tuple(s) for s in shapes})}")
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(len(shapes), *shapes[0])
