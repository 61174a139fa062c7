"""Checks that run before Ray starts: every input a job will read exists and fits, so a bad path or spec fails
in seconds with a message naming it, not minutes later inside a Ray worker (or after the reference evaluation).

What is checked: model folders (every component their family needs: ``pipeline/backbones``), weight files,
prompt sources (readable, non-empty; prompts longer than the text encoder's limit are reported by id and
length, since the encoder truncates them), and reward specs (names, keys, local paths).
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

from .backbones import check_model_folder
from .backbones.loader import backbone_class
from .data.prompts import load_prompts
from .rewards import check_reward_spec


class PreflightError(SystemExit):
    """An input a job needs is missing or malformed (exits with the message, no traceback)."""


def _fail(where: str, err: Exception) -> PreflightError:
    return PreflightError(f"error: {where}: {err}")


def check_model(path: str | Path, where: str = "model") -> Path:
    """A local model folder with every component its family needs (a toy world's reference folder that is not
    there yet is named as such, with how to make it)."""
    try:
        cls = backbone_class(path)
        required = getattr(importlib.import_module(cls.__module__), "REQUIRED", ())
        return check_model_folder(path, required)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        from .toyworld.worlds import WORLDS

        for world in WORLDS.values():
            try:
                ours = Path(path).absolute() == world.reference_dir.absolute()
            except ImportError:  # a world's reference module that cannot be imported here names no folder
                ours = False
            if ours and not world.reference_dir.is_dir():
                raise PreflightError(f"error: {where}: the {world.name} world's reference model is not at "
                                     f"{world.reference_dir} yet; train it with `python jobs/pretrain_toy.py"
                                     f"{' --world video' if world.video else ''}` (docs/toyworld.md)") from None
        raise _fail(where, err) from None


def check_weights(path: str, where: str) -> None:
    if path and not Path(path).is_file():
        raise PreflightError(f"error: {where}={path}: no such file (expected a denoiser .safetensors file)")


def check_prompts(source: str, model: str | Path | None = None, *, where: str = "prompts", limit: int = 0) -> int:
    """The number of prompts; warns, naming ids and token counts, about prompts the text encoder would truncate."""
    try:
        rows = load_prompts(source, limit=limit)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(where, err) from None
    if model is not None and (Path(model) / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(Path(model) / "tokenizer"), local_files_only=True)
        limit_tokens = int(getattr(tok, "model_max_length", 0) or 0)
        if 0 < limit_tokens < 100_000:
            lengths = [len(ids) for ids in tok([r["prompt"] for r in rows], truncation=False)["input_ids"]]
            long = [(r["prompt_id"], n) for r, n in zip(rows, lengths) if n > limit_tokens]
            if long:
                shown = ", ".join(f"id {i} ({n} tokens)" for i, n in long[:5])
                warnings.warn(f"{where}: {len(long)} of {len(rows)} prompts exceed the text encoder's {limit_tokens} "
                              f"tokens and will be truncated: {shown}{' …' if len(long) > 5 else ''}", stacklevel=2)
    return len(rows)


def check_reward(spec, where: str) -> None:
    try:
        check_reward_spec(spec)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        raise _fail(where, err) from None


def check_generation(cfg, where: str = "generation") -> None:
    check_model(cfg.model, f"{where}.model")
    check_weights(cfg.weights, f"{where}.weights")
    check_prompts(cfg.prompts, cfg.model, where=f"{where}.prompts", limit=cfg.prompt_limit)
    if cfg.strategy == "onpolicy":
        check_reward(cfg.reward, f"{where}.reward")
    if cfg.perturb == "llm" and cfg.strategy in ("ddspo-paired", "not-paired"):
        if not Path(cfg.llm_path).is_dir():
            raise PreflightError(f"error: {where}.llm_path={cfg.llm_path!r}: expected a local causal-LM folder")


def check_train(cfg, where: str = "train") -> None:
    check_model(cfg.model, f"{where}.model")
    check_weights(cfg.init_weights, f"{where}.init_weights")
    check_weights(cfg.reference_weights, f"{where}.reference_weights")


def check_rounds(cfg) -> None:
    """Everything the online rounds read: the model, the training prompts and reward, the held-out prompts."""
    check_model(cfg.model, "model")
    check_generation(cfg.generation)
    check_train(cfg.train)
    check_prompts(cfg.eval.prompts, cfg.model, where="eval.prompts", limit=cfg.eval.num_prompts)
    if cfg.eval.reward is not None:
        check_reward(cfg.eval.reward, "eval.reward")
