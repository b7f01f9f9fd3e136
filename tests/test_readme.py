"""The README's quickstart runs as written, against a real server, in a process without JAX."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    match = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md lost its quickstart block"
    return match.group(1)


def test_quickstart_runs_as_written(server_address):
    code = quickstart().replace("127.0.0.1:50051", server_address)
    code += "\nimport sys; assert not any(m.startswith('jax') for m in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "gradient is only defined for scalar-output functions" in result.stdout
    assert result.stdout.splitlines()[:2] == ["cpu", "(5,)"]
