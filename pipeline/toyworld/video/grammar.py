"""Prompt grammar of the toy video world: ``<count> <colour> <shape> <motion>``.

Prompts look like ``"a red circle moving left"``, ``"two blue squares moving up"`` or
``"three green triangles standing still"``. Colours, shapes and counts (and their words) are the
image world's (:mod:`pipeline.toyworld.grammar`); the image world's position is replaced by a
motion: one of four directions or ``still`` (the absence of motion, so that "moves at all" — VBench's
dynamic degree — is itself checkable). ``VideoSpec.text`` and ``parse_prompt`` are exact inverses.

Splits, all deterministic: a spec is **held out** (evaluation only) when its (colour, shape) pair is
one of the image world's held-out pairs (``grammar.heldout_pairs``: a model started from the image
reference has never seen those either) or its (colour, motion) pair is one of
``heldout_motion_pairs()`` (binding a direction to an object it never moved with). Every single
colour, shape, count and motion still occurs in training. ``validation_specs`` is every
``VALIDATION_EVERY``-th training spec, ``fit_specs`` the rest, as in the image world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np

from ..grammar import (_WORD_TO_COUNT, COLOURS, COUNT_WORDS, COUNTS, HELDOUT_SEED, SHAPES, check_spec,
                       VALIDATION_EVERY, _stable_hash, heldout_pairs)

#: the four directions of motion, then the absence of motion
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = (*DIRECTIONS, "still")
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
    "still": "standing still",
}
#: unit vector of each motion in image coordinates (x to the right, y downwards)
MOTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
}
REVERSED: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
_PHRASE_TO_MOTION: dict[str, str] = {v: k for k, v in MOTION_PHRASES.items()}

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "motion")
#: Number of (colour, motion) pairs held out, with distinct colours and distinct directions.
HELDOUT_NUM_MOTION_PAIRS = 3


@dataclass(frozen=True, order=True)
class VideoSpec:
    """One video prompt in structured form; validated on construction."""

    colour: str
    shape: str
    count: int
    motion: str

    def __post_init__(self) -> None:
        check_spec(self, colour=COLOURS, shape=SHAPES, count=COUNTS, motion=MOTIONS)

    @property
    def text(self) -> str:
        """The canonical English prompt, e.g. ``"two red circles moving left"``."""
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} {MOTION_PHRASES[self.motion]}"

    def replace(self, **changes: object) -> "VideoSpec":
        """A copy with some attributes changed (validated)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.text


_EXPECTED = (
    "expected '<count> <colour> <shape> <motion>' with count in "
    f"{sorted(_WORD_TO_COUNT)}, colour in {list(COLOURS)}, shape in {list(SHAPES)} "
    f"(plural when count > 1), motion in {list(MOTION_PHRASES.values())}"
)


def parse_prompt(text: str) -> VideoSpec:
    """Invert ``VideoSpec.text`` (case, extra whitespace, a final period and ``"one"`` tolerated)."""
    if not isinstance(text, str):
        raise ValueError(f"cannot parse video prompt {text!r}: not a string; {_EXPECTED}")
    words = text.strip().lower().rstrip(".").split()

    def fail(why: str) -> ValueError:
        return ValueError(f"cannot parse video prompt {text!r}: {why}; {_EXPECTED}")

    if len(words) != 5:
        raise fail(f"got {len(words)} words, need 5")
    count_word, colour, noun, phrase = words[0], words[1], words[2], " ".join(words[3:])
    if count_word not in _WORD_TO_COUNT:
        raise fail(f"unknown count word {count_word!r}")
    count = _WORD_TO_COUNT[count_word]
    if colour not in COLOURS:
        raise fail(f"unknown colour {colour!r}")
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if shape not in SHAPES:
        raise fail(f"unknown shape {noun!r}")
    if (noun != shape) != (count > 1):
        raise fail(f"{noun!r} does not agree in number with {count_word!r}")
    if phrase not in _PHRASE_TO_MOTION:
        raise fail(f"unknown motion {phrase!r}")
    return VideoSpec(colour, shape, count, _PHRASE_TO_MOTION[phrase])


def as_spec(prompt: "str | VideoSpec") -> VideoSpec:
    """Accept either form."""
    return prompt if isinstance(prompt, VideoSpec) else parse_prompt(prompt)


@lru_cache(maxsize=None)
def all_specs() -> tuple[VideoSpec, ...]:
    """Every prompt of the grammar (6 x 3 x 3 x 5 = 270), in a fixed order."""
    return tuple(VideoSpec(c, s, n, m) for c, s, n, m in product(COLOURS, SHAPES, COUNTS, MOTIONS))


@lru_cache(maxsize=None)
def heldout_motion_pairs(seed: int = HELDOUT_SEED,
                         num_pairs: int = HELDOUT_NUM_MOTION_PAIRS) -> tuple[tuple[str, str], ...]:
    """The (colour, direction) pairs never shown in training.

    Rule: rank the 24 (colour, direction) pairs by ``sha256(f"video:{seed}:{colour}:{direction}")``
    and take pairs greedily, skipping a colour or a direction already taken; ``still`` is never held
    out (it is no direction to bind). Pinned by ``tests/test_toyworld_video.py``.
    """
    if num_pairs > len(DIRECTIONS):
        raise ValueError(f"num_pairs={num_pairs} exceeds the number of directions {len(DIRECTIONS)}")
    ranked = sorted(product(COLOURS, DIRECTIONS), key=lambda cm: _stable_hash("video", seed, *cm))
    chosen: list[tuple[str, str]] = []
    for colour, motion in ranked:
        if len(chosen) == num_pairs:
            break
        if any(c == colour or m == motion for c, m in chosen):
            continue
        chosen.append((colour, motion))
    return tuple(sorted(chosen))


def is_heldout(spec: VideoSpec) -> bool:
    """Whether ``spec`` belongs to the held-out (evaluation-only) split."""
    return ((spec.colour, spec.shape) in heldout_pairs()
            or (spec.colour, spec.motion) in heldout_motion_pairs())


def train_specs() -> tuple[VideoSpec, ...]:
    """Specs allowed in training."""
    return tuple(s for s in all_specs() if not is_heldout(s))


def validation_specs() -> tuple[VideoSpec, ...]:
    """Training-distribution specs set aside for checkpoint selection (every 7th training spec)."""
    return train_specs()[::VALIDATION_EVERY]


def fit_specs() -> tuple[VideoSpec, ...]:
    """The training specs without the validation split."""
    val = set(validation_specs())
    return tuple(s for s in train_specs() if s not in val)


def heldout_specs() -> tuple[VideoSpec, ...]:
    """Specs reserved for evaluation of compositional generalisation."""
    return tuple(s for s in all_specs() if is_heldout(s))


def _values(attribute: str) -> tuple[object, ...]:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "motion": MOTIONS}[attribute]


def corrupt_spec(spec: VideoSpec, prob: float, rng: np.random.Generator) -> VideoSpec:
    """A noisy caption: each attribute, with probability ``prob``, replaced by another value
    (the image world's pretraining-noise model, ``grammar.corrupt_spec``, over the video attributes)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    changes: dict[str, object] = {}
    for attribute in ATTRIBUTES:
        if rng.random() < prob:
            others = [v for v in _values(attribute) if v != getattr(spec, attribute)]
            changes[attribute] = others[int(rng.integers(len(others)))]
    return spec.replace(**changes) if changes else spec


def differ_in(spec: VideoSpec, attribute: str, rng: np.random.Generator) -> VideoSpec:
    """``spec`` with exactly ``attribute`` changed to a random other value (for mismatch tests)."""
    others = [v for v in _values(attribute) if v != getattr(spec, attribute)]
    return spec.replace(**{attribute: others[int(rng.integers(len(others)))]})
