"""The embedded default's world: procedural prompts, a deterministic renderer and a
verifiable reward (a colour / shape / count / position detector), with no downloads."""

from .detector import (Detection, DetectedObject, ScoreResult, detect, detect_batch, score,
                       to_unit_rgb)
from .grammar import (ATTRIBUTES, COLOURS, COUNTS, POSITIONS, SHAPES, PromptSpec, all_specs,
                      as_spec, corrupt_spec, differ_in, fit_specs, heldout_pairs, heldout_specs, is_heldout,
                      parse_prompt, train_specs, validation_specs)
from .renderer import (Placement, from_tensor, layout, render, render_batch,
                     to_tensor)

__all__ = [
    "ATTRIBUTES", "COLOURS", "COUNTS", "POSITIONS", "SHAPES", "PromptSpec", "all_specs", "as_spec",
    "corrupt_spec", "differ_in", "heldout_pairs", "heldout_specs", "is_heldout", "parse_prompt",
    "train_specs", "validation_specs", "fit_specs", "Placement", "from_tensor", "layout", "render", "render_batch",
    "to_tensor", "Detection", "DetectedObject", "ScoreResult", "detect", "detect_batch", "score",
    "to_unit_rgb",
]
