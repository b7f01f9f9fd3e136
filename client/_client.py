"""The thin client: numpy in, numpy out, one typed exception per status code."""

from __future__ import annotations

import abc
import dataclasses
import ipaddress
import json
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from hessd.client import _requests, _sparse
from hessd.client._data import Handle, handle_of
from hessd.client._errors import NotFound, from_rpc_error
from hessd.client._requests import Function, Points, Spectrum
from hessd.client._sparse import Sparsity
from hessd.proto import codec, stream
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

__all__ = ["Client", "Function", "Handle", "Spectrum"]

# The requests that name a function, and so may carry its spec instead.
_AboutAFunction = TypeVar(
    "_AboutAFunction",
    hessd_pb2.ComputeRequest,
    hessd_pb2.SpectrumRequest,
    hessd_pb2.SparsityRequest,
)

# Above this, requests and results stream in chunks; measured: gRPC Python moves a 1 MiB
# message in ~2 ms and larger ones at a lower rate (benchmarks/throughput.py).
STREAM_THRESHOLD = 1 << 20

# UNAVAILABLE (a replica stopping or restarting) is retried with backoff by gRPC itself;
# round_robin spreads calls over every address a target resolves to.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "hessd.v1.Hessd"}],
            "retryPolicy": {
                "maxAttempts": 5,  # gRPC's cap
                "initialBackoff": "0.25s",
                "maxBackoff": "4s",
                "backoffMultiplier": 2.5,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
# Public (hessd.client.CHANNEL_OPTIONS): a raw channel given these behaves as the client's.
CHANNEL_OPTIONS = [
    # The server enforces its own size limits; the client accepts whatever it sends.
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
    # Reconnect to a restarted replica within a fraction of a second, not gRPC's default
    # 1 s doubling to 120 s: a channel in backoff fails calls fast, retries included.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # A call is retried only while its request fits the retry buffer (256 KiB by default).
    ("grpc.per_rpc_retry_buffer_size", 64 << 20),
    ("grpc.retry_buffer_size", 256 << 20),
]


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where and how to connect: shared by Client and AsyncClient.

    target: "host:port", "dns:///name:port" (every address the name resolves to), or a list
    of "ip:port" for several replicas; calls are spread round-robin. tls: use TLS, trusting
    `root_certificates` (PEM bytes; None: the system's roots); with `certificate_chain` and
    `private_key` (PEM) the client presents a certificate (mutual TLS). token: sent as
    `authorization: Bearer <token>` with every call.
    """

    target: str | Sequence[str]
    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    token: str | None = None

    def address(self) -> str:
        if isinstance(self.target, str):
            return self.target
        hosts = [t.rpartition(":")[0] for t in self.target]
        if all(_is_ipv4(h) for h in hosts):
            return "ipv4:" + ",".join(self.target)
        raise ValueError(
            f"several targets must be ip:port addresses, got {list(self.target)}; for host "
            "names use one 'dns:///name:port' target, which resolves to every replica"
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.certificate_chain):
            return None
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def open(self, api: types.ModuleType) -> grpc.Channel | grpc.aio.Channel:
        """A channel from `api`, grpc or grpc.aio (they share these two functions)."""
        credentials, address = self.credentials(), self.address()
        if credentials is None:
            return api.insecure_channel(address, options=CHANNEL_OPTIONS)
        return api.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def _with_spec(request: _AboutAFunction | bytes, f: Function) -> _AboutAFunction:
    """A copy of `request` that carries f's spec instead of its id; a planned Compute
    request (wire bytes) is parsed first."""
    if isinstance(request, bytes):
        inline: Any = hessd_pb2.ComputeRequest.FromString(request)
    else:
        inline = type(request)()
        inline.CopyFrom(request)
    inline.spec.CopyFrom(f.spec)  # one of function_id / spec: clears the id
    return inline


def _carries_spec(request: Message | bytes) -> bool:
    """Whether a request carries its function's spec (a planned one never does)."""
    return not isinstance(request, bytes) and request.HasField("spec")


def _serialized(request: Message | bytes) -> bytes:
    """The Compute request on the wire: a planned one is already bytes."""
    return request if isinstance(request, bytes) else request.SerializeToString()


def _names_a_resident_tensor(error: NotFound) -> bool:
    """Whether NOT_FOUND was about a resident tensor (not a function id)."""
    return "resident tensor" in str(error)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


class _Kinds(abc.ABC):
    """The connection and the derivative kinds as methods, over `compute` (which the sync
    and async clients each define: with AsyncClient every one of these returns an
    awaitable). `_api` is the gRPC module the channel comes from."""

    _api = grpc

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 30.0,
        stream_threshold: int = STREAM_THRESHOLD,
        **connection: Any,
    ):
        self.connection = Connection(target, **connection)
        self.timeout = timeout
        self.stream_threshold = stream_threshold
        self._channel = self.connection.open(self._api)
        self._stub = hessd_pb2_grpc.HessdStub(self._channel)
        self._metadata = self.connection.metadata()
        # Compute as the stub has it, but taking a planned request's wire bytes as well.
        self._compute = self._channel.unary_unary(
            "/hessd.v1.Hessd/Compute",
            request_serializer=_serialized,
            response_deserializer=hessd_pb2.ComputeResponse.FromString,
            _registered_method=True,
        )
        # The streams as bytes both ways (stream.send_serialized, stream.receive_serialized):
        # each ~1 MiB chunk copied once, not three times, on the way out and on the way in.
        self._compute_stream = self._channel.stream_stream(
            "/hessd.v1.Hessd/ComputeStream", _registered_method=True
        )
        self._put_stream = self._channel.stream_unary(
            "/hessd.v1.Hessd/PutStream",
            response_deserializer=hessd_pb2.PutResponse.FromString,
            _registered_method=True,
        )

    def _call_options(self, timeout: float | None) -> dict:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self._metadata,
        }

    @abc.abstractmethod
    def compute(self, f: Function, kind: str, points: Points, **options: Any) -> Any:
        """The call every kind goes through: sync in Client, a coroutine in AsyncClient."""

    def value(self, f: Function, points: Points, **options: Any) -> np.ndarray:
        """f at every point: (batch, *output_shape)."""
        return self.compute(f, "value", points, **options)

    def gradient(self, f: Function, points: Points, **options: Any) -> np.ndarray:
        """∇f of a scalar f: (batch, *wrt_shape); with several wrt, a dict by input."""
        return self.compute(f, "gradient", points, **options)

    def jacobian(
        self,
        f: Function,
        points: Points,
        mode: str = "auto",
        layout: str = "numerator",
        **options: Any,
    ) -> np.ndarray:
        """(batch, *output_shape, *wrt_shape); layout="denominator": (batch, *wrt, *out)."""
        return self.compute(f, "jacobian", points, mode=mode, layout=layout, **options)

    def hessian(
        self, f: Function, points: Points, layout: str = "numerator", **options: Any
    ) -> np.ndarray:
        """(batch, *output_shape, *wrt_shape, *wrt_shape); denominator puts output axes last.
        With several wrt, a dict of blocks keyed "a,b"."""
        return self.compute(f, "hessian", points, layout=layout, **options)

    def hvp(self, f: Function, points: Points, v: Any, **options: Any) -> np.ndarray:
        """H v of a scalar f, v (batch, *wrt_shape): (batch, *wrt_shape)."""
        return self.compute(f, "hvp", points, vector=v, **options)

    def jvp(self, f: Function, points: Points, t: Any, **options: Any) -> np.ndarray:
        """J t, t (batch, *wrt_shape): (batch, *output_shape)."""
        return self.compute(f, "jvp", points, vector=t, **options)

    def vjp(self, f: Function, points: Points, u: Any, **options: Any) -> np.ndarray:
        """uᵀ J, u (batch, *output_shape): (batch, *wrt_shape)."""
        return self.compute(f, "vjp", points, vector=u, **options)

    def diagonal(self, f: Function, points: Points, **options: Any) -> dict[str, np.ndarray]:
        """diag(C) of the curvature operator C (f's Hessian, or an objective's operator with
        data=...): {"diagonal", "std_error"} (batch, p). diagonal_estimator: "exact" (p
        matvecs; the default up to the server's max_exact_n), "diag++" (the default above),
        "hutchinson"; num_matvecs, seed."""
        return self.compute(f, "diagonal", points, **options)

    def solve(self, f: Function, points: Points, b: Any, **options: Any) -> dict[str, np.ndarray]:
        """(C + damping·I)⁻¹ b by conjugate gradients on the server: {"solution" (batch, p),
        "iterations", "residual" (relative), "converged"} per point; damping, tolerance,
        max_iterations."""
        return self.compute(f, "solve", points, vector=b, **options)

    def gradient_statistics(
        self, f: Function, points: Points, data: Mapping[str, Any], **options: Any
    ) -> dict[str, np.ndarray]:
        """Per-example gradient reductions over `data`: {"gradient" (batch, p), "norms"
        (batch, N), "variance" (batch, p), "sum_of_squares" (batch, p)}."""
        return self.compute(f, "gradient_statistics", points, data=data, **options)

    def taylor2(self, f: Function, points: Points, **options: Any) -> dict[str, np.ndarray]:
        """Value (batch,), gradient (batch, *in) and Hessian (batch, *in, *in) of a scalar f
        from one pass: the second-order Taylor model f(x+δ) ≈ f + ∇fᵀδ + ½ δᵀHδ."""
        return self.compute(f, "taylor2", points, **options)

    def taylor(
        self, f: Function, points: Points, direction: Any, order: int, **options: Any
    ) -> np.ndarray:
        """d^k/dt^k f(x + t d) at t = 0 for k = 1..order, d (batch, *in) per point:
        (batch, order, *output_shape). Then f(x + t d) ≈ f(x) + Σ_k t^k / k! · result[:, k-1]."""
        return self.compute(f, "taylor", points, vector=direction, order=order, **options)


