"""The fast path (service/fastpath.py): a repeated Compute answers exactly as the full path.

Each request is sent twice over a real socket: once with its spec inline (which never takes
the fast path) and once by function id after a first call has planned it. The answers must
be identical, kind by kind, for new points and other batch sizes, and a request the plan
cannot vouch for falls back to the full path's own error.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import fastpath
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

EXPRESSION = "sum(tanh(A @ x) ** 2) * x[0]"  # scalar; A is shared
VECTOR_EXPRESSION = "tanh(A @ x) * x[0]"  # (3,)


@pytest.fixture(scope="module", params=["threads", "aio"])
def stub(request):
    """Each transport has the fast path: in HessdServicer.Compute (threads), and on the
    event loop (aio, service/handlers.py)."""
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, server=request.param)
    server, port = create_server(config)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield hessd_pb2_grpc.HessdStub(channel), server
    server.stop(None)


def _spec(expression: str) -> hessd_pb2.FunctionSpec:
    spec = hessd_pb2.FunctionSpec(expression=hessd_pb2.Expression(source=expression))
    for name, shape in (("x", (4,)), ("A", (3, 4))):
        spec.inputs.add(name=name, shape=shape, dtype=hessd_pb2.FLOAT64)
    return spec


def _request(points: np.ndarray, kind: int, vector: np.ndarray | None = None, **options):
    request = hessd_pb2.ComputeRequest(kind=kind, shared=["A"], **options)
    codec.encode(points, out=request.inputs.add(name="x").tensor)
    a = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    codec.encode(a, out=request.inputs.add(name="A").tensor)
    if vector is not None:
        codec.encode(vector, out=request.vector)
    return request


def _arrays(response: hessd_pb2.ComputeResponse) -> dict[str, np.ndarray]:
    if response.HasField("output"):
        return {"output": codec.decode(response.output)}
    return {item.name: codec.decode(item.tensor) for item in response.outputs}


CASES = [
    ("value", hessd_pb2.VALUE, EXPRESSION, None, {}),
    ("gradient", hessd_pb2.GRADIENT, EXPRESSION, None, {}),
    ("hessian", hessd_pb2.HESSIAN, EXPRESSION, None, {}),
    ("hessian packed", hessd_pb2.HESSIAN, EXPRESSION, None, {"packed": True}),
    ("hessian wrt x", hessd_pb2.HESSIAN, EXPRESSION, None, {"wrt": ["x"]}),
    ("hvp", hessd_pb2.HVP, EXPRESSION, (4,), {}),
    ("taylor2", hessd_pb2.TAYLOR2, EXPRESSION, None, {}),
    ("jacobian", hessd_pb2.JACOBIAN, VECTOR_EXPRESSION, None, {}),
    ("jacobian denominator", hessd_pb2.JACOBIAN, VECTOR_EXPRESSION, None,
     {"layout": hessd_pb2.DENOMINATOR}),
    ("jacobian float32", hessd_pb2.JACOBIAN, VECTOR_EXPRESSION, None,
     {"output_dtype": hessd_pb2.FLOAT32}),
    ("jvp", hessd_pb2.JVP, VECTOR_EXPRESSION, (4,), {}),
    ("vjp", hessd_pb2.VJP, VECTOR_EXPRESSION, (3,), {}),
    ("taylor", hessd_pb2.TAYLOR, VECTOR_EXPRESSION, (4,), {"order": 3}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fast_path_answers_as_the_full_path(stub, case):
    stub, server = stub
    _, kind, expression, vector_shape, options = case
    fid = stub.Register(hessd_pb2.RegisterRequest(spec=_spec(expression))).function_id
    rng = np.random.default_rng(0)
    hits = server.servicer.plans.hits
    for batch in (3, 3, 5, 1):  # the first plans; the others take the fast path
        points = rng.normal(size=(batch, 4))
        vector = None if vector_shape is None else rng.normal(size=(batch, *vector_shape))
        by_id = _request(points, kind, vector, function_id=fid, **options)
        inline = _request(points, kind, vector, spec=_spec(expression), **options)
        fast, full = _arrays(stub.Compute(by_id)), _arrays(stub.Compute(inline))
        assert fast.keys() == full.keys()
        for name in full:
            assert fast[name].dtype == full[name].dtype
            np.testing.assert_array_equal(fast[name], full[name])
    assert server.servicer.plans.hits - hits == 3


def test_a_planned_request_with_bad_bytes_gets_the_full_paths_error(stub):
    stub, _ = stub
    fid = stub.Register(hessd_pb2.RegisterRequest(spec=_spec(EXPRESSION))).function_id
    stub.Compute(_request(np.ones((2, 4)), hessd_pb2.GRADIENT, function_id=fid))
    bad = _request(np.ones((2, 4)), hessd_pb2.GRADIENT, function_id=fid)
    bad.inputs[0].tensor.data = bad.inputs[0].tensor.data[:-8]  # a value short
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 64" in info.value.details()
    mismatched = _request(np.ones((2, 4)), hessd_pb2.HVP, np.ones((3, 4)), function_id=fid)
    stub.Compute(_request(np.ones((2, 4)), hessd_pb2.HVP, np.ones((2, 4)), function_id=fid))
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(mismatched)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 rows but there are 2 points" in info.value.details()


def test_a_planned_request_over_the_output_limit_is_refused(stub):
    stub, server = stub
    fid = stub.Register(hessd_pb2.RegisterRequest(spec=_spec(EXPRESSION))).function_id
    stub.Compute(_request(np.ones((1, 4)), hessd_pb2.HESSIAN, function_id=fid))
    limit = server.config.max_output_bytes
    points = limit // (16 * 8) + 1  # one more point than the limit holds
    request = _request(np.zeros((points, 4)), hessd_pb2.HESSIAN, function_id=fid)
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-output-bytes" in info.value.details()


def test_every_compute_request_field_is_known_to_the_fast_path():
    """A field added to ComputeRequest must be keyed, or keep a request off the fast path:
    otherwise a plan could answer a request it was not made for."""
    fields = {f.name for f in hessd_pb2.ComputeRequest.DESCRIPTOR.fields}
    assert fields == fastpath.KEYED | fastpath.SLOW
    assert not fastpath.KEYED & fastpath.SLOW


def test_requests_off_the_fast_path_have_no_key():
    request = _request(np.ones((1, 4)), hessd_pb2.GRADIENT, function_id="f")
    assert fastpath.key(request) is not None
    for change in (
        lambda r: setattr(r.inputs[0].tensor, "handle", "h"),
        lambda r: setattr(r, "sparse", True),
        lambda r: setattr(r, "num_matvecs", 3),
        lambda r: r.objective.SetInParent(),
        lambda r: r.spec.SetInParent(),
    ):
        changed = hessd_pb2.ComputeRequest()
        changed.CopyFrom(request)
        change(changed)
        assert fastpath.key(changed) is None
    # The batch size is not part of the key; a point's shape is.
    other = _request(np.ones((7, 4)), hessd_pb2.GRADIENT, function_id="f")
    assert fastpath.key(other) == fastpath.key(request)
    scalar = hessd_pb2.ComputeRequest()
    scalar.CopyFrom(request)
    scalar.inputs[0].tensor.shape[:] = [4]
    assert fastpath.key(scalar) != fastpath.key(request)
