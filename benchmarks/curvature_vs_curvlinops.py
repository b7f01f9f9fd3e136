"""Curvature over a data set: hessd (through the service) against curvlinops (in process).

Three sections, every time the median of interleaved rounds (benchmarks/_timing.py), hessd
with the data resident on the server (Client.put), torch with one thread per core:

    digits     the digits MLP (64-16-10 tanh, 1210 parameters) over all 1,797 images,
               float64, at Adam step 100 (digits_mlp.train): top-10 GGN and Hessian
               eigenvalues (hessd lanczos, its default 80 steps; curvlinops' operator under
               scipy eigsh, ARPACK to machine precision), the Hessian's trace by Hutch++,
               the GGN's diagonal by Hutchinson, by Diag++ (hessd) / XDiag (curvlinops), and
               exactly. Agreement: eigenvalues relative to eigsh; estimates against the
               exact value, in hessd's stated standard errors or as a relative error.
    large      an MLP 256-2048-512-10 (1,580,554 parameters), float32, on 2,048 synthetic
               examples: one Hessian-vector product with the chunk the server picks
               (chunk_size=0) and with a set chunk, against curvlinops' HVP, with XLA's temp
               bytes per chunk; then top-2 Lanczos (8 steps, one run each: hessd against
               the same Lanczos in torch, spectrum_vs_torch.lanczos, on curvlinops' HVP).
    memory     the digits MLP's HVP as its data set grows 10x and 100x (the digits with
               noise) at a fixed chunk, and in one chunk, each in a fresh server: its peak
               RSS over the first call above its RSS once the data is resident, and XLA's
               temp bytes of the compiled pass (memory_analysis) — what the chunk bounds.

    python benchmarks/curvature_vs_curvlinops.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import platform
import sys
import time
import warnings
from collections.abc import Callable

import jax
import numpy as np
import scipy.sparse.linalg

with warnings.catch_warnings():
    # linear_operator (a curvlinops dependency) calls the deprecated torch.jit.script.
    warnings.simplefilter("ignore", DeprecationWarning)
    import curvlinops
    import torch

from digits_mlp import train
from spectrum_vs_torch import lanczos as torch_lanczos

from hessd.client import Client, Function

from _models import init_params, load_data, param_layout
from _servers import start_server
from _timing import interleaved, median_ms, write_json

warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)

LOSS = "softmax_cross_entropy"
DIGITS_SIZES = (64, 16, 10)
DIGITS_STEP = 100
K = 10
MATVECS = 102  # each stochastic estimate: a multiple of 3 (Hutch++) and of 2 (XDiag)
LARGE_SIZES = (256, 2048, 512, 10)
LARGE_EXAMPLES = 2048
LARGE_CHUNKS = (0, 32)  # 0: the server's choice
LARGE_K, LARGE_STEPS = 2, 8
MEMORY_CHUNK = 256
MEMORY_SCALES = (1, 10, 100)
RESULTS = pathlib.Path(__file__).parent / "results" / "curvature_vs_curvlinops.json"


# The model on both sides -------------------------------------------------------------


def model_expression(sizes: tuple[int, ...]) -> str:
    """The MLP's logits as a hessd expression of the flat w (_models.param_layout: W (in,
    out), b, layer by layer) and one example x: tanh on every layer but the last."""
    lines = []
    for name, (start, stop, shape) in param_layout(sizes).items():
        piece = f"w[{start}:{stop}]"
        lines.append(
            f"{name} = reshape({piece}, {shape})" if len(shape) > 1 else f"{name} = {piece}"
        )
    layers = len(sizes) - 1
    h = "x"
    for i in range(1, layers):
        h = f"tanh({h} @ W{i} + b{i})"
    lines.append(f"{h} @ W{layers} + b{layers}")
    return "\n".join(lines)


def torch_order(sizes: tuple[int, ...]) -> np.ndarray:
    """PERM with torch's flat parameters (Linear weights (out, in), biases) = w[PERM]."""
    perm = []
    for _, (start, stop, shape) in param_layout(sizes).items():
        index = np.arange(start, stop)
        perm.append(index.reshape(shape).T.ravel() if len(shape) > 1 else index)
    return np.concatenate(perm)


