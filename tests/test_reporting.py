"""Reporting: the CI formatter and table writers, the rounds' summary (header, columns from the evaluation
itself, legend), the training-curve panels, the paired grid and its stratified prompts, and that
``bench/claims.py render`` still reproduces the committed docs/results.md."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation import SAMPLES_FILE, evaluate, load_samples, save_samples, stratified_indices
from pipeline.reporting import csv_table, fmt_ci, fmt_num, markdown_table
from pipeline.rounds import _summary_row, _write_summary
from pipeline.sampling import SamplerConfig
from pipeline.toyworld import heldout_specs, render_batch, to_tensor
from pipeline.utils.plots import TRAINING_PANELS, paired_grid, plot_training_curves

ROOT = Path(__file__).resolve().parents[1]


def test_ci_formatter_and_tables():
    m = {"mean": 0.3581, "ci_low": 0.3244, "ci_high": 0.3951}
    assert fmt_ci(m) == "0.358 [0.324, 0.395]"
    assert fmt_ci({"mean": 0.109, "ci_low": 0.054, "ci_high": 0.171}, signed=True) == "+0.109 [+0.054, +0.171]"
    assert fmt_ci({"mean": -0.02, "ci_low": -0.05, "ci_high": 0.01}, signed=True) == "-0.020 [-0.050, +0.010]"
    assert fmt_ci(None) == "–" and fmt_ci({"mean": None}) == "–"
    assert fmt_num(None) == "–" and fmt_num(float("nan")) == "–" and fmt_num(0.5, signed=True) == "+0.500"
    assert fmt_num(724) == "724" and fmt_num(3.0) == "3.000"
    table = markdown_table(["a", "b"], [["x", 0.25], ["y|z", None]])
    assert table == "| a | b |\n|---|---|\n| x | 0.250 |\n| y\\|z | – |"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [["only one"]])
    assert csv_table([{"a": 1, "b": 2, "extra": 3}, {"a": 4}], ["a", "b"]) == "a,b\r\n1,2\r\n4,\r\n"


def _eval(rewards: np.ndarray, toy: bool) -> dict:
    """An eval.json as evaluate() writes it (EvalResult.to_dict)."""
    def metric(v):
        return {"mean": float(np.mean(v)), "ci_low": float(np.mean(v)) - 0.05, "ci_high": float(np.mean(v)) + 0.05}

    return {"num_prompts": rewards.shape[0], "samples_per_prompt": rewards.shape[1], "reward": metric(rewards),
            "overall": metric(rewards > 0.9) if toy else None,
            "attributes": {a: metric(rewards > 0.3) for a in ("colour", "shape", "count", "position")} if toy else {},
            "best_of_k_reward": metric(rewards.max(1)), "best_of_k_overall": None, "rewards": rewards.tolist()}


def _history(steps: int, safeguard: bool) -> list[dict]:
    return [{"step": s, "loss": 0.69 - 0.01 * s, "margin": 0.001 * s, "residual_w": 0.1, "residual_l": 0.12,
             "ref_residual_w": 0.11, "ref_residual_l": 0.115, "implicit_acc": 0.5 + 0.01 * s,
             "lambda_mean": 0.8 if safeguard else 1.0, "lambda_active_frac": 0.4 if safeguard else 0.0,
             "grad_norm": 1.0 + 0.1 * s} for s in range(1, steps + 1)]


def _table(md: str, which: int = 0) -> list[list[str]]:
    """The header and body rows of the ``which``-th Markdown table in ``md`` (the ``|---|`` line left out)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif line.startswith("|---"):
            continue
        elif current:
            tables.append(current)
            current = []
    return tables[which]


