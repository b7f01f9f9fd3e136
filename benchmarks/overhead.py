"""What the service costs over in-process JAX, on the same work in one run.

For each workload, times
  service:    Client.<kind>(f, X) against a `hessd serve` subprocess on loopback
  in-process: np.asarray(jit(vmap(kind))(X)) in this process
and prints the median of each and their ratio. Both are warmed up first (compiles excluded).

    python benchmarks/overhead.py [--repeats 20] [--out benchmarks/results/overhead-cpu.json]

Run it with JAX_PLATFORMS=cuda (and the server inherits it) to measure on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hessd.client import Client

from _servers import start_server
from _timing import timed, write_json

WORKLOADS = [
    # (kind, n, batch)
    ("gradient", 256, 1024),
    ("hessian", 64, 256),
]
EXPRESSION = "sum(tanh(A @ x)**2)"


def in_process(kind: str, a: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def f(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(a @ x) ** 2)

    transform = {"gradient": jax.grad, "hessian": jax.hessian}[kind](f)
    return jax.jit(jax.vmap(transform))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / f"overhead-{backend}.json"

    proc, address, _ = start_server()
    rows = []
    try:
        with Client(address, timeout=600) as client:
            info = client.server_info()
            for kind, n, batch in WORKLOADS:
                rng = np.random.default_rng(0)
                a = (rng.normal(size=(n, n)) / np.sqrt(n)).astype(np.float32)
                x = rng.normal(size=(batch, n)).astype(np.float32)
                f = client.register(EXPRESSION, {"x": (n,)}, {"A": a})
                compiled = in_process(kind, jnp.asarray(a))
                service = timed(functools.partial(client.compute, f, kind, x), args.repeats)
                local = timed(lambda c=compiled, x=x: np.asarray(c(x)), args.repeats)
                out_bytes = batch * n ** (1 if kind == "gradient" else 2) * 4
                rows.append(
                    {
                        "workload": f"{kind} n={n} batch={batch}",
                        "output_MB": out_bytes / 1e6,
                        "service_ms": 1e3 * service.median,
                        "in_process_ms": 1e3 * local.median,
                    }
                )
                rows[-1]["ratio"] = rows[-1]["service_ms"] / rows[-1]["in_process_ms"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    header = f"{'workload':<28}{'out MB':>8}{'service ms':>12}{'in-proc ms':>12}{'ratio':>8}"
    print(f"backend {backend} ({info['devices'][0]['kind']}), median of {args.repeats}")
    print(header)
    for r in rows:
        print(
            f"{r['workload']:<28}{r['output_MB']:>8.1f}{r['service_ms']:>12.2f}"
            f"{r['in_process_ms']:>12.2f}{r['ratio']:>8.2f}"
        )
    meta = {
        "backend": backend,
        "device": info["devices"][0]["kind"],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
    }
    write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
