"""A real case for `hessd spectrum`: a 64-16-10 tanh MLP trained on scikit-learn's digits.

Trains the MLP with full-batch Adam (float32, fixed seed, in-process JAX) on all 1797 images
and writes, into the output folder (default benchmarks/results/digits/):

    spec.json         the loss as a hessd function of the flat parameters w (1210,), in the
                      format `hessd spectrum --function` reads; constants X and Y by path
    X.npy, Y.npy      (1797, 64) standardised pixels and (1797, 10) one-hot labels, float32
    checkpoints.npy   (num_checkpoints, 1210) float32 parameters at the checkpoint steps
    steps.json        step, training loss and accuracy per checkpoint, and the settings
    model.json        the model as a hessd function: logits (10,) of the flat w (1210,) and
                      one example x (64,), for `hessd spectrum --data --loss`
    data.npz          the data set for it: x (1797, 64) float32 and y (1797,) int64 labels

Then, with `hessd serve` running at ADDRESS:

    hessd spectrum --function benchmarks/results/digits/spec.json \\
        --points benchmarks/results/digits/checkpoints.npy \\
        --out benchmarks/results/digits/spectrum.npz --method exact --address ADDRESS
    python benchmarks/digits_mlp.py --plot-checkpoints docs/digits-spectrum-checkpoints.png

and the curvature operators of the training loss over the data set, one job each
(OPERATOR hessian, ggn and fisher; the README has the exact commands):

    hessd spectrum --function benchmarks/results/digits/model.json \\
        --points benchmarks/results/digits/checkpoints.npy \\
        --data benchmarks/results/digits/data.npz --loss softmax_cross_entropy \\
        --operator OPERATOR --method exact --chunk-size 1 \\
        --out benchmarks/results/digits/curvature-OPERATOR.npz --address ADDRESS
    python benchmarks/digits_mlp.py --plot-curvature docs/digits-curvature-checkpoints.png

The plot modes only draw figures from the jobs' results and steps.json; they train nothing.
--plot-curvature also prints the table of λmin, λmax and negative mass per checkpoint and
operator, and writes it to curvature.json.
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
    param_layout,
)
from _timing import write_json

CHECKPOINT_STEPS = (0, 30, 100, 300, 1000, 3000)
# The operators --plot-curvature draws, in its panels' order, and their result files.
CURVATURE_OPERATORS = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher (MC)"}
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
    """spec.json, X.npy, Y.npy, checkpoints.npy (c, n), steps.json, model.json and
    data.npz into `out`."""
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
    model = {
        "expression": model_expression(sizes),
        "inputs": {"w": [num_params(sizes)], "x": [sizes[0]]},
        "dtype": "float32",
    }
    write_json(out / "model.json", model)
    np.savez(out / "data.npz", x=x, y=np.argmax(y, axis=1).astype(np.int64))


def model_expression(sizes: tuple[int, ...] = SIZES) -> str:
    """The MLP of loss_expression as a model: the logits (sizes[-1],) of the flat
    parameters w (num_params(sizes),) and one example x (sizes[0],); the loss and the sum
    over the data set are the server's (`--loss softmax_cross_entropy --data`)."""
    lines = []
    for name, (start, stop, shape) in param_layout(sizes).items():
        piece = f"w[{start}:{stop}]"
        lines.append(
            f"{name} = reshape({piece}, {shape})" if len(shape) > 1 else f"{name} = {piece}"
        )
    h = "x"
    layers = len(sizes) - 1
    for i in range(1, layers):
        lines.append(f"h{i} = tanh({h} @ W{i} + b{i})")
        h = f"h{i}"
    lines.append(f"{h} @ W{layers} + b{layers}")
    return "\n".join(lines)


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


def curvature_table(results: dict[str, dict], step: np.ndarray) -> list[dict]:
    """Per operator and checkpoint: λmin, λmax, the eigenvalues below -tol (the server's
    tol), the negative mass Σ|λ<0| / Σ|λ| and the trace."""
    rows = []
    for operator, result in results.items():
        eigenvalues = result["eigenvalues"].astype(np.float64)
        tol = result["tol"].astype(np.float64)[:, None]
        for s, values, t in zip(step, eigenvalues, tol, strict=True):
            negative = values[values < 0]
            rows.append(
                {
                    "operator": operator,
                    "step": int(s),
                    "lambda_min": float(values.min()),
                    "lambda_max": float(values.max()),
                    "below_minus_tol": int((values < -t).sum()),
                    "negative_mass": float(np.abs(negative).sum() / np.abs(values).sum()),
                    "negative_sum": float(negative.sum()),
                    "trace": float(values.sum()),
                    "tol": float(t[0]),
                }
            )
    return rows


