"""A real case for `hessd spectrum`: a 64-16-10 tanh MLP trained on scikit-learn's digits.

Trains the MLP with full-batch Adam (float32, fixed seed, in-process JAX) on all 1797 images
and writes, into the output folder (default benchmarks/results/digits/):

    spec.json         the loss as a hessd function of the flat parameters w (1210,), in the
                      format `hessd spectrum --function` reads; constants X and Y by path
    X.npy, Y.npy      (1797, 64) standardised pixels and (1797, 10) one-hot labels, float32
    checkpoints.npy   (num_checkpoints, 1210) float32 parameters at the checkpoint steps
    steps.json        step, training loss and accuracy per checkpoint, and the settings

Then, with `hessd serve` running at ADDRESS:

    hessd spectrum --function benchmarks/results/digits/spec.json \\
        --points benchmarks/results/digits/checkpoints.npy \\
        --out benchmarks/results/digits/spectrum.npz --method exact --address ADDRESS
    python benchmarks/digits_mlp.py --plot-checkpoints docs/digits-spectrum-checkpoints.png

The second command only draws the figure from spectrum.npz and steps.json; it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from _models import (
    DIGITS_RESULTS,
    SIZES,
    init_params,
    load_data,
    loss_and_logits,
    loss_expression,
    num_params,
)
from _timing import write_json

CHECKPOINT_STEPS = (0, 30, 100, 300, 1000, 3000)
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
# Adam's (w, first moment, second moment, step count).
AdamState = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def train(
    x: np.ndarray,
    y: np.ndarray,
    steps: tuple[int, ...] = CHECKPOINT_STEPS,
    lr: float = 1e-3,
    seed: int = 0,
    sizes: tuple[int, ...] = SIZES,
) -> tuple[np.ndarray, list[dict]]:
    """Full-batch Adam on the mean cross-entropy, float32, from init_params(seed).

    x (N, d), y (N, c) one-hot; `steps` ascending. Returns the parameters after each of
    `steps` Adam updates, (len(steps), num_params(sizes)) float32, and per checkpoint
    {"step", "loss", "accuracy", "gradient_norm"} on the training data.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    value_and_grad = jax.value_and_grad(lambda w: loss_and_logits(w, x, y, sizes)[0])

    def adam_step(_: jax.Array, state: AdamState) -> AdamState:
        w, m, v, t = state
        g = value_and_grad(w)[1]
        t = t + 1
        m = _BETA1 * m + (1 - _BETA1) * g
        v = _BETA2 * v + (1 - _BETA2) * g * g
        w = w - lr * (m / (1 - _BETA1**t)) / (jnp.sqrt(v / (1 - _BETA2**t)) + _EPS)
        return w, m, v, t

    # A traced trip count: one compile serves every stretch between checkpoints.
    run = jax.jit(lambda state, n: lax.fori_loop(0, n, adam_step, state))

    @jax.jit
    def evaluate(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        loss, logits = loss_and_logits(w, x, y, sizes)
        accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.argmax(y, axis=1))
        return loss, accuracy, jnp.linalg.norm(value_and_grad(w)[1])

    w = init_params(seed, sizes)
    state = (w, jnp.zeros_like(w), jnp.zeros_like(w), jnp.zeros((), jnp.float32))
    done, checkpoints, records = 0, [], []
    for step in steps:
        state = run(state, step - done)
        done = step
        loss, accuracy, grad_norm = evaluate(state[0])
        checkpoints.append(np.asarray(state[0]))
        records.append(
            {
                "step": step,
                "loss": float(loss),
                "accuracy": float(accuracy),
                "gradient_norm": float(grad_norm),
            }
        )
    return np.stack(checkpoints).astype(np.float32), records


