"""Prompt grammar of the toy world: ``<count> <colour> <shape> <position>``.

The embedded default needs prompts whose meaning can be checked exactly (see ``detector.py``),
so the language is a closed grammar over four attributes. ``PromptSpec`` is the structured form;
``PromptSpec.text`` and ``parse_prompt`` convert both ways and are exact inverses.

Prompts look like ``"a blue square at the top"`` or ``"three red circles on the left"``.

The train / held-out split holds out whole (colour, shape) pairs, so that evaluation asks for
combinations the model never saw ("a cyan triangle") while every single colour, shape, count and
position still occurs in training: a test of compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np

# Six hues 60 degrees apart: separable by hue alone, even when blurred towards the black
# background (darkening keeps the hue). Channels are kept off the extremes of [0, 255].
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "yellow": (230, 230, 25),
    "green": (25, 230, 25),
    "cyan": (25, 230, 230),
    "blue": (25, 25, 230),
    "magenta": (230, 25, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_WORD_TO_COUNT: dict[str, int] = {"a": 1, "one": 1, "two": 2, "three": 3}
_PHRASE_TO_POSITION: dict[str, str] = {v: k for k, v in POSITION_PHRASES.items()}

#: Seed of the held-out rule; changing it changes the split (and invalidates shipped evals).
HELDOUT_SEED = 0
#: Number of (colour, shape) pairs held out: 4 of 18 pairs = 48 of 216 specs (22 %).
HELDOUT_NUM_PAIRS = 4


def check_spec(spec, **domains) -> None:
    """Validate a spec dataclass: each named attribute in its domain (a bool is not a count); ints normalised."""
    problems = []
    for name, allowed in domains.items():
        value = getattr(spec, name)
        if value not in allowed or isinstance(value, bool):
            shown = sorted(allowed) if name == "colour" else list(allowed)
            problems.append(f"{name} {value!r} not in {shown}")
    if problems:
        raise ValueError(f"invalid {type(spec).__name__}: " + "; ".join(problems))
    if "count" in domains:
        object.__setattr__(spec, "count", int(spec.count))  # numpy ints -> int


@dataclass(frozen=True, order=True)
class PromptSpec:
    """One prompt in structured form; validated on construction."""

    colour: str
    shape: str
    count: int
    position: str

    def __post_init__(self) -> None:
        check_spec(self, colour=COLOURS, shape=SHAPES, count=COUNTS, position=POSITIONS)

    @property
    def text(self) -> str:
        """The canonical English prompt, e.g. ``"two red circles on the left"``."""
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} {POSITION_PHRASES[self.position]}"

    def replace(self, **changes: object) -> "PromptSpec":
        """A copy with some attributes changed (validated)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.text


_EXPECTED = (
    "expected '<count> <colour> <shape> <position>' with count in "
    f"{sorted(_WORD_TO_COUNT)}, colour in {list(COLOURS)}, shape in {list(SHAPES)} "
    "(plural when count > 1), position in "
    f"{list(POSITION_PHRASES.values())}"
)


def parse_prompt(text: str) -> PromptSpec:
    """Invert ``PromptSpec.text``.

    Case, surrounding/duplicate whitespace and a final period are tolerated; ``"one"`` is
    accepted for ``"a"``. Anything else raises ``ValueError`` naming the text and the grammar.
    """
    if not isinstance(text, str):
        raise ValueError(f"cannot parse prompt {text!r}: not a string; {_EXPECTED}")
    words = text.strip().lower().rstrip(".").split()

    def fail(why: str) -> ValueError:
        return ValueError(f"cannot parse prompt {text!r}: {why}; {_EXPECTED}")

    if len(words) != 6:
        raise fail(f"got {len(words)} words, need 6")
    count_word, colour, noun = words[0], words[1], words[2]
    phrase = " ".join(words[3:])
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
    if phrase not in _PHRASE_TO_POSITION:
        raise fail(f"unknown position {phrase!r}")
    return PromptSpec(colour, shape, count, _PHRASE_TO_POSITION[phrase])


def as_spec(prompt: "str | PromptSpec") -> PromptSpec:
    """Accept either form."""
    return prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)


