"""Tests of the expression language: values against numpy closed forms, every JAX
transform, and one test per class of refusal (message fragment and position).

conftest.py turns x64 on before any array exists, so the float64 cases are real."""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from hessd.service.errors import InvalidArgument
from hessd.service.expression import (
    FUNCTIONS,
    ExpressionLimits,
    compile_expression,
)

V = np.array([0.2, 0.5, 0.7])
W = np.array([0.3, -0.4, 0.9])
M = np.array([[2.0, 0.5, 0.1], [0.3, 3.0, 0.2], [0.1, 0.4, 1.5]])


def allclose(actual, expected, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def _logsumexp(x):
    return np.log(np.sum(np.exp(x)))


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# Function name -> (source over inputs v, w (3,) and M (3, 3); numpy closed form).
CASES = {
    "sin": ("sin(v)", np.sin(V)),
    "cos": ("cos(v)", np.cos(V)),
    "tan": ("tan(v)", np.tan(V)),
    "arcsin": ("arcsin(v)", np.arcsin(V)),
    "arccos": ("arccos(v)", np.arccos(V)),
    "arctan": ("arctan(w)", np.arctan(W)),
    "sinh": ("sinh(w)", np.sinh(W)),
    "cosh": ("cosh(w)", np.cosh(W)),
    "tanh": ("tanh(w)", np.tanh(W)),
    "arcsinh": ("arcsinh(w)", np.arcsinh(W)),
    "arccosh": ("arccosh(v + 2)", np.arccosh(V + 2)),
    "arctanh": ("arctanh(w)", np.arctanh(W)),
    "exp": ("exp(w)", np.exp(W)),
    "exp2": ("exp2(w)", 2.0**W),
    "log": ("log(v)", np.log(V)),
    "log2": ("log2(v)", np.log2(V)),
    "log10": ("log10(v)", np.log10(V)),
    "log1p": ("log1p(w)", np.log1p(W)),
    "expm1": ("expm1(w)", np.expm1(W)),
    "sqrt": ("sqrt(v)", np.sqrt(V)),
    "square": ("square(w)", W**2),
    "abs": ("abs(w)", np.abs(W)),
    "sign": ("sign(w)", np.sign(W)),
    "reciprocal": ("reciprocal(w)", 1 / W),
    "sigmoid": ("sigmoid(w)", 1 / (1 + np.exp(-W))),
    "softplus": ("softplus(w)", np.log1p(np.exp(W))),
    "relu": ("relu(w)", np.maximum(W, 0)),
    "gelu": ("gelu(w)", _gelu(W)),
    "erf": ("erf(w)", np.array([math.erf(t) for t in W])),
    "maximum": ("maximum(v, w)", np.maximum(V, W)),
    "minimum": ("minimum(v, w)", np.minimum(V, W)),
    "power": ("power(v, w)", V**W),
    "arctan2": ("arctan2(w, v)", np.arctan2(W, V)),
    "where": ("where(w > 0, v, -v)", np.where(W > 0, V, -V)),
    "clip": ("clip(w, -0.2, 0.5)", np.clip(W, -0.2, 0.5)),
    "sum": ("sum(M, axis=0)", M.sum(axis=0)),
    "mean": ("mean(M, axis=(0, 1), keepdims=True)", M.mean(keepdims=True)),
    "prod": ("prod(M, axis=-1)", M.prod(axis=-1)),
    "max": ("max(M, axis=1, keepdims=True)", M.max(axis=1, keepdims=True)),
    "min": ("min(w)", W.min()),
    "logsumexp": ("logsumexp(w)", _logsumexp(W)),
    "norm": ("norm(w, ord=1) + norm(M)", np.abs(W).sum() + np.linalg.norm(M)),
    "softmax": ("softmax(w)", np.exp(W) / np.exp(W).sum()),
    "log_softmax": ("log_softmax(M, axis=0)", M - np.log(np.exp(M).sum(axis=0))),
    "dot": ("dot(v, w)", V @ W),
    "inner": ("inner(v, w)", V @ W),
    "outer": ("outer(v, w)", np.outer(V, W)),
    "matmul": ("matmul(M, w)", M @ W),
    "trace": ("trace(M, offset=1)", M[0, 1] + M[1, 2]),
    "diag": ("diag(v, k=0) + diag(diag(M))", np.diag(V) + np.diag(np.diag(M))),
    "det": ("det(M)", np.linalg.det(M)),
    "logdet": ("logdet(-M)", np.log(abs(np.linalg.det(M)))),
    "inv": ("inv(M)", np.linalg.inv(M)),
    "solve": ("solve(M, w)", np.linalg.solve(M, W)),
    "transpose": ("transpose(M) + transpose(M, axes=(0, 1))", M.T + M),
    "reshape": ("reshape(M, (9,))[2:5]", M.reshape(9)[2:5]),
    "stack": ("stack([v, w], axis=1)", np.stack([V, W], axis=1)),
    "concatenate": ("concatenate((v, w, v))", np.concatenate([V, W, V])),
}


def test_cases_cover_the_function_table():
    assert set(CASES) == set(FUNCTIONS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_function_matches_numpy(name):
    source, expected = CASES[name]
    fn = compile_expression(source, ["v", "w", "M"], {})
    out = jax.jit(fn)(V, W, M)
    assert out.dtype == jnp.float64
    allclose(out, expected)


def test_functions_are_documented():
    """The README has one row per function: its signature, meaning and keywords."""
    docs = pathlib.Path(__file__).parents[1] / "README.md"
    rows = re.findall(r"^\| `(\w+)\((.*)\)` \| (.*) \| (.*) \|$", docs.read_text(), re.MULTILINE)
    documented = {
        name: (params, meaning, re.findall(r"`(\w+)`", keywords))
        for name, params, meaning, keywords in rows
    }
    expected = {
        name: (", ".join(p for p, _ in entry.params), entry.meaning, list(entry.keywords))
        for name, entry in FUNCTIONS.items()
    }
    assert len(rows) == len(documented)
    assert documented == expected


def test_bindings_named_constants_and_literals():
    fn = compile_expression("r = w * 2\ns = r + 1\nunused = v\ns * pi - e ** 2", ["v", "w"], {})
    allclose(fn(V, W), (W * 2 + 1) * math.pi - math.e**2)


def test_transpose_attribute_indexing_and_slicing():
    fn = compile_expression("M.T[1, :] + M[:, -1] + M[::2, 0][-1] + M[0][::-1]", ["M"], {})
    allclose(fn(M), M.T[1, :] + M[:, -1] + M[::2, 0][-1] + M[0][::-1])


def test_matmul_of_vectors_and_matrices():
    fn = compile_expression("stack([v @ v, sum(M @ v), sum(v @ M), sum(M @ M)])", ["v", "M"], {})
    allclose(fn(V, M), [V @ V, (M @ V).sum(), (V @ M).sum(), (M @ M).sum()])


def test_quadratic_form_with_constant():
    """x @ A @ x has gradient (A + A.T) x and Hessian A + A.T."""
    fn = compile_expression("x @ A @ x", ["x"], {"A": M})
    allclose(fn(V), V @ M @ V)
    allclose(jax.jit(jax.grad(fn))(V), (M + M.T) @ V)
    allclose(jax.jit(jax.hessian(fn))(V), M + M.T)


def test_several_inputs_in_order():
    fn = compile_expression("a - 2 * b + c[0]", ["b", "a", "c"], {})
    allclose(fn(V, W, M), W - 2 * V + M[0])


def test_literals_are_weakly_typed():
    x = np.ones(3, np.float32)
    fn = compile_expression("2.0 * x + pi - 1", ["x"], {})
    assert jax.jit(fn)(x).dtype == jnp.float32
    assert jax.grad(lambda x: fn(x).sum())(x).dtype == jnp.float32


def test_constant_keeps_its_dtype():
    fn = compile_expression("A", ["x"], {"A": np.ones(2, np.float32)})
    assert fn(V).dtype == jnp.float32


def test_output_is_a_jax_array_even_for_a_literal():
    out = compile_expression("1.5", ["x"], {})(V)
    assert isinstance(out, jax.Array)
    assert out.shape == ()


def test_transforms():
    source = "y = tanh(A @ x)\nsum(y * y) + logsumexp(x) + norm(x) ** 2"
    fn = compile_expression(source, ["x"], {"A": M})

    def expected(x):
        y = np.tanh(M @ x)
        return (y * y).sum() + _logsumexp(x) + x @ x

    allclose(jax.jit(fn)(V), expected(V))
    batch = np.stack([V, W, -V])
    allclose(jax.jit(jax.vmap(fn))(batch), [expected(x) for x in batch])
    hessian = jax.jit(jax.vmap(jax.hessian(fn)))(batch)
    assert hessian.shape == (3, 3, 3)
    allclose(hessian[0], jax.jit(jax.jacfwd(jax.jacrev(fn)))(V))
    allclose(hessian[0], hessian[0].T)
    vec = compile_expression("A @ sin(x)", ["x"], {"A": M})
    allclose(jax.jit(jax.jacfwd(vec))(V), M * np.cos(V))
    allclose(jax.jit(jax.jacrev(vec))(V), M * np.cos(V))
    allclose(jax.jvp(vec, (V,), (W,))[1], M @ (np.cos(V) * W))
    _, pullback = jax.vjp(vec, V)
    allclose(pullback(W)[0], (W @ M) * np.cos(V))
    check_grads(jax.jit(fn), (V,), order=2, modes=("fwd", "rev"))


# Refusals found while compiling: (source, message fragment).
REFUSALS = {
    "import_builtin": ("__import__('os')", "line 1, column 1: unknown function '__import__'"),
    "dunder_attribute": ("x.__class__", "line 1, column 1: attribute access `x.__class__`"),
    "shape_attribute": ("y = x\n2 * y.shape", "line 2, column 5: attribute access"),
    "open": ("open('f')", "unknown function 'open'; available functions: abs, arccos"),
    "lambda": ("(lambda: x)", "line 1, column 2: lambda `lambda: x` is not allowed"),
    "list_comprehension": ("sum([t for t in x])", "line 1, column 5: list comprehension"),
    "generator": ("sum(t for t in x)", "generator expression"),
    "unknown_name": ("x + y", "line 1, column 5: unknown name 'y'; names available here: x, A"),
    "unknown_function": ("foo(x)", "line 1, column 1: unknown function 'foo'"),
    "qualified_call": ("jnp.sin(x)", "call table functions by bare name"),
    "calling_a_value": ("x(1)", "'x' is a value, not a function"),
    "bare_function_name": ("sin + x", "function 'sin' can only be called: sin(x)"),
    "keyword": ("sum(x, dtype=1)", "line 1, column 8: keyword 'dtype' is not allowed for sum()"),
    "keyword_unpacking": ("sum(x, **x)", "keyword unpacking"),
    "starred": ("maximum(*x)", "starred argument"),
    "arity": ("sin(x, x)", "sin() takes 1 positional argument(s), got 2"),
    "traced_axis": ("sum(x, axis=x)", "keyword 'axis' of sum() must be an int literal"),
    "traced_shape": ("reshape(x, (x, 1))", "argument 'shape' of reshape() must be"),
    "comparison": ("x > 0", "line 1, column 1: comparison `x > 0` is not allowed"),
    "chained_comparison": ("where(0 < x < 1, x, 0)", "compare two values once"),
    "string": ("x + 'a'", "line 1, column 5: string literal"),
    "f_string": ("f'{x}'", "f-string"),
    "bool": ("x * True", "line 1, column 5: bool literal"),
    "none": ("None", "literal `None` is not allowed"),
    "boolean_operator": ("x and x", "boolean operator"),
    "if_expression": ("x if 1 else x", "conditional expression"),
    "walrus": ("(y := x)", "assignment expression"),
    "floor_division": ("x // 2", "operator `x // 2` is not allowed"),
    "tuple_value": ("(x, x)", "tuple literal"),
    "traced_index": ("x[x]", "line 1, column 3: index `x` is not allowed"),
    "float_index": ("x[0.5]", "index `0.5`"),
    "rebind_input": ("x = 1\nx", "line 1, column 1: binding name 'x' is already defined"),
    "rebind_constant": ("A = x\nA", "binding name 'A' is already defined"),
    "rebind_pi": ("pi = 3\npi", "binding name 'pi' is a built-in constant"),
    "rebind_function": ("sum = x\nsum", "binding name 'sum' is the name of the function sum("),
    "rebind_binding": ("y = x\ny = 2\ny", "line 2, column 1: binding name 'y'"),
    "self_reference": ("y = y + 1\ny", "unknown name 'y'"),
    "last_is_binding": ("y = x", "last statement `y = x` must be the output expression"),
    "empty": ("  # nothing\n", "expression source is empty"),
    "two_outputs": ("x\nx", "only the last statement may be a bare expression"),
    "statement": ("import os\nx", "statement `import os` is not allowed"),
    "function_def": ("def f(): pass\nx", "statement `def f(): pass` is not allowed"),
    "tuple_binding": ("a, b = x\na", "a binding assigns one plain name"),
}


@pytest.mark.parametrize("source, fragment", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal(source, fragment):
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        compile_expression(source, ["x"], {"A": M})


def test_syntax_error_reports_line_and_column():
    with pytest.raises(InvalidArgument, match="line 2, column 4: syntax error"):
        compile_expression("y = x\nx +* 2", ["x"], {})


def test_columns_count_characters_not_bytes():
    with pytest.raises(InvalidArgument, match="line 1, column 9: unknown name 'q'"):
        compile_expression("é + x + q", ["é", "x"], {})


def test_oversized_source():
    source = "x" + " + x" * 6000
    with pytest.raises(
        InvalidArgument, match="24001 characters long; the limit max_chars is 20000"
    ):
        compile_expression(source, ["x"], {})


def test_too_many_nodes():
    source = "sum(stack([" + "x, " * 5000 + "x]))"
    with pytest.raises(
        InvalidArgument, match="5007 syntax-tree nodes; the limit max_nodes is 5000"
    ):
        compile_expression(source, ["x"], {})


def test_too_deep():
    source = "sin(" * 70 + "x" + ")" * 70
    with pytest.raises(
        InvalidArgument,
        match="line 1, column 281: expression is nested 71 levels deep; the limit max_depth is 64",
    ):
        compile_expression(source, ["x"], {})


def test_custom_limits():
    limits = ExpressionLimits(max_chars=10, max_nodes=3, max_depth=2)
    with pytest.raises(InvalidArgument, match="limit max_nodes is 3"):
        compile_expression("x + x + x", ["x"], {}, limits)
    with pytest.raises(ValueError, match="max_depth must be at most 128"):
        ExpressionLimits(max_depth=1000)


def test_deepest_allowed_nesting_traces_under_hessian():
    limits = ExpressionLimits(max_depth=128)
    fn = compile_expression("sin(" * 127 + "x" + ")" * 127, ["x"], {}, limits)
    assert np.isfinite(jax.hessian(fn)(0.3))


def test_many_unary_minus_is_refused_not_recursion_error():
    with pytest.raises(InvalidArgument, match="nested too deeply for the parser"):
        compile_expression("-" * 5000 + "x", ["x"], {})


def test_long_sum_is_refused_not_recursion_error():
    with pytest.raises(InvalidArgument, match="limit max_depth of 64"):
        compile_expression("+".join(["x"] * 4000), ["x"], {})


def test_shape_mismatch_at_trace_time_reports_position():
    fn = compile_expression("y = sin(x)\n1 + y @ A", ["x"], {"A": np.ones((2, 2))})
    with pytest.raises(InvalidArgument, match=r"line 2, column 5: operator @ `y @ A` failed: "):
        jax.jit(fn)(V)


def test_bad_axis_at_trace_time_reports_call():
    fn = compile_expression("sum(x, axis=3)", ["x"], {})
    with pytest.raises(
        InvalidArgument, match=r"line 1, column 1: sum\(\) `sum\(x, axis=3\)` failed"
    ):
        jax.grad(fn)(V)


@pytest.mark.parametrize(
    "inputs, constants, fragment",
    [
        (["x", "x"], {}, "input name 'x' is already defined"),
        (["sum"], {}, "input name 'sum' is the name of the function"),
        (["x"], {"x": M}, "constant name 'x' is already defined"),
        (["x-1"], {}, "input name 'x-1' is not a valid identifier"),
    ],
)
def test_bad_input_and_constant_names(inputs, constants, fragment):
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        compile_expression("1", inputs, constants)


def test_wrong_number_of_input_arrays():
    with pytest.raises(InvalidArgument, match="takes 2 input arrays"):
        compile_expression("x + y", ["x", "y"], {})(V)


@pytest.mark.parametrize("source", ["x[3]", "x[-4]", "M[0, 5]", "M[1][3]"])
def test_out_of_bounds_index_is_refused_not_clamped(source):
    # JAX clamps x[3] of a (3,) array to x[2]: a wrong answer, so hessd refuses it.
    fn = compile_expression(source, ["x", "M"], {})
    with pytest.raises(InvalidArgument, match="out of bounds"):
        jax.eval_shape(
            fn, jax.ShapeDtypeStruct((3,), np.float64), jax.ShapeDtypeStruct((3, 3), np.float64)
        )


def test_binding_names_may_not_start_with_an_underscore():
    with pytest.raises(InvalidArgument, match="may not start with an underscore"):
        compile_expression("__builtins__ = x\n__builtins__", ["x"], {})