def torch_mlp(sizes: tuple[int, ...], w: np.ndarray) -> torch.nn.Sequential:
    """The same MLP in torch, its parameters w (in w's dtype)."""
    dtype = torch.float64 if w.dtype == np.float64 else torch.float32
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [
            torch.nn.Linear(fan_in, fan_out, dtype=dtype),
            torch.nn.Tanh(),
        ]
    model = torch.nn.Sequential(*layers[:-1])
    flat = torch.from_numpy(w[torch_order(sizes)])
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
    return model


class Peer:
    """curvlinops' operators of one model and data set, in hessd's parameter order."""

    def __init__(self, sizes: tuple[int, ...], w: np.ndarray, x: np.ndarray, labels: np.ndarray):
        self.perm = torch_order(sizes)
        model = torch_mlp(sizes, w)
        params = list(model.parameters())
        data = [(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)))]
        loss = torch.nn.CrossEntropyLoss(reduction="mean")
        self.operators = {
            "hessian": curvlinops.HessianLinearOperator(model, loss, params, data),
            "ggn": curvlinops.GGNLinearOperator(model, loss, params, data),
        }

    def apply(self, operator: str, vectors: np.ndarray) -> np.ndarray:
        """C V for V (k, p) in hessd's order: (k, p)."""
        columns = torch.from_numpy(np.ascontiguousarray(vectors[:, self.perm].T))
        out = np.empty_like(vectors)
        out[:, self.perm] = (self.operators[operator] @ columns).numpy().T
        return out

    def hessd_order(self, torch_flat: torch.Tensor) -> np.ndarray:
        out = np.empty(len(self.perm), torch_flat.numpy().dtype)
        out[self.perm] = torch_flat.numpy()
        return out


class Counted(scipy.sparse.linalg.LinearOperator):
    """A scipy operator that counts its matvecs."""

    def __init__(self, inner: scipy.sparse.linalg.LinearOperator):
        super().__init__(inner.dtype, inner.shape)
        self.inner, self.count = inner, 0

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        self.count += 1
        return self.inner.matvec(v)


# Sections -----------------------------------------------------------------------------


def first_calls(methods: dict[str, Callable[[], object]]) -> tuple[dict, dict[str, float]]:
    """Call each method once (compiles, first transfers): what each returned, and seconds."""
    results, seconds = {}, {}
    for name, fn in methods.items():
        start = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - start
    return results, seconds


def pair(
    name: str,
    methods: dict[str, Callable[[], object]],
    repeats: int,
    agreement: Callable[[dict[str, object]], dict],
    matvecs: dict[str, int | str],
) -> dict:
    """Warm both up, time them interleaved, and judge what they returned."""
    results, warm = first_calls(methods)
    times, _ = interleaved(methods, {m: repeats for m in methods})
    row = {"task": name, "warmup_s": warm, "matvecs": matvecs}
    row["ms"] = {m: median_ms(t) for m, t in times.items()}
    row["hessd_over_curvlinops"] = row["ms"]["hessd"] / row["ms"]["curvlinops"]
    row["agreement"] = agreement(results)
    print(f"  {name}: " + ", ".join(f"{m} {v:.0f} ms" for m, v in row["ms"].items()), flush=True)
    return row


