"""A quiet console: the progress helpers the jobs print with (the jobs' own consoles are checked where they run:
tests/test_train_job.py, tests/test_offline.py)."""

import json

from pipeline.utils.progress import Stage, bar, duration, tail_training


def test_duration():
    assert [duration(s) for s in (0, 11.4, 72, 3600 + 125)] == ["0s", "11s", "1m12s", "1h02m"]


def test_stage_prints_at_most_every_interval_and_once_at_the_end():
    lines = []
    with Stage("round 0 · generate", 672, "rollouts", every=3600, printer=lines.append) as stage:
        for _ in range(672):
            stage.update()
    assert len(lines) == 1 and lines[0].startswith("round 0 · generate · 672/672 rollouts · ")
    assert "done in" in lines[0]

    lines = []
    stage = Stage("eval", 10, "images", every=0, printer=lines.append)
    stage.set(0)
    stage.set(0)  # "starting" is said once
    stage.set(4)
    stage.close("2 pairs")
    stage.close("again")  # once only
    assert lines[0] == "eval · 0/10 images · starting"
    assert lines[1].startswith("eval · 4/10 images · ") and " · ETA " in lines[1]
    assert lines[2].startswith("eval · 4/10 images · ") and lines[2].endswith("2 pairs") and len(lines) == 3


def test_bar_off_a_terminal_prints_lines_not_a_redrawn_bar(capsys):
    assert list(bar(range(3), desc="sampling", unit="batches", every=0)) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line.split("] ", 1)[1] for line in out.splitlines()]
    assert [line.split(" · ")[1] for line in lines] == ["1/3 batches", "2/3 batches", "3/3 batches"]
    assert "done in" in lines[-1]


def test_tail_training_prints_new_step_lines_and_a_final_line(tmp_path):
    progress = tmp_path / "progress.jsonl"
    progress.write_text(json.dumps({"step": 2.0, "loss": 0.7}) + "\n")  # a previous run's line: not repeated
    lines = []
    with tail_training(tmp_path, 6, label="train", pairs_per_step=8, poll=0.01, printer=lines.append):
        with open(progress, "a") as f:
            for step in (4, 4, 6):  # a checkpoint report at a logging step is shown once
                row = {"step": float(step), "loss": 0.652, "implicit_acc": 0.61, "pairs_per_s": 9.8}
                f.write(json.dumps(row) + "\n")
            f.write('{"step": 7')  # a partial line is never parsed
    assert lines[0] == "train · step 4/6 · loss 0.652 · acc 0.61 · 9.8 pairs/s · ETA 2s"  # (6-4) / (9.8/8)
    assert lines[1].startswith("train · step 6/6 · loss 0.652 · acc 0.61 · 9.8 pairs/s")
    assert "ETA" not in lines[1]
    assert lines[2].startswith("train · done · step 6/6 in ") and len(lines) == 3
