"""What a job's driver does first: join Ray and log with the seconds elapsed since it started."""

from __future__ import annotations

import time


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to, else start a local Ray (``num_cpus``; no dashboard, worker
    logs stay in Ray's log files)."""
    import ray

    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)


class ElapsedLog:
    """``log(msg)`` prints ``[    42s] msg``; ``log.seconds`` is the time since it was made."""

    def __init__(self) -> None:
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.seconds:6.0f}s] {msg}", flush=True)
