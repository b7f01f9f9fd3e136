"""Checks three hessd replicas running in Docker, from the host, with hessd's own client.

    python docker/check_replicas.py --replica NAME=127.0.0.1:PORT (three times) [--checks ...]

NAME is the container (name or id) behind each published gRPC port: the checks kill, stop,
restart and read the logs of containers with the `docker` command line. docker/test.sh
starts the replicas and runs this; docker/README.md lists what each check shows. Every check
prints PASS or FAIL, its wall time and what it saw; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hessd.client import Client, HessdError
from hessd.proto.oip import grpc_predict_v2_pb2 as oip_pb2

CHECKS = ("health", "healthcheck", "quickstart", "oip", "spread", "kill", "cache", "drain")
# The image's compile-cache volume (docker/Dockerfile.cpu: --compile-cache-dir).
CACHE_DIR = "/var/cache/hessd/jax"
# What service/engine.py logs at INFO for every executable it builds.
COMPILED = re.compile(r"hessd\.service\.engine: compiled (\S+) (\S+) bucket=(\d+) in ([\d.]+) s")
SERVING = health_pb2.HealthCheckResponse.SERVING
DOCKER = os.environ.get("DOCKER", "docker")


class CheckFailed(Exception):
    """A check saw something other than what it requires."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclasses.dataclass(frozen=True)
class Replica:
    container: str
    address: str

    @classmethod
    def parse(cls, text: str) -> Replica:
        container, sep, address = text.partition("=")
        if not sep or ":" not in address:
            raise argparse.ArgumentTypeError(f"expected CONTAINER=HOST:PORT, got {text!r}")
        return cls(container, address)


def docker(*args: str) -> str:
    """Run `docker ARGS`; its stdout and stderr together (docker logs writes the container's
    stderr, where the server logs, to stderr)."""
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout + done.stderr


