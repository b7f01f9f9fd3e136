"""The function file both tools read (`--function`): what Client.register takes, as JSON or
TOML.

    expression = "0.5 * x @ A @ x"        # required
    dtype = "float64"                     # optional, "float32" by default
    [inputs]                              # required: name -> shape of one point
    x = [4]
    [constants]                           # optional: a nested list in the function's
    A = "A.npy"                           # dtype, or a .npy path relative to this file
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from hessd.tools._common import Refused

__all__ = ["DTYPES", "FunctionSpec", "load_function_file"]

DTYPES = ("float32", "float64")
_KEYS = ("expression", "inputs", "constants", "dtype")


@dataclasses.dataclass(frozen=True)
class FunctionSpec:
    """What Client.register takes."""

    expression: str
    inputs: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray]
    dtype: str


def load_function_file(path: Path) -> FunctionSpec:
    """Read and check a function file; Refused says what is wrong with it."""
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".toml":
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise Refused(f"function file {path}: name a .json or a .toml file")
    except (OSError, UnicodeDecodeError) as e:
        raise Refused(f"cannot read function file {path}: {e}") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise Refused(f"function file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    where = f"function file {path}"
    if not isinstance(raw, dict):
        raise Refused(f"{where}: expected a table of {', '.join(_KEYS)}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise Refused(f"{where}: unknown keys {unknown}; the keys are {', '.join(_KEYS)}")
    expression = raw.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise Refused(f"{where}: `expression` must be a non-empty string, got {expression!r}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise Refused(f"{where}: `dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    inputs = raw.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise Refused(
            f"{where}: `inputs` must map each input name to the shape of one point, "
            'e.g. {"x": [3]}; got ' + repr(inputs)
        )
    shapes = {}
    for name, shape in inputs.items():
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise Refused(
                f"{where}: input {name!r} has shape {shape!r}; a shape is a list of "
                "non-negative integers, [] for a scalar"
            )
        shapes[name] = tuple(shape)
    constants = raw.get("constants", {})
    if not isinstance(constants, dict):
        raise Refused(f"{where}: `constants` must map names to arrays, got {constants!r}")
    return FunctionSpec(
        expression=expression,
        inputs=shapes,
        constants={
            name: _load_constant(value, name, dtype, path) for name, value in constants.items()
        },
        dtype=dtype,
    )


def _load_constant(value: Any, name: str, dtype: str, spec_path: Path) -> np.ndarray:
    """A constant: a .npy path relative to the function file, sent as stored (the client
    refuses a lossy conversion), or numbers written in the file, read in the function's
    dtype as a literal would be."""
    where = f"function file {spec_path}: constant {name!r}"
    if isinstance(value, str):
        npy = spec_path.parent / value
        try:
            return np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise Refused(f"{where}: cannot load {npy} as a .npy array: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise Refused(f"{where} must be a number, a nested list of them or a .npy path")
    try:
        return np.array(value, dtype=dtype)
    except (ValueError, TypeError):
        raise Refused(f"{where} is not a rectangular nested list of numbers") from None
