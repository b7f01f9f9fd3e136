"""What the fuzz suites (tests/test_fuzz_*.py) draw from, and how many cases they draw.

- Profiles. "hessd-ci" (the default) is derandomized, so CI runs the same cases every time,
  all four suites within about 35 s on 2 cores; `HESSD_FUZZ=thorough` selects
  "hessd-thorough", random and 20x the examples. Neither writes a `.hypothesis` database.
  `fuzz(n)` gives a test n cases in CI. Warnings are errors here as everywhere in the
  suite (a float literal past float32 once made tracing warn, and so fail, see
  test_source_that_warns_while_tracing_is_answered).
- `sources()`: expression sources over the inputs x, y, M and the constants A, b, from
  random trees over the grammar; half of them mix in what the grammar refuses.
- `tensors()`: Tensor messages of any dtype value and shape, with bytes that often match.
- `_spec`, `_artifact`, `_export_server`: a FunctionSpec of a source, a real jax.export
  artifact to corrupt, a server that accepts such artifacts.
- `_TIMEOUT`, `_REFUSALS`, `_check_message`, `CHANNEL_OPTIONS`: what a call over the socket
  may take and answer, the bound every status message keeps, and a test channel's options.
- The generators reach the inputs of every bug fixed so far: integer literals and powers
  past int64 (`2**64`, `9**9**9`, `10**20`), static ints past int32 and int64 (`diag(x,
  k=2**62)`, zero-sized reshapes), shapes past 64 axes or whose zero-size product
  overflows, variables with no elements, seeds past 2**63, sigma 0 and tiny, NaN and Inf
  points, long and fullwidth names and ids, corrupted artifacts. Each such bug keeps a
  regression test in test_fuzz_known_bugs.py. A bug still open there is a strict xfail,
  and where a generator keeps away from it, the place says so and names the test; the
  exclusion goes when the bug is fixed.
- Static ints in request sources are small or at least 2**31 (`HUGE_INTS`): one point may
  hold 2**31 elements, so a mid-sized one (`diag(x[0:1], k=46339)`, 17 GB) asks for memory
  that no bound refuses yet (issue 14, item 4: --max-inflight-bytes counts arguments and
  results, not intermediates). The expression suite, which only traces, takes every size.

Names keep the leading underscore they had when the four suites were one module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import grpc
import jax
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service.config import ServerConfig
from hessd.service.expression import FUNCTIONS, ArgKind
from hessd.service.server import create_server
from hessd.service.servicer import MAX_MESSAGE_BYTES

# Profiles. ------------------------------------------------------------------------------

_THOROUGH_SCALE = 20
settings.register_profile(
    "hessd-ci",
    deadline=None,  # JAX tracing and XLA compiles make per-example time noisy
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "hessd-thorough",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_MODE = os.environ.get("HESSD_FUZZ", "ci")
if _MODE not in ("ci", "thorough"):
    raise ValueError(f"HESSD_FUZZ={_MODE!r}; use 'ci' (the default) or 'thorough'")
_PROFILE = settings.get_profile(f"hessd-{_MODE}")
_SCALE = _THOROUGH_SCALE if _MODE == "thorough" else 1


def fuzz(examples: int) -> settings:
    """`examples` cases in CI, 20x with HESSD_FUZZ=thorough."""
    return settings(_PROFILE, max_examples=examples * _SCALE)


# Expression sources. ---------------------------------------------------------------------

# The inputs and constants every generated source is compiled against; shapes for tracing.
_INPUTS = {"x": (3,), "y": (3,), "M": (3, 3)}
_CONSTANTS = {"A": np.arange(9.0).reshape(3, 3) / 10, "b": np.array([1.0, -2.0, 0.5])}
_AVALS = [jax.ShapeDtypeStruct(shape, np.float64) for shape in _INPUTS.values()]
_VALID_NAMES = (*_INPUTS, *_CONSTANTS, "pi", "e")
_OTHER_NAMES = ("z", "sin", "jnp", "np", "ones", "True", "None", "self", "__builtins__", "\uff58")
_OTHER_FUNCTIONS = ("print", "len", "range", "ones", "zeros", "jnp.sin", "x.sum", "float")
_KEYWORDS = ("axis", "keepdims", "ord", "offset", "k", "axes", "dtype", "out", "where")
_ODD_LITERALS = (
    *("1e400", "-1e400", "1e-400", "0.0", "-0.0", "1_000", "0x10", "0o7", "0b1", "1j"),
    *("'s'", 'b"x"', "True", "False", "None", "...", "f'{x}'", "2.5e-3", "1.", ".5"),
)
_BINARY = ("+", "-", "*", "/", "**", "@")
_REFUSED_BINARY = ("%", "//", "<<", ">>", "&", "|", "^")
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")


# Static ints (axes, shapes, offsets, indices) past int32 and int64, which jnp refuses or
# which size an array past the elements one point may hold; and those of any size, for
# sources that are only traced (see the module docstring).
HUGE_INTS = (2**31, -(2**31), 2**32, 4_000_000_000, 2**62, 2**63 - 1, 2**63, -(2**63), 10**20)
ANY_INTS = (*HUGE_INTS, 46_339, 65_536, 2**31 - 1, -(2**31) + 1)
# Integer literals and literal arithmetic, exact or refused: in and past int64, powers that
# must be refused before they are computed (9**9**9 has 370 million digits), negative ones.
_INT_LITERALS = (
    *("9223372036854775807", "9223372036854775808", "100000000000000000000", "4294967296"),
    *("(2**62)", "(2**63)", "(2**64)", "(2**63 - 1)", "(-2**63)", "((-2)**63)", "(9**9**9)"),
    *("(2**-1)", "(0**-1)", "(3**40)", "(2**62 * 2)", "((2**32)**2)", "(-9223372036854775807 - 1)"),
)


def _small_int(max_int: int) -> st.SearchStrategy[int]:
    return st.integers(-max_int, max_int)


def _odd(draw, odd: bool, one_in: int) -> bool:
    """If `odd`, True about once in `one_in` draws (hypothesis leans to small integers, so
    the usual case is the smallest); never otherwise."""
    return odd and draw(st.integers(0, one_in - 1)) == one_in - 1


def _static_int(draw, max_int: int, big: tuple[int, ...]) -> int:
    """A static int: small, now and then one of `big`."""
    if big and _odd(draw, True, 8):
        return draw(st.sampled_from(big))
    return draw(_small_int(max_int))


def _index(draw, max_int: int, big: tuple[int, ...], depth: int, odd: bool) -> str:
    """A subscript: int, slice, tuple of those; in odd sources also what is refused."""

    def item() -> str:
        if _odd(draw, odd, 4):
            return draw(
                st.one_of(
                    st.sampled_from(["...", "None", "x", "-x", "(1, 2)", "[0]", "1.5", "2**70"]),
                    _expression(max_int=max_int, big=big, depth=depth - 1, odd=odd),
                )
            )
        if draw(st.booleans()):
            return str(_static_int(draw, max_int, big))
        parts = [draw(st.sampled_from(["", str(_static_int(draw, max_int, big))])) for _ in "abc"]
        return ":".join(parts[: draw(st.integers(2, 3))])

    items = [item() for _ in range(draw(st.integers(1, 2)))]
    return ", ".join(items) + ("," if len(items) == 1 and _odd(draw, odd, 4) else "")


def _argument(
    draw, kind: ArgKind, max_int: int, big: tuple[int, ...], depth: int, odd: bool
) -> str:
    """An argument of the kind a table function expects, or in odd sources another kind."""
    if _odd(draw, odd, 6):
        kind = draw(st.sampled_from(list(ArgKind)))
    sub = _expression(max_int=max_int, big=big, depth=depth - 1, odd=odd)
    match kind:
        case ArgKind.ARRAY:
            return draw(sub)
        case ArgKind.CONDITION:
            if draw(st.booleans()):
                return f"{draw(sub)} {draw(st.sampled_from(_COMPARE))} {draw(sub)}"
            return draw(sub)
        case ArgKind.ARRAYS:
            items = draw(st.lists(sub, min_size=0 if odd else 1, max_size=3))
            if draw(st.booleans()):
                return "[" + ", ".join(items) + "]"
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        case ArgKind.INT:
            return str(_static_int(draw, max_int, big))
        case ArgKind.INTS:
            if draw(st.booleans()):
                return str(_static_int(draw, max_int, big))
            items = [_static_int(draw, max_int, big) for _ in range(draw(st.integers(0, 3)))]
            return "(" + ", ".join(map(str, items)) + ("," if len(items) == 1 else "") + ")"
        case ArgKind.BOOL:
            return draw(st.sampled_from(["True", "False"]))
        case ArgKind.NUMBER:
            return draw(st.sampled_from(["1", "2", "-1", "0", "0.5", "1e400", "3", "-2.5"]))
    raise AssertionError(kind)


def _call(draw, max_int: int, big: tuple[int, ...], depth: int, odd: bool) -> str:
    sub = _expression(max_int=max_int, big=big, depth=depth - 1, odd=odd)
    if _odd(draw, odd, 8):
        name = draw(st.sampled_from(_OTHER_FUNCTIONS + _VALID_NAMES))
        return f"{name}({', '.join(draw(st.lists(sub, max_size=2)))})"
    name = draw(st.sampled_from(sorted(FUNCTIONS)))
    function = FUNCTIONS[name]
    params = [kind for _, kind in function.params]
    if _odd(draw, odd, 6):  # a wrong number of positional arguments
        params = params[: draw(st.integers(0, len(params)))]
        params += [ArgKind.ARRAY] * draw(st.integers(0, 2))
    args = [_argument(draw, kind, max_int, big, depth, odd) for kind in params]
    for keyword, kind in function.keywords.items():
        if draw(st.integers(0, 2)) == 0:
            args.append(f"{keyword}={_argument(draw, kind, max_int, big, depth, odd)}")
    if _odd(draw, odd, 8):
        args.append(f"{draw(st.sampled_from(_KEYWORDS))}={draw(sub)}")
    if _odd(draw, odd, 16):
        args.append(draw(st.sampled_from(["*x", "**x", "*[x]"])))
    return f"{name}({', '.join(args)})"


@st.composite
def _expression(
    draw, max_int: int = 8, big: tuple[int, ...] = ANY_INTS, depth: int = 4, odd: bool = False
) -> str:
    """One expression over _INPUTS and _CONSTANTS. Well-formed unless `odd`, but even then
    often refused for shapes, arity, types or integer literals past int64; `odd` ones mix in
    what the grammar refuses. Static ints are up to `max_int`, now and then one of `big`."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if _odd(draw, odd, 5):
            return draw(st.one_of(st.sampled_from(_OTHER_NAMES), st.sampled_from(_ODD_LITERALS)))
        match draw(st.integers(0, 7)):
            case 0 | 1 | 2 | 3 | 4:
                return draw(st.sampled_from(_VALID_NAMES))
            case 5 | 6:
                if _odd(draw, True, 6):
                    return draw(st.sampled_from(_INT_LITERALS))
                return str(draw(_small_int(max_int)))
            case _:
                value = draw(st.floats(allow_nan=False, allow_infinity=False))
                return repr(abs(value))  # a literal has no sign; unary minus is an operator
    sub = _expression(max_int=max_int, big=big, depth=depth - 1, odd=odd)
    if _odd(draw, odd, 5):
        match draw(st.integers(0, 4)):
            case 0:
                return f"{draw(st.sampled_from(['~', 'not ']))}{draw(sub)}"
            case 1:
                op = draw(st.sampled_from((*_REFUSED_BINARY, "and", "or")))
                return f"{draw(sub)} {op} {draw(sub)}"
            case 2:
                attr = draw(st.sampled_from(["shape", "__class__", "real", "t", "T.T"]))
                return f"({draw(sub)}).{attr}"
            case 3:
                ops = draw(st.lists(st.sampled_from(_COMPARE), min_size=1, max_size=2))
                return " ".join([draw(sub)] + [f"{op} {draw(sub)}" for op in ops])
            case _:
                wrapper = ["[{}]", "({},)", "{{{}}}", "lambda: {}", "{} if x else x", "({} := 1)"]
                return draw(st.sampled_from(wrapper)).format(draw(sub))
    match draw(st.integers(0, 11)):
        case 0:
            return f"{draw(st.sampled_from(['-', '+']))}{draw(sub)}"
        case 1 | 2 | 3:
            return f"{draw(sub)} {draw(st.sampled_from(_BINARY))} {draw(sub)}"
        case 4 | 5 | 6 | 7:
            return _call(draw, max_int, big, depth, odd)
        case 8:
            return f"({draw(sub)}).T"
        case 9:
            return f"({draw(sub)})[{_index(draw, max_int, big, depth, odd)}]"
        case 10:
            return f"({draw(sub)})"
        case _:
            cond = f"{draw(sub)} {draw(st.sampled_from(_COMPARE))} {draw(sub)}"
            return f"where({cond}, {draw(sub)}, {draw(sub)})"


