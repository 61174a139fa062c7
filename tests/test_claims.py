"""bench/claims.py: its statistics and verdicts, and its CI form end to end (real generator, real training)."""

import json
import re
import subprocess
import sys
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


@pytest.mark.slow
def test_quick_run_writes_every_claim_with_plots(tmp_path):
    out = tmp_path / "docs"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "results.md").read_text()
    for heading in ("## (a)", "## (b)", "## (c) SIPO Fig. 8c", "## (c) SIPO Fig. A1", "## (d)"):
        assert heading in text, heading
    verdicts = re.findall(r"\*\*(\w+)\*\*", text)
    assert len(verdicts) >= 7 and set(verdicts) <= {"reproduces", "contradicted", "inconclusive"}
    for png in ("a_winner_loss.png", "c_beta.png", "c_rounds.png"):
        assert (out / "results" / png).read_bytes()[:4] == b"\x89PNG"
    r = json.loads((out / "results.json").read_text())
    assert len(r["a"]["rows"]) == 3 and len(r["c_rounds"]["by_round"]["SIPO"]) == 2
    assert not list(tmp_path.glob("tmp*")), "the scratch folder is removed"
    assert "## Summary" in text and text.count("| SDPO Fig. 3 |") == 4
    (out / "results.md").unlink()
    assert claims.main(["--render", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == text, "a re-render from results.json gives the same report"


def test_render_names_the_missing_results_file(tmp_path):
    with pytest.raises(SystemExit, match="results.json does not exist"):
        claims.main(["--render", "--out", str(tmp_path)])


def test_render_names_a_results_file_without_its_budget(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="results.json has no 'budget'"):
        claims.main(["--render", "--out", str(tmp_path)])
