"""Whole requests over the loopback socket: a result whose tensors decode, or a typed error
whose message fits the metadata limits; never INTERNAL.

Random Compute, Register and Spectrum messages, ComputeStream calls whose chunks are cut
anywhere (and whose stream is now and then malformed), and random or mutated bytes as the
serialised request, against the session's in-process server; Register also against one
that accepts jax_export specs, with corrupted artifacts. Where the function is known, a
spectrum's point classes are checked: a point whose variable is not finite is "undefined",
a finite one is not. After each test a normal request still gets the right answer.
Strategies and profiles: fuzz_strategies.py.

Open bug kept away from: a corrupted artifact that still deserializes can fail to compile
with INTERNAL (test_corrupted_artifact_that_deserializes_compiles_or_is_refused_known_bug),
so artifacts reach a server that accepts them only in Register, which does not compile.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hessd.proto import codec, stream
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

from fuzz_strategies import (
    _CONSTANTS,
    _INPUTS,
    _REFUSALS,
    _TIMEOUT,
    _WIRE_DTYPES,
    CHANNEL_OPTIONS,
    HUGE_INTS,
    _artifact,
    _check_message,
    _export_server,
    _odd,
    _spec,
    fuzz,
    sources,
    tensors,
)

_INT32 = st.integers(-(2**31), 2**31 - 1)


# Registered once per module; requests name them by id or send them inline.
_KNOWN_SPECS = (
    _spec("sum(x**2) + sum(sin(y))", {"x": (3,), "y": (2,)}),
    _spec("tanh(W @ x)", {"x": (3,)}, constants={"W": np.arange(6.0).reshape(2, 3) / 6}),
    _spec("sum(M * M) / 2 + M[0, 1] * M[1, 0]", {"M": (2, 2)}, hessd_pb2.FLOAT32),
    _spec("x @ A @ x + b @ x", {"x": (3,)}, constants=_CONSTANTS),
)


def _signature(spec: hessd_pb2.FunctionSpec) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of each declared input, as a client would send it."""
    return [
        (s.name, tuple(s.shape), _WIRE_DTYPES.get(s.dtype, np.dtype("<f8"))) for s in spec.inputs
    ]


# Names that are not what they seem, or far too long to echo: fullwidth x (NFKC x), a
# ligature, a decomposed accent, 19,000 characters.
_ODD_NAMES = ("\uff58", "\ufb01", "e\u0301", "x\u0301", "_x", "x y", "y" * 19_000)
# Declared shapes: the usual, no elements (also beside a huge dimension), more axes than a
# point may have, more elements than one may hold.
_SHAPES = ((3,), (3,), (3, 3), (2,), (), (0,), (1, 3, 1), (3, 0), (0, 2**40), (1,) * 17)
_ODD_SHAPES = ((2**31,), (2**16 + 1, 2**16), (2**63 - 1,), (1,) * 65)