@st.composite
def sources(draw, max_int: int = 8, big: tuple[int, ...] = ANY_INTS, depth: int = 4) -> str:
    """Bindings then a final expression, with assorted line separators; half of them
    ("odd") mix in constructs and statements the grammar refuses. Static ints are up to
    `max_int`, now and then one of `big` (ANY_INTS, or HUGE_INTS for sources computed)."""
    odd = draw(st.booleans())
    lines = []
    for i in range(draw(st.integers(0, 3))):
        value = draw(_expression(max_int=max_int, big=big, depth=depth - 1, odd=odd))
        if _odd(draw, odd, 5):
            target = draw(st.sampled_from([*_VALID_NAMES, "sin", "x[0]", "a, c", "q.T", "t0"]))
            lines.append(f"{target} = {value}")
        elif _odd(draw, odd, 5):
            lines.append(draw(st.sampled_from([f"t{i} += {value}", f"t{i}: int = 1", value])))
        else:
            lines.append(f"t{i} = {value}")
    final = draw(_expression(max_int=max_int, big=big, depth=depth, odd=odd))
    if lines and draw(st.booleans()):  # use a binding
        final = f"{final} + t{len(lines) - 1}"
    lines.append(final)
    separator = draw(st.sampled_from(["\n", "\n", "; ", "\r\n", "\r", "\n\n"]))
    return separator.join(lines)


