"""The workloads of throughput.py: one Compute call each, its in-process JAX twin (same
jax.numpy function, same float32 data) and, for the Hessian and the Jacobian, its torch.func
twins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessd.client import Client, Function

from _models import loss_and_logits, loss_expression, param_layout
from _torch_peers import torch_peers

__all__ = ["EXPRESSION", "MAX_OUTPUT_BYTES", "MLP_SIZES", "WORKLOADS", "Workload", "workload"]

EXPRESSION = "sum(tanh(A @ x)**2)"
MAX_OUTPUT_BYTES = 1 << 30  # room for the 256 MiB Jacobian
MLP_SIZES = (784, 1024, 256, 10)
MLP_EXAMPLES = 64
WORKLOADS = (
    "gradient-latency",
    "gradient-c64",
    "gradient-large",
    "hessian",
    "hessian-packed",
    "jacobian",
    "mlp-hvp",
)


@dataclasses.dataclass
class Workload:
    """One Compute call, its in-process JAX twin and optionally its torch.func twins."""

    name: str
    label: str
    function: Function
    kind: str
    points: Any  # array, or dict of arrays
    options: dict[str, Any]
    local: Callable[[], jax.Array]  # in-process JAX, result on the device
    torch: dict[str, Callable[[], object]] = dataclasses.field(default_factory=dict)
    large: bool = True

    def service(self, client: Client) -> np.ndarray:
        return client.compute(self.function, self.kind, self.points, **self.options)


def workload(name: str, client: Client) -> Workload:
    """The workload called `name` (one of WORKLOADS), its function registered on `client`."""
    match name:
        case "gradient-latency" | "gradient-c64":
            return gradient_workload(client, name, 8, 1, large=False)
        case "gradient-large":
            return gradient_workload(client, name, 256, 1024)
        case "hessian":
            return hessian_workload(client, name, 256, 512, packed=False)
        case "hessian-packed":
            return hessian_workload(client, name, 256, 512, packed=True)
        case "jacobian":
            return jacobian_workload(client, name, 256, 1024)
        case "mlp-hvp":
            return mlp_hvp_workload(client, name)
    raise ValueError(f"unknown workload {name!r}; use one of {', '.join(WORKLOADS)}")


def tanh_square(
    n: int, rng: np.random.Generator
) -> tuple[np.ndarray, Callable[[jax.Array], jax.Array]]:
    """A (n, n) float32 and x -> sum(tanh(A x)²), EXPRESSION in jax.numpy."""
    a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    return a, lambda x: jnp.sum(jnp.tanh(a @ x) ** 2)


def gradient_workload(
    client: Client, name: str, n: int, batch: int, large: bool = True
) -> Workload:
    rng = np.random.default_rng(0)
    a, f = tanh_square(n, rng)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register(EXPRESSION, {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.grad(f)))
    label = f"gradient n={n} batch={batch}"
    return Workload(name, label, fn, "gradient", x, {}, lambda: local(x), large=large)


def hessian_workload(client: Client, name: str, n: int, batch: int, packed: bool) -> Workload:
    """The Hessian of sum(tanh(A x)²); packed: the upper triangle travels and the client
    unpacks it, so the in-process twin is the plain Hessian (the same result in hand)."""
    rng = np.random.default_rng(1)
    a, f = tanh_square(n, rng)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register(EXPRESSION, {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.hessian(f)))
    options = {"packed": True} if packed else {}
    label = f"hessian n={n} batch={batch}" + (" packed" if packed else "")
    peers = {} if packed else torch_peers("hessian", a, x)
    return Workload(name, label, fn, "hessian", x, options, lambda: local(x), peers)


def jacobian_workload(client: Client, name: str, n: int, batch: int) -> Workload:
    rng = np.random.default_rng(2)
    a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
    x = rng.normal(size=(batch, n)).astype(np.float32)
    fn = client.register("tanh(A @ x)", {"x": (n,)}, {"A": a})
    local = jax.jit(jax.vmap(jax.jacrev(lambda x: jnp.tanh(a @ x))))
    label = f"jacobian n={n} batch={batch}"
    options = {"mode": "reverse"}
    peers = torch_peers("jacobian", a, x)
    return Workload(name, label, fn, "jacobian", x, options, lambda: local(x), peers)


def mlp_hvp_workload(client: Client, name: str) -> Workload:
    """H v of a tanh MLP's loss on a fixed batch of examples, at one parameter vector."""
    rng = np.random.default_rng(3)
    d, classes = MLP_SIZES[0], MLP_SIZES[-1]
    x = rng.normal(size=(MLP_EXAMPLES, d)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(classes, size=MLP_EXAMPLES)]
    layout = param_layout(MLP_SIZES)
    p = max(stop for _, stop, _ in layout.values())
    w = np.zeros((1, p), np.float32)
    for start, stop, shape in layout.values():
        if len(shape) > 1:
            w[0, start:stop] = rng.normal(size=stop - start) / np.sqrt(shape[0])
    v = rng.normal(size=(1, p)).astype(np.float32)
    fn = client.register(loss_expression(MLP_SIZES), {"w": (p,)}, {"X": x, "Y": y})

    def hvp(w: jax.Array, v: jax.Array) -> jax.Array:
        def loss(w: jax.Array) -> jax.Array:
            return loss_and_logits(w, x, y, MLP_SIZES)[0]

        return jax.jvp(jax.grad(loss), (w,), (v,))[1]

    local = jax.jit(jax.vmap(hvp))
    label = f"hvp MLP {'-'.join(map(str, MLP_SIZES))} p={p} batch=1"
    return Workload(name, label, fn, "hvp", w, {"vector": v}, lambda: local(w, v))