def digits_section(
    client: Client, repeats: int, x: np.ndarray, labels: np.ndarray, w: np.ndarray
) -> tuple[list[dict], dict]:
    p = w.shape[0]
    f = client.register(model_expression(DIGITS_SIZES), {"w": (p,), "x": (64,)}, dtype="float64")
    data = {"x": client.put(x), "y": client.put(labels)}
    peer = Peer(DIGITS_SIZES, w, x, labels)
    eye = np.eye(p)
    dense = {
        name: np.concatenate([peer.apply(name, eye[i : i + 242]) for i in range(0, p, 242)])
        for name in ("hessian", "ggn")
    }
    exact = {name: np.linalg.eigvalsh(m) for name, m in dense.items()}
    over = {"data": data, "loss": LOSS}
    rows = []

    for operator in ("ggn", "hessian"):
        counted = Counted(peer.operators[operator].to_scipy(np.float64))

        def theirs(counted: Counted = counted) -> np.ndarray:
            counted.count = 0
            values = scipy.sparse.linalg.eigsh(counted, k=K, which="LA", return_eigenvectors=False)
            return np.sort(values)

        def ours(operator: str = operator) -> np.ndarray:
            return client.spectrum(f, w[None], "lanczos", operator=operator, k=K, **over)

        def agreement(r: dict, operator: str = operator) -> dict:
            top, want = r["hessd"].eigenvalues[0, -K:], r["curvlinops"]
            return {
                "top": want[::-1].tolist(),
                "max_rel_diff": float(np.max(np.abs(top - want) / np.abs(want))),
                "eigsh_vs_dense_max_rel": float(
                    np.max(np.abs(want - exact[operator][-K:]) / np.abs(want))
                ),
                "hessd_max_residual": float(r["hessd"].residuals[0, -K:].max()),
            }

        row = pair(
            f"top-{K} {operator} eigenvalues",
            {"hessd": ours, "curvlinops": theirs},
            repeats,
            agreement,
            {"hessd": 80, "curvlinops": "eigsh"},
        )
        row["matvecs"]["curvlinops"] = counted.count
        rows.append(row)

    trace = float(np.trace(dense["hessian"]))

    def trace_agreement(r: dict) -> dict:
        ours, theirs = r["hessd"], float(r["curvlinops"])
        se = float(ours.trace_std_error[0])
        return {
            "exact": trace,
            "hessd": float(ours.trace[0]),
            "hessd_std_error": se,
            "curvlinops": theirs,
            "hessd_error_in_se": (float(ours.trace[0]) - trace) / se,
            "curvlinops_error_in_hessd_se": (theirs - trace) / se,
        }

    rows.append(
        pair(
            f"hessian trace, Hutch++ {MATVECS} matvecs",
            {
                "hessd": lambda: client.spectrum(
                    f,
                    w[None],
                    "trace",
                    operator="hessian",
                    trace_estimator="hutch++",
                    num_matvecs=MATVECS,
                    **over,
                ),
                "curvlinops": lambda: curvlinops.hutchpp_trace(peer.operators["hessian"], MATVECS),
            },
            repeats,
            trace_agreement,
            {"hessd": MATVECS, "curvlinops": MATVECS},
        )
    )

    diagonal = np.diag(dense["ggn"])

    def diagonal_agreement(r: dict) -> dict:
        ours = r["hessd"]["diagonal"][0]
        theirs = peer.hessd_order(r["curvlinops"])
        norm = np.linalg.norm(diagonal)
        return {
            "hessd_rel_error": float(np.linalg.norm(ours - diagonal) / norm),
            "curvlinops_rel_error": float(np.linalg.norm(theirs - diagonal) / norm),
            "hessd_median_std_error_rel": float(
                np.median(r["hessd"]["std_error"][0]) / np.median(np.abs(diagonal))
            ),
        }

    for ours_name, theirs_name, theirs_fn in (
        ("hutchinson", "hutchinson_diag", curvlinops.hutchinson_diag),
        ("diag++", "xdiag", curvlinops.xdiag),
    ):
        rows.append(
            pair(
                f"ggn diagonal, {ours_name} / {theirs_name} {MATVECS} matvecs",
                {
                    "hessd": lambda e=ours_name: client.diagonal(
                        f,
                        w[None],
                        operator="ggn",
                        diagonal_estimator=e,
                        num_matvecs=MATVECS,
                        seed=1,
                        **over,
                    ),
                    "curvlinops": lambda fn=theirs_fn: fn(peer.operators["ggn"], MATVECS),
                },
                repeats,
                diagonal_agreement,
                {"hessd": MATVECS, "curvlinops": MATVECS},
            )
        )

    def exact_diagonal_agreement(r: dict) -> dict:
        ours, theirs = r["hessd"]["diagonal"][0], np.diag(r["curvlinops"])
        return {"max_rel_diff": float(np.abs(ours - theirs).max() / np.abs(theirs).max())}

    rows.append(
        pair(
            "ggn diagonal, exact",
            {
                "hessd": lambda: client.diagonal(
                    f, w[None], operator="ggn", diagonal_estimator="exact", **over
                ),
                # curvlinops has no exact diagonal: the operator applied to I, in blocks.
                "curvlinops": lambda: np.concatenate(
                    [peer.apply("ggn", eye[i : i + 242]) for i in range(0, p, 242)]
                ),
            },
            repeats,
            exact_diagonal_agreement,
            {"hessd": p, "curvlinops": p},
        )
    )
    info = {
        "sizes": list(DIGITS_SIZES),
        "parameters": p,
        "examples": len(x),
        "dtype": "float64",
        "hessian_extremes": [float(exact["hessian"][0]), float(exact["hessian"][-1])],
        "ggn_extremes": [float(exact["ggn"][0]), float(exact["ggn"][-1])],
    }
    return rows, info


