"""The expression language: source text compiled into a pure jax.numpy function.

A source is one or more lines, ``name = expr`` bindings then one final expression, in
Python's expression syntax restricted to an allowlist (README.md, "Expression language").
It is parsed with :func:`ast.parse` and never evaluated as Python: each allowed node
becomes a closure, built once here, that calls jax.numpy when the returned function is
traced. The result is
an ordinary JAX function, so jit, vmap, grad, jacfwd, jacrev, jvp, vjp and hessian all work.

Every refusal is an :class:`InvalidArgument` whose message starts with
``line L, column C:`` (both 1-based, columns counted in characters) where a position exists.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import keyword
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special
from jax.typing import ArrayLike

from hessd.service.errors import InvalidArgument

__all__ = ["FUNCTIONS", "ArgKind", "ExpressionLimits", "Function", "compile_expression"]

# Deepest max_depth an operator may configure: compiling and tracing recurse a few Python
# frames per level, and this keeps both far below CPython's default recursion limit (1000).
_DEPTH_CEILING = 128


@dataclasses.dataclass(frozen=True)
class ExpressionLimits:
    """Bounds on one source; exceeding any of them is an InvalidArgument naming the limit."""

    max_chars: int = 20_000
    max_nodes: int = 5_000  # syntax-tree nodes, not counting operator and context tokens
    max_depth: int = 64  # nesting depth of the expression tree (``x`` is 1, ``sin(x)`` is 2)

    def __post_init__(self) -> None:
        if min(self.max_chars, self.max_nodes, self.max_depth) < 1:
            raise ValueError(f"expression limits must be positive, got {self}")
        if self.max_depth > _DEPTH_CEILING:
            raise ValueError(f"max_depth must be at most {_DEPTH_CEILING}, got {self.max_depth}")


class ArgKind(enum.Enum):
    """What an argument of a table function must be written as."""

    ARRAY = "an array expression"
    CONDITION = "an array expression or one comparison"
    ARRAYS = "a list or tuple of array expressions"
    INT = "an int literal"
    INTS = "an int literal or a tuple of int literals"
    BOOL = "True or False"
    NUMBER = "an int or float literal"


@dataclasses.dataclass(frozen=True)
class Function:
    """One entry of the function table: ``impl(*positional, **keywords)``.

    Only ARRAY, CONDITION and ARRAYS arguments are traced; the others reach ``impl`` as
    Python ints, tuples, bools or floats, so axes and shapes stay static under jit.
    """

    impl: Callable[..., Any]
    meaning: str
    params: tuple[tuple[str, ArgKind], ...] = (("x", ArgKind.ARRAY),)
    keywords: Mapping[str, ArgKind] = dataclasses.field(default_factory=dict)

    def signature(self, name: str) -> str:
        """The call as written in a source, e.g. ``sum(x, axis=..., keepdims=...)``."""
        parts = [param for param, _ in self.params] + [f"{kw}=..." for kw in self.keywords]
        return f"{name}({', '.join(parts)})"


_X = (("x", ArgKind.ARRAY),)
_XY = (*_X, ("y", ArgKind.ARRAY))
_YX = (("y", ArgKind.ARRAY), *_X)
_AB = (("a", ArgKind.ARRAY), ("b", ArgKind.ARRAY))
_WHERE = (("cond", ArgKind.CONDITION), *_XY)
_CLIP = (*_X, ("lo", ArgKind.ARRAY), ("hi", ArgKind.ARRAY))
_SHAPE = (*_X, ("shape", ArgKind.INTS))
_ARRAYS = (("arrays", ArgKind.ARRAYS),)
_REDUCE = {"axis": ArgKind.INTS, "keepdims": ArgKind.BOOL}
_NORM = {**_REDUCE, "ord": ArgKind.NUMBER}
_AXES = {"axis": ArgKind.INTS}
_AXIS = {"axis": ArgKind.INT}

# Elementwise functions of one array that are exactly the jnp function of the same name.
_JNP_UNARY = (
    *("sin", "cos", "tan", "arcsin", "arccos", "arctan"),
    *("sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh"),
    *("exp", "exp2", "log", "log2", "log10", "log1p", "expm1"),
    *("sqrt", "square", "abs", "sign", "reciprocal"),
)


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip(x, min=lo, max=hi)


def _logdet(x: jax.Array) -> jax.Array:
    """log|det x| of a (..., n, n) array; slogdet neither overflows nor needs det > 0."""
    return jnp.linalg.slogdet(x)[1]


FUNCTIONS: Mapping[str, Function] = types.MappingProxyType(
    {name: Function(getattr(jnp, name), f"jnp.{name}") for name in _JNP_UNARY}
    | {
        "sigmoid": Function(jax.nn.sigmoid, "jax.nn.sigmoid: 1 / (1 + exp(-x))"),
        "softplus": Function(jax.nn.softplus, "jax.nn.softplus: log(1 + exp(x))"),
        "relu": Function(jax.nn.relu, "jax.nn.relu: maximum(x, 0)"),
        "gelu": Function(jax.nn.gelu, "jax.nn.gelu, tanh approximation"),
        "erf": Function(special.erf, "jax.scipy.special.erf"),
        "maximum": Function(jnp.maximum, "jnp.maximum, elementwise", _XY),
        "minimum": Function(jnp.minimum, "jnp.minimum, elementwise", _XY),
        "power": Function(jnp.power, "jnp.power: x ** y", _XY),
        "arctan2": Function(jnp.arctan2, "jnp.arctan2", _YX),
        "where": Function(
            jnp.where, "jnp.where: x where cond holds, else y; cond may be a comparison", _WHERE
        ),
        "clip": Function(_clip, "jnp.clip(x, min=lo, max=hi)", _CLIP),
        "sum": Function(jnp.sum, "jnp.sum, over all axes by default", _X, _REDUCE),
        "mean": Function(jnp.mean, "jnp.mean, over all axes by default", _X, _REDUCE),
        "prod": Function(jnp.prod, "jnp.prod, over all axes by default", _X, _REDUCE),
        "max": Function(jnp.max, "jnp.max, a reduction (see maximum)", _X, _REDUCE),
        "min": Function(jnp.min, "jnp.min, a reduction (see minimum)", _X, _REDUCE),
        "logsumexp": Function(special.logsumexp, "jax.scipy.special.logsumexp", _X, _REDUCE),
        "norm": Function(
            jnp.linalg.norm,
            "jnp.linalg.norm: 2-norm of a vector, Frobenius norm of a matrix",
            _X,
            _NORM,
        ),
        "softmax": Function(jax.nn.softmax, "jax.nn.softmax, axis -1 by default", _X, _AXES),
        "log_softmax": Function(
            jax.nn.log_softmax, "jax.nn.log_softmax, axis -1 by default", _X, _AXES
        ),
        "dot": Function(jnp.dot, "jnp.dot", _XY),
        "inner": Function(jnp.inner, "jnp.inner", _XY),
        "outer": Function(jnp.outer, "jnp.outer, of the flattened inputs", _XY),
        "matmul": Function(jnp.matmul, "jnp.matmul: x @ y", _XY),
        "trace": Function(jnp.trace, "jnp.trace: sum of the diagonal", _X, {"offset": ArgKind.INT}),
        "diag": Function(
            jnp.diag,
            "jnp.diag: vector to diagonal matrix, matrix to its diagonal",
            _X,
            {"k": ArgKind.INT},
        ),
        "det": Function(jnp.linalg.det, "jnp.linalg.det"),
        "logdet": Function(_logdet, "log(abs(det(x))): jnp.linalg.slogdet(x)[1]"),
        "inv": Function(jnp.linalg.inv, "jnp.linalg.inv"),
        "solve": Function(jnp.linalg.solve, "jnp.linalg.solve: inv(a) @ b", _AB),
        "transpose": Function(
            jnp.transpose, "jnp.transpose: reverses the axes by default", _X, {"axes": ArgKind.INTS}
        ),
        "reshape": Function(jnp.reshape, "jnp.reshape; the shape may hold one -1", _SHAPE),
        "stack": Function(
            jnp.stack, "jnp.stack: joins arrays along a new axis, 0 by default", _ARRAYS, _AXIS
        ),
        "concatenate": Function(
            jnp.concatenate, "jnp.concatenate: joins arrays along axis 0 by default", _ARRAYS, _AXIS
        ),
    }
)

_NAMED_CONSTANTS: Mapping[str, float] = {"pi": math.pi, "e": math.e}

_BINARY: Mapping[type[ast.operator], tuple[str, Callable[..., Any]]] = {
    ast.Add: ("+", jnp.add),
    ast.Sub: ("-", jnp.subtract),
    ast.Mult: ("*", jnp.multiply),
    ast.Div: ("/", jnp.true_divide),
    ast.Pow: ("**", jnp.power),
    ast.MatMult: ("@", jnp.matmul),
}


class _BeyondInt64(ArithmeticError):
    """An integer literal expression whose exact value int64 cannot hold."""


_INT64 = range(-(1 << 63), 1 << 63)


def _int_power(base: int, exponent: int) -> int | float:
    if exponent < 0:
        if base == 0:
            raise ZeroDivisionError("0 cannot be raised to a negative power")
        return base**exponent  # a float, as in Python
    if abs(base) > 1 and exponent * math.log2(abs(base)) > 64:
        raise _BeyondInt64  # decided before computing: 9**9**9 has 370 million digits
    return base**exponent


# Arithmetic on integer literals alone is done exactly, in Python, and refused past int64:
# jnp would compute it in int64 and wrap silently (2**64 would be 0, 2**63 negative).
_EXACT_INT: Mapping[Callable[..., Any], Callable[..., Any]] = {
    jnp.add: lambda a, b: a + b,
    jnp.subtract: lambda a, b: a - b,
    jnp.multiply: lambda a, b: a * b,
    jnp.power: _int_power,
    jnp.negative: lambda a: -a,
    jnp.positive: lambda a: a,
}

_UNARY_OPS: Mapping[type[ast.unaryop], tuple[str, Callable[..., Any]]] = {
    ast.UAdd: ("+", jnp.positive),
    ast.USub: ("-", jnp.negative),
}
_COMPARISONS: Mapping[type[ast.cmpop], tuple[str, Callable[..., Any]]] = {
    ast.Lt: ("<", jnp.less),
    ast.LtE: ("<=", jnp.less_equal),
    ast.Gt: (">", jnp.greater),
    ast.GtE: (">=", jnp.greater_equal),
    ast.Eq: ("==", jnp.equal),
    ast.NotEq: ("!=", jnp.not_equal),
}

_USE_BINDINGS = "write it as bindings `name = expr` and one final expression"
_ONLY_ARGUMENTS = (
    "lists and tuples are only call arguments: stack([a, b]), reshape(x, (3, 2)), sum(x, axis=0)"
)
_REFUSED: Mapping[type[ast.AST], tuple[str, str]] = {
    ast.Lambda: ("lambda", _USE_BINDINGS),
    ast.ListComp: ("list comprehension", "write the elements out: stack([a, b])"),
    ast.SetComp: ("set comprehension", "write the elements out: stack([a, b])"),
    ast.DictComp: ("dict comprehension", "the language has no dicts"),
    ast.GeneratorExp: ("generator expression", "use a reduction such as sum(x, axis=0)"),
    ast.NamedExpr: ("assignment expression (:=)", _USE_BINDINGS),
    ast.BoolOp: ("boolean operator", "use where(cond, x, y) with one comparison"),
    ast.IfExp: ("conditional expression", "use where(cond, x, y)"),
    ast.JoinedStr: ("f-string", "the language has no strings"),
    ast.Dict: ("dict literal", "the language has no dicts"),
    ast.Set: ("set literal", "use stack([a, b]) to build an array"),
    ast.Starred: ("starred expression", "pass each argument on its own"),
    ast.List: ("list literal", _ONLY_ARGUMENTS),
    ast.Tuple: ("tuple literal", _ONLY_ARGUMENTS),
}

# Operator and context nodes are shared singletons that carry no source of their own, so
# they count towards neither the node limit nor the depth.
_TOKEN_NODES = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)

_NEWLINE = re.compile(r"\r\n|\r|\n")  # the line breaks that ast.parse counts

_TRACE_ERRORS = (TypeError, ValueError, IndexError, OverflowError, ZeroDivisionError)

_Eval = Callable[[list[Any]], Any]  # env (input values, then binding values) -> value


def compile_expression(
    source: str,
    inputs: Sequence[str],
    constants: Mapping[str, np.ndarray],
    limits: ExpressionLimits = ExpressionLimits(),
) -> Callable[..., jax.Array]:
    """Compile ``source`` into ``fn(*input_arrays) -> jax.Array``.

    ``fn`` takes one array per name in ``inputs``, in that order, of any shape the
    expression accepts, and returns the final expression as a jax.Array. It is pure and
    traceable by every JAX transform; ``constants`` are converted once with jnp.asarray
    (keeping their dtype) and closed over. Shape errors surface when ``fn`` is traced, as
    InvalidArgument naming the call or operator and its position.

    Raises:
        InvalidArgument: the source breaks the grammar or a limit, or a name is undefined.
    """
    if len(source) > limits.max_chars:
        raise InvalidArgument(
            f"expression source is {len(source)} characters long; the limit max_chars is "
            f"{limits.max_chars}"
        )
    module = _parse(source, limits)
    lines = _NEWLINE.split(source)
    _check_size(module, lines, limits)
    return _Compiler(lines, inputs, constants).compile(module)


def _parse(source: str, limits: ExpressionLimits) -> ast.Module:
    """ast.parse, with every failure turned into an InvalidArgument."""
    if "\x00" in source:
        where = _index_position(source, source.index("\x00"))
        raise InvalidArgument(f"{where}: syntax error: null character")
    try:
        return ast.parse(source, mode="exec")
    except UnicodeEncodeError as err:
        where = _index_position(source, err.start)
        raise InvalidArgument(f"{where}: syntax error: {err.reason}") from None
    except SyntaxError as err:
        where = f"line {err.lineno}, column {err.offset or 1}: " if err.lineno else ""
        raise InvalidArgument(f"{where}syntax error: {err.msg}") from None
    except (RecursionError, MemoryError):
        # CPython's parser recurses once per nesting level (even for x+x+...+x, a
        # left-leaning tree), so such a source is far deeper than any limit we allow.
        raise InvalidArgument(
            f"expression is nested too deeply for the parser, far beyond the limit max_depth "
            f"of {limits.max_depth}; {_USE_BINDINGS}"
        ) from None


def _check_size(module: ast.Module, lines: list[str], limits: ExpressionLimits) -> None:
    """Count nodes and measure depth with an explicit stack, before anything recurses."""
    count, depth, deepest = 0, 0, None
    # Each entry: a node, its depth, and the nearest node with a position (some, such as
    # the arguments of a lambda, have none).
    stack: list[tuple[ast.AST, int, ast.AST]] = [(stmt, 0, stmt) for stmt in module.body]
    while stack:
        node, level, located = stack.pop()
        count += 1
        if level > depth:
            depth, deepest = level, located
        stack.extend(
            (child, level + 1, child if hasattr(child, "lineno") else located)
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, _TOKEN_NODES)
        )
    if count > limits.max_nodes:
        raise InvalidArgument(
            f"expression has {count} syntax-tree nodes; the limit max_nodes is {limits.max_nodes}"
        )
    if depth > limits.max_depth:
        raise InvalidArgument(
            f"{_position(lines, deepest)}: expression is nested {depth} levels deep; the limit "
            f"max_depth is {limits.max_depth}; {_USE_BINDINGS}"
        )


def _checked_index(
    index: int | slice | tuple[int | slice, ...],
) -> Callable[[ArrayLike], jax.Array]:
    """x[index], refusing integers outside their axis: JAX would clamp them silently
    (x[5] of a (3,) array is x[2]), which is a wrong answer, not an index."""

    def take(value: ArrayLike) -> jax.Array:
        x = jnp.asarray(value)  # a literal (pi[0]) is a 0-d array: refused below, not an error
        items = index if isinstance(index, tuple) else (index,)
        if len(items) > x.ndim:
            raise IndexError(f"{len(items)} indices for an array of {x.ndim} axes {x.shape}")
        for axis, item in enumerate(items):
            if isinstance(item, int) and not -x.shape[axis] <= item < x.shape[axis]:
                raise IndexError(f"index {item} is out of bounds for axis {axis} of size "
                                 f"{x.shape[axis]}")  # fmt: skip
        return x[index]

    return take


def _index_position(source: str, index: int) -> str:
    """'line L, column C' of a character index into ``source``."""
    before = _NEWLINE.split(source[:index])
    return f"line {len(before)}, column {len(before[-1]) + 1}"


def _position(lines: list[str], node: Any) -> str:
    """'line L, column C' of a node; ast columns are UTF-8 byte offsets, ours are characters."""
    prefix = lines[node.lineno - 1].encode()[: node.col_offset]
    return f"line {node.lineno}, column {len(prefix.decode(errors='replace')) + 1}"


def _literal_number(node: ast.expr) -> int | float | None:
    """The value of an int or float literal, optionally signed (``-1``); otherwise None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return sign * value
    return None


