"""Label Studio round trip: blinded task export, and all-or-nothing import of a Label Studio JSON export."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from pipeline.human.labelstudio import export_tasks, import_results, labeling_config
from pipeline.human.store import ItemRecord, SampleRecord, StudyError, StudyStore

N_ITEMS = 6


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def study(tmp_path) -> StudyStore:
    items = [ItemRecord(prompt=f"prompt {i}", prompt_index=i,
                        a=SampleRecord("A", _png((10 * i, 0, 0)), seed=i),
                        b=SampleRecord("B", _png((0, 10 * i, 200)), seed=i))
             for i in range(N_ITEMS)]
    return StudyStore.create(tmp_path / "study" / "study.sqlite", meta={"name": "t", "groups": 2}, items=items,
                             annotators=[], admin_token="x")


@pytest.fixture
def exported(study, tmp_path):
    out = tmp_path / "ls"
    tasks_path = export_tasks(study, out, seed=3)
    return out, json.loads(tasks_path.read_text()), json.loads((out / "mapping.json").read_text())


def _decode(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return base64.b64decode(uri[len(prefix):])


def _annotation(user, result, cancelled=False) -> dict:
    """One annotation as Label Studio's JSON export writes it."""
    return {"id": 1000, "completed_by": user, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "lead_time": 3.2, "task": 1, "created_at": "2024-01-01T00:00:00Z"}


def _pick(side: str) -> list[dict]:
    return [{"id": "pw1", "type": "pairwise", "from_name": "pairwise", "to_name": "pairwise",
             "value": {"selected": side}, "origin": "manual"}]


TIE = [{"id": "c1", "type": "choices", "from_name": "tie", "to_name": "left", "value": {"choices": ["Tie"]}}]


def _ls_export(tasks: list[dict], annotations: dict[int, list[dict]]) -> list[dict]:
    """Tasks (by index in our tasks.json) with their annotations, in Label Studio's export shape."""
    return [{"id": t + 1, "data": tasks[t]["data"], "annotations": anns, "predictions": [], "project": 1}
            for t, anns in annotations.items()]


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _other(system: str) -> str:
    return "B" if system == "A" else "A"


# ---------------------------------------------------------------------------------------------- config
def test_labeling_config_is_the_pairwise_template_with_a_tie_choice():
    root = ET.fromstring(labeling_config())
    assert root.tag == "View"
    pairwise = root.find(".//Pairwise")
    assert pairwise.get("toName") == "left,right"
    images = {im.get("name"): im.get("value") for im in root.iter("Image")}
    assert images == {"left": "$left", "right": "$right"}
    assert "$prompt" in [h.get("value") for h in root.iter("Header")]
    tie = root.find(".//Choices")
    assert (tie.get("name"), tie.get("toName")) == ("tie", "left")
    assert [c.get("value") for c in tie.iter("Choice")] == ["Tie"]


# ---------------------------------------------------------------------------------------------- export
def test_export_is_blinded_and_holds_every_item_once(study, exported):
    out, tasks, mapping = exported
    items = study.items()
    assert (out / "labeling_config.xml").read_text() == labeling_config()
    assert len(tasks) == N_ITEMS
    assert sorted(t["data"]["item"] for t in tasks) == sorted(it["item_key"] for it in items)
    for task in tasks:
        assert set(task) == {"data"}
        assert set(task["data"]) == {"prompt", "left", "right", "item"}
        assert "A" not in task["data"].values() and "B" not in task["data"].values()
    raw = (out / "tasks.json").read_text()
    for marker in ('"A"', '"B"', "system", "sample_a", "a_on_left", "seed"):
        assert marker not in raw
    assert set(mapping) == {it["item_key"] for it in items}
    assert {m["left"] for m in mapping.values()} == {"A", "B"}  # sides really are randomised


