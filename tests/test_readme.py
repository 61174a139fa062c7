"""The README's promises hold: two fresh-machine commands, the CI runs the test one, examples run."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_has_exactly_two_one_line_commands():
    cmds = quickstart_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert cmds[0].endswith("jobs/iterative_sipo.py")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    run_line = next(ln for ln in ci_lines if "pytest" in ln)
    # .ci/run may add pip's -q; otherwise the command is the README's, character for character.
    assert run_line.replace("pip install -q ", "pip install ") == quickstart_commands()[1]


def test_objectives_example_runs():
    block = re.search(r"## Using the objectives\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].metrics["lambda_mean"] <= 1.0


def test_main_job_help():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "iterative_sipo.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout
