"""The top-k Hessian eigenvalues of the digits MLP: hessd against PyTorch on the same CPU.

At checkpoints written by digits_mlp.py (default: the first and the last), times

    hessd lanczos       Client.spectrum(f, w[None], "lanczos", k=10), RPC included
    torch power         PyHessian's algorithm: power iteration with deflation, one top
                        eigenvalue after another (its defaults: tol 1e-3, 100 iterations)
    torch lanczos       Lanczos with full reorthogonalisation, as hessd runs it
    hessd exact         Client.spectrum(f, w[None], "exact"): H (n x n) formed, eigh; the
                        reference λ_exact of every row
    torch dense         torch.autograd.functional.hessian, then numpy eigvalsh (float64)
    torch dense f64     the same with parameters and data cast to float64: how far the
                        float32 reference is from the eigenvalues of the float64 loss

on the same float32 data and parameters, torch with one thread per core. Each time is the
median of --repeats runs after a warm-up (compiles excluded). The errors compare the k
largest eigenvalues, sorted, with the k largest of hessd exact:

    max |Δλ| = max_i |λ_i - λ_exact,i|        rel err = max_i |λ_i - λ_exact,i| / |λ_exact,i|

    python benchmarks/digits_mlp.py   # first: the checkpoints
    python benchmarks/spectrum_vs_torch.py [--repeats 5] [--checkpoints 0 -1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable

import jax
import numpy as np
import torch

from hessd.client import Client, Function

from _models import DIGITS_RESULTS, SIZES, loss_expression, num_params, param_layout
from _servers import start_server
from _timing import timed, write_json

K = 10
# PyHessian's defaults for hessian.eigenvalues(maxIter=100, tol=1e-3).
PYHESSIAN_MAX_ITER, PYHESSIAN_TOL = 100, 1e-3
TORCH_HVP = "reverse-over-reverse"


def torch_loss(sizes: tuple[int, int, int] = SIZES) -> Callable:
    """(w (n,), x (N, d), y (N, c)) -> () the mean cross-entropy, as loss_expression."""
    layout = param_layout(sizes)

    def loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = {name: w[a:b].reshape(shape) for name, (a, b, shape) in layout.items()}
        logits = torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
        return torch.mean(torch.logsumexp(logits, dim=1) - torch.sum(logits * y, dim=1))

    return loss


def torch_hvps(
    w: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Two HVPs v (n,) -> H v (n,) at w with torch.func.

    forward-over-reverse: jvp of grad, one forward-mode pass through the gradient per call.
    reverse-over-reverse: vjp of grad with the gradient's graph built once and reused, which
        is what PyHessian does (loss.backward(create_graph=True), then autograd.grad per HVP).
    """
    grad = torch.func.grad(lambda p: torch_loss()(p, x, y))
    _, vjp_of_grad = torch.func.vjp(grad, w)
    return {
        "forward-over-reverse": lambda v: torch.func.jvp(grad, (w,), (v,))[1],
        "reverse-over-reverse": lambda v: vjp_of_grad(v)[0],
    }