def server_chunk(f: Function, examples: int, columns: int = 1) -> int:
    """The chunk the server picks (chunk_size=0) for a pass over `examples` with `columns`
    vectors: hessd.service.curvature.chunk_for, as the servicer calls it."""
    from hessd.proto.kinds import BuiltinLoss
    from hessd.service import curvature
    from hessd.service.program import build_program

    program = build_program(f.spec)
    objective = curvature.Objective(
        data=(1,), examples=examples, chunk=1, loss=BuiltinLoss.SOFTMAX_CROSS_ENTROPY
    )
    return curvature.chunk_for(
        program,
        program.wrt(["w"], flatten=True),
        objective,
        columns,
        curvature.device_budget(),
        0,
        curvature.device_memory_bytes(),
    )


def large_section(client: Client, repeats: int) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    sizes = LARGE_SIZES
    x = rng.normal(size=(LARGE_EXAMPLES, sizes[0])).astype(np.float32)
    teacher = rng.normal(size=(sizes[0], sizes[-1]))
    labels = np.argmax(x @ teacher, axis=1).astype(np.int32)
    w = np.array(init_params(0, sizes), np.float32)  # writable, for torch.from_numpy
    p = w.shape[0]
    f = client.register(model_expression(sizes), {"w": (p,), "x": (sizes[0],)}, dtype="float32")
    data = {"x": client.put(x), "y": client.put(labels)}
    peer = Peer(sizes, w, x, labels)
    v = rng.normal(size=(1, p)).astype(np.float32)
    chosen = server_chunk(f, LARGE_EXAMPLES)
    methods: dict[str, Callable[[], object]] = {
        f"hessd chunk {c or chosen}{' (server)' if c == 0 else ''}": lambda c=c: client.hvp(
            f, w[None], v, data=data, loss=LOSS, chunk_size=c
        )
        for c in LARGE_CHUNKS
    }
    methods["curvlinops"] = lambda: peer.apply("hessian", v)
    results, warm = first_calls(methods)
    times, _ = interleaved(methods, {m: repeats for m in methods})
    reference = results["curvlinops"]
    hvp_row = {
        "task": "hessian-vector product",
        "warmup_s": warm,
        # What the chunk costs in memory: XLA's temporaries of the compiled pass.
        "xla_temp_mib": {
            c or chosen: xla_temp_bytes(f, LARGE_EXAMPLES, c or chosen) / (1 << 20)
            for c in LARGE_CHUNKS
        },
        "ms": {m: median_ms(t) for m, t in times.items()},
        "agreement": {
            m: float(np.linalg.norm(r - reference) / np.linalg.norm(reference))
            for m, r in results.items()
            if m != "curvlinops"
        },
    }
    print(
        "  large HVP: " + ", ".join(f"{m} {t:.0f} ms" for m, t in hvp_row["ms"].items()), flush=True
    )

    fastest = min((m for m in hvp_row["ms"] if m.startswith("hessd")), key=hvp_row["ms"].get)
    chunk = int(fastest.split()[2])
    start = time.perf_counter()
    ours = client.spectrum(
        f,
        w[None],
        "lanczos",
        data=data,
        loss=LOSS,
        k=LARGE_K,
        num_steps=LARGE_STEPS,
        chunk_size=chunk,
    )
    ours_s = time.perf_counter() - start
    hessian = peer.operators["hessian"]
    start = time.perf_counter()
    theirs = torch_lanczos(lambda u: hessian @ u, p, LARGE_STEPS, seed=0)
    theirs_s = time.perf_counter() - start
    top, want = ours.eigenvalues[0, -LARGE_K:], theirs[-LARGE_K:]
    lanczos_row = {
        "task": f"top-{LARGE_K} hessian eigenvalues, lanczos {LARGE_STEPS} steps",
        "ms": {f"hessd chunk {chunk}": 1e3 * ours_s, "curvlinops": 1e3 * theirs_s},
        "runs": 1,
        "hessd_top": top[::-1].tolist(),
        "curvlinops_top": want[::-1].tolist(),
        "hessd_residuals": ours.residuals[0, -LARGE_K:][::-1].tolist(),
        "agreement": {"top1_rel_diff": float(abs(top[-1] - want[-1]) / abs(want[-1]))},
        "note": "one run each, hessd's compile included; different Gaussian starts, so only "
        "converged Ritz values agree",
    }
    print(f"  large lanczos: hessd {ours_s:.1f} s, curvlinops {theirs_s:.1f} s", flush=True)
    info = {
        "sizes": list(sizes),
        "parameters": p,
        "examples": LARGE_EXAMPLES,
        "dtype": "float32",
        "server_chunk": chosen,
        "server_chunk_note": "chunk_size=0: hessd.service.curvature.chunk_for with the server's "
        "CPU budget (256 MiB) and its per-example estimate",
    }
    return [hvp_row, lanczos_row], info