def _literal_int(node: ast.expr) -> int | None:
    value = _literal_number(node)
    return value if isinstance(value, int) else None


def _in_floating_point(operand: _Eval) -> _Eval:
    """`operand`, with an int (a literal, or exact arithmetic on literals) made a float.

    Table functions, .T and indexing compute in floating point, as on the inputs: jnp would
    hold a Python int as int64 and wrap silently (square(2**32) would be 0, abs(-2**63)
    negative, (2**62).T * 4 zero).
    """

    def evaluate(env: list[Any]) -> Any:
        value = operand(env)
        return float(value) if type(value) is int else value

    return evaluate


class _Compiler:
    """Checks a size-checked module against the allowlist and turns it into closures.

    Each closure takes ``env``, the list of input values followed by binding values, so a
    binding used twice is traced once.
    """

    def __init__(self, lines: list[str], inputs: Sequence[str], constants: Mapping[str, Any]):
        self._lines = lines
        self._slots: dict[str, int] = {}  # input or binding name -> index into env
        self._constants: dict[str, jax.Array] = {}
        for name in inputs:
            self._check_new_name(name, "input", None)
            self._slots[name] = len(self._slots)
        self._inputs = tuple(inputs)
        for name, value in constants.items():
            self._check_new_name(name, "constant", None)
            try:
                self._constants[name] = jnp.asarray(value)
            except _TRACE_ERRORS as err:
                raise InvalidArgument(f"constant '{name}' is not a numeric array: {err}") from None

    def compile(self, module: ast.Module) -> Callable[..., jax.Array]:
        """Compile the bindings and the final expression into ``fn(*input_arrays)``."""
        if not module.body:
            raise InvalidArgument("expression source is empty; write at least one expression")
        *statements, last = module.body
        bindings = [self._binding(statement) for statement in statements]
        if not isinstance(last, ast.Expr):
            raise self._error(
                last,
                f"the last statement `{self._segment(last)}` must be the output expression, "
                "not a binding or other statement; end the source with the expression to return",
            )
        output = self._expr(last.value)
        inputs = self._inputs

        def expression_fn(*arrays: Any) -> jax.Array:
            if len(arrays) != len(inputs):
                raise InvalidArgument(
                    f"expression takes {len(inputs)} input arrays {inputs}, got {len(arrays)}"
                )
            env = [jnp.asarray(array) for array in arrays]
            for binding in bindings:
                env.append(binding(env))
            value = output(env)
            try:
                return jnp.asarray(value)
            except OverflowError as err:  # a literal past int64: `100000000000000000000`
                raise InvalidArgument(f"the expression's value cannot be an array: {err}") from None

        return expression_fn

    # Statements and names.

    def _binding(self, statement: ast.stmt) -> _Eval:
        if isinstance(statement, ast.Expr):
            raise self._error(
                statement,
                "only the last statement may be a bare expression; bind "
                f"`{self._segment(statement)}` to a name or remove it",
            )
        if not isinstance(statement, ast.Assign):
            raise self._error(
                statement,
                f"statement `{self._segment(statement)}` is not allowed; a source is bindings "
                "`name = expr` followed by one final expression",
            )
        if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
            raise self._error(statement, "a binding assigns one plain name: `name = expr`")
        target = statement.targets[0]
        evaluate = self._expr(statement.value)  # before the name exists: no self-reference
        self._check_new_name(target.id, "binding", target)
        self._slots[target.id] = len(self._slots)
        return evaluate

    def _check_new_name(self, name: str, what: str, node: ast.AST | None) -> None:
        """Refuse a name that would shadow another: inputs, constants, pi, e, functions."""
        if not name.isidentifier() or keyword.iskeyword(name):
            problem = "not a valid identifier"
        elif name.startswith("_"):
            problem = "reserved: names may not start with an underscore"
        elif name in FUNCTIONS:
            problem = f"the name of the function {FUNCTIONS[name].signature(name)}"
        elif name in _NAMED_CONSTANTS:
            problem = "a built-in constant"
        elif name in self._slots or name in self._constants:
            problem = "already defined"
        else:
            return
        message = f"{what} name '{name}' is {problem}; choose another name"
        raise InvalidArgument(message) if node is None else self._error(node, message)

    def _name(self, node: ast.Name) -> _Eval:
        name = node.id
        if name in self._slots:
            slot = self._slots[name]
            return lambda env: env[slot]
        value = self._constants.get(name, _NAMED_CONSTANTS.get(name))
        if value is not None:
            return lambda env: value
        if name in FUNCTIONS:
            raise self._error(
                node, f"function '{name}' can only be called: {FUNCTIONS[name].signature(name)}"
            )
        available = ", ".join([*self._slots, *sorted(self._constants), *_NAMED_CONSTANTS])
        raise self._error(node, f"unknown name '{name}'; names available here: {available}")

    # Messages.

    def _error(self, node: ast.AST, message: str) -> InvalidArgument:
        return InvalidArgument(f"{_position(self._lines, node)}: {message}")

    def _segment(self, node: Any) -> str:
        """The node's source text on one line, shortened for messages."""
        # Not ast.get_source_segment: it splits the whole source on every call.
        lines = [line.encode() for line in self._lines[node.lineno - 1 : node.end_lineno]]
        lines[-1] = lines[-1][: node.end_col_offset]
        lines[0] = lines[0][node.col_offset :]
        text = " ".join(b" ".join(lines).decode(errors="replace").split())
        return text if len(text) <= 60 else text[:57] + "..."

    def _refuse(self, node: ast.AST, what: str, hint: str) -> InvalidArgument:
        return self._error(node, f"{what} `{self._segment(node)}` is not allowed; {hint}")

    # Expressions.

    def _apply(
        self,
        node: ast.AST,
        what: str,
        impl: Callable[..., Any],
        operands: Sequence[_Eval],
        keywords: Mapping[str, Any] | None = None,
    ) -> _Eval:
        """A closure computing ``impl(*operands, **keywords)``.

        jnp reports a shape mismatch or a bad axis only when traced, as TypeError or
        ValueError; re-raise it as InvalidArgument naming ``what`` and the node's position.
        """
        keywords = dict(keywords or {})
        exact = _EXACT_INT.get(impl) if not keywords else None

        def evaluate(env: list[Any]) -> Any:
            values = [operand(env) for operand in operands]
            if exact is not None and all(type(v) is int for v in values):
                return self._exact(node, what, exact, values)
            try:
                return impl(*values, **keywords)
            except _TRACE_ERRORS as err:
                raise self._error(node, f"{what} `{self._segment(node)}` failed: {err}") from None

        return evaluate

    def _exact(
        self, node: ast.AST, what: str, exact: Callable[..., Any], values: Sequence[int]
    ) -> int | float:
        """Integer literal arithmetic, exactly; InvalidArgument past int64."""
        try:
            result = exact(*values)
            if isinstance(result, int) and result not in _INT64:
                raise _BeyondInt64
        except _BeyondInt64:
            raise self._error(
                node,
                f"{what} `{self._segment(node)}` on integer literals is beyond int64, where "
                "it would wrap around; write a float literal (e.g. 2.0**64) for a float value",
            ) from None
        except ZeroDivisionError as err:
            raise self._error(node, f"{what} `{self._segment(node)}` failed: {err}") from None
        return result

    def _expr(self, node: ast.expr) -> _Eval:
        if (number := _literal_number(node)) is not None:
            # Python scalars are weak-typed in JAX: 2.0 * x keeps x's float32.
            return lambda env: number
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Constant):
            raise self._constant(node)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            symbol, impl = _UNARY_OPS[type(node.op)]
            return self._apply(node, f"unary {symbol}", impl, [self._expr(node.operand)])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            symbol, impl = _BINARY[type(node.op)]
            operands = [self._expr(node.left), self._expr(node.right)]
            return self._apply(node, f"operator {symbol}", impl, operands)
        if isinstance(node, ast.UnaryOp | ast.BinOp):
            raise self._refuse(
                node, "operator", "allowed: unary + -, binary + - * / ** @; for logic use where"
            )
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Attribute):
            if node.attr != "T":
                raise self._refuse(
                    node,
                    "attribute access",
                    "only .T is; use transpose(x, axes=...) or reshape(x, shape) instead",
                )
            value = _in_floating_point(self._expr(node.value))
            return self._apply(node, ".T", jnp.transpose, [value])
        if isinstance(node, ast.Subscript):
            index = self._index(node.slice)
            value = _in_floating_point(self._expr(node.value))
            return self._apply(node, "indexing", _checked_index(index), [value])
        if isinstance(node, ast.Compare):
            raise self._refuse(
                node, "comparison", "comparisons are only the first argument of where(cond, x, y)"
            )
        what, hint = _REFUSED.get(type(node), (type(node).__name__, _USE_BINDINGS))
        raise self._refuse(node, what, hint)

    def _constant(self, node: ast.Constant) -> InvalidArgument:
        """The error for a literal that is not an int or float."""
        if isinstance(node.value, bool):
            return self._refuse(
                node, "bool literal", "True and False are only values of keepdims=..."
            )
        kind = {str: "string", bytes: "bytes", complex: "complex"}.get(type(node.value), "")
        return self._refuse(node, f"{kind} literal".lstrip(), "only int and float literals are")

    def _call(self, node: ast.Call) -> _Eval:
        if not isinstance(node.func, ast.Name):
            raise self._refuse(
                node.func, "calling", "call table functions by bare name: sin(x), not jnp.sin(x)"
            )
        name = node.func.id
        function = FUNCTIONS.get(name)
        if function is None:
            if name in self._slots or name in self._constants or name in _NAMED_CONSTANTS:
                raise self._error(node.func, f"'{name}' is a value, not a function")
            raise self._error(
                node.func,
                f"unknown function '{name}'; available functions: {', '.join(sorted(FUNCTIONS))}",
            )
        signature = function.signature(name)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self._refuse(arg, "starred argument", f"pass each argument of {signature}")
        for kw in node.keywords:
            if kw.arg is None:
                raise self._refuse(kw, "keyword unpacking", f"write out the keywords: {signature}")
        if len(node.args) != len(function.params):
            raise self._error(
                node,
                f"{name}() takes {len(function.params)} positional argument(s), got "
                f"{len(node.args)}: {signature}",
            )
        operands = [
            self._argument(arg, kind, f"argument '{param}' of {name}()")
            for arg, (param, kind) in zip(node.args, function.params, strict=True)
        ]
        keywords: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg not in function.keywords:
                allowed = ", ".join(function.keywords) or "none"
                raise self._error(
                    kw,
                    f"keyword '{kw.arg}' is not allowed for {name}(); keywords allowed: {allowed}",
                )
            kind = function.keywords[kw.arg]
            keywords[kw.arg] = self._static(kw.value, kind, f"keyword '{kw.arg}' of {name}()")
        return self._apply(node, f"{name}()", function.impl, operands, keywords)

    def _argument(self, node: ast.expr, kind: ArgKind, what: str) -> _Eval:
        """A positional argument as a closure; static kinds return a Python value."""
        if kind is ArgKind.CONDITION and isinstance(node, ast.Compare):
            return self._comparison(node)
        if kind in (ArgKind.ARRAY, ArgKind.CONDITION):
            return _in_floating_point(self._expr(node))
        if kind is ArgKind.ARRAYS:
            if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
                raise self._error(node, f"{what} must be {kind.value}, e.g. [a, b]")
            elements = [_in_floating_point(self._expr(element)) for element in node.elts]
            return lambda env: [element(env) for element in elements]
        value = self._static(node, kind, what)
        return lambda env: value

    def _comparison(self, node: ast.Compare) -> _Eval:
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARISONS:
            raise self._refuse(
                node, "comparison", "compare two values once with <, <=, >, >=, == or !="
            )
        symbol, impl = _COMPARISONS[type(node.ops[0])]
        operands = [self._expr(node.left), self._expr(node.comparators[0])]
        return self._apply(node, f"comparison {symbol}", impl, operands)

    def _static(self, node: ast.expr, kind: ArgKind, what: str) -> Any:
        """A static argument as a Python value: axes and shapes must never be traced."""
        value: Any = None
        if kind is ArgKind.BOOL and isinstance(node, ast.Constant):
            value = node.value if isinstance(node.value, bool) else None
        elif kind is ArgKind.NUMBER:
            value = _literal_number(node)
        elif kind is ArgKind.INTS and isinstance(node, ast.Tuple | ast.List):
            items = [_literal_int(element) for element in node.elts]
            value = None if None in items else tuple(items)
        elif kind in (ArgKind.INT, ArgKind.INTS):
            value = _literal_int(node)
        if value is None:
            raise self._error(node, f"{what} must be {kind.value}, got `{self._segment(node)}`")
        return value

    def _index(self, node: ast.expr) -> int | slice | tuple[int | slice, ...]:
        """A static index: an int literal, a slice of them, or a tuple of those."""
        if isinstance(node, ast.Tuple):
            return tuple(self._index_item(element) for element in node.elts)
        return self._index_item(node)

    def _index_item(self, node: ast.expr) -> int | slice:
        if isinstance(node, ast.Slice):
            parts = (node.lower, node.upper, node.step)
            bounds = [None if part is None else _literal_int(part) for part in parts]
            if all(b is not None or p is None for b, p in zip(bounds, parts, strict=True)):
                return slice(*bounds)
        elif (value := _literal_int(node)) is not None:
            return value
        raise self._refuse(
            node,
            "index",
            "indices are int literals or slices of them: x[0], X[1, :], x[::2], X[:, -1]",
        )