@st.composite
def _corrupted(draw, data: bytes) -> bytes:
    """`data` with bits flipped, bytes inserted or deleted, a run zeroed, or cut short."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        match draw(st.integers(0, 4)):
            case 0 if at < len(data):
                data[at] ^= 1 << draw(st.integers(0, 7))
            case 1:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case 2:
                del data[at : at + draw(st.integers(1, 8))]
            case 3:
                data[at : at + 64] = bytes(len(data[at : at + 64]))
            case _:
                data = data[:at]
    return bytes(data)


@st.composite
def function_specs(draw) -> hessd_pb2.FunctionSpec:
    """Known specs, random sources over x, y, M with A, b, export artifacts (random bytes,
    or a real one corrupted), or junk with odd names and shapes.

    Static ints in sources are small or past int32 (HUGE_INTS, see fuzz_strategies.py)."""
    match draw(st.integers(0, 9)):
        case 0 | 1 | 2:
            return draw(st.sampled_from(_KNOWN_SPECS))
        case 3 | 4 | 5 | 6:
            names = draw(st.lists(st.sampled_from(list(_INPUTS)), min_size=1, unique=True))
            shapes = st.sampled_from(_SHAPES)
            inputs = {
                name: _INPUTS[name] if draw(st.integers(0, 3)) else draw(shapes) for name in names
            }
            dtype = draw(st.sampled_from([hessd_pb2.FLOAT64] * 4 + [hessd_pb2.FLOAT32, 0, 5, 99]))
            constants = {k: v for k, v in _CONSTANTS.items() if draw(st.integers(0, 5))}
            return _spec(draw(sources(max_int=4, big=HUGE_INTS, depth=3)), inputs, dtype, constants)
        case 7:
            if draw(st.booleans()):
                return hessd_pb2.FunctionSpec(
                    jax_export=hessd_pb2.JaxExport(
                        serialized=draw(st.binary(max_size=64)),
                        jax_version=draw(st.text(max_size=8)),
                    ),
                    inputs=[hessd_pb2.InputSpec(name="x", shape=[3], dtype=hessd_pb2.FLOAT64)],
                )
            spec = hessd_pb2.FunctionSpec()
            spec.CopyFrom(_artifact())
            spec.jax_export.serialized = draw(_corrupted(spec.jax_export.serialized))
            return spec
        case _:
            spec = hessd_pb2.FunctionSpec()
            if draw(st.booleans()):
                spec.expression.source = draw(st.text(max_size=20))
            names = st.one_of(st.text(max_size=5), st.sampled_from(_ODD_NAMES))
            shapes = st.one_of(
                st.lists(st.integers(-2, 4), max_size=3),
                st.sampled_from(_ODD_SHAPES).map(list),
                st.lists(st.sampled_from([0, 1, 2**31, 2**62]), max_size=4),
            )
            for _ in range(draw(st.integers(0, 2))):
                spec.inputs.add(name=draw(names), shape=draw(shapes), dtype=draw(_INT32))
            for _ in range(draw(st.integers(0, 1))):
                spec.constants.add(name=draw(names), tensor=draw(tensors()))
            return spec


@st.composite
def _points(draw, shape, dtype: np.dtype, batch: int | None, odd: bool) -> hessd_pb2.Tensor:
    """Points for one input: what it declares ((batch, *shape), or (*shape) when shared,
    i.e. batch None); in odd requests sometimes the wrong dtype or shape, or any tensor.
    NaN or Inf one time in six."""
    if any(d < 0 for d in shape) or math.prod(shape) > 64:
        return draw(tensors())
    match draw(st.integers(0, 9)) if odd else 0:
        case 8:
            return draw(tensors())
        case 9:
            shape = (*shape, 1) if draw(st.booleans()) else shape[1:]
            if math.prod(shape) > 64:  # (0, 2**40)[1:]
                return draw(tensors())
        case 7:
            dtype = draw(st.sampled_from([np.dtype("<f4"), np.dtype("<f8"), np.dtype("<i8")]))
    if dtype.type.__module__ != "numpy":  # ml_dtypes' bfloat16: hypothesis cannot fill it
        dtype = np.dtype("<f8")
    elements = {
        "f": st.floats(-3, 3, width=min(32, 8 * dtype.itemsize)),
        "b": st.booleans(),
    }.get(dtype.kind, st.integers(-3, 3))
    full = shape if batch is None else (batch, *shape)
    if 0 in full or len(full) > 64:  # numpy cannot make all of these: (0, 2**62, 2**62)
        size = math.prod(full) * dtype.itemsize  # of float64, or 65 axes; zeros will do
        return hessd_pb2.Tensor(dtype=codec.dtype_to_proto(dtype), shape=full, data=bytes(size))
    values = draw(hnp.arrays(dtype, full, elements=elements))
    if dtype.kind == "f" and values.size and draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, values.size - 1))
        values.flat[at] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return codec.encode(values)


def _rarely(draw, odd: bool, strategy, usual):
    """`usual` in a clean request; in an odd one, a draw from `strategy` one time in three."""
    return draw(strategy) if _odd(draw, odd, 3) else usual


def _add_inputs(draw, request, signature, odd: bool) -> tuple[int, list[str]]:
    """Inputs (and `shared`) for `signature`; in odd requests, shared ones, points of the
    wrong shape or dtype, and now and then an input missing, extra or twice."""
    names = [name for name, _, _ in signature]
    if len(names) > 1 or (names and odd):  # valid shared lists name some inputs, once each
        candidates = st.sampled_from([*names, "nope"] if odd else names)
        request.shared[:] = _rarely(draw, True, st.lists(candidates, unique=not odd), [])
    batch = draw(st.integers(0, 3))
    for name, shape, dtype in signature:
        if _odd(draw, odd, 10):
            continue
        for _ in range(2 if _odd(draw, odd, 10) else 1):
            tensor = draw(_points(shape, dtype, None if name in request.shared else batch, odd))
            request.inputs.add(name=name, tensor=tensor)
    if _odd(draw, odd, 10):
        name = draw(st.sampled_from(["z", "", "W", *_ODD_NAMES]))
        request.inputs.add(name=name, tensor=draw(tensors()))
    return batch, names


def _function(draw, request, function_ids: dict[bytes, str]) -> hessd_pb2.FunctionSpec:
    """Name a function in `request`: a known one by id, a spec inline, or a wrong id or
    none; returns the spec whose inputs the request should send."""
    match draw(st.integers(0, 9)):
        case 0 | 1 | 2 | 3 | 4 | 5:
            spec = draw(st.sampled_from(_KNOWN_SPECS))
            request.function_id = function_ids[spec.SerializeToString()]
        case 6 | 7 | 8:
            spec = draw(function_specs())
            request.spec.CopyFrom(spec)
        case _:
            spec = draw(st.sampled_from(_KNOWN_SPECS))
            if draw(st.booleans()):
                request.function_id = draw(
                    st.one_of(st.text(max_size=70), st.sampled_from(["f" * 64, "f" * 1_000_000]))
                )
    return spec


@st.composite
def compute_requests(draw, function_ids: dict[bytes, str]) -> hessd_pb2.ComputeRequest:
    """Random ComputeRequests: half clean (often a result), half with odd fields."""
    odd = draw(st.booleans())
    request = hessd_pb2.ComputeRequest()
    spec = _function(draw, request, function_ids)
    kind = draw(st.sampled_from(hessd_pb2.Kind.values()[1:]))
    request.kind = _rarely(draw, odd, _INT32, kind)
    batch, names = _add_inputs(draw, request, _signature(spec), odd)
    request.wrt[:] = _rarely(draw, odd, st.lists(st.sampled_from([*names, "nope", ""])), [])
    request.flatten = _rarely(draw, odd, st.booleans(), False)
    order = draw(st.integers(1, 3)) if request.kind == hessd_pb2.TAYLOR else 0
    request.order = _rarely(draw, odd, st.one_of(st.integers(-1, 9), _INT32), order)
    mode = draw(st.integers(0, 3)) if request.kind == hessd_pb2.JACOBIAN else 0
    request.jacobian_mode = _rarely(draw, odd, _INT32, mode)
    has_layout = (hessd_pb2.GRADIENT, hessd_pb2.JACOBIAN, hessd_pb2.HESSIAN)
    layout = draw(st.integers(0, 2)) if request.kind in has_layout else 0
    request.layout = _rarely(draw, odd, _INT32, layout)
    output_dtype = draw(st.sampled_from([0, 0, 0, hessd_pb2.FLOAT32, hessd_pb2.FLOAT64]))
    request.output_dtype = _rarely(draw, odd, _INT32, output_dtype)
    packed = request.kind == hessd_pb2.HESSIAN and draw(st.booleans())
    request.packed = _rarely(draw, odd, st.booleans(), packed)
    takes_vector = request.kind in (hessd_pb2.HVP, hessd_pb2.JVP, hessd_pb2.VJP, hessd_pb2.TAYLOR)
    if takes_vector != _odd(draw, odd, 5):
        signature = _signature(spec)
        shapes = [s for _, s, _ in signature] + [(2,), (5,)] * odd + [()]
        dtype = signature[0][2] if signature else np.dtype("<f8")
        vector = draw(_points(draw(st.sampled_from(shapes)), dtype, batch, odd))
        request.vector.CopyFrom(vector)
    return request


# Spectral widths: zero, subnormal, just below and at the least each dtype takes (the square
# of sqrt(tiny) is tiny), and ordinary. Seeds: both sides of 2**63 (JAX's keys are int64).
# The server compiles once per seed and sigma (they are options), so most calls draw from
# these few, which keeps the number of compiles down.
_SIGMAS = (0.0, 5e-324, 1e-300, 1.4e-154, 1.5e-154, 1e-19, 1.1e-19, 1e-6, 0.5)
_SEEDS = (0, 2**63, 2**64 - 1)
_OPTIONS = {  # SpectrumRequest options by method, clean values
    hessd_pb2.EXACT: {"eigenvectors": st.booleans()},
    hessd_pb2.LANCZOS: {
        "eigenvectors": st.booleans(),
        "k": st.integers(0, 2),
        "num_steps": st.integers(0, 5),
    },
    hessd_pb2.TRACE: {"num_matvecs": st.integers(0, 100), "trace_estimator": st.integers(0, 2)},
    hessd_pb2.DENSITY: {
        "num_steps": st.integers(0, 5),
        "num_probes": st.integers(0, 6),
        "grid_size": st.integers(0, 300),
        "sigma": st.sampled_from(_SIGMAS),
    },
}
# Counts past the server's limits (analysis.MAX_COUNT), refused before any work; at the
# limits they are seconds of work per call, more than a fuzz case should take.
_PAST_LIMITS = {"k": 1001, "num_steps": 4001, "num_probes": 1001, "num_matvecs": 10_001}


@st.composite
def spectrum_requests(draw, function_ids: dict[bytes, str]) -> hessd_pb2.SpectrumRequest:
    """Random SpectrumRequests: half clean, half with odd fields and options of any method,
    counts past the limits, any uint64 seed."""
    odd = draw(st.booleans())
    request = hessd_pb2.SpectrumRequest()
    spec = _function(draw, request, function_ids)
    _, names = _add_inputs(draw, request, _signature(spec), odd)
    request.wrt[:] = _rarely(draw, odd, st.lists(st.sampled_from([*names, "nope"])), [])
    method = draw(st.sampled_from(hessd_pb2.SpectrumMethod.values()))
    request.method = _rarely(draw, odd, _INT32, method)
    for name, strategy in _OPTIONS.get(method, {}).items():
        if draw(st.booleans()):
            setattr(request, name, draw(strategy))
    odd_options = {
        "eigenvectors": st.booleans(),
        "k": st.one_of(st.integers(-1, 6), _INT32),
        "num_steps": st.one_of(st.integers(-1, 12), _INT32),
        "num_probes": st.integers(-1, 6),
        "num_matvecs": st.integers(-1, 100),
        "grid_size": st.one_of(st.integers(-1, 300), _INT32),
        "trace_estimator": st.one_of(st.integers(0, 2), _INT32),
        "tol": st.floats(),
        "gtol": st.floats(),
        "sigma": st.one_of(st.floats(), st.sampled_from(_SIGMAS)),
    }
    for name, strategy in odd_options.items():
        if _odd(draw, odd, 4):
            past = _PAST_LIMITS.get(name)
            if past is not None and draw(st.booleans()):
                strategy = st.sampled_from([past, 2**31 - 1])
            setattr(request, name, draw(strategy))
    seeds = st.integers(0, 2**64 - 1) if _odd(draw, True, 8) else st.sampled_from(_SEEDS)
    request.seed = draw(seeds)
    return request


def _tensors_of(message) -> list[hessd_pb2.Tensor]:
    """Every Tensor in a response, nested ones included."""
    found = []
    for field, value in message.ListFields():
        if field.message_type is hessd_pb2.Tensor.DESCRIPTOR:
            found.append(value)
        elif field.message_type is hessd_pb2.NamedTensor.DESCRIPTOR:
            found.extend(item.tensor for item in value)
    return found


def _check_call(method, request, check=None) -> grpc.StatusCode:
    """Call; the answer is a result whose tensors decode (and pass `check`, if given), or a
    refusal with a bounded message."""
    try:
        response = method(request, timeout=_TIMEOUT)
    except grpc.RpcError as error:
        assert error.code() in _REFUSALS, (error.code(), error.details()[:2000], request)
        _check_message(error)
        event(error.code().name)
        return error.code()
    for tensor in _tensors_of(response):
        codec.decode(tensor)
    if check is not None:
        check(response)
    event("OK")
    return grpc.StatusCode.OK


def _known_spec(request, function_ids: dict[bytes, str]) -> hessd_pb2.FunctionSpec | None:
    """The spec of _KNOWN_SPECS that `request` names, by id or inline; None for others."""
    if request.HasField("spec"):
        return request.spec if request.spec in _KNOWN_SPECS else None
    for spec in _KNOWN_SPECS:
        if function_ids[spec.SerializeToString()] == request.function_id:
            return spec
    return None


def _check_point_classes(request, response, spec: hessd_pb2.FunctionSpec) -> None:
    """For a known spec, whose derivatives are finite wherever its inputs are: a point
    whose variable (the `wrt` inputs) holds NaN or Inf is "undefined", and one whose inputs
    are all finite is not. Mixed points (a non-finite input beside the variable) may be
    either."""
    if not response.HasField("point_class"):
        return
    classes = codec.decode(response.point_class)
    if not classes.size:
        return
    wrt = set(request.wrt) or {spec.inputs[0].name}
    variable_bad = np.zeros(classes.shape, bool)
    any_bad = np.zeros(classes.shape, bool)
    for named in request.inputs:
        finite = np.isfinite(codec.decode(named.tensor).astype(np.float64))
        if named.name in request.shared:
            bad = np.full(classes.shape, not finite.all())
        else:
            bad = ~finite.reshape(len(classes), -1).all(axis=1)
        any_bad |= bad
        if named.name in wrt:
            variable_bad |= bad
    undefined = classes == hessd_pb2.UNDEFINED
    np.testing.assert_array_equal(undefined[variable_bad], True, err_msg=str(classes))
    np.testing.assert_array_equal(undefined[~any_bad], False, err_msg=str(classes))


def _assert_serving(stub) -> None:
    """A normal request still gets the right answer."""
    x = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    request = hessd_pb2.ComputeRequest(
        spec=_spec("sum(x**2)", {"x": (3,)}),
        kind=hessd_pb2.GRADIENT,
        inputs=[hessd_pb2.NamedTensor(name="x", tensor=codec.encode(x))],
    )
    np.testing.assert_array_equal(
        codec.decode(stub.Compute(request, timeout=_TIMEOUT).output), 2 * x
    )


@pytest.fixture(scope="module")
def channel(server_address):
    with grpc.insecure_channel(server_address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return hessd_pb2_grpc.HessdStub(channel)


@pytest.fixture(scope="module")
def export_stub():
    """A server that accepts jax_export specs, for Register (see the module docstring)."""
    with _export_server() as stub:
        yield stub


@pytest.fixture(scope="module")
def function_ids(stub) -> dict[bytes, str]:
    """Serialised known spec -> its id on the server."""
    return {
        spec.SerializeToString(): stub.Register(
            hessd_pb2.RegisterRequest(spec=spec), timeout=_TIMEOUT
        ).function_id
        for spec in _KNOWN_SPECS
    }


def test_random_compute_requests_get_a_result_or_a_typed_error(stub, function_ids):
    @fuzz(400)
    @given(compute_requests(function_ids))
    def run(request):
        _check_call(stub.Compute, request)

    run()
    _assert_serving(stub)


def test_random_spectrum_requests_get_a_result_or_a_typed_error(stub, function_ids):
    @fuzz(150)
    @given(spectrum_requests(function_ids))
    def run(request):
        spec = _known_spec(request, function_ids)
        if spec is None:
            _check_call(stub.Spectrum, request)
        else:
            _check_call(stub.Spectrum, request, lambda r: _check_point_classes(request, r, spec))

    run()
    _assert_serving(stub)


def test_random_register_requests_get_an_id_or_a_typed_error(stub, export_stub):
    """Against a server that accepts jax_export specs, so that corrupted artifacts are
    deserialized and checked, not refused for what they are."""

    @fuzz(200)
    @given(function_specs())
    def run(spec):
        _check_call(export_stub.Register, hessd_pb2.RegisterRequest(spec=spec))

    run()
    _assert_serving(export_stub)
    _assert_serving(stub)


@st.composite
def compute_streams(draw, function_ids: dict[bytes, str]) -> list[hessd_pb2.StreamMessage]:
    """A ComputeStream call: a random request as a header with its tensors' bytes cut into
    chunks anywhere; one time in four something about the stream itself is wrong."""
    request = draw(compute_requests(function_ids))
    data = b"".join(tensor.data for _, tensor in stream.tensors(request))
    header = hessd_pb2.ComputeRequest()
    header.CopyFrom(request)
    for _, tensor in stream.tensors(header):
        tensor.data = b""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    messages = [hessd_pb2.StreamMessage(compute_request=header)]
    messages += [hessd_pb2.StreamMessage(data=chunk) for chunk in chunks]
    match draw(st.integers(0, 5)) if _odd(draw, True, 4) else None:
        case 0:  # no header
            del messages[0]
        case 1:  # data left in the header
            messages[0] = hessd_pb2.StreamMessage(compute_request=request)
        case 2:  # bytes missing, or extra
            messages.append(hessd_pb2.StreamMessage(data=draw(st.binary(min_size=1))))
        case 3 if data:
            messages[-1] = hessd_pb2.StreamMessage(data=messages[-1].data[:-1])
        case 4:  # a second header, or a response header, somewhere
            part = draw(st.sampled_from([{"compute_request": header}, {"compute_response": {}}]))
            messages.insert(draw(st.integers(0, len(messages))), hessd_pb2.StreamMessage(**part))
        case 5:
            messages = []
    return messages


_MESSAGES = {
    "Compute": hessd_pb2.ComputeRequest,
    "Spectrum": hessd_pb2.SpectrumRequest,
    "Register": hessd_pb2.RegisterRequest,
}


@st.composite
def request_bytes(draw, function_ids: dict[bytes, str]) -> tuple[str, bytes]:
    """(method, bytes): random bytes, or a random request's bytes mutated."""
    method = draw(st.sampled_from(sorted(_MESSAGES)))
    if draw(st.integers(0, 3)) == 0:
        return method, draw(st.binary(max_size=300))
    match method:
        case "Compute":
            data = draw(compute_requests(function_ids)).SerializeToString()
        case "Spectrum":
            data = draw(spectrum_requests(function_ids)).SerializeToString()
        case _:
            data = hessd_pb2.RegisterRequest(spec=draw(function_specs())).SerializeToString()
    return method, draw(_corrupted(data))