# Tensors. --------------------------------------------------------------------------------


def _wire_dtypes() -> dict[int, np.dtype]:
    """The DType values codec.decode accepts, and their numpy dtypes."""
    dtypes = {}
    for value in hessd_pb2.DType.values():
        with contextlib.suppress(codec.TensorError):
            dtypes[value] = codec.dtype_from_proto(value)
    return dtypes


_WIRE_DTYPES = _wire_dtypes()
_INT64 = st.integers(-(2**63), 2**63 - 1)
_DIMENSIONS = st.one_of(
    st.integers(0, 4),
    st.integers(-3, -1),
    st.integers(2**31 - 2, 2**33),
    st.sampled_from([2**62, 2**63 - 1, -(2**63)]),
    _INT64,
)


@st.composite
def tensors(draw) -> hessd_pb2.Tensor:
    """A Tensor message: any dtype value, any shape (past 64 axes, zero-size ones whose
    other dimensions overflow int64), bytes that often match it."""
    dtype = draw(
        st.one_of(
            st.sampled_from(sorted(_WIRE_DTYPES)),
            st.sampled_from(sorted(hessd_pb2.DType.values())),
            st.integers(-(2**31), 2**31 - 1),
        )
    )
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 4), max_size=4),
            st.lists(_DIMENSIONS, max_size=6),
            st.lists(st.integers(0, 1), min_size=60, max_size=70),
            st.lists(st.sampled_from([0, 2**62, 2**63 - 1, 3]), min_size=2, max_size=4),
        )
    )
    itemsize = _WIRE_DTYPES[dtype].itemsize if dtype in _WIRE_DTYPES else 4
    size = math.prod(shape) * itemsize if all(d >= 0 for d in shape) else -1
    if draw(st.booleans()) and 0 <= size <= 4096:
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        data = draw(st.binary(max_size=64))
    return hessd_pb2.Tensor(dtype=dtype, shape=shape, data=data)


