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


def test_curvature_example_runs_as_written(server_address):
    """The README's curvature block, with data and checkpoints made up to fit it."""
    import numpy as np

    from hessd.client import Client

    match = re.search(r"<!-- curvature -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md lost its curvature block"
    rng = np.random.default_rng(0)
    namespace = {
        "X": rng.normal(size=(40, 64)),
        "labels": rng.integers(0, 10, size=40),
        "checkpoints": 0.1 * rng.normal(size=(2, 1210)),
        "V": rng.normal(size=(2, 1210)),
        "g": rng.normal(size=(2, 1210)),
    }
    with Client(server_address, timeout=120) as c:
        namespace["c"] = c
        exec(match.group(1), namespace)
