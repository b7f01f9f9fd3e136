"""The thin client: numpy in, numpy out, one typed exception per status code."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from hessd.client._errors import InvalidArgument, from_rpc_error
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

__all__ = ["Client", "Function"]

Points = Any  # an array-like (batch, *shape), or a mapping of input name to one

_MODES = {"auto": hessd_pb2.AUTO, "forward": hessd_pb2.FORWARD, "reverse": hessd_pb2.REVERSE}
_LAYOUTS = {"numerator": hessd_pb2.NUMERATOR, "denominator": hessd_pb2.DENOMINATOR}


@dataclasses.dataclass(frozen=True)
class Function:
    """A registered function: its id, its inputs (name → shape of one point, in order),
    the shape of its output at one point, and its dtype."""

    id: str
    inputs: dict[str, tuple[int, ...]]
    output_shape: tuple[int, ...]
    dtype: np.dtype
    spec: hessd_pb2.FunctionSpec = dataclasses.field(repr=False, compare=False)


class Client:
    """A connection to a hessd server.

        with Client("127.0.0.1:50051", timeout=30.0) as c:
            f = c.register("x @ A @ x", inputs={"x": (3,)}, constants={"A": A}, dtype="float64")
            c.hessian(f, X)   # (batch, 3, 3)

    Every method takes `timeout=` (seconds), defaulting to the client's. Failures raise a
    HessdError subclass per status code; inputs are checked here, before sending.
    """

    def __init__(self, target: str, *, timeout: float | None = 30.0):
        self.target = target
        self.timeout = timeout
        # The server enforces its own size limits; the client accepts whatever it sends.
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
            ],
        )
        self._stub = hessd_pb2_grpc.HessdStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """{"version", "jax_version", "backend", "devices": [...], "limits": {...}}."""
        reply = self._call(self._stub.ServerInfo, hessd_pb2.ServerInfoRequest(), timeout)
        limits = reply.limits
        return {
            "version": reply.version,
            "jax_version": reply.jax_version,
            "backend": reply.backend,
            "devices": [
                {"id": d.id, "platform": d.platform, "kind": d.kind} for d in reply.devices
            ],
            "limits": {f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
        }

    def register(
        self,
        expression: str,
        inputs: Mapping[str, Sequence[int]],
        constants: Mapping[str, Any] | None = None,
        dtype: str | np.dtype = "float32",
        *,
        timeout: float | None = None,
    ) -> Function:
        """Register `expression` over `inputs` (name → shape of one point, in order).

        Every input has `dtype`; constants are converted to it where that changes no value.
        """
        dtype = np.dtype(dtype)
        try:
            spec = hessd_pb2.FunctionSpec(
                expression=hessd_pb2.Expression(source=expression),
                inputs=[
                    hessd_pb2.InputSpec(
                        name=name, shape=_shape(shape, name), dtype=codec.dtype_to_proto(dtype)
                    )
                    for name, shape in inputs.items()
                ],
                constants=[
                    hessd_pb2.NamedTensor(
                        name=name, tensor=codec.encode(codec.coerce(v, dtype, f"constant {name!r}"))
                    )
                    for name, v in (constants or {}).items()
                ],
            )
        except codec.TensorError as e:
            raise InvalidArgument(str(e)) from None
        reply = self._call(self._stub.Register, hessd_pb2.RegisterRequest(spec=spec), timeout)
        return Function(
            id=reply.function_id,
            inputs={s.name: tuple(s.shape) for s in spec.inputs},
            output_shape=tuple(reply.output_shape),
            dtype=dtype,
            spec=spec,
        )

    def value(self, f: Function, points: Points, **options) -> np.ndarray:
        """f at every point: (batch, *output_shape)."""
        return self.compute(f, "value", points, **options)

    def gradient(self, f: Function, points: Points, **options) -> np.ndarray:
        """∇f of a scalar f: (batch, *wrt_shape)."""
        return self.compute(f, "gradient", points, **options)

    def jacobian(
        self, f: Function, points: Points, mode: str = "auto", layout: str = "numerator", **options
    ) -> np.ndarray:
        """(batch, *output_shape, *wrt_shape); layout="denominator": (batch, *wrt, *out)."""
        return self.compute(f, "jacobian", points, mode=mode, layout=layout, **options)

    def hessian(
        self, f: Function, points: Points, layout: str = "numerator", **options
    ) -> np.ndarray:
        """(batch, *output_shape, *wrt_shape, *wrt_shape); denominator puts output axes last."""
        return self.compute(f, "hessian", points, layout=layout, **options)

    def hvp(self, f: Function, points: Points, v: Any, **options) -> np.ndarray:
        """H v of a scalar f, v (batch, *wrt_shape): (batch, *wrt_shape)."""
        return self.compute(f, "hvp", points, vector=v, **options)

    def jvp(self, f: Function, points: Points, t: Any, **options) -> np.ndarray:
        """J t, t (batch, *wrt_shape): (batch, *output_shape)."""
        return self.compute(f, "jvp", points, vector=t, **options)

    def vjp(self, f: Function, points: Points, u: Any, **options) -> np.ndarray:
        """uᵀ J, u (batch, *output_shape): (batch, *wrt_shape)."""
        return self.compute(f, "vjp", points, vector=u, **options)

    def compute(
        self,
        f: Function,
        kind: str,
        points: Points,
        *,
        vector: Any = None,
        wrt: str | None = None,
        mode: str = "auto",
        layout: str = "numerator",
        timeout: float | None = None,
    ) -> np.ndarray:
        """The general call behind value … vjp: `kind` is one of those method names."""
        try:
            kind_value = hessd_pb2.Kind.Value(kind.upper())
        except ValueError:
            raise InvalidArgument(f"unknown kind {kind!r}") from None
        request = hessd_pb2.ComputeRequest(
            function_id=f.id,
            kind=kind_value,
            wrt=wrt or "",
            jacobian_mode=_option(_MODES, mode, "mode"),
            layout=_option(_LAYOUTS, layout, "layout"),
        )
        _encode_points(f, points, request)
        if vector is not None:
            _encode_vector(f, kind, vector, wrt, request.vector)
        reply = self._call(self._stub.Compute, request, timeout)
        # A writable copy would double the memory of a large result; decode's view is read-only.
        return codec.decode(reply.output, "output")

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


def _shape(shape: Sequence[int] | int, name: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {shape} must be non-negative integers")
    return shape


def _option(table: dict[str, int], value: str, name: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{name}={value!r}; use one of {', '.join(table)}") from None


def _encode_points(f: Function, points: Points, request: hessd_pb2.ComputeRequest) -> None:
    """Check `points` against f's inputs and encode them into request.inputs, in place."""
    if not isinstance(points, Mapping):
        if len(f.inputs) != 1:
            raise InvalidArgument(
                f"this function has inputs {list(f.inputs)}; pass a dict of arrays, one per input"
            )
        points = {next(iter(f.inputs)): points}
    unknown = sorted(set(points) - set(f.inputs))
    missing = [n for n in f.inputs if n not in points]
    if unknown or missing:
        raise InvalidArgument(f"the function takes inputs {list(f.inputs)}; got {sorted(points)}")
    batch = None
    for name, shape in f.inputs.items():
        array = _checked(points[name], shape, f.dtype, f"input {name!r}")
        if batch is not None and array.shape[0] != batch:
            raise InvalidArgument(
                f"input {name!r} has {array.shape[0]} points, others have {batch}"
            )
        batch = array.shape[0]
        codec.encode(array, out=request.inputs.add(name=name).tensor)


def _encode_vector(
    f: Function, kind: str, vector: Any, wrt: str | None, out: hessd_pb2.Tensor
) -> None:
    if kind == "vjp":
        shape = f.output_shape
    else:
        name = wrt or next(iter(f.inputs))
        if name not in f.inputs:
            raise InvalidArgument(f"wrt={name!r} is not an input; inputs are {list(f.inputs)}")
        shape = f.inputs[name]
    codec.encode(_checked(vector, shape, f.dtype, f"the {kind} vector"), out=out)


def _checked(value: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """`value` as an array of `dtype` and shape (batch, *shape), or InvalidArgument."""
    try:
        array = codec.coerce(value, dtype, what)
        codec.check_points(array, shape, dtype, what)
    except codec.TensorError as e:
        raise InvalidArgument(str(e)) from None
    return array
