"""The PyTorch peers of throughput.py's Hessian and Jacobian workloads: torch.func on the
same float32 data, in this process, 2 threads."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["THREADS", "torch_peers"]

THREADS = 2


def torch_peers(kind: str, a: np.ndarray, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """torch.func twins of the Hessian of sum(tanh(A x)²) or the Jacobian of tanh(A x) at
    every row of x (batch, n), by formulation: for the Hessian vmap(hessian) (forward over
    reverse, as hessd and jax.hessian) and vmap(jacrev(jacrev)) (faster in torch on the
    CPU); for the Jacobian vmap(jacrev). Empty without torch."""
    try:
        import torch
        from torch import func
    except ImportError:
        return {}
    torch.set_num_threads(THREADS)
    a_t, x_t = torch.from_numpy(a), torch.from_numpy(x)
    if kind == "hessian":

        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.sum(torch.tanh(a_t @ x) ** 2)

        formulations = {
            "vmap(hessian)": func.vmap(func.hessian(f)),
            "vmap(jacrev(jacrev))": func.vmap(func.jacrev(func.jacrev(f))),
        }
    else:
        formulations = {"vmap(jacrev)": func.vmap(func.jacrev(lambda x: torch.tanh(a_t @ x)))}
    return {name: functools.partial(fn, x_t) for name, fn in formulations.items()}