def test_random_bytes_as_requests_get_a_typed_error(channel, stub, function_ids):
    """Bytes that parse as the request are answered like any request; bytes that do not
    parse get INVALID_ARGUMENT saying so (service/parsing.py). No INTERNAL at all."""
    calls = {
        method: channel.unary_unary(
            f"/hessd.v1.Hessd/{method}", request_serializer=None, response_deserializer=None
        )
        for method in _MESSAGES
    }

    @fuzz(500)
    @given(request_bytes(function_ids))
    def run(case):
        method, data = case
        try:
            parsed = _MESSAGES[method].FromString(data)
        except Exception:  # protobuf's DecodeError, by whichever backend is installed
            parsed = None
        try:
            calls[method](data, timeout=_TIMEOUT)
        except grpc.RpcError as error:
            _check_message(error)
            if parsed is None:
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
                assert "do not parse" in error.details(), error.details()
                event("unparsable: INVALID_ARGUMENT")
                return
            assert error.code() in _REFUSALS, (error.code(), error.details()[:2000], data)
            event(error.code().name)
            return
        assert parsed is not None, data
        event("OK")

    run()
    _assert_serving(stub)


def test_random_compute_streams_get_a_result_or_a_typed_error(stub, function_ids):
    """ComputeStream: the response stream reassembles into tensors that decode, or the
    call is refused with a typed error."""

    @fuzz(150)
    @given(compute_streams(function_ids))
    def run(messages):
        try:
            responses = stub.ComputeStream(iter(messages), timeout=_TIMEOUT)
            header, buffers = stream.receive(responses, "compute_response", 2**31)
        except grpc.RpcError as error:
            assert error.code() in _REFUSALS, (error.code(), error.details()[:2000], messages)
            _check_message(error)
            event(error.code().name)
            return
        for (what, tensor), buffer in zip(stream.tensors(header), buffers, strict=True):
            codec.decode(tensor, what, buffer)
        event("OK")

    run()
    _assert_serving(stub)