def plot_curvature(folder: pathlib.Path, png: pathlib.Path) -> list[dict]:
    """Draw the Hessian, GGN and Fisher spectra of curvature-<operator>.npz (exact, every
    eigenvalue at each checkpoint) side by side, one histogram per checkpoint on one symlog
    axis shared by the three panels (the spectrum job's own helpers, so the bins are equal
    on that axis and compare across panels), and a fourth panel with the negative mass per
    checkpoint. Returns curvature_table's rows."""
    import matplotlib

    from hessd.tools.spectrum import (
        eigenvalue_histogram,
        symlog_axis,
        symlog_edges,
        symlog_linthresh,
    )

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = json.loads((folder / "steps.json").read_text())["checkpoints"]
    step = np.array([r["step"] for r in records])
    results = {}
    for operator in CURVATURE_OPERATORS:
        path = folder / f"curvature-{operator}.npz"
        with np.load(path) as result:
            results[operator] = {name: result[name] for name in result.files}
        if len(results[operator]["eigenvalues"]) != len(step):
            raise ValueError(
                f"{path} has {len(results[operator]['eigenvalues'])} spectra but steps.json "
                f"has {len(step)} checkpoints; run the job on this folder's checkpoints.npy"
            )
    every = np.concatenate([r["eigenvalues"].astype(np.float64).ravel() for r in results.values()])
    tols = np.concatenate(
        [np.repeat(r["tol"], r["eigenvalues"].shape[1]) for r in results.values()]
    )
    linthresh = symlog_linthresh(every[None, :], tols[None, :])
    edges = symlog_edges(every, linthresh, bins=90)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(step)))
    rows = curvature_table(results, step)

    fig, axes = plt.subplots(
        1, 4, figsize=(17, 4.2), width_ratios=(1, 1, 1, 0.8), layout="constrained"
    )
    for ax, (operator, name) in zip(axes[:3], CURVATURE_OPERATORS.items(), strict=False):
        ax.axvspan(-linthresh, linthresh, color="0.93", linewidth=0, zorder=0)
        for values, s, color in zip(results[operator]["eigenvalues"], step, colors, strict=True):
            eigenvalue_histogram(
                ax, values.astype(np.float64), edges, fill=False, color=color, label=f"step {s}"
            )
        symlog_axis(ax, "x", float(every.min()), float(every.max()), linthresh)
        ax.set_yscale("log")
        ax.set_ylim(0.7, 1500)
        ax.axvline(0.0, color="gray", linewidth=0.6, zorder=0)
        ax.set_xlabel(f"eigenvalue λ (symlog, linear within ±{linthresh:g})")
        ax.set_title(f"{name}: all {results[operator]['eigenvalues'].shape[1]} eigenvalues")
    axes[0].set_ylabel("eigenvalues per bin")
    axes[0].legend(fontsize=7, loc="upper left")

    x = np.maximum(step, 1)
    for (operator, name), marker in zip(CURVATURE_OPERATORS.items(), "ovs", strict=True):
        mass = [r["negative_mass"] for r in rows if r["operator"] == operator]
        axes[3].plot(x, mass, f"{marker}-", label=name)
    axes[3].set_xscale("log")
    axes[3].set_xlabel("Adam step (step 0 drawn at 1)")
    axes[3].set_ylabel("negative mass Σ|λ<0| / Σ|λ|")
    axes[3].set_title("negative curvature against training")
    axes[3].legend(fontsize=7)
    fig.suptitle(
        "digits MLP (n = 1210), mean cross-entropy over all 1797 examples: exact spectra of "
        "three curvature operators at six checkpoints (hessd spectrum --data)",
        fontsize="medium",
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return rows


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
    parser.add_argument(
        "--plot-curvature",
        type=pathlib.Path,
        metavar="PNG",
        help="only draw PNG from OUT/curvature-{hessian,ggn,fisher}.npz and OUT/steps.json, "
        "print the table and write OUT/curvature.json (no training)",
    )
    args = parser.parse_args()
    if args.plot_curvature:
        rows = plot_curvature(args.out, args.plot_curvature)
        write_json(args.out / "curvature.json", {"checkpoints": rows})
        print(f"{'operator':<10}{'step':>6}{'λmin':>12}{'λmax':>10}{'λ<-tol':>8}{'neg mass':>10}")
        for r in rows:
            print(
                f"{r['operator']:<10}{r['step']:>6}{r['lambda_min']:>12.3e}"
                f"{r['lambda_max']:>10.4f}{r['below_minus_tol']:>8}{r['negative_mass']:>10.4f}"
            )
        print(f"wrote {args.plot_curvature} and {args.out}/curvature.json")
        return
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
    print(
        f"wrote {args.out}/: spec.json X.npy Y.npy checkpoints.npy steps.json model.json data.npz"
    )


if __name__ == "__main__":
    main()
