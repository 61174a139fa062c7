"""Prompt sources: a text file (one prompt a line), a Parquet file (a ``prompt`` column), or a toy world's split.

A toy world's split is ``<world>:<split>`` — ``toy:train``, ``toy_video:heldout``, … — resolved through the world
registry (:mod:`pipeline.toyworld.worlds`: worlds ``toy`` and ``toy_video``, splits ``train`` = ``fit`` + ``val``,
``heldout``, ``all``). Every source yields rows ``{"prompt_id": int, "prompt": str}`` with ids in source order, so
seeds and pair ids derived from them are stable across reruns.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# toy:train (168) = toy:fit (144) + toy:val (24, checkpoint selection); toy:heldout (48) is the test split. The toy
# video world: toy_video:train (192) = toy_video:fit (164) + toy_video:val (28); toy_video:heldout (78).


def _world_source(source: str):
    """(world, split) of a ``<world>:<split>`` source, None for anything else (a file); the registry is imported
    only for a source that looks like one."""
    name, sep, _ = source.partition(":")
    if not sep or not name.replace("_", "").isalnum():
        return None
    from ..toyworld.worlds import parse_source

    return parse_source(source)


def load_prompts(source: str, *, limit: int = 0, repeat: int = 1) -> list[dict]:
    """Read a prompt source; ``limit`` keeps N prompts (a file's and the image world's first N, the video world's N
    evenly spaced over its split), ``repeat`` cycles the list N times."""
    world = _world_source(str(source))
    if world is not None:
        prompts = world[0].prompts(world[1], limit=limit)  # the video world spreads its N over the grammar
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
        from ..toyworld.worlds import prompt_sources

        raise FileNotFoundError(f"prompt file {path} does not exist (expected a .txt/.parquet file or one of "
                                f"{prompt_sources()})")
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
