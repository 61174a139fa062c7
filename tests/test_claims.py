"""bench/claims.py: its statistics and verdicts, its parts and their guards, and its CI form end to end (real
generator, the production engine, the product's round loop)."""

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import claims  # noqa: E402


def test_verdict_follows_the_interval_and_the_claimed_direction():
    assert claims.verdict({"ci_low": 0.01, "ci_high": 0.2}, +1) == "reproduces"
    assert claims.verdict({"ci_low": 0.01, "ci_high": 0.2}, -1) == "contradicted"
    assert claims.verdict({"ci_low": -0.2, "ci_high": -0.01}, -1) == "reproduces"
    assert claims.verdict({"ci_low": -0.01, "ci_high": 0.2}, +1) == "inconclusive"
    assert claims.verdict({"ci_low": float("nan"), "ci_high": float("nan")}, +1) == "inconclusive"


def test_paired_difference_averages_seeds_per_prompt():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=(40, 2))
    better = [base + 0.05, base + 0.07]
    d = claims.paired_over_seeds(better, base)
    assert d["mean"] == pytest.approx(0.06)
    assert d["per_seed"] == pytest.approx([0.05, 0.07])
    assert d["ci_low"] == pytest.approx(0.06) and d["ci_high"] == pytest.approx(0.06)  # no noise left after pairing
    s = claims.t_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["ci_low"] < 1.0 and s["ci_high"] > 3.0  # t interval with 2 dof is wide


def _online_part(seed: int, sipo_gain: float, rng) -> dict:
    ref = rng.uniform(0, 1, size=(30, 2))
    rounds = {"sipo": [ref + sipo_gain * (k + 1) for k in range(3)], "diffusion-dpo": [ref + 0.01 for _ in range(3)]}
    return {"seed": seed, "arms": {n: {"objective": {"name": n}, "reference": ref.tolist(),
                                       "rounds": [r.tolist() for r in rs]} for n, rs in rounds.items()}}


def test_online_claims_pool_seeds_and_pair_rounds():
    rng = np.random.default_rng(1)
    results = {"online-0": _online_part(0, 0.02, rng), "online-1": _online_part(1, 0.04, rng)}
    o = claims.online_series(results, claims.FULL)
    assert o["seeds"] == [0, 1]
    assert o["sipo"]["rounds"][2]["mean"] == pytest.approx(0.09)  # (0.06 + 0.12) / 2
    assert o["sipo"]["vs_previous"][1]["mean"] == pytest.approx(0.03)
    assert o["sipo"]["last_vs_first"]["per_seed"] == pytest.approx([0.04, 0.08])
    assert o["sipo_vs_dpo"][0]["mean"] == pytest.approx(0.02)
    rows = {r["claim"]: r for r in claims.claims(results, claims.FULL)}
    last = rows["after 3 online rounds SIPO beats Diffusion-DPO (reward)"]
    assert claims.verdict(last["interval"], last["direction"]) == "reproduces"
    assert last["interval"]["ci_low"] == pytest.approx(0.08)  # pairing removes the shared reference's noise


def test_a_claim_without_its_part_says_which_part_to_run():
    rows = claims.claims({}, claims.FULL)
    assert all(r["interval"] is None for r in rows)
    text = claims.report({}, claims.FULL, quick=False)
    assert "Parts present: none" in text and "missing: sweep, offline, sdpo, online-0, online-1, online-2" in text
    assert "not measured yet (`bench/claims.py run sdpo`)" in text
    assert "not measured yet (`bench/claims.py run online-0`)" in text


def test_render_refuses_a_part_measured_with_another_budget(tmp_path):
    parts = tmp_path / "results" / "parts"
    parts.mkdir(parents=True)
    (parts / "sweep.json").write_text(json.dumps({"budget": asdict(claims.QUICK)}))
    with pytest.raises(SystemExit, match=r"sweep.json: measured with another budget"):
        claims.main(["render", "--out", str(tmp_path)])