def _run_dir(tmp_path, toy: bool, safeguard: bool):
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, size=(6, 2))
    pol = np.clip(ref + rng.normal(0.05, 0.05, size=ref.shape), 0, 1)
    run = tmp_path / ("toy" if toy else "pickscore")
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"job": "iterative_sipo", "fingerprint": "0123456789abcdef",
                                                     "config": {"model": "/models/tiny", "rounds": 1}}))
    train = {"last": _history(4, safeguard)[-1], "history": _history(4, safeguard)}
    rows = [_summary_row("reference", _eval(ref, toy), _eval(ref, toy), _eval(ref, toy), {}, {}),
            _summary_row("round 0", _eval(pol, toy), _eval(ref, toy), _eval(ref, toy), train,
                         {"num_pairs": 12, "mean_reward_gap": 0.3, "mean_prompt_reward": 0.4})]
    return run, rows, ref, pol


def test_summary_for_a_toy_reward_has_a_header_the_attribute_columns_and_a_legend(tmp_path, capsys):
    run, rows, ref, pol = _run_dir(tmp_path, toy=True, safeguard=True)
    _write_summary(run, rows)
    text = (run / "summary.md").read_text()
    assert "Model: `/models/tiny`" in text and "`0123456789abcdef`" in text
    assert "6 prompts × 2 seeds" in text and "percentile bootstrap over prompts" in text
    table, data = _table(text), _table(text, 1)
    header = table[0]
    assert header[:5] == ["round", "reward [95% CI]", "Δ vs ref, paired [95% CI]", "Δ vs previous, paired",
                          "win vs ref [95% CI]"]
    for col in ("all attributes", "colour", "shape", "count", "position"):
        assert col in header, col
    for col in ("pairs", "reward gap", "rollout reward", "loss", "impl. acc", "λ", "λ active"):
        assert col in data[0], col
    assert [r[0] for r in table[1:]] == ["reference", "round 0"] == [r[0] for r in data[1:]]
    ref_row, round_row = table[1], table[2]
    assert ref_row[2] == "–" and ref_row[3] == "–"  # no comparison of the reference with itself
    assert round_row[2].startswith(("+", "-")) and round_row[3] == round_row[2]  # round 0: previous = reference
    assert data[2][data[0].index("λ")] == "0.800" and data[2][data[0].index("pairs")] == "12"
    assert "Columns:" in text and "- **Δ vs ref, paired**" in text and "- **colour**" in text
    # reward.png, curves.png; rows carry the paired Δ and win rate
    for f in ("summary.json", "reward.png", "delta.png", "curves.png"):
        assert (run / f).read_bytes()[:4] == b"\x89PNG" or f.endswith(".json")
    assert rows[1]["delta_vs_ref"]["mean"] == pytest.approx((pol - ref).mean())
    assert rows[0]["delta_vs_ref"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert rows[0]["win_rate_vs_ref"] == 0.5


def test_summary_for_a_reward_without_attributes_has_no_empty_columns(tmp_path, capsys):
    run, rows, _, _ = _run_dir(tmp_path, toy=False, safeguard=False)
    _write_summary(run, rows)
    text = (run / "summary.md").read_text()
    for table in (_table(text), _table(text, 1)):
        header, body = table[0], table[1:]
        for col in ("all attributes", "colour", "shape", "count", "position", "λ", "λ active", "w̄", "masked"):
            assert col not in header, col  # no attributes; safeguard off (λ ≡ 1); no importance weights / mask
        for j, col in enumerate(header):
            assert any(row[j] != "–" for row in body), f"column {col!r} is empty"
    assert _table(text)[0] == ["round", "reward [95% CI]", "Δ vs ref, paired [95% CI]", "Δ vs previous, paired",
                               "win vs ref [95% CI]"]
    assert _table(text, 1)[0][:6] == ["round", "pairs", "reward gap", "rollout reward", "loss", "impl. acc"]


def test_training_curves_have_separate_panels(tmp_path):
    with_safeguard = plot_training_curves([_history(5, True), _history(5, True)], tmp_path / "a.png")
    assert with_safeguard == ["loss", "margin (reference − policy, winner − loser)", "denoising residuals",
                              "implicit accuracy", "safeguard λ", "gradient norm (before clipping)"]
    without = plot_training_curves([_history(5, False)], tmp_path / "b.png", safeguard=False)
    assert "safeguard λ" not in without and len(without) == 5
    assert plot_training_curves([_history(5, False)], tmp_path / "c.png") == without  # λ ≡ 1: off
    assert "importance weight" in plot_training_curves([[{**h, "iw_mean": 1.0} for h in _history(3, False)]],
                                                       tmp_path / "d.png")
    assert {t for t, _ in TRAINING_PANELS} >= set(with_safeguard)
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == b.size  # 6 and 5 panels: both 2 rows × 3 columns
    three = plot_training_curves([[{k: h[k] for k in ("step", "loss", "implicit_acc", "grad_norm")}
                                   for h in _history(3, False)]], tmp_path / "e.png")
    assert three == ["loss", "implicit accuracy", "gradient norm (before clipping)"]
    assert Image.open(tmp_path / "e.png").size[1] < 0.7 * a.size[1]  # one row of panels
    # jobs/train.py draws its curves with the same panels
    sys.path.insert(0, str(ROOT / "jobs"))
    import inspect

    import train as train_job

    assert "plot_training_curves" in inspect.getsource(train_job.write_outputs)


def _images(rows: int, per: int) -> np.ndarray:
    specs = list(heldout_specs())[:rows]
    return render_batch([s for s in specs for _ in range(per)], list(range(rows * per)), 32).reshape(rows, per, 32, 32, 3)


def test_paired_grid_has_a_row_per_prompt(tmp_path):
    two, four = _images(2, 3), _images(4, 3)
    assert paired_grid(two, two[:, ::-1], ["p0", "p1"], [0.1, -0.2], tmp_path / "two.png") == (2, 7)
    assert paired_grid(four, four, [f"p{i}" for i in range(4)], [0.0] * 4, tmp_path / "four.png",
                       ref_scores=np.zeros((4, 3)), policy_scores=np.ones((4, 3))) == (4, 7)
    h2, h4 = Image.open(tmp_path / "two.png").size[1], Image.open(tmp_path / "four.png").size[1]
    assert 1.6 < h4 / h2 < 2.2  # twice the rows, about twice the height
    with pytest.raises(ValueError, match="labels"):
        paired_grid(two, two, ["only one"], [0.0], tmp_path / "bad.png")


def test_stratified_prompts_cover_every_heldout_combination():
    specs = list(heldout_specs())
    idx = stratified_indices(specs, 12)
    assert len(idx) == 12 and idx == sorted(idx)
    pairs = {(s.colour, s.shape) for s in specs}
    assert {(specs[i].colour, specs[i].shape) for i in idx} == pairs and len(pairs) == 4
    assert len({specs[i].position for i in idx}) > 1 and len({specs[i].count for i in idx}) > 1
    assert {(specs[i].colour, specs[i].shape) for i in stratified_indices(specs, 3)} < pairs  # fewer rows than pairs
    assert stratified_indices([s.text for s in specs], 12) == idx  # texts parse back to specs
    other = [f"a photo of thing {i}" for i in range(10)]
    assert stratified_indices(other, 4) == [0, 3, 6, 9]  # evenly spaced
    assert stratified_indices(other, 50) == list(range(10)) and stratified_indices(other, 0) == []


def test_evaluate_saves_the_stratified_samples_and_rounds_draw_the_paired_grid(tiny_toy_backbone, tmp_path, capsys):
    specs = list(heldout_specs())[:13:6]  # 3 prompts, two (colour, shape) pairs
    sampler = SamplerConfig(num_steps=2)
    run, _, _, _ = _run_dir(tmp_path, toy=True, safeguard=False)
    (run / "reference_eval").mkdir()
    (run / "round_0").mkdir()
    res, out = evaluate(tiny_toy_backbone, specs, samples_per_prompt=2, sampler=sampler, grid_prompts=2,
                        progress=False, samples_path=run / "reference_eval" / SAMPLES_FILE)
    s = load_samples(run / "reference_eval" / SAMPLES_FILE)
    assert s["images"].shape == (2, 2, 32, 32, 3) and s["images"].dtype == np.uint8
    assert s["prompt_index"] == stratified_indices(specs, 2) and s["texts"] == [specs[i].text for i in s["prompt_index"]]
    np.testing.assert_allclose(s["rewards"], res.rewards[s["prompt_index"]])
    # thumbnails of large images
    big = to_tensor(np.repeat(np.repeat(render_batch(specs, [0, 1, 2], 32), 8, 1), 8, 2))  # 256 px
    save_samples(tmp_path / "big.npz", specs, big, np.zeros((3, 1)), 1, [0, 2], max_side=64)
    assert load_samples(tmp_path / "big.npz")["images"].shape == (2, 1, 64, 64, 3)
    # the rounds' summary draws round_0/paired_grid.png from the two samples files
    shutil.copy(run / "reference_eval" / SAMPLES_FILE, run / "round_0" / SAMPLES_FILE)
    ref = res.to_dict()
    _write_summary(run, [_summary_row("reference", ref, ref, ref, {}, {}),
                         _summary_row("round 0", ref, ref, ref, {"last": _history(2, False)[-1],
                                                                 "history": _history(2, False)}, {})])
    assert (run / "round_0" / "paired_grid.png").read_bytes()[:4] == b"\x89PNG"
    table = _table((run / "summary.md").read_text())
    assert "colour" in table[0] and "all attributes" in table[0]  # the toy detector's own per-attribute scores


def test_render_reproduces_the_committed_results_md(tmp_path):
    """``bench/claims.py render`` rewrites docs/results.md from the committed parts, byte for byte."""
    sys.path.insert(0, str(ROOT / "bench"))
    import claims

    shutil.copytree(ROOT / "docs" / "results" / "parts", tmp_path / "results" / "parts")
    assert claims.main(["render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text()


def test_hacking_warnings_fire_on_gold_falling_brighter_backgrounds_and_collapse():
    from pipeline.rounds import hacking_warnings

    def row(name, reward_rise, gold, bright=0.05, diversity=0.2, entropy=0.8, rollout=None):
        return {"round": name, "delta_vs_prev": None if reward_rise is None else {"mean": reward_rise},
                "overall": {"mean": gold}, "rollout_reward": rollout,
                "drift": {"background_brightness": {"mean": bright}, "seed_diversity": {"mean": diversity},
                          "colour_entropy": {"mean": entropy}}}

    ref = row("reference", None, 0.10)
    assert hacking_warnings([ref, row("round 0", +0.05, 0.20)]) == []  # reward and gold both up
    assert hacking_warnings([ref, row("round 0", -0.02, 0.05)]) == []  # both down: a regression, not a hack
    [gold] = hacking_warnings([ref, row("round 0", +0.05, 0.20), row("round 1", +0.03, 0.15)])
    assert "gold metric" in gold and "0.200 → 0.150" in gold
    [bright] = hacking_warnings([ref, row("round 0", +0.05, 0.20, bright=0.30)])
    assert "background brightness 0.300" in bright
    [collapse] = hacking_warnings([ref, row("round 0", +0.05, 0.20, diversity=0.05)])
    assert "diversity across seeds 0.050" in collapse
    [speckle] = hacking_warnings([ref, row("round 0", +0.17, 0.20, entropy=2.36)])
    assert "colour entropy 2.36 bits vs the reference's 0.80" in speckle
    steady = [ref, row("round 0", +0.05, 0.20, rollout=0.60), row("round 1", +0.02, 0.25, rollout=0.58)]
    assert hacking_warnings(steady) == []
    [left] = hacking_warnings([*steady[:2], row("round 1", -0.12, 0.25, rollout=0.48)])
    assert "round 0's policy scores 0.480 on the training prompts, below the reference's 0.600" in left
