"""Prompt sources: a text file (one prompt a line), a Parquet file (a ``prompt`` column), or the toy world.

Every source yields rows ``{"prompt_id": int, "prompt": str}`` with ids in source order, so seeds and
pair ids derived from them are stable across reruns.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: toy:train (168) = toy:fit (144) + toy:val (24, checkpoint selection); toy:heldout (48) is the test split
TOY_SOURCES = {"toy:train", "toy:fit", "toy:val", "toy:heldout", "toy:all"}


def load_prompts(source: str, *, limit: int = 0, repeat: int = 1) -> list[dict]:
    """Read a prompt source; ``limit`` keeps the first N prompts, ``repeat`` cycles the list N times."""
    if source in TOY_SOURCES:
        from ..toyworld import all_specs, fit_specs, heldout_specs, train_specs, validation_specs

        specs = {"toy:train": train_specs, "toy:fit": fit_specs, "toy:val": validation_specs,
                 "toy:heldout": heldout_specs, "toy:all": all_specs}[source]()
        prompts = [s.text for s in specs]
    else:
        prompts = _read_file(Path(source))
    if limit:
        prompts = prompts[:limit]
    if repeat < 1:
        raise ValueError(f"prompts.repeat={repeat}: expected >= 1")
    prompts = prompts * repeat
    return [{"prompt_id": i, "prompt": p} for i, p in enumerate(prompts)]


def _read_file(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist (expected a .txt/.parquet file or one of "
                                f"{sorted(TOY_SOURCES)})")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"prompt file {path} is not a readable Parquet file ({err})") from err
        if "prompt" not in table.column_names:
            raise ValueError(f"prompt file {path} has no 'prompt' column (columns: {table.column_names})")
        prompts = [p for p in table.column("prompt").to_pylist() if p and p.strip()]
    else:
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt file {path} is not UTF-8 text ({err})") from err
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    return prompts
