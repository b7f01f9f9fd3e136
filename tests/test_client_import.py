"""The thin client must stay thin: importing it must not pull in JAX."""

import subprocess
import sys


def test_client_import_does_not_import_jax():
    code = (
        "import sys, hessd.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib'))\n"
        "assert not heavy, heavy\n"
        "assert 'hessd.service' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