def test_exported_images_are_the_stored_pngs_on_the_mapped_sides(study, exported):
    _, tasks, mapping = exported
    by_key = {it["item_key"]: it for it in study.items()}
    for task in tasks:
        data = task["data"]
        item = by_key[data["item"]]
        left = mapping[data["item"]]["left"]
        assert data["prompt"] == item["prompt"]
        for side, system in (("left", left), ("right", _other(left))):
            png = _decode(data[side])
            assert png == study.sample(item["item_id"], system)["png"]
            assert Image.open(io.BytesIO(png)).format == "PNG"


def test_export_is_deterministic_and_never_overwrites_another_mapping(study, exported):
    out, tasks, mapping = exported
    export_tasks(study, out, seed=3)  # same seed: identical files, allowed
    assert json.loads((out / "tasks.json").read_text()) == tasks
    other = next(s for s in range(1, 40)
                 if json.loads(export_tasks(study, out.parent / f"s{s}", seed=s).with_name("mapping.json")
                               .read_text()) != mapping)
    with pytest.raises(StudyError, match="different left/right mapping"):
        export_tasks(study, out, seed=other)
    assert json.loads((out / "mapping.json").read_text()) == mapping


# ---------------------------------------------------------------------------------------------- import
def test_import_maps_sides_back_to_systems(study, exported, tmp_path):
    out, tasks, mapping = exported
    key = [t["data"]["item"] for t in tasks]
    left = [mapping[k]["left"] for k in key]
    user7 = {"id": 7, "email": "ann@example.org", "first_name": "", "last_name": ""}
    export = _ls_export(tasks, {
        3: [_annotation(1, _pick("left")), _annotation(user7, _pick("right"))],
        0: [_annotation(1, _pick("right")), _annotation(user7, [], cancelled=True)],
        1: [_annotation(1, TIE)],
        2: [_annotation(1, []), _annotation(user7, TIE + [{"type": "textarea", "from_name": "note",
                                                             "value": {"text": ["nice"]}}])],
        4: [],
    })
    counts = import_results(study, _write(tmp_path / "export.json", export), out / "mapping.json")
    assert counts == {"annotators": 2, "votes": 6, "skipped_cancelled": 1}

    got = {(v["annotator"], v["item"]): (v["choice"], v["side"]) for v in study.votes()}
    assert got == {
        ("labelstudio:1", key[3]): (left[3], "left"),
        ("labelstudio:7", key[3]): (_other(left[3]), "right"),
        ("labelstudio:1", key[0]): (_other(left[0]), "right"),
        ("labelstudio:1", key[1]): ("tie", "tie"),
        ("labelstudio:1", key[2]): ("skip", "skip"),
        ("labelstudio:7", key[2]): ("tie", "tie"),
    }
    people = {a["name"]: a for a in study.annotators()}
    assert {n: (a["group"], a["source"], a["assigned"], a["voted"]) for n, a in people.items()} == {
        "labelstudio:1": (0, "labelstudio", N_ITEMS, 4), "labelstudio:7": (1, "labelstudio", N_ITEMS, 2)}


def test_imported_assignments_follow_the_export_order_and_sides(study, exported, tmp_path):
    out, tasks, mapping = exported
    export = _ls_export(tasks, {4: [_annotation(5, _pick("left"))], 1: [], 2: []})
    import_results(study, _write(tmp_path / "export.json", export), out / "mapping.json")
    rows = study.assignments()
    first = [tasks[t]["data"]["item"] for t in (4, 1, 2)]
    assert [r["item"] for r in rows[:3]] == first
    assert sorted(r["item"] for r in rows) == sorted(it["item_key"] for it in study.items())
    assert all(r["a_on_left"] == (mapping[r["item"]]["left"] == "A") for r in rows)


