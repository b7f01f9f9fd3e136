"""Central finite differences in float64, computed from the service's own `value` kind.

Each helper builds every perturbed point of the whole batch and evaluates them in one call,
so the reference is independent of the automatic differentiation it checks.
"""

from __future__ import annotations

import numpy as np


def _perturbed(points: dict, wrt: str, deltas: np.ndarray) -> dict:
    """Points repeated once per delta: (len(deltas) * batch, ...), delta-major."""
    k = len(deltas)
    out = {name: np.concatenate([x] * k) for name, x in points.items()}
    out[wrt] = np.concatenate([points[wrt] + d for d in deltas])
    return out


def jacobian(value, points: dict, wrt: str, h: float = 1e-6) -> np.ndarray:
    """(batch, *out, *in) by central differences of value(points) -> (batch, *out)."""
    x = points[wrt]
    batch, in_shape = x.shape[0], x.shape[1:]
    n = int(np.prod(in_shape))
    basis = np.eye(n).reshape(n, *in_shape) * h
    values = value(_perturbed(points, wrt, np.concatenate([basis, -basis])))
    values = values.reshape(2, n, batch, *values.shape[1:])
    d = (values[0] - values[1]) / (2 * h)  # (n, batch, *out)
    d = np.moveaxis(d, 0, -1)  # (batch, *out, n)
    return d.reshape(*d.shape[:-1], *in_shape)


def hessian(value, points: dict, wrt: str, h: float = 1e-4) -> np.ndarray:
    """(batch, *out, *in, *in) by the four-point central second difference."""
    x = points[wrt]
    batch, in_shape = x.shape[0], x.shape[1:]
    n = int(np.prod(in_shape))
    e = np.eye(n) * h
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    deltas = np.stack(
        [si * e[i] + sj * e[j] for si, sj in signs for i in range(n) for j in range(n)]
    )
    values = value(_perturbed(points, wrt, deltas.reshape(-1, *in_shape)))
    values = values.reshape(4, n, n, batch, *values.shape[1:])
    d = (values[0] - values[1] - values[2] + values[3]) / (4 * h * h)  # (n, n, batch, *out)
    d = np.moveaxis(np.moveaxis(d, 0, -1), 0, -1)  # (batch, *out, n, n)
    return d.reshape(*d.shape[:-2], *in_shape, *in_shape)
