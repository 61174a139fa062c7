"""The machine a measurement ran on, for result files: results are deterministic on one machine, not across
machines (floating-point kernels differ between CPU models)."""

from __future__ import annotations

import os
from pathlib import Path


def describe_machine() -> str:
    """The CPU model and core count, e.g. ``"AMD EPYC 7B13, 2 cores"``."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"