@lru_cache(maxsize=None)
def all_specs() -> tuple[PromptSpec, ...]:
    """Every prompt of the grammar (216), in a fixed order."""
    return tuple(PromptSpec(c, s, n, p)
                 for c, s, n, p in product(COLOURS, SHAPES, COUNTS, POSITIONS))


def _stable_hash(*parts: object) -> int:
    """A hash that is identical across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@lru_cache(maxsize=None)
def heldout_pairs(seed: int = HELDOUT_SEED,
                  num_pairs: int = HELDOUT_NUM_PAIRS) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs never shown in training.

    Rule: rank all 18 pairs by ``sha256(f"{seed}:{colour}:{shape}")`` and take pairs greedily
    in that order, skipping a pair whose colour is already held out or whose shape is already
    held out ``ceil(num_pairs / len(SHAPES))`` times. Each colour therefore keeps at least two
    shapes and each shape at least four colours in training. With the defaults the result is
    pinned by the tests (see ``tests/test_toyworld_data.py``).
    """
    max_per_shape = -(-num_pairs // len(SHAPES))
    if num_pairs > len(COLOURS):
        raise ValueError(f"num_pairs={num_pairs} exceeds the number of colours {len(COLOURS)}")
    ranked = sorted(product(COLOURS, SHAPES), key=lambda cs: _stable_hash(seed, *cs))
    chosen: list[tuple[str, str]] = []
    for colour, shape in ranked:
        if len(chosen) == num_pairs:
            break
        if any(c == colour for c, _ in chosen):
            continue
        if sum(s == shape for _, s in chosen) >= max_per_shape:
            continue
        chosen.append((colour, shape))
    return tuple(sorted(chosen))


def is_heldout(spec: PromptSpec) -> bool:
    """Whether ``spec`` belongs to the held-out (evaluation-only) split."""
    return (spec.colour, spec.shape) in heldout_pairs()


def train_specs() -> tuple[PromptSpec, ...]:
    """Specs allowed in training (168 of 216)."""
    return tuple(s for s in all_specs() if not is_heldout(s))


#: every VALIDATION_EVERY-th training spec forms the validation split (24 of 168): checkpoint selection
#: looks at these, never at the held-out test prompts
VALIDATION_EVERY = 7


def validation_specs() -> tuple[PromptSpec, ...]:
    """Training-distribution specs set aside for checkpoint selection (24 of the 168 training specs)."""
    return train_specs()[::VALIDATION_EVERY]


def fit_specs() -> tuple[PromptSpec, ...]:
    """The training specs without the validation split (144): the rollout prompts when selection is on."""
    val = set(validation_specs())
    return tuple(s for s in train_specs() if s not in val)


def heldout_specs() -> tuple[PromptSpec, ...]:
    """Specs reserved for evaluation of compositional generalisation (48 of 216)."""
    return tuple(s for s in all_specs() if is_heldout(s))


def _values(attribute: str) -> tuple[object, ...]:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS,
            "position": POSITIONS}[attribute]


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "position")


def corrupt_spec(spec: PromptSpec, prob: float, rng: np.random.Generator) -> PromptSpec:
    """Return a noisy caption for ``spec``: the pretraining-noise model.

    Each of the four attributes independently, with probability ``prob``, is replaced by a
    value drawn uniformly from the *other* values of that attribute. The pretrained model thus
    learns from captions that are wrong about ``prob`` of the time per attribute, which leaves
    the room for alignment that the preference objectives are meant to recover. ``prob=0``
    returns ``spec`` unchanged; ``prob=1`` changes every attribute. Draws exactly four uniforms
    plus one integer per changed attribute from ``rng``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    changes: dict[str, object] = {}
    for attribute in ATTRIBUTES:
        if rng.random() < prob:
            others = [v for v in _values(attribute) if v != getattr(spec, attribute)]
            changes[attribute] = others[int(rng.integers(len(others)))]
    return spec.replace(**changes) if changes else spec


def differ_in(spec: PromptSpec, attribute: str, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with exactly ``attribute`` changed to a random other value (for mismatch tests)."""
    others = [v for v in _values(attribute) if v != getattr(spec, attribute)]
    return spec.replace(**{attribute: others[int(rng.integers(len(others)))]})
