"""The parts of a job on disk: one .npz per finished chunk in `<out>.parts/`, beside a
manifest.json that records what defines the job, every file written atomically. A resume
skips the chunks there; the result is assembled from them whether or not the job was
interrupted, so it does not depend on how often it was."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from hessd.client import Spectrum
from hessd.tools._common import Refused

__all__ = ["MANIFEST", "assemble", "chunk_arrays", "chunk_path", "claim_parts", "save_npz"]

MANIFEST = "manifest.json"


def chunk_path(parts: Path, start: int) -> Path:
    return parts / f"chunk-{start:08d}.npz"


def claim_parts(parts: Path, manifest: dict[str, Any]) -> None:
    """Create the parts folder with its manifest, or check that the one there is this job's."""
    path = parts / MANIFEST
    if parts.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            existing = None
        except (OSError, ValueError) as e:
            raise Refused(
                f"cannot read {path} ({e}); delete {parts} to start over, or use another --out"
            ) from None
        if existing is None and any(parts.glob("chunk-*.npz")):
            raise Refused(
                f"{parts} holds chunks but no {MANIFEST}, so nothing says which job they belong "
                "to; delete it to start over, or use another --out"
            )
        if existing is not None:
            if existing != manifest:
                there, now = _flat(existing), _flat(manifest)
                differences = "; ".join(
                    f"{key}: {there.get(key)!r} there, {now.get(key)!r} now"
                    for key in sorted(set(there) | set(now))
                    if there.get(key) != now.get(key)
                )
                raise Refused(
                    f"{parts} holds the parts of a different job ({differences}); results of "
                    "two jobs are never mixed: delete the folder to start over, or use "
                    "another --out"
                )
            return
    parts.mkdir(exist_ok=True)
    _write_atomically(path, lambda f: f.write(json.dumps(manifest, indent=2).encode() + b"\n"))


def _flat(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest with its options spelled as the flags: {"--k": 3, "chunk_size": 64, ...}."""
    options = manifest.get("options")
    flat = {key: value for key, value in manifest.items() if key != "options"}
    if isinstance(options, dict):
        flat |= {"--" + name.replace("_", "-"): value for name, value in options.items()}
    return flat


def chunk_arrays(spectrum: Spectrum) -> dict[str, np.ndarray]:
    """What a chunk file holds: every field the server returned."""
    return {
        field.name: getattr(spectrum, field.name)
        for field in dataclasses.fields(spectrum)
        if getattr(spectrum, field.name) is not None
    }


def assemble(parts: Path, starts: range, chunk_size: int, num_points: int) -> dict[str, Any]:
    """The chunk files, concatenated along the batch axis."""
    pieces: dict[str, list[np.ndarray]] = {}
    for start in starts:
        path = chunk_path(parts, start)
        expected = min(chunk_size, num_points - start)
        with np.load(path, allow_pickle=False) as chunk:
            for name in chunk.files:
                array = chunk[name]
                if array.shape[:1] != (expected,):
                    raise Refused(
                        f"{path} holds {name} of shape {array.shape}, not {expected} points; "
                        f"delete {parts} to start over"
                    )
                pieces.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in pieces.items()}


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    _write_atomically(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`: a reader
    (or a resume) sees the old file or the whole new one, never a part."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
