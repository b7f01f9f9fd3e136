"""The model the benchmarks differentiate: a tanh MLP with a softmax cross-entropy loss, as
a hessd expression of its flat parameters and as the same loss in JAX; and its data,
scikit-learn's digits.

`sizes` lists the layer widths, input first: (64, 16, 10) is the digits MLP (1210
parameters), (784, 1024, 256, 10) the one of benchmarks/throughput.py's mlp-hvp workload.
Every layer but the last is tanh; the parameters are W1, b1, W2, b2, ... in that order in
one flat vector w.
"""

from __future__ import annotations

import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DIGITS_RESULTS",
    "SIZES",
    "init_params",
    "load_data",
    "loss_and_logits",
    "loss_expression",
    "num_params",
    "param_layout",
]

SIZES = (64, 16, 10)
# Where benchmarks/digits_mlp.py writes the data, the loss and the checkpoints.
DIGITS_RESULTS = pathlib.Path(__file__).parent / "results" / "digits"

Sizes = tuple[int, ...]


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """The digits data set: X (1797, 64) standardised pixels, Y (1797, 10) one-hot, float32.

    Each pixel is centred and scaled to unit variance over the data set; the three pixels
    that are 0 in every image stay 0 (their weights then get zero curvature).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    std = digits.data.std(axis=0)
    x = (digits.data - digits.data.mean(axis=0)) / np.where(std > 0, std, 1.0)
    y = np.eye(10)[digits.target]
    return x.astype(np.float32), y.astype(np.float32)


def param_layout(sizes: Sizes = SIZES) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """name -> (start, stop, shape) of each weight and bias inside the flat vector w."""
    layout, start = {}, 0
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
        for name, shape in ((f"W{i}", (fan_in, fan_out)), (f"b{i}", (fan_out,))):
            layout[name] = (start, start + math.prod(shape), shape)
            start += math.prod(shape)
    return layout


def num_params(sizes: Sizes = SIZES) -> int:
    """Number of parameters: the sum of fan_in fan_out + fan_out over the layers (1210 for
    64-16-10)."""
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))


def loss_expression(sizes: Sizes = SIZES) -> str:
    """The mean softmax cross-entropy of the MLP as a hessd expression (at least one hidden
    layer).

    Inputs: w (num_params(sizes),); constants X (N, d) and Y (N, c) one-hot. Output: scalar.
    """
    lines = []
    for name, (start, stop, shape) in param_layout(sizes).items():
        piece = f"w[{start}:{stop}]"
        lines.append(
            f"{name} = reshape({piece}, {shape})" if len(shape) > 1 else f"{name} = {piece}"
        )
    layers = len(sizes) - 1
    h = "X"
    for i in range(1, layers - 1):
        lines.append(f"h{i} = tanh({h} @ W{i} + b{i})")
        h = f"h{i}"
    last = layers - 1
    lines.append(f"logits = tanh({h} @ W{last} + b{last}) @ W{layers} + b{layers}")
    lines.append("mean(logsumexp(logits, axis=1) - sum(logits * Y, axis=1))")
    return "\n".join(lines)


def loss_and_logits(
    w: jax.Array, x: jax.Array, y: jax.Array, sizes: Sizes = SIZES
) -> tuple[jax.Array, jax.Array]:
    """The same loss as loss_expression in JAX: w (n,), x (N, d), y (N, c) -> ((), (N, c))."""
    p = {name: w[a:b].reshape(shape) for name, (a, b, shape) in param_layout(sizes).items()}
    layers = len(sizes) - 1
    h = x
    for i in range(1, layers):
        h = jnp.tanh(h @ p[f"W{i}"] + p[f"b{i}"])
    logits = h @ p[f"W{layers}"] + p[f"b{layers}"]
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * y, axis=1))
    return loss, logits


def init_params(seed: int, sizes: Sizes = SIZES) -> jax.Array:
    """LeCun-normal weights (variance 1/fan_in) and zero biases, flat: (num_params(sizes),)."""
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    pieces = []
    for key, (fan_in, fan_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        pieces += [jax.random.normal(key, (fan_in * fan_out,)) / np.sqrt(fan_in)]
        pieces += [jnp.zeros(fan_out)]
    return jnp.concatenate(pieces)