# Calls over the socket. ------------------------------------------------------------------

_TIMEOUT = 30.0  # generous: a random valid spec may compile; DEADLINE_EXCEEDED is a failure
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Options for a test channel: responses as large as the server sends (--max-output-bytes is
# 1 GiB; gRPC's default receive limit of 4 MiB would make a large answer look refused).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


def _check_message(error: grpc.RpcError) -> None:
    """A refusal says something, and what it says fits the metadata limits: echoed input
    is cut (servicer.bounded), so the client never sees gRPC's 'Stream removed' instead."""
    details = error.details()
    assert details, error.code()
    assert len(details.encode()) <= MAX_MESSAGE_BYTES, (error.code(), len(details.encode()))
    assert "Stream removed" not in details, details


def _spec(source, inputs, dtype=hessd_pb2.FLOAT64, constants=None) -> hessd_pb2.FunctionSpec:
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[hessd_pb2.InputSpec(name=n, shape=s, dtype=dtype) for n, s in inputs.items()],
    )
    for name, value in (constants or {}).items():
        codec.encode(value, out=spec.constants.add(name=name).tensor)
    return spec


@contextlib.contextmanager
def _export_server():
    """A stub of an in-process server that accepts jax_export specs (the session's does not)."""
    config = ServerConfig(host="127.0.0.1", port=0, workers=4, allow_jax_export=True)
    server, port = create_server(config)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            yield hessd_pb2_grpc.HessdStub(channel)
    finally:
        server.stop(grace=None)


@functools.cache
def _artifact() -> hessd_pb2.FunctionSpec:
    """A jax_export spec of sum(sin(x)**2) over x (3,), float64, as a client makes it."""
    from hessd.client._export import export_spec

    inputs = [hessd_pb2.InputSpec(name="x", shape=[3], dtype=hessd_pb2.FLOAT64)]
    return export_spec(lambda x: (jax.numpy.sin(x) ** 2).sum(), inputs, np.dtype("<f8"), "cpu")
