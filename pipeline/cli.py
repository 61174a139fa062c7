"""The jobs' front door: ``--recipe`` / ``--config`` / ``--set`` (repeatable) / ``--print-config``.

Resolution order: the dataclass defaults ← the recipe ← the ``--config`` file (merged: a file that sets only
``train.lr`` keeps the rest of the recipe) ← every ``--set KEY=VALUE`` in order (``--set a=1 --set b=2`` and
``--set a=1 b=2`` are the same). A bad field or value exits with a message naming its dotted path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .config import ConfigError, apply_overrides, build, merge, read_config_file, to_dict
from .recipes import recipe, recipes_for

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, *, default_recipe: str, tree: str = "rounds",
                    section: str = "") -> None:
    """The config options of a job whose config is a ``tree`` (``rounds``, ``sweep``), or one ``section`` of a rounds
    config (``generation`` for jobs/generate_pairs.py, ``train`` for jobs/train.py)."""
    where = f" (its {section} section)" if section else ""
    parser.add_argument("--recipe", default=default_recipe, choices=recipes_for(tree, section),
                        help=f"named starting config{where} (pipeline/recipes.py; default: {default_recipe})")
    parser.set_defaults(recipe_section=section)
    parser.add_argument("--config", type=Path, help="JSON or YAML file, merged over the recipe")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a field by its dotted path, e.g. train.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def overrides_of(args: argparse.Namespace) -> list[str]:
    return [item for group in args.overrides for item in group]


def config_data(args: argparse.Namespace, extra: list[str] = ()) -> dict[str, Any]:
    """The merged mapping (recipe ← file ← overrides) before it is built into a dataclass."""
    data = recipe(args.recipe, getattr(args, "recipe_section", ""))
    if args.config:
        data = merge(data, read_config_file(args.config))
    return apply_overrides(data, [*overrides_of(args), *extra])


def resolve(args: argparse.Namespace, cls: type[T], *, extra: list[str] = (), data: dict | None = None) -> T:
    """The job's config tree; a config error exits with its message (no traceback), before any work starts."""
    try:
        cfg = build(cls, config_data(args, list(extra)) if data is None else data)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        sys.stdout.flush()
        raise SystemExit(0)
    return cfg



def print_options_if_asked(args: argparse.Namespace) -> None:
    """``--print-config`` for the jobs configured by plain options (toy pretraining and evaluation): print the
    resolved options as YAML and exit."""
    if getattr(args, "print_config", False):
        shown = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "print_config"}
        print(yaml.safe_dump(shown, sort_keys=False), end="")
        raise SystemExit(0)