class Client(_Kinds):
    """A connection to a hessd server.

        with Client("127.0.0.1:50051", timeout=30.0) as c:
            f = c.register("x @ A @ x", inputs={"x": (3,)}, constants={"A": A}, dtype="float64")
            c.hessian(f, X)   # (batch, 3, 3)

    Every method takes `timeout=` (seconds), defaulting to the client's. Failures raise a
    HessdError subclass per status code; inputs are checked here, before sending. Points
    may be anything np.asarray takes (numpy, JAX arrays, PyTorch CPU tensors, lists);
    results are numpy arrays.

    Connection options (see Connection): a list of addresses or a dns:/// target spreads
    calls round-robin over replicas; `tls=True`, `root_certificates=`, `certificate_chain=`,
    `private_key=` for TLS and mutual TLS; `token=` for servers that require one. gRPC
    retries UNAVAILABLE with backoff, and a function a server does not know is registered
    there again transparently.

    Derivative options: `wrt` names the input (or a list of inputs: results per input, or
    with `flatten=True` with respect to their concatenation); `shared` lists inputs sent
    once for all points, without a batch axis.
    """

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """{"version", "jax_version", "backend", "devices": [...], "limits": {...}}."""
        reply = self._call(self._stub.ServerInfo, hessd_pb2.ServerInfoRequest(), timeout)
        return _requests.server_info_result(reply)

    def put(
        self, array: Any, dtype: str | np.dtype | None = None, *, timeout: float | None = None
    ) -> Handle:
        """Upload an array once; the Handle may then stand wherever an array goes (inputs,
        shared inputs, vectors, data), and only it travels. Content-addressed: every replica
        gives the same array the same handle, and a server that has dropped it is given it
        again by the next call that needs it. Large arrays stream."""
        array = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype))
        request = hessd_pb2.PutRequest()
        if array.nbytes <= self.stream_threshold:
            codec.encode(array, out=request.tensor)
            reply = self._call(self._stub.Put, request, timeout)
        else:
            codec.encode(array, out=request.tensor, data=False)
            messages = stream.send_serialized("put_request", request, [array])
            try:
                reply = self._put_stream(messages, **self._call_options(timeout))
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
        if reply.handle != handle_of(array):
            raise AssertionError("the server's handle differs from the array's content address")
        return Handle(reply.handle, array)

    def _put_again(self, handles: Sequence[Handle], timeout: float | None) -> None:
        for handle in handles:
            self.put(handle.array, timeout=timeout)

    def register(
        self,
        function: str | Callable,
        inputs: Mapping[str, Sequence[int] | int],
        constants: Mapping[str, Any] | None = None,
        dtype: str | np.dtype = "float32",
        *,
        warmup: Sequence[int] = (),
        warmup_kinds: Sequence[str] = ("value", "gradient"),
        name: str = "",
        timeout: float | None = None,
    ) -> Function:
        """Register an expression, or a JAX callable fn(*inputs) -> array, over `inputs`
        (name → shape of one point, in order).

        Every input has `dtype`; constants are converted to it where that changes no value.
        `warmup=[batch sizes]` compiles each of `warmup_kinds` for those sizes now, so the
        first calls do not wait for XLA. `name` makes the function known to this server by
        that name too: the model name of the Open Inference Protocol (README.md).
        A callable is exported here with jax.export (needs `hessd[jax]`; the server must run
        with --allow-jax-export): jax.vmap(fn), a symbolic batch dimension, vjp_order=2.
        """
        dtype = np.dtype(dtype)
        request = _requests.register_request(
            function,
            inputs,
            constants,
            dtype,
            lambda: self.server_info()["backend"],
            warmup,
            warmup_kinds,
        )
        request.name = name
        reply = self._call(self._stub.Register, request, timeout)
        return _requests.function_of(request, reply, dtype)

    def compute(
        self,
        f: Function,
        kind: str,
        points: Points,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The general call behind value … taylor: `kind` is one of those method names;
        options are theirs (vector, wrt, mode, layout, order, flatten, shared) and
        `output_dtype` ("float16", "bfloat16", "float32", "float64": cast on the server
        before the transfer), `packed` (hessian of a scalar f: the upper triangle travels,
        half the bytes; unpacked here unless unpack=False).

        Requests or results over `stream_threshold` bytes travel as streams of ~1 MiB
        chunks (ComputeStream): faster than one large message, and not capped at 2 GiB.

        A result that came in one message is a read-only view of its bytes (np.array(r)
        copies it). A call like one answered before (same function, kind, options as
        passed, shapes; arrays of the function's dtype) is built from the plan kept then:
        the request's wire bytes around the arrays', and the reply's layout."""
        call = _requests.compute_call(f, kind, points, options, self.stream_threshold)
        if isinstance(call, _requests.PlannedCall):
            return call.result(self._call_on(f, self._compute, call.wire, timeout))
        if max(call.input_bytes, call.output_bytes) <= self.stream_threshold:
            reply = self._call_on(f, self._compute, call.filled(), timeout, call.handles)
            return call.result(reply)
        try:
            return self._streamed(call, timeout)
        except NotFound as e:
            if _names_a_resident_tensor(e):
                self._put_again(call.handles, timeout)
            elif f.spec is None:
                raise
            else:
                call.request = _with_spec(call.request, f)
            return self._streamed(call, timeout)

    def _streamed(
        self, call: _requests.ComputeCall, timeout: float | None
    ) -> np.ndarray | dict[str, np.ndarray]:
        messages = stream.send_serialized("compute_request", call.request, call.arrays)
        try:
            replies = self._compute_stream(messages, **self._call_options(timeout))
            header, buffers = stream.receive_serialized(replies, "compute_response", 1 << 62)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.result(header, buffers)

    def sparsity(
        self,
        f: Function,
        kind: str = "jacobian",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Sparsity:
        """The sparsity pattern of f's jacobian (m, n) or hessian (n, n) for all inputs, its
        nonzeros and colours, and the cost of sparse=True against the dense kind (passes and
        bytes per point). Options: wrt, flatten, mode ("forward": column colouring, "reverse":
        row), counts_only (leave out the pattern's indices), output_dtype (of the bytes)."""
        request = _sparse.sparsity_request(f, kind, **options)
        return _sparse.sparsity_result(self._call_on(f, self._stub.Sparsity, request, timeout))

    def spectrum(
        self,
        f: Function,
        points: Points,
        method: str = "exact",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Spectrum:
        """The Hessian's spectrum at every point of a scalar f (see the README).

        method: "exact" (every eigenvalue, n up to a few thousand), "lanczos" (the k smallest
        and k largest, from HVPs), "trace" (Hutch++ or Hutchinson) or "density" (stochastic
        Lanczos quadrature). Options (wrt, shared, eigenvectors, k, num_steps, num_probes,
        num_matvecs, trace_estimator, seed, grid_size, tol, gtol, sigma) that are 0 or None
        take the server's defaults; one that does not apply to `method` is refused.
        """
        request, handles = _requests.spectrum_request(f, points, method, **options)
        reply = self._call_on(f, self._stub.Spectrum, request, timeout, handles)
        return _requests.spectrum_result(reply)

    def _call_on(
        self,
        f: Function,
        method: Callable[..., Any],
        request: _AboutAFunction | bytes,
        timeout: float | None,
        handles: Sequence[Handle] = (),
    ) -> Any:
        """Call about f; if the server does not know f (restarted, or another replica), call
        once more with f's spec inline, which registers it on whichever replica answers;
        if it lacks a resident tensor the call names, put those again and call once more.
        Ids and handles are content-addressed, so both stay valid everywhere. `request`
        may be a planned Compute request's wire bytes."""
        try:
            return self._call(method, request, timeout)
        except NotFound as e:
            if _names_a_resident_tensor(e) and handles:
                self._put_again(handles, timeout)
            elif f.spec is None:
                raise
            else:
                request = _with_spec(request, f)
        try:
            return self._call(method, request, timeout)
        except NotFound as e:
            # A function the server had dropped and a tensor it lacks may come one by one.
            if _names_a_resident_tensor(e) and handles:
                self._put_again(handles, timeout)
            elif f.spec is not None and not _carries_spec(request):
                request = _with_spec(request, f)
            else:
                raise
            return self._call(method, request, timeout)

    def _call(
        self, method: Callable[..., Any], request: Message | bytes, timeout: float | None
    ) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
