"""A `hessd serve` subprocess for the benchmark scripts."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading

__all__ = ["start_server"]


def start_server(*flags: str) -> tuple[subprocess.Popen, str, collections.deque]:
    """`hessd serve` on a free loopback port: (process, "host:port", its last log lines).

    Its stderr is drained by a thread for the whole run, so the server never blocks on a
    full pipe. The caller terminates the process.
    """
    args = [sys.executable, "-m", "hessd.service.cli", "serve", "--port", "0"]
    args += ["--compile-cache-dir", "", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    log: collections.deque = collections.deque(maxlen=50)
    for line in proc.stderr:
        log.append(line)
        if match := re.search(r"listening on ([\d.]+:\d+)", line):
            threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
            return proc, match.group(1), log
    raise RuntimeError("the server exited before listening:\n" + "".join(log))