def test_a_part_that_needs_the_sweep_names_it(tmp_path):
    with pytest.raises(SystemExit, match=r"run `bench/claims.py run sweep` first"):
        claims.run_part("offline", claims.Bench(str(claims.REFERENCE_DIR), tmp_path, claims.QUICK, print), tmp_path)


def test_the_work_folder_refuses_another_budget(tmp_path):
    work = tmp_path / "quick"
    claims.guard_run_dir(work, {"model": "m", "budget": asdict(claims.FULL)}, job="claims")
    with pytest.raises(SystemExit, match=r"another config: budget\."):
        claims.main(["run", "sweep", "--quick", "--model", "m", "--work", str(tmp_path), "--out", str(tmp_path)])


def test_unknown_part_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown part\(s\) online-7; the parts of this budget: sweep, offline, "
                                         r"sdpo, online-0"):
        claims.main(["run", "online-7", "--quick", "--out", str(tmp_path), "--work", str(tmp_path)])


@pytest.mark.slow
def test_quick_run_writes_every_part_claim_and_plot(tmp_path, capsys):
    out, work = tmp_path / "docs", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "claims.py"), "run", "all", "--quick", "--out", str(out),
           "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in claims.parts(claims.QUICK):
        assert (out / "results" / "parts" / f"{part}.json").is_file(), part
    text = (out / "results.md").read_text()
    assert "missing: none" in text
    for heading in ("## Summary", "## The β sweep", "## Offline", "## SDPO Fig. 1/3", "## SIPO Fig. A1",
                    "## SIPO Table 1 on video"):
        assert heading in text, heading
    verdicts = re.findall(r"\| \*\*([\w ]+)\*\* \|", text)
    assert len(verdicts) == len(claims.claims({}, claims.QUICK)) + 2  # the online claim is three once measured
    assert set(verdicts) <= {"reproduces", "contradicted", "inconclusive", "the safeguard helps", "the safeguard hurts"}
    assert "not measured yet" not in text
    for png in ("sweep.png", "winner_loss.png", "rounds.png"):
        assert (out / "results" / png).read_bytes()[:4] == b"\x89PNG"
    sweep = json.loads((out / "results" / "parts" / "sweep.json").read_text())
    for key, m in sweep["methods"].items():  # the best β is the validation argmax of the method's own grid
        assert m["best_beta"] == float(max(m["by_beta"], key=lambda x: m["by_beta"][x]["mean"])), key
    video = json.loads((out / "results" / "parts" / "video.json").read_text())  # the video world's own sweep and arms
    from pipeline.toyworld.worlds import resolve_model

    assert video["budget"] == json.loads(json.dumps(asdict(claims.VIDEO_QUICK)))
    assert video["model"] == resolve_model("toy_video:reference")
    assert set(video["arms"]) == {f"{m}@best" for m in claims.VIDEO_METHODS}
    for key, m in video["sweep"]["methods"].items():
        assert video["arms"][f"{key.split('/')[1]}@best"]["objective"]["beta"] == m["best_beta"]
    online = json.loads((out / "results" / "parts" / "online-0.json").read_text())
    # the product's round loop ran each arm (one round in the CI form; tests above pool rounds and seeds)
    assert [len(a["rounds"]) for a in online["arms"].values()] == [1, 1]
    (out / "results.md").unlink()
    assert claims.main(["render", "--quick", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == text, "a re-render from the parts gives the same report"
    # a part rerun after its result is removed trains nothing: every arm comes from the work folder's cache (run
    # in this process: the command line was checked above)
    (out / "results" / "parts" / "offline.json").unlink()
    capsys.readouterr()
    assert claims.main([cmd[2], "offline", *cmd[4:]]) == 0
    printed = capsys.readouterr().out
    assert "arm ·" not in printed and "part offline: done" in printed
    summary = text[text.index("## Summary"):]  # the header's minutes change; the measurements do not
    assert (out / "results.md").read_text().endswith(summary)
