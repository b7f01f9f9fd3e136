"""A training pipeline that calls hessd: per-example gradients and Hessian-vector products.

A 64-16-10 tanh MLP (1210 parameters) trains on scikit-learn's digits with minibatch SGD in
this process. Every --every steps it asks a hessd server, for the current minibatch:

  per-example gradients   one request: the loss of one example, parameters `shared`
                          -> (batch, 1210); their norms are what DP-SGD clips, their mean
                          the minibatch gradient g
  curvature along g       one HVP of the minibatch loss (w one point, the minibatch
                          shared): gᵀHg / gᵀg, and the step 1 / that which minimises the
                          quadratic model along -g
  extreme eigenvalues     Lanczos on HVPs, on the server: λmin and λmax of the minibatch
                          Hessian (power iteration, as PyHessian does, would find the
                          largest |λ|, which early in training is a negative one)

The per-example and minibatch losses are registered as JAX callables (jax.export), so the
server runs with --allow-jax-export; the spectrum needs an expression (an exported function
neither vmaps nor runs forward mode). It also times an HVP through the service against the same HVP
in-process (np.asarray(jit(hvp)(...))) and writes benchmarks/results/training_pipeline.json.

    python benchmarks/training_pipeline.py [--steps 600] [--every 150] [--batch 128]
"""

from __future__ import annotations

import argparse
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np

from hessd.client import Client

from _models import init_params, load_data, loss_and_logits, loss_expression, num_params
from _servers import start_server
from _timing import timed, write_json

OUT = pathlib.Path(__file__).parent / "results" / "training_pipeline.json"


def example_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Cross-entropy of one example: w (1210,), x (64,), y (10,) one-hot -> ()."""
    return loss_and_logits(w, x[None], y[None])[0]


def batch_loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of a minibatch: w (1210,), x (B, 64), y (B, 10) -> ()."""
    return loss_and_logits(w, x, y)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    x_all, y_all = load_data()
    n = num_params()
    rng = np.random.default_rng(0)
    w = np.asarray(init_params(0))
    grad = jax.jit(jax.grad(batch_loss))
    proc, address, _ = start_server("--allow-jax-export")
    rows = []
    try:
        with Client(address, timeout=300) as c:
            per_example = c.register(example_loss, {"w": (n,), "x": (64,), "y": (10,)})
            minibatch = c.register(
                batch_loss, {"w": (n,), "x": (args.batch, 64), "y": (args.batch, 10)}
            )
            expression = c.register(
                _expression(), {"w": (n,), "x": (args.batch, 64), "y": (args.batch, 10)}
            )
            print(f"{'step':>5}{'loss':>9}{'‖g_i‖ median':>14}{'‖g_i‖ max':>11}"
                  f"{'gᵀHg/gᵀg':>10}{'λmin':>10}{'λmax':>9}")  # fmt: skip
            for step in range(args.steps + 1):
                idx = rng.choice(len(x_all), args.batch, replace=False)
                x, y = x_all[idx], y_all[idx]
                if step % args.every == 0:
                    g = c.gradient(per_example, {"w": w, "x": x, "y": y}, wrt="w", shared=["w"])
                    # The mean of the per-example gradients is the minibatch gradient.
                    np.testing.assert_allclose(g.mean(0), grad(w, x, y), rtol=1e-3, atol=1e-5)
                    norms = np.linalg.norm(g, axis=1)
                    mean = g.mean(axis=0, keepdims=True)
                    points = {"w": w[None], "x": x, "y": y}
                    hg = c.hvp(minibatch, points, mean, shared=["x", "y"])
                    curvature = float(np.vdot(mean, hg) / np.vdot(mean, mean))
                    ends = c.spectrum(expression, points, "lanczos", k=1, shared=["x", "y"])
                    lo, hi = (float(e) for e in ends.eigenvalues[0])
                    loss = float(batch_loss(w, x, y))
                    median, largest = float(np.median(norms)), float(norms.max())
                    rows.append({"step": step, "loss": loss, "grad_norm_median": median,
                                 "grad_norm_max": largest, "curvature_along_g": curvature,
                                 "lambda_min": lo, "lambda_max": hi})  # fmt: skip
                    print(f"{step:>5}{loss:>9.4f}{median:>14.4f}{largest:>11.4f}"
                          f"{curvature:>10.4f}{lo:>10.4f}{hi:>9.4f}")  # fmt: skip
                w = w - args.lr * np.asarray(grad(w, x, y))

            # One HVP of the minibatch loss: through the service vs in-process, same run.
            v = rng.normal(size=(1, n)).astype(np.float32)
            points = {"w": w[None], "x": x, "y": y}
            hvp = jax.jit(
                lambda w, x, y, v: jax.jvp(lambda w: jax.grad(batch_loss)(w, x, y), (w,), (v,))[1]
            )
            service_export = timed(
                lambda: c.hvp(minibatch, points, v, shared=["x", "y"]), args.repeats
            ).median
            service_expr = timed(
                lambda: c.hvp(expression, points, v, shared=["x", "y"]), args.repeats
            ).median
            local = timed(lambda: np.asarray(hvp(w, x, y, v[0])), args.repeats).median
            np.testing.assert_allclose(
                c.hvp(expression, points, v, shared=["x", "y"])[0],
                hvp(w, x, y, v[0]),
                rtol=2e-3,
                atol=1e-5,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    timing = {
        "service_export_ms": 1e3 * service_export,
        "service_expression_ms": 1e3 * service_expr,
        "in_process_ms": 1e3 * local,
    }
    print(f"\nHVP of the minibatch loss (n={n}, batch {args.batch}), median of {args.repeats}:")
    for name, ms in timing.items():
        print(f"  {name:<24}{ms:>8.2f} ms   ratio {ms / timing['in_process_ms']:.2f}")
    meta = {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
    }
    write_json(OUT, {"meta": meta, "args": vars(args), "checkpoints": rows, "hvp": timing})
    print(f"wrote {OUT}")


def _expression() -> str:
    """The minibatch loss as a hessd expression over w, x (batch, 64), y (batch, 10)."""
    return loss_expression().replace("X @", "x @").replace("* Y", "* y")


if __name__ == "__main__":
    jnp.zeros(())  # bring JAX up before the server competes for the cores
    main()
