"""Regenerate the Python modules of the wire contract from proto/v1/hessd.proto.

    python proto/generate.py            # rewrite proto/v1/hessd_pb2{,_grpc}.py{,i}
    python proto/generate.py --check    # exit 1 if the committed modules have drifted

Needs grpcio-tools (the pinned version in pyproject.toml's dev extra): code it generates
refuses to import under an older grpcio, so the generator must be no newer than the
oldest grpcio the project declares.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parent
GENERATED = ("hessd_pb2.py", "hessd_pb2.pyi", "hessd_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> dict[str, bytes]:
    """Run protoc into out_dir; return the generated files by name."""
    # -Ihessd/proto=proto makes the generated imports read `from hessd.proto.v1 import ...`.
    args = [
        "protoc",
        f"-Ihessd/proto={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"{PROTO_DIR}/v1/hessd.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    generated = out_dir / "hessd" / "proto" / "v1"
    return {name: (generated / name).read_bytes() for name in GENERATED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(pathlib.Path(tmp))
    drifted = [n for n, data in files.items() if (PROTO_DIR / "v1" / n).read_bytes() != data]
    if args.check:
        for name in drifted:
            print(f"proto/v1/{name} differs from what proto/v1/hessd.proto generates")
        return 1 if drifted else 0
    for name, data in files.items():
        (PROTO_DIR / "v1" / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
