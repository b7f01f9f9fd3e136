"""Sparse against dense Jacobians and Hessians, through hessd and in-process JAX.

Two workloads, n from 10³ to 10⁵ unknowns, one point per call:

    pde      the residual of the 2-D Bratu problem on a k x k grid (five-point Laplacian
             plus λ exp(u)), its Jacobian ((k-2)², k²): 7 colours whatever k
    banded   a pentadiagonal objective Σ (x[i+2] - 2x[i+1] + x[i])² + Σ cosh(x), its
             Hessian (n, n): 5 colours whatever n

For each: hessd with sparse=True (the first call, which detects and colours the pattern and
compiles, and the steady median), hessd dense, and in-process dense JAX (jit of jacrev or
hessian). Passes are JVPs/VJPs/HVPs per point; bytes are those of the values on the wire
per point (the sparse pattern's int32 indices travel once per response and are listed
apart). Dense runs that the server refuses (--max-output-bytes) or that would not fit in
this machine's memory are recorded as such, not run.

    .venv/bin/python benchmarks/sparse.py [--sizes 1000 10000 100000] [--repeats 3]

prints a table and writes benchmarks/results/sparse.json.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessd.client import Client, ResourceExhausted

from _servers import start_server
from _timing import timed, wait_for_quiet, write_json

RESULTS = pathlib.Path(__file__).parent / "results" / "sparse.json"
LAMBDA = 1.0
# In-process dense runs whose matrix would exceed this are not attempted.
MEMORY_BUDGET = int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def pde_expression(k: int) -> str:
    h2 = 1.0 / (k - 1) ** 2
    return (
        "c = u[1:-1, 1:-1]\n"
        "u[1:-1, 2:] + u[1:-1, :-2] + u[2:, 1:-1] + u[:-2, 1:-1] - 4 * c"
        f" + {LAMBDA * h2!r} * exp(c)"
    )


def pde_jax(k: int) -> Callable[[jax.Array], jax.Array]:
    h2 = 1.0 / (k - 1) ** 2

    def residual(u: jax.Array) -> jax.Array:
        c = u[1:-1, 1:-1]
        lap = u[1:-1, 2:] + u[1:-1, :-2] + u[2:, 1:-1] + u[:-2, 1:-1] - 4 * c
        return lap + LAMBDA * h2 * jnp.exp(c)

    return residual


BANDED = "sum((x[2:] - 2 * x[1:-1] + x[:-2])**2) + sum(cosh(x))"


def banded_jax(x: jax.Array) -> jax.Array:
    return jnp.sum((x[2:] - 2 * x[1:-1] + x[:-2]) ** 2) + jnp.sum(jnp.cosh(x))


def workloads(n: int) -> list[dict[str, Any]]:
    k = round(math.sqrt(n))
    return [
        {
            "name": "pde",
            "kind": "jacobian",
            "n": k * k,
            "m": (k - 2) ** 2,
            "source": pde_expression(k),
            "inputs": {"u": (k, k)},
            "jax": jax.jacrev(pde_jax(k)),
        },
        {
            "name": "banded",
            "kind": "hessian",
            "n": n,
            "m": n,
            "source": BANDED,
            "inputs": {"x": (n,)},
            "jax": jax.hessian(banded_jax),
        },
    ]


def measure(c: Client, w: dict[str, Any], repeats: int, max_output: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    (shape,) = w["inputs"].values()
    X = 0.1 * rng.standard_normal((1, *shape))
    f = c.register(w["source"], w["inputs"], dtype="float64")
    row: dict[str, Any] = {k: w[k] for k in ("name", "kind", "n", "m")}

    start = time.perf_counter()
    (rows, cols), values = c.compute(f, w["kind"], X, sparse=True, sparse_format="arrays")
    row["sparse_first_s"] = time.perf_counter() - start
    pattern = c.sparsity(f, w["kind"], counts_only=True)
    sparse_run = timed(
        lambda: c.compute(f, w["kind"], X, sparse=True, sparse_format="arrays"), repeats
    )
    row |= {
        "nnz": pattern.nnz,
        "colors": pattern.colors,
        "sparse_passes": pattern.passes,
        "dense_passes": pattern.dense_passes,
        "sparse_s": sparse_run.median,
        "sparse_bytes": pattern.bytes_per_point,
        "index_bytes": rows.nbytes + cols.nbytes,
        "dense_bytes": pattern.dense_bytes_per_point,
        "dense_reason": pattern.dense_reason,
    }
    m, n = pattern.shape

    if pattern.dense_bytes_per_point > max_output:
        try:
            c.compute(f, w["kind"], X)
            row["hessd_dense"] = "ran"  # not expected: the limit should refuse it
        except ResourceExhausted as e:
            row["hessd_dense"] = f"refused: {str(e).split(';')[0]}"
    else:
        dense_run = timed(lambda: c.compute(f, w["kind"], X), 1 if n >= 5000 else repeats)
        dense = np.asarray(dense_run.result).reshape(m, n)
        np.testing.assert_allclose(values[0], dense[rows, cols], rtol=1e-10, atol=1e-12)
        row["hessd_dense_s"] = dense_run.median
        row["hessd_dense"] = "ran"

    if pattern.dense_bytes_per_point * 2 > MEMORY_BUDGET:
        row["jax_dense"] = (
            f"not run: the matrix alone is {pattern.dense_bytes_per_point / 2**30:.1f} GiB, "
            f"over {MEMORY_BUDGET / 2**30:.1f} GiB (40% of this machine's memory)"
        )
    else:
        fn = jax.jit(jax.vmap(w["jax"]))
        x = jnp.asarray(X)
        jax_run = timed(lambda: fn(x).block_until_ready(), 1 if n >= 5000 else repeats)
        row["jax_dense_s"] = jax_run.median
        row["jax_dense"] = "ran"
    return row


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{1e3 * seconds:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'workload':8} {'n':>7} {'nnz':>8} {'passes s/d':>12} {'bytes/pt s/d':>20} "
        f"{'sparse':>10} {'first':>9} {'hessd dense':>12} {'jax dense':>10} "
        f"{'vs hessd':>8} {'vs jax':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        dense, in_process = r.get("hessd_dense_s"), r.get("jax_dense_s")
        speedup = f"{dense / r['sparse_s']:.0f}x" if dense else "-"
        against_jax = f"{in_process / r['sparse_s']:.0f}x" if in_process else "-"
        lines.append(
            f"{r['name']:8} {r['n']:>7} {r['nnz']:>8} "
            f"{r['sparse_passes']:>5}/{r['dense_passes']:<6} "
            f"{r['sparse_bytes']:>9}/{r['dense_bytes']:<10} "
            f"{_fmt(r['sparse_s']):>10} {_fmt(r['sparse_first_s']):>9} "
            f"{_fmt(dense) if dense else 'refused':>12} "
            f"{_fmt(r.get('jax_dense_s')) if r.get('jax_dense_s') else 'no memory':>10} "
            f"{speedup:>8} {against_jax:>7}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-wait", type=float, default=180, help="seconds to wait for a load average < 2.5"
    )
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    load = wait_for_quiet(threshold=2.5, max_wait=args.max_wait)
    proc, address, _ = start_server()
    try:
        with Client(address, timeout=900) as c:
            max_output = c.server_info()["limits"]["max_output_bytes"]
            rows = []
            for n in args.sizes:
                for w in workloads(n):
                    rows.append(measure(c, w, args.repeats, max_output))
                    print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait()
    print(table(rows))
    for r in rows:
        for key in ("hessd_dense", "jax_dense", "dense_reason"):
            if r.get(key) not in (None, "", "ran"):
                print(f"{r['name']} n={r['n']}: {key}: {r[key]}")
    write_json(
        RESULTS,
        {
            "machine": {"cpus": os.cpu_count(), "backend": jax.default_backend()},
            "load_average_at_start": load,
            "load_average_at_end": os.getloadavg()[0],
            "max_output_bytes": max_output,
            "batch": 1,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
