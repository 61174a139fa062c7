"""Run a study's comparisons in Label Studio instead of the built-in server, and bring the votes back.

Why: some teams already run Label Studio (accounts, review, audit trail). This module keeps the study's
blinding intact across the round trip:

* :func:`export_tasks` writes ``tasks.json`` (Label Studio's task import format: a list of
  ``{"data": {...}}``), ``labeling_config.xml`` and an admin-only ``mapping.json``. A task holds only the
  prompt, the two images as PNG data URIs (no file server needed) and the item's random key; which system is
  on the left lives in ``mapping.json`` alone, which must never be uploaded to Label Studio.
* :func:`import_results` reads Label Studio's "JSON" export (tasks with ``annotations``) and stores each
  non-cancelled annotation as a vote of an imported annotator, all or nothing per file.

Labeling interface (:func:`labeling_config`): annotators click the better image (Label Studio's ``Pairwise``
tag, result ``{"type": "pairwise", "value": {"selected": "left" | "right"}}``) or tick **Tie** (a ``Choices``
tag named ``tie`` with one choice ``Tie``, result ``{"type": "choices", "value": {"choices": ["Tie"]}}``).
A submitted annotation with neither is stored as ``skip``; a *skipped* (cancelled) annotation is not stored.

Size: every image travels inside ``tasks.json`` (base64 adds a third). Label Studio caps one import request
(about 200 MB); split a very large study's file, or host the images and rewrite the URIs, if it is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import numpy as np

from pipeline.human.store import AnnotatorRecord, StudyError, StudyStore
from pipeline.utils.atomic import atomic_write_bytes

TASKS_FILE = "tasks.json"
CONFIG_FILE = "labeling_config.xml"
MAPPING_FILE = "mapping.json"

PAIRWISE_NAME = "pairwise"
TIE_NAME = "tie"
TIE_VALUE = "Tie"
ANNOTATOR_PREFIX = "labelstudio:"
SOURCE = "labelstudio"
DEFAULT_GROUPS = 3
_PNG_PREFIX = "data:image/png;base64,"

_CONFIG = f"""<View>
  <Header value="$prompt"/>
  <Header value="Click the image that better matches the prompt; if neither is better, tick Tie."/>
  <Pairwise name="{PAIRWISE_NAME}" toName="left,right" selectionStyle="outline: 4px solid #2f80ed"/>
  <View style="display: flex; gap: 1em;">
    <Image name="left" value="$left"/>
    <Image name="right" value="$right"/>
  </View>
  <Choices name="{TIE_NAME}" toName="left" choice="single" showInline="true">
    <Choice value="{TIE_VALUE}"/>
  </Choices>
</View>
"""


def labeling_config() -> str:
    """The XML to paste into the Label Studio project (Settings → Labeling Interface → Code)."""
    return _CONFIG


# ---------------------------------------------------------------------------------------------- export
def _data_uri(png: bytes) -> str:
    return _PNG_PREFIX + base64.b64encode(png).decode("ascii")


def _task(item: dict, left_png: bytes, right_png: bytes) -> dict:
    """One task in screen terms only: nothing in it says which system drew which image."""
    return {"data": {"prompt": item["prompt"], "left": _data_uri(left_png), "right": _data_uri(right_png),
                     "item": item["item_key"]}}


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _check_mapping_replaceable(path: Path, mapping: dict) -> None:
    """Refuse to overwrite a different mapping: tasks already loaded into Label Studio may need the old one,
    and importing them with another would silently swap A and B on half the items."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old != mapping:
        raise StudyError(f"{path} already holds a different left/right mapping (another seed or study); tasks "
                         f"exported with it can only be imported with it. Choose another output folder.")