def write_outputs(
    out: pathlib.Path,
    x: np.ndarray,
    y: np.ndarray,
    checkpoints: np.ndarray,
    records: list[dict],
    settings: dict,
    sizes: tuple[int, ...] = SIZES,
) -> None:
    """spec.json, X.npy, Y.npy, checkpoints.npy (c, n) and steps.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "X.npy", x)
    np.save(out / "Y.npy", y)
    np.save(out / "checkpoints.npy", checkpoints)
    spec = {
        "expression": loss_expression(sizes),
        "inputs": {"w": [num_params(sizes)]},
        "constants": {"X": "X.npy", "Y": "Y.npy"},
        "dtype": "float32",
    }
    write_json(out / "spec.json", spec)
    steps = {"settings": settings, "checkpoints": records}
    write_json(out / "steps.json", steps)


def plot_checkpoints(spectrum: pathlib.Path, steps: pathlib.Path, png: pathlib.Path) -> None:
    """Draw the exact spectra of spectrum.npz (eigenvalues (c, n)) against training.

    Left: a histogram of the eigenvalues per checkpoint on a symlog axis. Middle: λ_max, the
    10th largest eigenvalue, |λ_min| and the loss against the step. Right: the number of
    eigenvalues below -tol, within ±tol and above tol, with tol = sqrt(eps_float32) λ_max.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eigenvalues = np.load(spectrum)["eigenvalues"].astype(np.float64)
    records = json.loads(steps.read_text())["checkpoints"]
    step = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    if len(step) != len(eigenvalues):
        raise ValueError(
            f"{spectrum} has {len(eigenvalues)} spectra but {steps} has {len(step)} "
            "checkpoints; run the spectrum job on this folder's checkpoints.npy"
        )
    top = eigenvalues.max(axis=1)
    tol = np.sqrt(np.finfo(np.float32).eps) * np.abs(eigenvalues).max(axis=1)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(step)))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    linthresh = 1e-4
    edge = np.abs(eigenvalues).max()
    bins = np.concatenate([-np.geomspace(edge, linthresh, 40), np.geomspace(linthresh, edge, 40)])
    bins = np.unique(np.concatenate([bins, np.linspace(-linthresh, linthresh, 5)]))
    for values, s, color in zip(eigenvalues, step, colors, strict=True):
        axes[0].hist(values, bins=bins, histtype="step", color=color, label=f"step {s}")
    axes[0].set_xscale("symlog", linthresh=linthresh)
    axes[0].set_xticks([-1, -1e-2, -1e-4, 0, 1e-4, 1e-2, 1])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("eigenvalue (symlog, linear within ±1e-4)")
    axes[0].set_ylabel("count")
    axes[0].set_title("Hessian eigenvalues per checkpoint")
    axes[0].legend(fontsize=7)

    x = np.maximum(step, 1)
    axes[1].plot(x, top, "o-", label="λ_max")
    axes[1].plot(x, np.sort(eigenvalues, axis=1)[:, -10], "s-", label="10th largest λ")
    axes[1].plot(x, -eigenvalues.min(axis=1), "v-", label="|λ_min| (negative)")
    axes[1].plot(x, loss, "k--", label="training loss")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("Adam step (step 0 drawn at 1)")
    axes[1].set_title("extremes against training")
    axes[1].legend(fontsize=7)

    below = (eigenvalues < -tol[:, None]).sum(axis=1)
    within = (np.abs(eigenvalues) <= tol[:, None]).sum(axis=1)
    above = (eigenvalues > tol[:, None]).sum(axis=1)
    axes[2].plot(x, below, "v-", label="λ < -tol")
    axes[2].plot(x, within, "o-", label="|λ| ≤ tol")
    axes[2].plot(x, above, "^-", label="λ > tol")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("Adam step (step 0 drawn at 1)")
    axes[2].set_ylabel(f"count of n={eigenvalues.shape[1]}")
    axes[2].set_title("tol = sqrt(eps) max|λ| (hessd's default)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DIGITS_RESULTS, help="output folder")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, nargs="+", default=list(CHECKPOINT_STEPS), help="checkpoint steps"
    )
    parser.add_argument(
        "--plot-checkpoints",
        type=pathlib.Path,
        metavar="PNG",
        help="only draw PNG from OUT/spectrum.npz and OUT/steps.json (no training)",
    )
    args = parser.parse_args()
    if args.plot_checkpoints:
        plot_checkpoints(args.out / "spectrum.npz", args.out / "steps.json", args.plot_checkpoints)
        print(f"wrote {args.plot_checkpoints}")
        return
    steps = tuple(sorted(set(args.steps)))
    if steps[0] < 0:
        parser.error(f"--steps must be ≥ 0, got {steps[0]}")
    x, y = load_data()
    start = time.perf_counter()
    checkpoints, records = train(x, y, steps, lr=args.lr, seed=args.seed)
    seconds = time.perf_counter() - start
    settings = {
        "sizes": list(SIZES),
        "optimizer": "adam, full batch",
        "lr": args.lr,
        "betas": [_BETA1, _BETA2],
        "eps": _EPS,
        "seed": args.seed,
        "dtype": "float32",
        "jax": jax.__version__,
        "train_seconds": round(seconds, 2),
    }
    write_outputs(args.out, x, y, checkpoints, records, settings)
    print(f"digits {x.shape}, MLP {SIZES}, n={num_params()}, Adam lr={args.lr}, {seconds:.1f} s")
    print(f"{'step':>6}{'loss':>10}{'accuracy':>10}{'‖∇f‖':>10}")
    for r in records:
        print(f"{r['step']:>6}{r['loss']:>10.4f}{r['accuracy']:>10.4f}{r['gradient_norm']:>10.4f}")
    print(f"wrote {args.out}/: spec.json X.npy Y.npy checkpoints.npy steps.json")


if __name__ == "__main__":
    main()
