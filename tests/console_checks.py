"""What a quiet console means, shared by the tests that run a job and read its output (tests/test_train_job.py,
tests/test_offline.py): the job prints its own progress lines; Ray's operator dumps and notices stay in its logs."""

#: What Ray Data and Ray Train/Tune print when left alone (operator status blocks, progress bars, banners).
RAY_NOISE = ("Running Dataset", "Operator", "Total Progress", "logging_progress", "streaming_executor", "✔️",
             "[dataset]", "Execution plan", "Starting execution", "Data sink", "Started a local Ray instance",
             "Token authentication", "Progress bars", "Trial status", "Loading weights")
#: Ray core prints this from C++ when Ray Data creates an actor pool (ray-project/ray#57733); no switch hides it
#: short of dropping the driver's C++ errors altogether.
RAY_CORE_NOTICE = "has constructor arguments in the object store"


def ray_lines(lines: list[str]) -> list[str]:
    """The lines of a job's output that Ray printed (or a redrawn progress bar)."""
    return [line for line in lines if any(n in line for n in RAY_NOISE) or "\r" in line
            or ("MapBatches" in line and RAY_CORE_NOTICE not in line)]


def check_generation_console(output: str, prompts: int, samples: int) -> None:
    """The generation job's console: its own stage lines with counts, none of Ray Data's."""
    lines = output.rstrip("\n").split("\n")  # not splitlines(): a carriage return (a redrawn bar) stays in its line
    assert not ray_lines(lines), lines
    n = prompts * samples
    assert any(f"round 0 · generate · {prompts} prompts × {samples} samples = {n} rollouts" in line for line in lines), lines
    assert any(f"round 0 · generate · {n}/{n} rollouts" in line and "done in" in line for line in lines), lines
    assert len([line for line in lines if RAY_CORE_NOTICE in line]) <= 1, lines