def export_tasks(store: StudyStore, out_dir: Path, *, seed: int = 0) -> Path:
    """Write ``tasks.json``, ``labeling_config.xml`` and the admin-only ``mapping.json`` into ``out_dir``;
    returns the path of ``tasks.json``. Left/right is drawn per item from ``seed``, so a rerun with the same
    seed rewrites identical files."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    tasks, mapping = [], {}
    for item in store.items():
        left = "A" if rng.integers(2) == 1 else "B"
        right = "B" if left == "A" else "A"
        pngs = {s: store.sample(item["item_id"], s)["png"] for s in (left, right)}
        tasks.append(_task(item, pngs[left], pngs[right]))
        mapping[item["item_key"]] = {"left": left}
    _check_mapping_replaceable(out_dir / MAPPING_FILE, mapping)
    # mapping first: whoever finds a tasks.json also finds the mapping it needs
    atomic_write_bytes(out_dir / MAPPING_FILE, _dump(mapping))
    atomic_write_bytes(out_dir / CONFIG_FILE, labeling_config().encode())
    atomic_write_bytes(out_dir / TASKS_FILE, _dump(tasks))
    return out_dir / TASKS_FILE


# ---------------------------------------------------------------------------------------------- import
def _load_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise StudyError(f"{path}: cannot read {what}: {err}") from err
    except ValueError as err:
        raise StudyError(f"{path}: malformed JSON ({err}); expected {what}") from err


def _load_mapping(path: Path, study_keys: set[str]) -> dict[str, str]:
    """``{item_key: system on the left}``, checked against the study so a mapping of another study fails."""
    raw = _load_json(path, f"the {MAPPING_FILE} written by export_tasks")
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected an object {{item_key: {{\"left\": \"A\"|\"B\"}}}}")
    mapping = {}
    for key, entry in raw.items():
        left = entry.get("left") if isinstance(entry, dict) else None
        if left not in ("A", "B"):
            raise StudyError(f"{path}: item {key!r}: expected {{\"left\": \"A\"|\"B\"}}, got {entry!r}")
        mapping[key] = left
    foreign = sorted(set(mapping) - study_keys)
    if foreign:
        raise StudyError(f"{path}: {len(foreign)} item(s) not in this study (e.g. {foreign[0]!r}): "
                         f"the mapping belongs to another study")
    return mapping


def _where(path: Path, t: int, a: int | None = None) -> str:
    return f"{path}: task {t}" + ("" if a is None else f", annotation {a}")


def _task_item(path: Path, t: int, task, study_keys: set[str], mapping: dict[str, str]) -> str:
    data = task.get("data") if isinstance(task, dict) else None
    key = data.get("item") if isinstance(data, dict) else None
    if not isinstance(key, str):
        raise StudyError(f"{_where(path, t)}: no data.item key (was the project loaded from our tasks.json?)")
    if key not in study_keys:
        raise StudyError(f"{_where(path, t)}: item {key!r} is not in this study")
    if key not in mapping:
        raise StudyError(f"{_where(path, t)}: item {key!r} is missing from the mapping file")
    return key


def _png_of_uri(uri) -> bytes | None:
    if not isinstance(uri, str) or not uri.startswith(_PNG_PREFIX):
        return None  # images re-hosted elsewhere: nothing to compare here
    try:
        return base64.b64decode(uri[len(_PNG_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return b""  # not decodable: cannot be the stored image


def _check_images(store: StudyStore, path: Path, t: int, item_id: int, data: dict, left: str) -> None:
    """The task's own images must be the samples the mapping puts there: a mapping from another export run
    would otherwise swap A and B without a sound."""
    right = "B" if left == "A" else "A"
    for side, system in (("left", left), ("right", right)):
        png = _png_of_uri(data.get(side))
        if png is not None and png != store.sample(item_id, system)["png"]:
            raise StudyError(f"{_where(path, t)}: the {side} image does not match the mapping file: "
                             f"tasks and mapping come from different exports")


def _annotator_name(path: Path, t: int, a: int, completed_by) -> str:
    """Label Studio writes ``completed_by`` as a user id, or as ``{"id", "email", ...}``; the id is preferred
    so both spellings of one user give one annotator (and no e-mail address lands in the study)."""
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("id", completed_by.get("email"))
    if isinstance(completed_by, bool) or not isinstance(completed_by, (int, str)) or completed_by == "":
        raise StudyError(f"{_where(path, t, a)}: completed_by {completed_by!r} is neither a user id nor an e-mail")
    return f"{ANNOTATOR_PREFIX}{completed_by}"


def _selection(path: Path, t: int, a: int, result) -> str:
    """The annotation's answer in screen terms: ``left``, ``right``, ``tie`` or ``skip`` (nothing chosen).
    Results of other controls (say, a comment box someone added) are ignored."""
    if not isinstance(result, list):
        raise StudyError(f"{_where(path, t, a)}: result is {type(result).__name__}, expected a list")
    answers = []
    for r in result:
        kind = r.get("type") if isinstance(r, dict) else None
        value = r.get("value") if isinstance(r, dict) else None
        if kind == "pairwise":
            selected = value.get("selected") if isinstance(value, dict) else None
            if selected not in ("left", "right"):
                raise StudyError(f"{_where(path, t, a)}: pairwise selection {selected!r}: expected 'left' or 'right'")
            answers.append(selected)
        elif kind == "choices" and r.get("from_name") == TIE_NAME:
            choices = value.get("choices") if isinstance(value, dict) else None
            if choices != [TIE_VALUE]:
                raise StudyError(f"{_where(path, t, a)}: tie choices {choices!r}: expected [{TIE_VALUE!r}]")
            answers.append("tie")
    if len(answers) > 1:
        raise StudyError(f"{_where(path, t, a)}: ambiguous answer {answers}: an image and Tie were both chosen")
    return answers[0] if answers else "skip"


def _choice(side: str, left: str) -> str:
    if side == "left":
        return left
    if side == "right":
        return "B" if left == "A" else "A"
    return side


def _read_votes(store: StudyStore, path: Path, tasks: list, mapping: dict[str, str],
                item_ids: dict[str, int]) -> tuple[dict[str, dict[str, str]], list[str], int]:
    """Validate the whole export; returns ``{annotator: {item_key: choice}}``, the export's item order and
    the number of cancelled annotations. Raises before anything is written."""
    votes: dict[str, dict[str, str]] = {}
    order: list[str] = []
    cancelled = 0
    study_keys = set(item_ids)
    for t, task in enumerate(tasks):
        key = _task_item(path, t, task, study_keys, mapping)
        _check_images(store, path, t, item_ids[key], task["data"], mapping[key])
        if key not in order:
            order.append(key)
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise StudyError(f"{_where(path, t)}: annotations is {type(annotations).__name__}, expected a list")
        for a, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise StudyError(f"{_where(path, t, a)}: expected an object, got {type(ann).__name__}")
            if ann.get("was_cancelled"):
                cancelled += 1
                continue
            name = _annotator_name(path, t, a, ann.get("completed_by"))
            choice = _choice(_selection(path, t, a, ann.get("result")), mapping[key])
            mine = votes.setdefault(name, {})
            if key in mine:
                raise StudyError(f"{_where(path, t, a)}: {name} annotated item {key!r} twice")
            mine[key] = choice
    return votes, order, cancelled


def _groups(store: StudyStore, names: list[str], groups: int | None,
            group_of: dict[str, int] | None, path: Path) -> dict[str, int]:
    """``group_of`` where given, else round-robin over the sorted remaining names."""
    if groups is None:
        meta = store.meta()
        groups = int(meta.get("groups", DEFAULT_GROUPS)) if isinstance(meta, dict) else DEFAULT_GROUPS
    if groups < 1:
        raise StudyError(f"{path}: groups must be at least 1, got {groups}")
    group_of = group_of or {}
    out = {}
    rest = sorted(n for n in names if n not in group_of)
    for i, name in enumerate(rest):
        out[name] = i % groups
    for name in names:
        if name in group_of:
            g = group_of[name]
            if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < groups:
                raise StudyError(f"{path}: group_of[{name!r}] = {g!r}: expected an integer in 0..{groups - 1}")
            out[name] = g
    return out


def _records(names: list[str], group: dict[str, int], order: list[str], item_keys: list[str],
             mapping: dict[str, str]) -> list[AnnotatorRecord]:
    """Every imported annotator sees the export's item order (then any item the export lacks), with the
    sides the tasks showed, so the stored ``side`` of each vote is what was on screen."""
    full = order + [k for k in item_keys if k not in order]
    index = {k: i for i, k in enumerate(item_keys)}
    positions = [index[k] for k in full]
    a_on_left = [mapping.get(k, "A") == "A" for k in full]
    return [AnnotatorRecord(name=n, group_index=group[n], token=None, order=positions, a_on_left=a_on_left,
                            source=SOURCE) for n in names]


def import_results(store: StudyStore, export_json: Path, mapping_json: Path, *, groups: int | None = None,
                   group_of: dict[str, int] | None = None) -> dict:
    """Store a Label Studio JSON export as votes of imported annotators (``labelstudio:<user id>``).

    The whole file is validated before anything is written; a file whose annotators are already in the study
    (a second import of the same export) is refused. Returns ``{"annotators", "votes", "skipped_cancelled"}``.
    """
    export_json, mapping_json = Path(export_json), Path(mapping_json)
    items = store.items()
    item_ids = {it["item_key"]: it["item_id"] for it in items}
    mapping = _load_mapping(mapping_json, set(item_ids))
    tasks = _load_json(export_json, "a Label Studio JSON export (a list of tasks)")
    if not isinstance(tasks, list):
        raise StudyError(f"{export_json}: expected a list of tasks (Label Studio's 'JSON' export), "
                         f"got {type(tasks).__name__}")
    votes, order, cancelled = _read_votes(store, export_json, tasks, mapping, item_ids)
    names = list(votes)
    existing = sorted(set(names) & {a["name"] for a in store.annotators()})
    if existing:
        raise StudyError(f"{export_json}: annotators {existing} are already in the study (already voted): "
                         f"this export was imported before; nothing was written")
    group = _groups(store, names, groups, group_of, export_json)
    stored = store.add_annotators(_records(names, group, order, [it["item_key"] for it in items], mapping),
                                  {n: list(votes[n].items()) for n in names})  # one transaction: all or nothing
    return {"annotators": len(names), "votes": stored, "skipped_cancelled": cancelled}
