"""Bad input gets a typed error with a useful message, over a real socket, and the server
keeps serving. Each case has its own test asserting the status code and a message fragment.

Server-side checks are exercised through the raw stub so the client's own checks (which
mirror them) cannot hide a missing one; the client's checks have their own tests below.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from hessd.client import (
    Client,
    HessdError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc


@pytest.fixture(scope="module")
def stub(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield hessd_pb2_grpc.HessdStub(channel)


def spec(source, inputs=None, dtype=hessd_pb2.FLOAT64):
    inputs = {"x": (3,)} if inputs is None else inputs
    return hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[hessd_pb2.InputSpec(name=n, shape=s, dtype=dtype) for n, s in inputs.items()],
    )


def register(stub, *args, **kwargs):
    return stub.Register(hessd_pb2.RegisterRequest(spec=spec(*args, **kwargs)), timeout=30)


def compute(stub, fid, kind=hessd_pb2.VALUE, x=None, **fields):
    x = np.ones((2, 3)) if x is None else x
    request = hessd_pb2.ComputeRequest(
        function_id=fid,
        kind=kind,
        inputs=[hessd_pb2.NamedTensor(name="x", tensor=codec.encode(x))],
        **fields,
    )
    return stub.Compute(request, timeout=30)


def assert_status(call, code, fragment):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


def assert_serving(stub):
    fid = register(stub, "sum(x**2)").function_id
    out = codec.decode(compute(stub, fid, hessd_pb2.GRADIENT).output)
    np.testing.assert_array_equal(out, 2 * np.ones((2, 3)))


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("__import__('os')", "__import__"),
        ("x.__class__", "attribute"),
        ("open('f')", "open"),
        ("sum(x).shape", "attribute"),
        ("(lambda y: y)(x)", "lambda"),
        ("sum([y for y in x])", "comprehension"),
    ],
)
def test_expression_outside_allowlist(stub, source, fragment):
    assert_status(lambda: register(stub, source), INVALID, fragment)
    assert_serving(stub)


def test_syntax_error_gives_line_and_column(stub):
    assert_status(lambda: register(stub, "y = x + 1\nsum(y *)"), INVALID, "line 2")
    assert_status(lambda: register(stub, "y = x + 1\nsum(y *)"), INVALID, "column")


def test_oversized_expression(stub):
    assert_status(lambda: register(stub, "x + " * 10_000 + "x"), INVALID, "20000")


@pytest.mark.parametrize(
    "source",
    [
        "-" * 5000 + "x",
        "+".join(["x"] * 4000),
        "x * (" * 150 + "x" + ")" * 150,
        "sin(" * 200 + "x" + ")" * 200,
    ],
)
def test_deeply_nested_expression_is_refused_not_a_recursion_error(stub, source):
    with pytest.raises(grpc.RpcError) as info:
        register(stub, source)
    assert info.value.code() == INVALID
    assert "Recursion" not in info.value.details()
    assert_serving(stub)


def test_points_of_wrong_shape(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(lambda: compute(stub, fid, x=np.ones((2, 4))), INVALID, "expected (batch, 3)")
    assert_status(lambda: compute(stub, fid, x=np.ones(3)), INVALID, "leading batch axis")


def test_points_of_wrong_dtype(stub):
    fid = register(stub, "sum(x**2)").function_id
    x = np.ones((2, 3), np.float32)
    assert_status(
        lambda: compute(stub, fid, x=x), INVALID, "dtype float32; the function takes float64"
    )


def test_tensor_bytes_do_not_match_shape(stub):
    fid = register(stub, "sum(x**2)").function_id
    bad = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT64, shape=[2, 3], data=b"\0" * 40)
    request = hessd_pb2.ComputeRequest(
        function_id=fid, kind=hessd_pb2.VALUE, inputs=[hessd_pb2.NamedTensor(name="x", tensor=bad)]
    )
    assert_status(
        lambda: stub.Compute(request, timeout=30), INVALID, "has 40 bytes of data but shape (2, 3)"
    )


def test_gradient_of_non_scalar_function(stub):
    fid = register(stub, "sin(x)").function_id
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.GRADIENT),
        INVALID,
        "only defined for scalar-output functions",
    )
    assert_status(lambda: compute(stub, fid, hessd_pb2.GRADIENT), INVALID, "Use jacobian")


def test_hvp_of_non_scalar_function(stub):
    fid = register(stub, "sin(x)").function_id
    v = codec.encode(np.ones((2, 3)))
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.HVP, vector=v),
        INVALID,
        "hvp is only defined for scalar-output",
    )


def test_unknown_function_id(stub):
    assert_status(
        lambda: compute(stub, "0" * 64), grpc.StatusCode.NOT_FOUND, "register its spec first"
    )


def test_unknown_kind(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(lambda: compute(stub, fid, kind=99), INVALID, "unknown kind 99")
    assert_status(
        lambda: compute(stub, fid, kind=hessd_pb2.KIND_UNSPECIFIED), INVALID, "unknown kind 0"
    )


def test_output_over_the_limit_is_refused_before_work(stub):
    # 300 Hessians of n=1000 in float64 would be 2.4 GB, over the default 1 GiB limit.
    fid = register(stub, "sum(x**2)", {"x": (1000,)}).function_id
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.HESSIAN, x=np.ones((300, 1000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over this server's limit",
    )
    assert_serving(stub)


def test_one_point_over_the_limit_names_what_can_help(stub):
    # One Hessian of n=12000 in float64 is 1.15 GB: fewer points cannot help.
    fid = register(stub, "sum(x**2)", {"x": (12_000,)}).function_id
    with pytest.raises(grpc.RpcError) as info:
        compute(stub, fid, hessd_pb2.HESSIAN, x=np.ones((1, 12_000)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = info.value.details()
    assert "one point alone" in message and "send fewer points" not in message
    for remedy in ("packed=True", "output_dtype", "hvp", "--max-output-bytes"):
        assert remedy in message, message
    assert_serving(stub)


def test_missing_vector_for_hvp(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(lambda: compute(stub, fid, hessd_pb2.HVP), INVALID, "hvp v is missing")


def test_vector_of_wrong_shape(stub):
    fid = register(stub, "sum(x**2)").function_id
    v = codec.encode(np.ones((2, 4)))
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.HVP, vector=v), INVALID, "the hvp v has shape (2, 4)"
    )


def test_vector_for_a_kind_without_one(stub):
    fid = register(stub, "sum(x**2)").function_id
    v = codec.encode(np.ones((2, 3)))
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.GRADIENT, vector=v), INVALID, "takes no vector"
    )


def test_unknown_wrt(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.GRADIENT, wrt="y"), INVALID, "wrt='y' is not an input"
    )


def test_missing_and_unknown_inputs(stub):
    fid = register(stub, "sum(x * y)", {"x": (3,), "y": (3,)}).function_id
    assert_status(lambda: compute(stub, fid), INVALID, "missing ['y']")


def test_jacobian_mode_on_another_kind(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(
        lambda: compute(stub, fid, hessd_pb2.HESSIAN, jacobian_mode=hessd_pb2.FORWARD),
        INVALID,
        "jacobian_mode applies only to kind jacobian",
    )


def test_layout_on_value(stub):
    fid = register(stub, "sum(x**2)").function_id
    assert_status(
        lambda: compute(stub, fid, layout=hessd_pb2.DENOMINATOR), INVALID, "layout applies only"
    )


def test_request_names_no_function(stub):
    assert_status(
        lambda: stub.Compute(hessd_pb2.ComputeRequest(kind=hessd_pb2.VALUE), timeout=30),
        INVALID,
        "names no function",
    )


def test_spec_with_shape_mismatch(stub):
    assert_status(lambda: register(stub, "x @ ones", {"x": (3,)}), INVALID, "'ones'")
    bad = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source="x @ A"),
        inputs=[hessd_pb2.InputSpec(name="x", shape=[3], dtype=hessd_pb2.FLOAT64)],
        constants=[hessd_pb2.NamedTensor(name="A", tensor=codec.encode(np.ones((4, 2))))],
    )
    assert_status(
        lambda: stub.Register(hessd_pb2.RegisterRequest(spec=bad), timeout=30), INVALID, "line 1"
    )


def test_spec_without_inputs_or_body(stub):
    assert_status(
        lambda: stub.Register(hessd_pb2.RegisterRequest(spec=hessd_pb2.FunctionSpec()), timeout=30),
        INVALID,
        "no body",
    )
    assert_status(lambda: register(stub, "1.0", {}), INVALID, "declares no inputs")


def test_spec_with_integer_input_dtype(stub):
    assert_status(
        lambda: register(stub, "sum(x)", dtype=hessd_pb2.INT32),
        INVALID,
        "must be float32 or float64",
    )


def test_spec_with_bad_input_name(stub):
    assert_status(
        lambda: register(stub, "sum(x)", {"__x": (3,)}), INVALID, "name '__x' is not allowed"
    )


# The client checks before sending and raises the same typed errors.


def test_client_raises_typed_errors(server_address):
    with Client(server_address) as c:
        f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
        with pytest.raises(InvalidArgument, match=r"has shape .*expected \(batch, 3\)") as info:
            c.gradient(f, np.ones((2, 4)))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgument, match="only defined for scalar-output") as info:
            c.gradient(c.register("sin(x)", {"x": (3,)}, dtype="float64"), np.ones((2, 3)))
        with pytest.raises(InvalidArgument, match="line 1"):
            c.register("x.__class__", {"x": (3,)})
        with pytest.raises(InvalidArgument, match="converting would change its values"):
            c.gradient(c.register("sum(x**2)", {"x": (3,)}), np.full((2, 3), 0.1))
        with pytest.raises(InvalidArgument, match="not a rectangular array"):
            c.gradient(c.register("sum(x**2)", {"x": (3,)}), [[0.1, 0.2, 0.3], [0.1]])
        with pytest.raises(InvalidArgument, match="mode='sideways'"):
            c.jacobian(f, np.ones((2, 3)), mode="sideways")
        with pytest.raises(InvalidArgument, match="unknown kind 'laplacian'"):
            c.compute(f, "laplacian", np.ones((2, 3)))
        with pytest.raises(InvalidArgument, match="pass a dict"):
            c.value(c.register("sum(x * y)", {"x": (3,), "y": (3,)}), np.ones((2, 3)))
        gone = type(f)(id="f" * 64, inputs=f.inputs, output_shape=(), dtype=f.dtype, spec=None)
        with pytest.raises(NotFound) as info:
            c.value(gone, np.ones((2, 3)))
        assert isinstance(info.value, HessdError) and "register" in info.value.message
        with pytest.raises(ResourceExhausted, match="over this server's limit"):
            big = c.register("sum(x**2)", {"x": (1000,)}, dtype="float64")
            c.hessian(big, np.ones((300, 1000)))


def test_client_deadline(server_address):
    from hessd.client import DeadlineExceeded

    with Client(server_address) as c:
        f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
        with pytest.raises(DeadlineExceeded):
            c.hessian(f, np.ones((4, 3)), timeout=1e-6)
