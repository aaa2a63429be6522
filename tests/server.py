"""Start the real labeling app (`python app.py`) on a free loopback port, for server-level tests."""

from __future__ import annotations

import os
import signal
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


class AppServer:
    """`python app.py --db URL --port P --no-demo` as a child process, listening on 127.0.0.1.

    With `demo=True` it starts as a new user's `python app.py` does, seeding the demo into an empty
    database (under `data_dir`); `admin_password()` reads the first-run password it prints.
    """

    def __init__(self, db_url: str, log: Path, project: str | None = None, port: int | None = None, demo: bool = False,
                 data_dir: Path | None = None, extra_args: list[str] | None = None):  # fmt: skip
        self.db_url, self.log, self.project, self.demo, self.data_dir = db_url, log, project, demo, data_dir
        self.extra_args = list(extra_args or [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> AppServer:
        cmd = [sys.executable, str(ROOT / "app.py"), "--db", self.db_url, "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir or self.log.parent / "data")] if self.demo else ["--no-demo"]
        if self.project:
            cmd += ["--project", self.project]
        cmd += self.extra_args
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"app.py did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def admin_password(self) -> str:
        for line in self.log.read_text().splitlines():
            if "created account 'admin' with password: " in line:
                return line.split("with password: ")[1].split()[0]
        raise AssertionError(f"app.py printed no admin password:\n{self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
