"""Regenerate the Python modules of the wire contract from the .proto files under proto/.

    python proto/generate.py            # rewrite proto/{v1,oip}/*_pb2*.py{,i}
    python proto/generate.py --check    # exit 1 if the committed modules have drifted

The generator is pinned (pyproject.toml's `generate` extra, grpcio-tools==X), and what it
writes decides which runtimes can import the modules: gencode of protobuf V.m accepts any
runtime from V.m up to the end of major V+1 (protobuf's cross-version runtime guarantee),
and the _grpc modules refuse a grpcio older than X. The pin is old on purpose, so that
hessd installs beside libraries that hold protobuf back a major version; and a grpcio-tools
that old requires a protobuf the development virtualenv does not have. So the generator
runs in a virtualenv of its own, made once by this script under the system's temporary
folder (HESSD_GENERATOR_VENV to choose another folder), with the pin installed by pip.
Only the standard library is needed to run this script, from any interpreter.

Exit codes: 0 done (or no drift), 1 drift found, 2 the generator could not be had (pip
could not install it, e.g. offline); the message says which.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PYPROJECT = PROTO_DIR.parent / "pyproject.toml"
# The contract's .proto files, relative to proto/, and the modules kept of each. The Open
# Inference Protocol gets no _grpc module (see proto/oip/grpc_predict_v2.proto).
SOURCES = {
    "v1/hessd.proto": ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"),
    "oip/grpc_predict_v2.proto": ("_pb2.py", "_pb2.pyi"),
}
UNAVAILABLE = 2


class GeneratorUnavailable(RuntimeError):
    """The pinned grpcio-tools could not be installed."""


def pinned_generator() -> str:
    """The `grpcio-tools==X` requirement of pyproject.toml's `generate` extra."""
    with PYPROJECT.open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    (pin,) = (r for r in extras["generate"] if r.startswith("grpcio-tools=="))
    return pin


def generator_python(pin: str) -> pathlib.Path:
    """The python of a virtualenv that has `pin` installed, made on first use."""
    version = pin.partition("==")[2]
    root = pathlib.Path(
        os.environ.get("HESSD_GENERATOR_VENV")
        or pathlib.Path(tempfile.gettempdir()) / f"hessd-grpcio-tools-{version}"
    )
    python = root / "bin" / "python"
    ready = root / ".ready"
    if ready.exists():
        return python
    with _locked(root.with_name(root.name + ".lock")):
        if ready.exists():  # made by another process while this one waited
            return python
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", pin],
            capture_output=True,
            text=True,
        )
        if installed.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise GeneratorUnavailable(
                f"could not install {pin} into {root} (offline?):\n{installed.stderr.strip()}"
            )
        ready.touch()
    return python


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def generate(out_dir: pathlib.Path, python: pathlib.Path) -> dict[str, bytes]:
    """Run the pinned protoc into out_dir; return the generated files by path under proto/."""
    # -Ihessd/proto=proto makes the generated imports read `from hessd.proto.v1 import ...`.
    args = [
        str(python),
        "-m",
        "grpc_tools.protoc",
        f"-Ihessd/proto={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{PROTO_DIR}/{source}" for source in SOURCES),
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{result.stderr}")
    generated = out_dir / "hessd" / "proto"
    return {
        name: (generated / name).read_bytes()
        for source, suffixes in SOURCES.items()
        for name in (source.removesuffix(".proto") + suffix for suffix in suffixes)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, write nothing")
    args = parser.parse_args()
    pin = pinned_generator()
    try:
        python = generator_python(pin)
    except GeneratorUnavailable as e:
        print(f"proto/generate.py: {e}", file=sys.stderr)
        return UNAVAILABLE
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp), python)
    drifted = [
        name
        for name, data in files.items()
        if not (PROTO_DIR / name).exists() or (PROTO_DIR / name).read_bytes() != data
    ]
    if args.check:
        for name in drifted:
            print(f"proto/{name} differs from what {pin} generates from the .proto")
        return 1 if drifted else 0
    for name, data in files.items():
        (PROTO_DIR / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
