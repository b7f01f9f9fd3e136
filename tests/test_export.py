"""JAX-export specs: functions registered from training code as jax.export artifacts.

The same mathematics through an expression and through an artifact must agree; the
artifact path serves reverse mode only; hostile artifacts are refused and the server keeps
serving."""

from __future__ import annotations

import types

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from hessd.client import Client, InvalidArgument, PermissionDenied
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import exported
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

from conftest import allclose

A = np.random.default_rng(7).normal(size=(3, 4))
INPUTS = {"w": (4,), "x": (3,)}


def loss(w, x):
    return jnp.sum(jnp.tanh(jnp.asarray(A, w.dtype) @ w) * x) + 0.1 * jnp.sum(w**4)


LOSS = "sum(tanh(A @ w) * x) + 0.1 * sum(w**4)"


def features(w, x):
    return jnp.tanh(jnp.asarray(A, w.dtype) @ w) * x


@pytest.fixture(scope="module")
def export_address():
    server, port = create_server(ServerConfig(port=0, allow_jax_export=True, workers=4))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def c(export_address):
    with Client(export_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def pair(c):
    """The same loss as an artifact and as an expression."""
    return (
        c.register(loss, INPUTS, dtype="float64"),
        c.register(LOSS, INPUTS, {"A": A}, dtype="float64"),
    )


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(8)
    return {"w": rng.normal(size=(5, 4)), "x": rng.normal(size=(5, 3))}


@pytest.mark.parametrize("kind", ["value", "gradient", "hessian", "taylor2"])
def test_artifact_equals_expression(c, pair, points, kind):
    artifact, expression = pair
    got, want = c.compute(artifact, kind, points), c.compute(expression, kind, points)
    if isinstance(want, dict):
        assert set(got) == set(want)
        for name in want:
            allclose(got[name], want[name], atol=1e-12)
    else:
        allclose(got, want, atol=1e-12)


def test_artifact_hvp_and_vjp_equal_expression(c, pair, points):
    artifact, expression = pair
    v = np.random.default_rng(9).normal(size=(5, 4))
    allclose(c.hvp(artifact, points, v), c.hvp(expression, points, v), atol=1e-12)
    allclose(c.vjp(artifact, points, np.ones(5)), c.gradient(expression, points), atol=1e-12)
    allclose(c.gradient(artifact, points, wrt="x"), c.gradient(expression, points, wrt="x"))


def test_artifact_jacobian_and_hessian_of_vector_function(c, points):
    artifact = c.register(features, INPUTS, dtype="float64")
    expression = c.register("tanh(A @ w) * x", INPUTS, {"A": A}, dtype="float64")
    for layout in ("numerator", "denominator"):
        allclose(c.jacobian(artifact, points, layout=layout),
                 c.jacobian(expression, points, layout=layout), atol=1e-12)  # fmt: skip
        allclose(c.hessian(artifact, points, layout=layout),
                 c.hessian(expression, points, layout=layout), atol=1e-12)  # fmt: skip
    u = np.random.default_rng(1).normal(size=(5, 3))
    allclose(c.vjp(artifact, points, u), c.vjp(expression, points, u), atol=1e-12)


def test_artifact_with_shared_inputs_and_several_wrt(c, pair, points):
    artifact, expression = pair
    shared = {"w": points["w"][0], "x": points["x"]}
    allclose(c.gradient(artifact, shared, wrt="w", shared=["w"]),
             c.gradient(expression, shared, wrt="w", shared=["w"]), atol=1e-12)  # fmt: skip
    for flatten in (False, True):
        got = c.hessian(artifact, points, wrt=["w", "x"], flatten=flatten)
        want = c.hessian(expression, points, wrt=["w", "x"], flatten=flatten)
        for name in want if isinstance(want, dict) else [None]:
            allclose(got[name] if name else got, want[name] if name else want, atol=1e-12)


def test_artifact_float32(c, points):
    f32 = c.register(loss, INPUTS)  # float32 default
    x32 = {k: v.astype(np.float32) for k, v in points.items()}
    f64 = c.register(LOSS, INPUTS, {"A": A}, dtype="float64")
    g = c.gradient(f32, x32)
    assert g.dtype == np.float32
    allclose(g, c.gradient(f64, points), dtype=np.float32, fd=True)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c, f, p: c.jvp(f, p, p["w"]), "jvp needs forward mode"),
        (lambda c, f, p: c.jacobian(f, p, mode="forward"), "use mode='reverse'"),
        (lambda c, f, p: c.taylor(f, p, p["w"], order=2), "taylor needs forward mode"),
    ],
)
def test_forward_mode_on_artifact_is_refused(c, pair, points, call, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        call(c, pair[0], points)


@pytest.mark.parametrize(
    ("method", "options", "fields"),
    [
        ("exact", {"eigenvectors": True}, ["eigenvalues", "point_class", "gradient_norm"]),
        ("lanczos", {"k": 2}, ["eigenvalues", "residuals", "point_class"]),
        ("trace", {"num_matvecs": 12, "seed": 3}, ["trace", "trace_std_error"]),
        ("density", {"num_steps": 4, "num_probes": 2, "seed": 1}, ["nodes", "weights", "density"]),
    ],
)
def test_artifact_spectrum_equals_expression(c, pair, points, method, options, fields):
    """Every spectral method serves an artifact from its reverse-over-reverse HVPs, batched
    over the points without vmapping the artifact, and equals the expression's."""
    artifact, expression = pair
    got = c.spectrum(artifact, points, method, **options)
    want = c.spectrum(expression, points, method, **options)
    for field in fields:
        if field == "point_class":
            assert list(got.point_class) == list(want.point_class)
        else:
            allclose(getattr(got, field), getattr(want, field), atol=1e-10)


def test_refused_without_allow_flag(client):
    with pytest.raises(PermissionDenied, match="--allow-jax-export") as info:
        client.register(loss, INPUTS, dtype="float64")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def export_spec(fn, *, vjp_order=2, disabled=(), version=jax.__version__):
    (b,) = export.symbolic_shape("b")
    avals = [jax.ShapeDtypeStruct((b, *s), jnp.float64) for s in INPUTS.values()]
    artifact = export.export(jax.jit(jax.vmap(fn)), disabled_checks=list(disabled))(*avals)
    return hessd_pb2.FunctionSpec(
        jax_export=hessd_pb2.JaxExport(
            serialized=bytes(artifact.serialize(vjp_order=vjp_order)), jax_version=version
        ),
        inputs=[
            hessd_pb2.InputSpec(name=n, shape=s, dtype=hessd_pb2.FLOAT64) for n, s in INPUTS.items()
        ],
    )


def register_raw(address, spec):
    with grpc.insecure_channel(address) as channel:
        return hessd_pb2_grpc.HessdStub(channel).Register(
            hessd_pb2.RegisterRequest(spec=spec), timeout=60
        )


def assert_refused(address, c, spec, fragment):
    with pytest.raises(grpc.RpcError) as info:
        register_raw(address, spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details(), info.value.details()
    assert (
        c.value(
            c.register("sum(w) * sum(x)", INPUTS, dtype="float64"),
            {"w": np.ones((1, 4)), "x": np.ones((1, 3))},
        )[0]
        == 12.0
    )


def test_custom_call_outside_allowlist_is_refused(export_address, c):
    def with_eig(w, x):
        # jnp.linalg.eigvals lowers to LAPACK geev: a real target, but not on hessd's list.
        fixed = jax.lax.stop_gradient(w)  # no derivative reaches geev
        spectrum = jnp.real(jnp.linalg.eigvals(jnp.outer(fixed, fixed) + jnp.eye(4)))
        return loss(w, x) + jnp.sum(spectrum)

    assert_refused(
        export_address, c, export_spec(with_eig), "custom-call target 'lapack_dgeev_ffi'"
    )


def test_disabled_safety_checks_are_refused(export_address, c):
    def evil(w, x):
        call = jax.ffi.ffi_call(
            "evil_target", jax.ShapeDtypeStruct((), jnp.float64), vmap_method="sequential"
        )
        return loss(w, x) + call(jnp.sum(jax.lax.stop_gradient(w)))

    spec = export_spec(evil, disabled=[export.DisabledSafetyCheck.custom_call("evil_target")])
    assert_refused(export_address, c, spec, "safety checks disabled")


def test_artifact_from_newer_jax_is_refused(export_address, c):
    spec = export_spec(loss, version="99.0.0")
    assert_refused(
        export_address,
        c,
        spec,
        f"made by JAX 99.0.0, newer than this server's JAX {jax.__version__}",
    )


def test_artifact_without_second_order_vjp_is_refused(export_address, c):
    assert_refused(export_address, c, export_spec(loss, vjp_order=1), "serialize(vjp_order=2)")


def test_malformed_artifact_is_refused(export_address, c):
    spec = export_spec(loss)
    spec.jax_export.serialized = b"not a flatbuffer"
    assert_refused(export_address, c, spec, "could not be deserialized")


def test_artifact_disagreeing_with_declared_inputs_is_refused(export_address, c):
    spec = export_spec(loss)
    spec.inputs[0].shape[:] = [5]
    assert_refused(export_address, c, spec, "input 'w': the artifact takes")


def fake_artifact(text, **overrides):
    fields = {"disabled_safety_checks": (), "platforms": ("cpu",), "nr_devices": 1}
    return types.SimpleNamespace(**(fields | overrides), mlir_module=lambda: text)


HOST_TRANSFERS = {
    "send": '%0 = "stablehlo.send"(%x, %t) {channel_handle = #stablehlo.channel_handle<handle = 1, '
    "type = 2>, is_host_transfer = true} : (tensor<f32>, !stablehlo.token) -> !stablehlo.token",
    "recv": '%0:2 = "stablehlo.recv"(%t) {channel_handle = #stablehlo.channel_handle<handle = 1, '
    "type = 3>, is_host_transfer = true} : (!stablehlo.token) -> (tensor<f32>, !stablehlo.token)",
    "infeed": '%0:2 = "stablehlo.infeed"(%t) {infeed_config = ""} : (!stablehlo.token) -> '
    "(tensor<f32>, !stablehlo.token)",
    "outfeed": '%0 = "stablehlo.outfeed"(%x, %t) {outfeed_config = ""} : (tensor<f32>, '
    "!stablehlo.token) -> !stablehlo.token",
}


def module(body: str) -> str:
    return (
        "func.func @main(%x: tensor<f32>, %t: !stablehlo.token) -> tensor<f32> {\n"
        f"  {body}\n  return %x : tensor<f32>\n}}"
    )


@pytest.mark.parametrize("op", list(HOST_TRANSFERS))
def test_host_transfer_ops_are_refused(op):
    with pytest.raises(exported.InvalidArgument, match=f"stablehlo.{op}: host transfers"):
        exported.check_module(fake_artifact(module(HOST_TRANSFERS[op])))


def test_custom_call_in_generic_form_is_found():
    call = (
        '%0 = "stablehlo.custom_call"(%x) {call_target_name = "sneaky"} : '
        "(tensor<f32>) -> tensor<f32>"
    )
    with pytest.raises(exported.InvalidArgument, match="'sneaky'"):
        exported.check_module(fake_artifact(module(call)))


def test_names_that_mention_custom_calls_are_not_custom_calls():
    # A location or string attribute is the author's text, not an op: no false refusal.
    text = module('%0 = stablehlo.abs %x : tensor<f32> loc("stablehlo.custom_call @evil")')
    exported.check_module(fake_artifact(text))


def test_unparseable_module_is_refused():
    with pytest.raises(exported.InvalidArgument, match="could not be parsed"):
        exported.check_module(fake_artifact("this is not MLIR"))


def test_artifact_for_another_platform_is_refused():
    with pytest.raises(exported.InvalidArgument, match="exported for \\('cuda',\\)"):
        exported.check_module(fake_artifact("", platforms=("cuda",)))
