"""The annotation server as the tests drive it: ``jobs/human_study.py serve`` in a subprocess on a free loopback
port, and plain HTTP calls that never raise on an error status (shared by the server, loop and browser tests)."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``jobs/human_study.py serve`` as a subprocess, ready when it answers."""

    def __init__(self, study: Path, port: int | None = None):
        self.study, self.port = study, port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "human_study.py"), "serve", "--study",
                                      str(study), "--port", str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.base + "/", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not answer within 90 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def request(url: str, *, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """``(status, parsed JSON or raw bytes)``; never raises on HTTP errors."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, data, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, data, ctype = err.code, err.read(), err.headers.get("content-type", "")
    return status, (json.loads(data) if ctype.startswith("application/json") else data)


def vote(base: str, token: str, item: str, choice: str):
    return request(f"{base}/annotate/{token}/vote", body=json.dumps({"item": item, "choice": choice}).encode(),
                   headers={"Content-Type": "application/json"})


def tokens(folder: Path) -> dict[str, str]:
    """``{annotator name: token}`` from links.md."""
    return dict(re.findall(r"^\| (g\d+-a\d+) \| \d+ \| http://[^/]+/annotate/(\S+) \|$", (folder / "links.md").read_text(), re.M))