def health(address: str, service: str = "", timeout: float = 2.0) -> str:
    """grpc.health.v1 Check over a channel of its own: the status name, or the error code."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(address: str, timeout: float = 180.0) -> float:
    """Seconds until `address` says SERVING (a replica imports JAX before it listens)."""
    start = time.monotonic()
    while (status := health(address)) != "SERVING":
        require(time.monotonic() - start < timeout, f"{address}: {status} after {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


def server_id(address: str) -> str:
    with Client(address, timeout=10.0) as c:
        return c.server_info()["server_id"]


def compiled_lines(replica: Replica) -> list[re.Match]:
    """Every "compiled ..." line the container logged, over all its runs (docker logs keeps a
    restarted container's earlier output)."""
    return [
        m for line in docker("logs", replica.container).splitlines() if (m := COMPILED.search(line))
    ]


def cache_entries(replica: Replica) -> set[str]:
    """The JAX persistent-cache entries on the replica's volume (one `<key>-cache` file per
    executable written)."""
    listing = docker("exec", replica.container, "ls", "-1", CACHE_DIR).split()
    return {name for name in listing if name.endswith("-cache")}


# ---- the checks: each returns what it saw, or raises CheckFailed


def check_health(replicas: list[Replica], args) -> str:
    seen = []
    for r in replicas:
        seconds = wait_serving(r.address)
        named = health(r.address, "hessd.v1.Hessd")
        require(named == "SERVING", f"{r.address}: hessd.v1.Hessd is {named}")
        seen.append(f"{r.address} SERVING (+{seconds:.1f} s)")
    return "grpc.health.v1 '' and hessd.v1.Hessd: " + ", ".join(seen)


def check_docker_healthcheck(replicas: list[Replica], args) -> str:
    """The image's HEALTHCHECK, as Docker runs it (every 15 s) inside each container."""
    deadline = time.monotonic() + 90
    states = {}
    for r in replicas:
        while (
            state := docker("inspect", "-f", "{{.State.Health.Status}}", r.container).strip()
        ) != "healthy":
            require(state == "starting" and time.monotonic() < deadline, f"{r.container}: {state}")
            time.sleep(1)
        states[r.container] = state
    return ", ".join(f"{name} {state}" for name, state in states.items())


def check_quickstart(replicas: list[Replica], args) -> str:
    """The README's quickstart block as written, with a client over all the replicas."""
    text = Path(args.readme).read_text()
    match = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", text, re.DOTALL)
    require(match is not None, f"{args.readme} has no quickstart block")
    code = match.group(1)
    require(
        code.count('"127.0.0.1:50051"') == 1, "the quickstart no longer connects to one address"
    )
    code = code.replace('"127.0.0.1:50051"', repr([r.address for r in replicas]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md quickstart", "exec"), {"__name__": "quickstart"})
    printed = out.getvalue().strip().splitlines()
    require(printed[:1] == ["cpu"], f"server_info backend: {printed[:1]}")
    return f"Client({[r.address for r in replicas]}): printed " + " | ".join(printed)


def check_oip(replicas: list[Replica], args) -> str:
    """The Open Inference Protocol on each replica's port: ServerReady, then a Hessian of a
    function registered there under a name, against hessd.v1's."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    seen = []
    for r in replicas:
        with Client(r.address, timeout=60) as c:
            f = c.register("sum(x ** 2) * prod(x)", inputs={"x": (3,)}, dtype="float64",
                           name="docker-check")  # fmt: skip
            expected = c.hessian(f, x)
        with grpc.insecure_channel(r.address) as channel:

            def call(method: str, request, reply):
                return channel.unary_unary(
                    f"/inference.GRPCInferenceService/{method}",
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=reply.FromString,
                )(request, timeout=60)

            ready = call("ServerReady", oip_pb2.ServerReadyRequest(), oip_pb2.ServerReadyResponse)
            require(ready.ready, f"{r.container}: ServerReady false")
            request = oip_pb2.ModelInferRequest(model_name="docker-check", model_version="hessian")
            request.inputs.add(name="x", datatype="FP64", shape=x.shape)
            request.raw_input_contents.append(x.tobytes())
            reply = call("ModelInfer", request, oip_pb2.ModelInferResponse)
            (out,) = reply.outputs
            got = np.frombuffer(reply.raw_output_contents[0], np.float64).reshape(out.shape)
            require(
                np.array_equal(got, expected), f"{r.container}: ModelInfer differs from hessd.v1"
            )
        seen.append(f"{r.container} {out.name} {list(out.shape)} {out.datatype}")
    return "ServerReady and ModelInfer equal to hessd.v1: " + ", ".join(seen)


def check_spread(replicas: list[Replica], args) -> str:
    ids = {server_id(r.address): r.container for r in replicas}
    require(len(ids) == len(replicas), f"replicas share a server_id: {ids}")
    counts: collections.Counter[str] = collections.Counter()
    with Client([r.address for r in replicas], timeout=10.0) as c:
        for _ in range(args.calls):
            counts[c.server_info()["server_id"]] += 1
    require(set(counts) <= set(ids), f"a server_id no replica reported alone: {counts}")
    missed = [name for sid, name in ids.items() if counts[sid] == 0]
    require(not missed, f"no call of {args.calls} reached {missed}")
    per = ", ".join(f"{ids[sid]} {counts[sid]}" for sid in ids)
    return f"{args.calls} ServerInfo calls over one client, {len(counts)} distinct server_id: {per}"


def check_kill(replicas: list[Replica], args) -> str:
    """`docker kill` (SIGKILL) one replica while 4 threads call through one client."""
    victim = replicas[1]
    victim_id = server_id(victim.address)
    x = np.random.default_rng(1).normal(size=(8, 3))
    records = []  # (start, end, ok, server_id or error)
    lock, stop = threading.Lock(), threading.Event()
    with Client([r.address for r in replicas], timeout=30.0) as c:
        f = c.register("sum(x ** 2)", inputs={"x": (3,)}, dtype="float64")
        for _ in range(3 * len(replicas)):  # every replica has compiled it
            c.gradient(f, x)

        def loop() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    ok = bool(np.allclose(c.gradient(f, x), 2 * x))
                    seen = c.server_info()["server_id"]
                except HessdError as e:
                    ok, seen = False, repr(e)
                with lock:
                    records.append((start, time.monotonic(), ok, seen))

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(2.0)
            kill_start = time.monotonic()
            docker("kill", victim.container)
            killed = time.monotonic()
            time.sleep(4.0)
        finally:
            stop.set()
            for t in threads:
                t.join()
        failed = [r for r in records if not r[2]]
        in_flight = sum(1 for s, e, _, _ in records if s < kill_start < e)
        before = {seen for s, _, ok, seen in records if ok and s < kill_start}
        after = [seen for s, _, ok, seen in records if ok and s > killed]
        require(not failed, f"{len(failed)} of {len(records)} calls failed: {failed[:1]}")
        require(victim_id in before, "no call reached the victim before the kill")
        require(len(after) > 0, "no call completed after the kill")
        require(victim_id not in after, "a call started after the kill reached the killed replica")
        # Back in rotation: the same client reaches the restarted replica's new process.
        docker("start", victim.container)
        back = wait_serving(victim.address)
        new_id = server_id(victim.address)
        rejoin_start = time.monotonic()
        while c.server_info()["server_id"] != new_id:
            require(
                time.monotonic() - rejoin_start < 15, "the restarted replica got no call in 15 s"
            )
        rejoined = time.monotonic() - rejoin_start
    return (
        f"killed {victim.container}: {len(records)} calls, 0 failed ({in_flight} in flight at "
        f"the kill, {len(after)} after it, none on the victim); docker start: SERVING in "
        f"{back:.1f} s, the same client reached it after {rejoined:.2f} s"
    )


def check_cache(replicas: list[Replica], args) -> str:
    """A replica restarted with its compile-cache volume builds its first executable from the
    volume, not by compiling.

    hessd logs "compiled ..." (and counts hessd_compiles) for every executable it builds,
    whether XLA compiled it or JAX loaded it from the persistent cache, so those alone cannot
    tell the two apart. What tells them apart is the volume: a compilation writes a new
    `<key>-cache` entry, a load writes none. The function carries a random constant, so no
    earlier run can have cached it. Required: its first call writes an entry; the volume
    still holds it after the restart; the restarted process's first call builds exactly one
    executable (the log line) and writes nothing; and, as a control that the restarted
    process does write entries, a new batch size on it writes one.
    """
    r = replicas[2]
    scale = 1.0 + secrets.randbelow(10**6) / 10**6
    rng = np.random.default_rng(2)
    x4, x8 = rng.normal(size=(4, 3)), rng.normal(size=(8, 3))

    def expected(x: np.ndarray) -> np.ndarray:  # d²/dx² (c sin²x + x²) = 2c cos 2x + 2
        return np.stack([np.diag(2 * scale * np.cos(2 * p) + 2) for p in x])

    with Client(r.address, timeout=60.0) as c:
        f = c.register(
            f"{scale!r} * sum(sin(x) ** 2) + sum(x * x)", inputs={"x": (3,)}, dtype="float64"
        )
        entries0, lines0 = cache_entries(r), len(compiled_lines(r))
        require(np.allclose(c.hessian(f, x4), expected(x4)), "wrong Hessian before the restart")
        entries1, first = cache_entries(r), compiled_lines(r)[lines0:]
    require(len(first) == 1, f"the first call built {len(first)} executables, expected 1")
    require(len(entries1 - entries0) >= 1, "a compilation wrote no cache entry: is the cache on?")
    old_id = server_id(r.address)

    restart = time.monotonic()
    docker("restart", "-t", "40", r.container)
    serving = wait_serving(r.address)
    restarted = time.monotonic() - restart
    require(server_id(r.address) != old_id, "the same server_id after docker restart")
    entries2, lines2 = cache_entries(r), len(compiled_lines(r))
    require(
        entries2 == entries1,
        f"the volume changed across the restart: {sorted(entries2 ^ entries1)}",
    )
    with Client(r.address, timeout=60.0) as c:
        # f is unknown to the new process: the client sends its spec again, transparently.
        require(np.allclose(c.hessian(f, x4), expected(x4)), "wrong Hessian after the restart")
        entries3, again = cache_entries(r), compiled_lines(r)[lines2:]
        require(len(again) == 1, f"the first call after the restart built {len(again)} executables")
        require(again[0].group(1) == first[0].group(1), "it built another function's executable")
        require(
            entries3 == entries2, f"it compiled: new cache entries {sorted(entries3 - entries2)}"
        )
        require(np.allclose(c.hessian(f, x8), expected(x8)), "wrong Hessian for batch 8")
        entries4 = cache_entries(r)
    require(
        len(entries4 - entries3) >= 1, "control: a new batch size wrote no entry after the restart"
    )
    return (
        f"{r.container}: first call built {first[0].group(2)} bucket={first[0].group(3)} in "
        f"{first[0].group(4)} s and wrote {len(entries1 - entries0)} cache entry; docker restart "
        f"({restarted:.1f} s, SERVING +{serving:.1f} s, new server_id, {len(entries2)} entries "
        f"kept); first call after it built 1 executable in {again[0].group(4)} s and wrote 0 "
        f"entries (loaded from the volume); control, batch 8: wrote "
        f"{len(entries4 - entries3)} entry"
    )


def check_drain(replicas: list[Replica], args) -> str:
    """`docker stop` while a call of several seconds (exact Hessian spectra, n=1200) runs.

    The call's batch is sized from a timed warm call (8 to 64 points, aiming at ~6 s, well
    inside the 30 s grace however loaded the host is), and the stop comes a quarter of the
    way in; the check fails, rather than passes, if the call ends before the stop begins."""
    r = replicas[0]
    n = 1200

    def points(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.random.default_rng(seed).uniform(-2, 2, size=(batch, n))
        t = np.tanh(x)  # f = Σ tanh(x)² + x²: H is diagonal, (2 - 6t²)(1 - t²) + 2
        return x, np.sort((2 - 6 * t**2) * (1 - t**2) + 2, axis=1)

    outcome: dict = {}
    with Client(r.address, timeout=300.0) as c:
        f = c.register("sum(tanh(x) ** 2) + sum(x * x)", inputs={"x": (n,)}, dtype="float64")
        x, expected = points(8, 3)
        c.spectrum(f, x, method="exact")  # compiled
        warm = time.monotonic()
        require(
            np.allclose(c.spectrum(f, x, method="exact").eigenvalues, expected),
            "wrong eigenvalues from the warm call",
        )
        per_point = (time.monotonic() - warm) / 8
        batch = 8
        while batch * per_point < 6.0 and batch < 64:
            batch *= 2
        x, expected = points(batch, 4)

        def call() -> None:
            try:
                outcome["spectrum"] = c.spectrum(f, x, method="exact")
            except HessdError as e:
                outcome["error"] = e
            outcome["end"] = time.monotonic()

        caller = threading.Thread(target=call)
        call_start = time.monotonic()
        caller.start()
        time.sleep(min(1.5, batch * per_point / 4))
        stop_start = time.monotonic()
        stopper = subprocess.Popen(
            [DOCKER, "stop", "-t", "40", r.container], stdout=subprocess.DEVNULL
        )
        time.sleep(0.5)
        during = health(r.address)
        caller.join()
        require(stopper.wait() == 0, "docker stop failed")
        stopped = time.monotonic() - stop_start
    require(
        "error" not in outcome,
        f"the call in flight ({batch} points, {outcome['end'] - call_start:.1f} s) failed: "
        f"{outcome.get('error')!r}",
    )
    require(outcome["end"] > stop_start, "the call ended before docker stop began: make it longer")
    values = outcome["spectrum"].eigenvalues
    require(np.allclose(values, expected, rtol=1e-8, atol=1e-8), "wrong eigenvalues")
    require(during != "SERVING", "health still SERVING 0.5 s into the stop")
    code = docker("inspect", "-f", "{{.State.ExitCode}}", r.container).strip()
    require(code == "0", f"{r.container} exited {code}")
    return (
        f"{r.container}: docker stop {stop_start - call_start:.1f} s into a "
        f"{outcome['end'] - call_start:.1f} s Spectrum call ({batch} points); health 0.5 s "
        f"later: {during}; the call finished OK {outcome['end'] - stop_start:.1f} s after stop "
        f"began; exit code {code} after {stopped:.1f} s"
    )


RUNNERS: dict[str, Callable[[list[Replica], argparse.Namespace], str]] = {
    "health": check_health,
    "healthcheck": check_docker_healthcheck,
    "quickstart": check_quickstart,
    "oip": check_oip,
    "spread": check_spread,
    "kill": check_kill,
    "cache": check_cache,
    "drain": check_drain,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replica", type=Replica.parse, action="append", required=True)
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated, in order")
    parser.add_argument("--calls", type=int, default=60, help="calls of the spread check")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = parser.parse_args(argv)
    replicas = args.replica
    if len(replicas) != 3:
        parser.error(f"three --replica expected, got {len(replicas)}")
    names = args.checks.split(",")
    unknown = [name for name in names if name not in RUNNERS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    failures = 0
    for name in names:
        start = time.perf_counter()
        try:
            detail, verdict = RUNNERS[name](replicas, args), "PASS"
        except Exception as e:  # one check's surprise must not hide the others' results
            detail, verdict = f"{type(e).__name__}: {e}", "FAIL"
            failures += 1
        print(f"{verdict} {name:<11} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
