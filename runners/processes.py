"""Child processes of the local tools (ingress, pipeline): start, await, stop.

Every wait is bounded; every process is put in its own session so that
stopping it also stops what it started (e.g. Prism under the pipeline).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional, Sequence


class Child:
    def __init__(self, name: str, argv: Sequence[str], *, env: dict, log_path: str, cwd: Optional[str] = None):
        self.name = name
        self.log_path = log_path
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @classmethod
    def python(cls, name: str, module_args: Sequence[str], **kwargs) -> "Child":
        return cls(name, [sys.executable, "-m", *module_args], **kwargs)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return b"".join(handle.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""
