"""The Open Inference Protocol, driven by the real Triton client (tritonclient.grpc).

tritonclient 2.73 requires protobuf <7, so it is not in the development virtualenv:
tests/test_compat.py runs this module in an environment that has it beside hessd (and
fails if anything here skips). Run by hand:
`PYTHONPATH=build/compat/tritonclient .venv/bin/python -m pytest tests/test_oip.py` after
test_compat has made that folder.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc",
    reason="tritonclient needs protobuf <7: tests/test_compat.py runs this module beside it",
)
from tritonclient.grpc import service_pb2 as triton_pb2  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as triton_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from hessd.client import Client  # noqa: E402
from hessd.proto.oip import grpc_predict_v2_pb2 as oip_pb2  # noqa: E402
from hessd.service import oip  # noqa: E402
from hessd.service.config import ServerConfig  # noqa: E402
from hessd.service.security import Principal, Tokens  # noqa: E402
from hessd.service.server import HessdServer  # noqa: E402

from conftest import allclose  # noqa: E402

A = np.array([[2.0, 1.0, 0.0], [0.5, 3.0, 1.0], [0.0, -1.0, 4.0]])


@pytest.fixture(scope="module")
def models(server_address):
    """Functions registered under names: a quadratic (scalar, float64), a map R^3 → R^2
    (float32) and a scalar of two inputs."""
    with Client(server_address, timeout=60.0) as c:
        quad = c.register(
            "x @ A @ x + sum(sin(x))", inputs={"x": (3,)}, constants={"A": A},
            dtype="float64", name="quadratic",
        )  # fmt: skip
        vec = c.register("stack([sum(x ** 2), prod(x)])", inputs={"x": (3,)}, name="map")
        two = c.register("sum(x * y) + sum(x ** 2)", inputs={"x": (2,), "y": (2,)},
                         dtype="float64", name="two")  # fmt: skip
    return {"quadratic": quad, "map": vec, "two": two}


@pytest.fixture
def triton(server_address, models):
    client = tritonclient_grpc.InferenceServerClient(url=server_address)
    yield client
    client.close()


@pytest.fixture
def stub(server_address):
    with grpc.insecure_channel(server_address) as channel:
        yield triton_grpc.GRPCInferenceServiceStub(channel)


def infer_input(name, array):
    datatype = {"float64": "FP64", "float32": "FP32", "float16": "FP16", "int32": "INT32"}
    item = tritonclient_grpc.InferInput(name, list(array.shape), datatype[array.dtype.name])
    item.set_data_from_numpy(array)
    return item


def infer(triton, model, kind=None, version="", **inputs):
    parameters = {"kind": kind} if kind else None
    items = [infer_input(n, a) for n, a in inputs.items()]
    return triton.infer(model, items, model_version=version, parameters=parameters)


def expect_error(code, fragment, call, *args, **kwargs):
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    assert raised.value.status() == str(code), raised.value
    assert fragment in raised.value.message(), raised.value.message()
    return raised.value.message()


# ---- the contract


def test_messages_and_field_numbers_match_tritonclient():
    ours = oip_pb2.DESCRIPTOR
    service = ours.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    # The service's name travels on the wire; the messages' package does not.
    assert oip.SERVICE_NAME == theirs.full_name == "inference.GRPCInferenceService"

    def fields(message):
        found = {}
        for f in message.fields:
            found[f.name] = (f.number, f.type, f.message_type and f.message_type.name)
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                found.update({f"{nested.name}.{k}": v for k, v in fields(nested).items()})
        return found

    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        for ours_type, their_type in (
            (method.input_type, other.input_type),
            (method.output_type, other.output_type),
        ):
            assert ours_type.name == their_type.name
            mine, triton = fields(ours_type), fields(their_type)
            # Triton's messages are a superset of the protocol's; ours may not differ.
            assert {k: triton.get(k) for k in mine} == mine, ours_type.full_name


# ---- health and metadata


def test_server_live_ready_and_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata.name == "hessd" and metadata.version


def test_model_ready(triton):
    assert triton.is_model_ready("quadratic")
    assert triton.is_model_ready("quadratic", "hessian")
    assert not triton.is_model_ready("map", "gradient")  # gradient needs a scalar f
    assert not triton.is_model_ready("no-such-model")


def test_model_metadata(triton):
    m = triton.get_model_metadata("quadratic")
    assert m.platform == "hessd"
    assert list(m.versions) == ["value", "gradient", "jacobian", "hessian", "hvp", "jvp",
                                "vjp", "taylor2", "taylor"]  # fmt: skip
    assert [(i.name, i.datatype, list(i.shape)) for i in m.inputs] == [("x", "FP64", [-1, 3])]
    outputs = {o.name: list(o.shape) for o in m.outputs}
    assert outputs["gradient"] == [-1, 3] and outputs["hessian"] == [-1, 3, 3]
    assert outputs["value"] == [-1]

    hvp = triton.get_model_metadata("quadratic", "hvp")
    assert [(i.name, list(i.shape)) for i in hvp.inputs] == [("x", [-1, 3]), ("vector", [-1, 3])]
    assert [(o.name, list(o.shape)) for o in hvp.outputs] == [("hvp", [-1, 3])]

    vec = triton.get_model_metadata("map")
    assert "gradient" not in vec.versions
    assert [(i.name, i.datatype) for i in vec.inputs] == [("x", "FP32")]
    assert {o.name: list(o.shape) for o in vec.outputs}["jacobian"] == [-1, 2, 3]


# ---- derivatives equal hessd.v1's


@pytest.mark.parametrize("kind", ["value", "gradient", "jacobian", "hessian"])
def test_kinds_equal_hessd_v1(triton, client, models, rng, kind):
    x = rng.normal(size=(5, 3))
    result = infer(triton, "quadratic", kind, x=x)
    expected = client.compute(models["quadratic"], kind, x)
    assert result.get_response().model_version == kind
    np.testing.assert_array_equal(result.as_numpy(kind), expected)
    assert result.as_numpy(kind).dtype == np.float64


def test_hessian_closed_form(triton, rng):
    x = rng.normal(size=(4, 3))
    H = infer(triton, "quadratic", "hessian", x=x).as_numpy("hessian")
    expected = (A + A.T)[None] - np.einsum("bi,ij->bij", np.sin(x), np.eye(3))
    allclose(H, expected)


def test_hvp_equals_hessd_v1(triton, client, models, rng):
    x, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    result = infer(triton, "quadratic", "hvp", x=x, vector=v).as_numpy("hvp")
    np.testing.assert_array_equal(result, client.hvp(models["quadratic"], x, v))


def test_model_version_chooses_the_kind(triton, client, models, rng):
    x = rng.normal(size=(2, 3)).astype(np.float32)
    result = infer(triton, "map", version="jacobian", x=x)
    assert result.as_numpy("jacobian").shape == (2, 2, 3)
    np.testing.assert_array_equal(result.as_numpy("jacobian"), client.jacobian(models["map"], x))


def test_default_kind_is_value(triton, rng):
    x = rng.normal(size=(3, 3)).astype(np.float32)
    value = infer(triton, "map", x=x).as_numpy("value")
    allclose(value, np.stack([(x**2).sum(1), x.prod(1)], 1), np.float32)


def test_parameters_wrt_and_layout(triton, client, models, rng):
    x, y = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    items = [infer_input("x", x), infer_input("y", y)]
    result = triton.infer("two", items, parameters={"kind": "gradient", "wrt": "x,y"})
    names = {o.name for o in result.get_response().outputs}
    assert names == {"x", "y"}
    allclose(result.as_numpy("x"), y + 2 * x)
    allclose(result.as_numpy("y"), x)
    # Denominator layout of the map's Jacobian: (batch, n, m).
    z = rng.normal(size=(2, 3)).astype(np.float32)
    result = triton.infer(
        "map", [infer_input("x", z)], parameters={"kind": "jacobian", "layout": "denominator"}
    )
    np.testing.assert_array_equal(
        result.as_numpy("jacobian"), client.jacobian(models["map"], z, layout="denominator")
    )


def test_output_dtype_fp16_comes_raw(triton, rng):
    x = rng.normal(size=(2, 3))
    result = triton.infer(
        "quadratic", [infer_input("x", x)],
        parameters={"kind": "gradient", "output_dtype": "FP16"},
    )  # fmt: skip
    assert result.get_output("gradient").datatype == "FP16"
    assert result.as_numpy("gradient").dtype == np.float16


def test_requested_outputs(triton, rng):
    x = rng.normal(size=(2, 3))
    result = triton.infer(
        "quadratic", [infer_input("x", x)], parameters={"kind": "taylor2"},
        outputs=[tritonclient_grpc.InferRequestedOutput("hessian")],
    )  # fmt: skip
    assert [o.name for o in result.get_response().outputs] == ["hessian"]


def test_typed_contents_in_and_out(stub, client, models, rng):
    x = rng.normal(size=(2, 3))
    request = triton_pb2.ModelInferRequest(model_name="quadratic", model_version="gradient")
    item = request.inputs.add(name="x", datatype="FP64", shape=[2, 3])
    item.contents.fp64_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    assert not response.raw_output_contents
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("gradient", "FP64", [2, 3])
    got = np.array(out.contents.fp64_contents).reshape(2, 3)
    np.testing.assert_array_equal(got, client.gradient(models["quadratic"], x))


def test_batched_calls_in_parallel(triton, client, models, rng):
    import concurrent.futures

    xs = [rng.normal(size=(1, 3)) for _ in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: infer(triton, "quadratic", "gradient", x=x), xs))
    for x, r in zip(xs, results, strict=True):
        allclose(r.as_numpy("gradient"), client.gradient(models["quadratic"], x))


# ---- errors, each with its status and message


def test_unknown_model(triton):
    expect_error(
        grpc.StatusCode.NOT_FOUND, "no model named 'nope'", infer, triton, "nope", x=np.ones((1, 3))
    )


def test_unknown_model_metadata(triton):
    expect_error(
        grpc.StatusCode.NOT_FOUND, "no model named 'nope'", triton.get_model_metadata, "nope"
    )


def test_unknown_version(triton):
    expect_error(
        grpc.StatusCode.NOT_FOUND, "has no version 'sideways'",
        infer, triton, "quadratic", version="sideways", x=np.ones((1, 3)),
    )  # fmt: skip
    expect_error(
        grpc.StatusCode.NOT_FOUND, "has no version 'gradient'",
        triton.get_model_metadata, "map", "gradient",
    )  # fmt: skip


def test_wrong_input_name_has_hessd_v1s_message(triton, client, models):
    message = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "'y'", infer, triton, "quadratic", "gradient",
        y=np.ones((1, 3)),
    )  # fmt: skip
    from hessd.proto import codec
    from hessd.proto.v1 import hessd_pb2

    request = hessd_pb2.ComputeRequest(function_id=models["quadratic"].id, kind=hessd_pb2.GRADIENT)
    request.inputs.add(name="y", tensor=codec.encode(np.ones((1, 3))))
    with pytest.raises(grpc.RpcError) as raised:
        client._stub.Compute(request)
    assert raised.value.details() == message


def test_wrong_input_shape(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "has shape (2, 4); expected (batch, 3)",
        infer, triton, "quadratic", "gradient", x=np.ones((2, 4)),
    )  # fmt: skip


def test_gradient_of_a_vector_function(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "scalar-output",
        infer, triton, "map", "gradient", x=np.ones((1, 3), np.float32),
    )  # fmt: skip


def test_unsupported_datatype(triton):
    item = tritonclient_grpc.InferInput("x", [1, 3], "UINT8")
    item.set_data_from_numpy(np.ones((1, 3), np.uint8))
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "datatype 'UINT8' is not one hessd computes with",
        triton.infer, "quadratic", [item],
    )  # fmt: skip


def test_unknown_parameter(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "unknown request parameters ['colour']",
        triton.infer, "quadratic", [infer_input("x", np.ones((1, 3)))],
        parameters={"colour": "blue"},
    )  # fmt: skip


def test_parameter_of_the_wrong_type(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "parameter 'kind' must be a string, got int64",
        triton.infer, "quadratic", [infer_input("x", np.ones((1, 3)))], parameters={"kind": 3},
    )  # fmt: skip


def test_unknown_kind(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "unknown Kind 'curl'",
        infer, triton, "quadratic", "curl", x=np.ones((1, 3)),
    )  # fmt: skip


def test_curvature_kind_refused(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "needs an objective over a data set",
        infer, triton, "quadratic", "diagonal", x=np.ones((1, 3)),
    )  # fmt: skip


def test_kind_and_version_disagree(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "disagree",
        infer, triton, "quadratic", "hessian", version="gradient", x=np.ones((1, 3)),
    )  # fmt: skip


def test_missing_vector(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "send it as the input named 'vector'",
        infer, triton, "quadratic", "hvp", x=np.ones((1, 3)),
    )  # fmt: skip


def test_unknown_requested_output(triton):
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, "requested outputs ['jacobian']",
        triton.infer, "quadratic", [infer_input("x", np.ones((1, 3)))],
        parameters={"kind": "gradient"},
        outputs=[tritonclient_grpc.InferRequestedOutput("jacobian")],
    )  # fmt: skip


def test_raw_contents_count_mismatch(stub):
    request = triton_pb2.ModelInferRequest(model_name="two", raw_input_contents=[b"\0" * 16])
    request.inputs.add(name="x", datatype="FP64", shape=[1, 2])
    request.inputs.add(name="y", datatype="FP64", shape=[1, 2])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 1 entries for 2 inputs" in raised.value.details()


def test_raw_bytes_of_the_wrong_length(stub):
    request = triton_pb2.ModelInferRequest(model_name="quadratic", raw_input_contents=[b"\0" * 7])
    request.inputs.add(name="x", datatype="FP64", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "24" in raised.value.details() and "7" in raised.value.details()


def test_typed_contents_for_fp16_refused(stub):
    request = triton_pb2.ModelInferRequest(model_name="quadratic")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no typed contents field" in raised.value.details()


def test_typed_contents_in_the_wrong_field(stub):
    request = triton_pb2.ModelInferRequest(model_name="quadratic")
    item = request.inputs.add(name="x", datatype="FP64", shape=[1, 3])
    item.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents.fp32_contents is set" in raised.value.details()


# ---- tokens: the protocol's metadata carries them


@pytest.fixture(scope="module")
def guarded():
    tokens = Tokens([("s3cret-token-for-oip-tests", Principal("alice"))])
    server = HessdServer(ServerConfig(host="127.0.0.1", port=0, workers=4), tokens)
    server.start()
    yield f"127.0.0.1:{server.port}"
    server.stop(None)


def test_token_required(guarded):
    triton = tritonclient_grpc.InferenceServerClient(url=guarded)
    try:
        expect_error(grpc.StatusCode.UNAUTHENTICATED, "missing, repeated or unknown token",
                     triton.is_server_live)  # fmt: skip
        live = triton.is_server_live(headers={"authorization": "Bearer s3cret-token-for-oip-tests"})
        assert live
    finally:
        triton.close()


def test_metrics_and_request_log_count_model_infer(rng, caplog):
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, log_requests=True)
    server = HessdServer(config, Tokens())
    server.start()
    address = f"127.0.0.1:{server.port}"
    triton = tritonclient_grpc.InferenceServerClient(url=address)
    try:
        with Client(address, timeout=60.0) as c:
            c.register("sum(x ** 2)", inputs={"x": (3,)}, dtype="float64", name="square")
        with caplog.at_level("INFO", logger="hessd.requests"):
            infer(triton, "square", "gradient", x=rng.normal(size=(4, 3)))
        sample = server.metrics.registry.get_sample_value(
            "hessd_requests_total", {"method": "ModelInfer", "kind": "gradient", "status": "OK"}
        )
        assert sample == 1
        assert any("method=ModelInfer" in r.message and "points=4" in r.message
                   for r in caplog.records)  # fmt: skip
    finally:
        triton.close()
        server.stop(None)


def test_v1_register_name_gives_a_model(client, triton, rng):
    client.register("sum(x ** 3)", inputs={"x": (2,)}, dtype="float64", name="cubic")
    x = rng.normal(size=(2, 2))
    allclose(infer(triton, "cubic", "gradient", x=x).as_numpy("gradient"), 3 * x**2)
    # Registering another spec under the name moves it.
    client.register("sum(x ** 2)", inputs={"x": (2,)}, dtype="float64", name="cubic")
    allclose(infer(triton, "cubic", "gradient", x=x).as_numpy("gradient"), 2 * x)


def test_tls(tmp_path, rng):
    import certs

    made = certs.make_pki()
    for name, pem in made.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
    config = ServerConfig(
        host="127.0.0.1", port=0, workers=4,
        tls_cert=str(tmp_path / "server_cert.pem"), tls_key=str(tmp_path / "server_key.pem"),
    )  # fmt: skip
    server = HessdServer(config, Tokens())
    server.start()
    address = f"127.0.0.1:{server.port}"
    triton = tritonclient_grpc.InferenceServerClient(
        url=address, ssl=True, root_certificates=str(tmp_path / "ca.pem")
    )
    try:
        with Client(address, tls=True, root_certificates=made["ca"], timeout=30) as c:
            c.register("sum(x ** 2)", inputs={"x": (3,)}, dtype="float64", name="square")
        x = rng.normal(size=(2, 3))
        allclose(infer(triton, "square", "gradient", x=x).as_numpy("gradient"), 2 * x)
    finally:
        triton.close()
        server.stop(None)


def test_health_reports_the_protocol(server_address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=oip.SERVICE_NAME)
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_methods_hessd_does_not_serve_are_unimplemented(triton):
    expect_error(grpc.StatusCode.UNIMPLEMENTED, "", triton.get_model_config, "quadratic")


def test_readme_example_runs_as_written(server_address):
    import pathlib
    import re
    import subprocess
    import sys

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- oip -->\n```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md lost its Open Inference Protocol block"
    code = match.group(1).replace("127.0.0.1:50051", server_address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["(4, 3, 3)", "True"], result.stdout