def test_group_of_and_groups_override_the_round_robin(study, exported, tmp_path):
    out, tasks, _ = exported
    export = _ls_export(tasks, {0: [_annotation(u, _pick("left")) for u in (1, 2, 3, 4)]})
    import_results(study, _write(tmp_path / "e.json", export), out / "mapping.json", groups=3,
                   group_of={"labelstudio:3": 2})
    groups = {a["name"]: a["group"] for a in study.annotators()}
    assert groups == {"labelstudio:1": 0, "labelstudio:2": 1, "labelstudio:3": 2, "labelstudio:4": 2}


def _corrupt_unknown_item(export):
    export[0]["data"]["item"] = "no-such-item"


def _corrupt_selection(export):
    export[1]["annotations"][0]["result"] = _pick("middle")


def _corrupt_tie_and_pick(export):
    export[1]["annotations"][0]["result"] = _pick("left") + TIE


def _corrupt_swapped_images(export):
    data = export[1]["data"]
    data["left"], data["right"] = data["right"], data["left"]


@pytest.mark.parametrize("corrupt, problem, task", [
    (_corrupt_unknown_item, "item 'no-such-item' is not in this study", 0),
    (_corrupt_selection, "pairwise selection 'middle'", 1),
    (_corrupt_tie_and_pick, "ambiguous answer", 1),
    (_corrupt_swapped_images, "does not match the mapping file", 1),
])
def test_a_bad_task_anywhere_writes_nothing(study, exported, tmp_path, corrupt, problem, task):
    out, tasks, _ = exported
    export = _ls_export(tasks, {0: [_annotation(1, _pick("left"))], 1: [_annotation(2, _pick("right"))]})
    corrupt(export)
    path = _write(tmp_path / "bad.json", export)
    with pytest.raises(StudyError) as err:
        import_results(study, path, out / "mapping.json")
    assert problem in str(err.value) and path in str(err.value) and f"task {task}" in str(err.value)
    assert study.votes() == [] and study.annotators() == []


def test_malformed_json_names_the_file_and_writes_nothing(study, exported, tmp_path):
    out, _, _ = exported
    path = tmp_path / "truncated.json"
    path.write_text('[{"data": {"item": ')
    with pytest.raises(StudyError, match="truncated.json: malformed JSON"):
        import_results(study, path, out / "mapping.json")
    with pytest.raises(StudyError, match="expected a list of tasks"):
        import_results(study, _write(tmp_path / "obj.json", {"tasks": []}), out / "mapping.json")
    assert study.votes() == [] and study.annotators() == []


def test_mapping_of_another_study_is_refused(study, exported, tmp_path):
    out, tasks, mapping = exported
    foreign = dict(mapping, **{"other-study-item": {"left": "A"}})
    export = _ls_export(tasks, {0: [_annotation(1, _pick("left"))]})
    with pytest.raises(StudyError, match="belongs to another study"):
        import_results(study, _write(tmp_path / "e.json", export), _write(tmp_path / "m.json", foreign))
    assert study.votes() == []


def test_reimport_is_refused_without_partial_writes(study, exported, tmp_path):
    out, tasks, _ = exported
    path = _write(tmp_path / "export.json",
                  _ls_export(tasks, {0: [_annotation(1, _pick("left"))], 1: [_annotation(1, TIE)]}))
    assert import_results(study, path, out / "mapping.json")["votes"] == 2
    before = (study.votes(), study.annotators())
    with pytest.raises(StudyError, match="already in the study"):
        import_results(study, path, out / "mapping.json")
    assert (study.votes(), study.annotators()) == before


def test_task_item_missing_from_the_mapping_is_refused(study, exported, tmp_path):
    out, tasks, mapping = exported
    missing = tasks[2]["data"]["item"]
    partial = {k: v for k, v in mapping.items() if k != missing}
    export = _ls_export(tasks, {0: [_annotation(1, _pick("left"))], 2: [_annotation(1, TIE)]})
    with pytest.raises(StudyError, match=f"task 1: item '{missing}' is missing from the mapping file"):
        import_results(study, _write(tmp_path / "e.json", export), _write(tmp_path / "m.json", partial))
    assert study.votes() == [] and study.annotators() == []
