"""The one resume guard: a run directory records its resolved config; a rerun with another config refuses.

Every job calls :func:`guard_run_dir` before any work: the first run writes ``run_config.json`` (the whole
resolved tree and its fingerprint); a rerun whose config differs in any field that is not declared
resumable stops with the differing dotted fields named, instead of silently reusing results made with the
old config. Resumable fields (e.g. ``rounds``: run more rounds; ``max_steps``: train longer) may change, and
the record is updated to the new values.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from ..config import differences, fingerprint, to_dict
from .atomic import atomic_write_bytes

RECORD = "run_config.json"


class ConfigMismatch(SystemExit):
    """A rerun into a run directory made with another config (exits with the message, no traceback)."""


def _resumable(path: str, resumable: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in resumable)


def describe(diffs: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    shown = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diffs.items())[:limit]]
    return "; ".join(shown) + (f"; … ({len(diffs)} fields)" if len(diffs) > limit else "")


def _as_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return to_dict(cfg)
    return json.loads(json.dumps({k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in cfg.items()},
                                 default=str))


def guard_run_dir(run_dir: str | Path, cfg: Any, *, job: str, resumable: Sequence[str] = ()) -> dict:
    """Record ``cfg`` (a config tree, or a mapping of them) in ``run_dir`` or check it against the record
    there; returns the record."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD
    new = _as_dict(cfg)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigMismatch(f"error: {path} is not valid JSON ({err}); remove it or choose another run directory")
        if old.get("job") != job:
            raise ConfigMismatch(f"error: {run_dir} holds a {old.get('job')!r} run, not a {job!r} run; "
                                 f"choose another run directory")
        diffs = {k: v for k, v in differences(old["config"], new).items() if not _resumable(k, resumable)}
        if diffs:
            allowed = f" (only {', '.join(resumable)} may change on a rerun)" if resumable else ""
            raise ConfigMismatch(f"error: {run_dir} holds a run made with another config: {describe(diffs)}{allowed}; "
                                 f"choose another run directory to start a new run")
    record = {"job": job, "fingerprint": fingerprint(new), "config": new}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return record