def rss_kib(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of process `pid`, KiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def xla_temp_bytes(f: Function, examples: int, chunk: int) -> int:
    """XLA's temp bytes of the compiled HVP pass (one point) over `examples` in `chunk`s."""
    import jax.numpy as jnp

    from hessd.proto.kinds import BuiltinLoss, Kind
    from hessd.service.curvature import CurvatureRequest, Objective
    from hessd.service.program import build_program

    program = build_program(f.spec)
    p = f.inputs["w"][0]
    objective = Objective(
        data=(1,), examples=examples, chunk=chunk, loss=BuiltinLoss.SOFTMAX_CROSS_ENTROPY
    )
    request = CurvatureRequest(
        kind=Kind.HVP, wrt=program.wrt(["w"], flatten=True), shared=(2, 3, 4), objective=objective
    )
    padded, dtype = objective.examples, jnp.dtype(f.dtype)  # the data as sent, unpadded
    avals = [
        jax.ShapeDtypeStruct((1, p), dtype),
        jax.ShapeDtypeStruct((1, p), dtype),
        jax.ShapeDtypeStruct((padded, f.inputs["x"][0]), dtype),
        jax.ShapeDtypeStruct((padded,), jnp.int32),
        jax.ShapeDtypeStruct((padded,), dtype),
    ]
    compiled = jax.jit(request.transform(program)).lower(*avals).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_section(x0: np.ndarray, labels0: np.ndarray, w: np.ndarray) -> list[dict]:
    """Each (N, chunk) in a fresh server: its peak RSS over the first HVP (compile
    included, the same program each time) above its RSS once the data is resident. A
    second call in the same server would show nothing: freed memory stays in the process."""
    from hessd.service.server import enable_x64

    enable_x64()
    p = w.shape[0]
    rng = np.random.default_rng(3)
    v = rng.normal(size=(1, p))
    rows = []
    for scale in MEMORY_SCALES:
        n = scale * len(x0)
        index = np.arange(n) % len(x0)
        x = x0[index] + (0.1 * rng.normal(size=(n, 64)) if scale > 1 else 0)
        labels = labels0[index]
        for chunk in (MEMORY_CHUNK, n):
            if chunk == n and scale == MEMORY_SCALES[-1]:
                continue  # one chunk of 179,700 examples: gigabytes, the point made at 10x
            proc, address, log = start_server()
            try:
                with Client(address, timeout=600) as client:
                    f = client.register(
                        model_expression(DIGITS_SIZES), {"w": (p,), "x": (64,)}, dtype="float64"
                    )
                    data = {"x": client.put(x), "y": client.put(labels)}
                    before = rss_kib(proc.pid, "VmRSS")
                    start = time.perf_counter()
                    client.hvp(f, w[None], v, data=data, loss=LOSS, chunk_size=chunk)
                    seconds = time.perf_counter() - start
                    peak = rss_kib(proc.pid, "VmHWM")
            except Exception:
                print("".join(log), file=sys.stderr)
                raise
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            row = {
                "examples": n,
                "chunk": chunk,
                "data_bytes": int(x.nbytes + labels.nbytes),
                "rss_before_mib": before / 1024,
                "peak_above_before_mib": (peak - before) / 1024,
                "xla_temp_mib": xla_temp_bytes(f, n, chunk) / (1 << 20),
                "first_hvp_ms": 1e3 * seconds,
            }
            rows.append(row)
            print(
                f"  memory N={n} chunk={chunk}: peak +{row['peak_above_before_mib']:.1f} MiB, "
                f"XLA temp {row['xla_temp_mib']:.2f} MiB",
                flush=True,
            )
    return rows


# Output -------------------------------------------------------------------------------


def print_tables(digits: list[dict], large: list[dict], memory: list[dict], infos: dict) -> None:
    d = infos["digits"]
    print(
        f"\ndigits MLP {d['sizes']}, p={d['parameters']}, N={d['examples']}, float64, "
        f"Adam step {DIGITS_STEP}"
    )
    print(f"{'task':<46}{'hessd ms':>10}{'curvl. ms':>11}{'ratio':>7}  matvecs  agreement")
    for r in digits:
        a = r["agreement"]
        if "max_rel_diff" in a and "top" in a:
            agree = f"max rel diff {a['max_rel_diff']:.1e}"
        elif "hessd_error_in_se" in a:
            ours, theirs = a["hessd_error_in_se"], a["curvlinops_error_in_hessd_se"]
            agree = f"error/se: hessd {ours:+.2f}, curvlinops {theirs:+.2f}"
        elif "hessd_rel_error" in a:
            ours, theirs = a["hessd_rel_error"], a["curvlinops_rel_error"]
            agree = f"rel error: hessd {ours:.3f}, curvlinops {theirs:.3f}"
        else:
            agree = f"max rel diff {a['max_rel_diff']:.1e}"
        m = r["matvecs"]
        print(
            f"{r['task']:<46}{r['ms']['hessd']:>10.0f}{r['ms']['curvlinops']:>11.0f}"
            f"{r['hessd_over_curvlinops']:>7.2f}  {m['hessd']}/{m['curvlinops']:<5}  {agree}"
        )
    g = infos["large"]
    print(
        f"\nlarge MLP {g['sizes']}, p={g['parameters']:,}, N={g['examples']}, float32; "
        f"server's chunk {g['server_chunk']}"
    )
    for r in large:
        agreement = r["agreement"]
        for method, ms in r["ms"].items():
            rel = (
                agreement.get(method, agreement.get("top1_rel_diff", ""))
                if method != "curvlinops"
                else ""
            )
            rel = f"{rel:.1e}" if isinstance(rel, float) else rel
            print(f"{r['task']:<52}{method:<24}{ms:>10.0f} ms  {rel}")
    print(f"\nmemory: digits MLP HVP, data grown, chunk {MEMORY_CHUNK} or one chunk")
    print(
        f"{'examples':>9}{'chunk':>8}{'data MiB':>10}{'peak+ MiB':>11}{'XLA temp MiB':>14}{'ms':>8}"
    )
    for r in memory:
        print(
            f"{r['examples']:>9}{r['chunk']:>8}{r['data_bytes'] / (1 << 20):>10.1f}"
            f"{r['peak_above_before_mib']:>11.1f}{r['xla_temp_mib']:>14.2f}{r['first_hvp_ms']:>8.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    x32, onehot = load_data()
    (w32,), records = train(x32, onehot, steps=(DIGITS_STEP,))
    x, labels = x32.astype(np.float64), onehot.argmax(axis=1).astype(np.int32)
    w = w32.astype(np.float64)
    proc, address, log = start_server()
    try:
        with Client(address, timeout=900) as client:
            server = client.server_info()
            torch.set_default_dtype(torch.float64)
            print("digits", flush=True)
            digits, digits_info = digits_section(client, args.repeats, x, labels, w)
            digits_info["checkpoint"] = records[0]
            torch.set_default_dtype(torch.float32)
            print("large", flush=True)
            large, large_info = large_section(client, max(1, args.repeats - 1))
    except Exception:
        print("".join(log), file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("memory", flush=True)
    memory = memory_section(x, labels, w)
    infos = {"digits": digits_info, "large": large_info}
    print_tables(digits, large, memory, infos)
    meta = {
        "repeats": args.repeats,
        "cpus": threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "curvlinops": "3.0.1",
        "jax_client": jax.__version__,
        "jax_server": server["jax_version"],
        "hessd": server["version"],
        "backend": server["backend"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        # Other work on the same cores inflates every time; compare rows of one run only.
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "total_seconds": time.perf_counter() - start,
        "hessd_ms": "Client wall time, RPC included; the data set resident (Client.put)",
        "curvlinops_ms": "in this process, operators built once (not timed)",
    }
    write_json(
        args.out,
        {"meta": meta, "models": infos, "digits": digits, "large": large, "memory": memory},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