def power_iteration(
    hvp: Callable, n: int, k: int, seed: int, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """PyHessian's hessian.eigenvalues(maxIter, tol, top_n=k) on a flat vector of size n.

    For each of k eigenvalues: a Gaussian start; per iteration, deflate against the vectors
    found so far, normalise, λ = vᵀHv, v = Hv/‖Hv‖; stop when λ changes by less than tol
    relatively. It converges to the largest |λ| left, not the largest λ. Returns the k
    eigenvalues in the order found, (k,), and the number of HVPs.
    """
    generator = torch.Generator().manual_seed(seed)
    eigenvalues, vectors, hvps = [], [], 0
    for _ in range(k):
        eigenvalue = None
        v = torch.randn(n, generator=generator)
        v = v / (torch.linalg.vector_norm(v) + 1e-6)
        for _ in range(max_iter):
            for u in vectors:
                v = v - (v @ u) * u
            v = v / (torch.linalg.vector_norm(v) + 1e-6)
            hv = hvp(v)
            hvps += 1
            estimate = float(hv @ v)
            v = hv / (torch.linalg.vector_norm(hv) + 1e-6)
            if (
                eigenvalue is not None
                and abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol
            ):
                break
            eigenvalue = estimate
        eigenvalues.append(eigenvalue)
        vectors.append(v)
    return np.array(eigenvalues), hvps


def lanczos(hvp: Callable, n: int, num_steps: int, seed: int) -> np.ndarray:
    """num_steps Lanczos steps from a Gaussian start with full reorthogonalisation (classical
    Gram-Schmidt, twice, as hessd's spectral.lanczos). Returns the Ritz values (num_steps,)
    ascending; the k largest approximate the k largest eigenvalues."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(num_steps, n)
    v = torch.randn(n, generator=generator)
    v = v / torch.linalg.vector_norm(v)
    alphas, betas = [], []
    for j in range(num_steps):
        basis[j] = v
        w = hvp(v)
        alphas.append(float(w @ v))
        done = basis[: j + 1]
        for _ in range(2):
            w = w - done.T @ (done @ w)
        if j + 1 < num_steps:
            beta = torch.linalg.vector_norm(w)
            betas.append(float(beta))
            v = w / beta
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.linalg.eigvalsh(tridiagonal)


def dense_eigenvalues(loss: Callable, w: torch.Tensor) -> np.ndarray:
    """Every eigenvalue (n,) ascending: torch.autograd.functional.hessian (vectorised), then
    numpy's eigvalsh in float64."""
    hessian = torch.autograd.functional.hessian(loss, w, vectorize=True)
    return np.linalg.eigvalsh(hessian.double().numpy())


def compare(top: np.ndarray, exact_top: np.ndarray) -> tuple[float, float]:
    """(max |Δλ|, max |Δλ| / |λ_exact|) of the k largest, both sorted descending: (k,)."""
    error = np.abs(np.sort(top)[::-1] - exact_top)
    return float(error.max()), float((error / np.abs(exact_top)).max())


def run_checkpoint(
    client: Client,
    f: Function,
    w: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    step: int,
    args: argparse.Namespace,
) -> tuple[list[dict], dict]:
    """Every method at one checkpoint w (n,): the table rows and what the checkpoint is."""
    n = w.shape[0]
    w_t, x_t, y_t = (torch.from_numpy(np.ascontiguousarray(a)) for a in (w, x, y))
    loss = torch_loss()
    products = torch_hvps(w_t, x_t, y_t)
    probe = torch.randn(n, generator=torch.Generator().manual_seed(1))
    hvp_seconds = {name: timed(lambda h=h: h(probe), 50).median for name, h in products.items()}
    # PyHessian's product, and the faster of the two here (see hvp_ms in the JSON).
    hvp = products[TORCH_HVP]

    exact_run = timed(lambda: client.spectrum(f, w[None], "exact"), args.repeats)
    exact = exact_run.result
    exact_values = exact.eigenvalues[0].astype(np.float64)
    exact_top = exact_values[::-1][:K]
    rows = []

    def add(
        method: str, seconds: float | None, hvps: int | str, top: np.ndarray, note: str = ""
    ) -> None:
        abs_err, rel_err = compare(top, exact_top)
        rows.append(
            {
                "step": step,
                "method": method,
                "ms": None if seconds is None else 1e3 * seconds,
                "hvps": hvps,
                "max_abs_err": abs_err,
                "rel_err": rel_err,
                "top": np.sort(top)[::-1].tolist(),
                "note": note,
            }
        )

    for steps in args.lanczos_steps:
        run = timed(
            lambda s=steps: client.spectrum(f, w[None], "lanczos", k=K, num_steps=s),
            args.repeats,
        )
        add(
            f"hessd lanczos m={steps}",
            run.median,
            steps,
            run.result.eigenvalues[0, K:],
            f"max Ritz residual {run.result.residuals[0, K:].max():.2e}",
        )
    for steps in args.lanczos_steps:
        run = timed(lambda s=steps: lanczos(hvp, n, s, args.seed), args.repeats)
        add(f"torch lanczos m={steps}", run.median, steps, run.result[-K:])
    for label, max_iter, tol in (
        ("torch power (PyHessian)", PYHESSIAN_MAX_ITER, PYHESSIAN_TOL),
        ("torch power tol=1e-6", args.tight_max_iter, 1e-6),
    ):
        run = timed(
            lambda m=max_iter, t=tol: power_iteration(hvp, n, K, args.seed, m, t), args.repeats
        )
        found, count = run.result
        negative = int((found < 0).sum())
        note = f"{negative} of the {K} found are negative (largest |λ|)" if negative else ""
        add(f"{label} it≤{max_iter}", run.median, count, found, note)
    add(
        "hessd exact (reference)",
        exact_run.median,
        f"n={n}",
        exact_top,
        "float32 eigh on the server",
    )
    run = timed(lambda: dense_eigenvalues(loss_of(loss, x_t, y_t), w_t), args.repeats)
    add(
        "torch dense + eigvalsh",
        run.median,
        f"n={n}",
        run.result[-K:],
        "float32 H, float64 eigvalsh",
    )
    dense64 = dense_eigenvalues(loss_of(loss, x_t.double(), y_t.double()), w_t.double())
    add(
        "torch dense f64 (untimed)",
        None,
        f"n={n}",
        dense64[-K:],
        f"all n: max |Δλ| vs hessd exact {np.abs(dense64 - exact_values).max():.2e}",
    )
    value = client.value(f, w[None])[0]
    info = {
        "step": step,
        "loss_hessd": float(value),
        "loss_torch": float(loss(w_t, x_t, y_t)),
        "gradient_norm": float(exact.gradient_norm[0]),
        "point_class": str(exact.point_class[0]),
        "exact_top": exact_top.tolist(),
        "exact_bottom": exact_values[:K].tolist(),
        "hvp_ms": {name: 1e3 * s for name, s in hvp_seconds.items()},
        "torch_hvp_used": TORCH_HVP,
    }
    return rows, info


def loss_of(loss: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """w -> loss(w, x, y)."""
    return lambda w: loss(w, x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=pathlib.Path, default=DIGITS_RESULTS, help="digits_mlp's --out"
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        default=[0, -1],
        help="indices into checkpoints.npy (default: the first and the last)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lanczos-steps", type=int, nargs="+", default=[40, 80], help="40 is hessd's default"
    )
    parser.add_argument("--tight-max-iter", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent / "results" / "spectrum_vs_torch.json",
    )
    args = parser.parse_args()
    if not (args.data / "checkpoints.npy").exists():
        parser.error(f"{args.data}/checkpoints.npy is missing; run benchmarks/digits_mlp.py first")
    x, y = np.load(args.data / "X.npy"), np.load(args.data / "Y.npy")
    checkpoints = np.load(args.data / "checkpoints.npy")
    steps = [r["step"] for r in json.loads((args.data / "steps.json").read_text())["checkpoints"]]
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]

    proc, address, log = start_server()
    rows, infos = [], []
    try:
        with Client(address, timeout=600) as client:
            server = client.server_info()
            f = client.register(loss_expression(), {"w": (num_params(),)}, {"X": x, "Y": y})
            for index in args.checkpoints:
                new_rows, info = run_checkpoint(
                    client, f, checkpoints[index], x, y, steps[index], args
                )
                rows += new_rows
                infos.append(info)
    except Exception:
        print("".join(log), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(
        f"top-{K} Hessian eigenvalues, digits MLP {SIZES}, n={num_params()}, float32, "
        f"{threads} CPU threads, median of {args.repeats}"
    )
    for info in infos:
        print(
            f"step {info['step']}: loss {info['loss_hessd']:.5f} (torch {info['loss_torch']:.5f}),"
            f" ‖∇f‖ {info['gradient_norm']:.3g}, {info['point_class']}; "
            f"λ_max {info['exact_top'][0]:.5f}, λ_{K} {info['exact_top'][-1]:.5f}, "
            f"λ_min {info['exact_bottom'][0]:.5f}; torch HVP "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in info["hvp_ms"].items())
        )
    print(f"{'step':>5}  {'method':<32}{'ms':>10}{'HVPs':>8}{'max|Δλ|':>11}{'rel err':>10}  note")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        print(
            f"{r['step']:>5}  {r['method']:<32}{ms:>10}{r['hvps']!s:>8}"
            f"{r['max_abs_err']:>11.2e}{r['rel_err']:>10.2e}  {r['note']}"
        )
    meta = {
        "k": K,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "jax_client": jax.__version__,
        "jax_server": server["jax_version"],
        "hessd": server["version"],
        "backend": server["backend"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        # Other work on the same cores inflates every time here, torch's most (its OpenMP
        # threads spin); compare rows of one run only.
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "errors": "the k largest, sorted, against the k largest of hessd exact (float32 eigh)",
        "hessd_ms": "Client.spectrum wall time, RPC and transfer included; X and Y registered once",
        "pyhessian": {"max_iter": PYHESSIAN_MAX_ITER, "tol": PYHESSIAN_TOL},
    }
    write_json(args.out, {"meta": meta, "checkpoints": infos, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
