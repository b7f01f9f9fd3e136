"""The expression compiler under arbitrary input: a result or a typed refusal, and nothing
outside the allowlist ever runs.

`compile_expression`, then `jax.eval_shape` of what it returns, on arbitrary text, on random
trees over the grammar (often valid), on valid sources with escapes spliced in (dunders,
imports, `eval`, `open`, lambdas), and on very deep or long sources: never a crash, a hang, a
RecursionError or an untyped exception. Spies on the builtins and audit events a source
could use to escape check that none is used. Strategies and profiles: fuzz_strategies.py.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import math
import re
import sys

import jax
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hessd.service import expression
from hessd.service.errors import InvalidArgument
from hessd.service.expression import ExpressionLimits, compile_expression

from fuzz_strategies import (
    _AVALS,
    _CONSTANTS,
    _INPUTS,
    _PROFILE,
    fuzz,
    sources,
)

# The compiler's promise. ------------------------------------------------------------------

_POSITION = re.compile(r"line (\d+), column (\d+)")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line breaks ast.parse counts


# Syntax errors whose column CPython counts otherwise than hessd documents: a known bug.
_KNOWN_BAD_COLUMNS = (
    "unexpected character after line continuation character",
    "leading zeros in decimal integer literals",
)


def _check_refusal(source: str, error: InvalidArgument) -> None:
    """A refusal says something, and a leading position lies within the source."""
    assert error.message and str(error) == error.message
    if match := _POSITION.match(error.message):
        lines = _LINE_BREAK.split(source)
        line, column = int(match[1]), int(match[2])
        assert 1 <= line <= len(lines), (error.message, len(lines))
        if any(known in error.message for known in _KNOWN_BAD_COLUMNS):
            return  # test_syntax_error_column_known_bug
        # One past the end: "unexpected EOF" and unclosed brackets point there.
        assert 1 <= column <= len(lines[line - 1]) + 1, (error.message, lines[line - 1])


def _compile_and_trace(source: str, limits: ExpressionLimits = ExpressionLimits()) -> str:
    """Compile `source` over _INPUTS and _CONSTANTS and trace it with jax.eval_shape.

    Returns what happened ("refused", "refused when traced", "ok"); any exception other
    than InvalidArgument propagates and fails the test.
    """
    try:
        fn = compile_expression(source, list(_INPUTS), _CONSTANTS, limits)
    except InvalidArgument as error:
        _check_refusal(source, error)
        return "refused"
    assert callable(fn)
    try:
        out = jax.eval_shape(fn, *_AVALS)
    except InvalidArgument as error:
        _check_refusal(source, error)
        return "refused when traced"
    assert isinstance(out, jax.ShapeDtypeStruct), out
    return "ok"


# Nothing outside the allowlist runs. --------------------------------------------------------

# Every escape below names this, so that a spy can tell its traces from JAX's own lazy
# imports and file reads.
_CANARY = "hessd_canary"
_EXPRESSION_GLOBALS = vars(expression)
_SPIED_BUILTINS = (
    *("__import__", "open", "eval", "exec", "compile", "getattr", "globals", "vars"),
    *("breakpoint", "input", "setattr", "delattr"),
)
# Audit events that run code or touch the system; none belongs in compiling or tracing.
_RISKY_EVENTS = (
    *("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty"),
    *("os.kill", "os.putenv", "os.remove", "os.rename", "os.rmdir", "shutil.rmtree"),
    *("subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "builtins.input"),
    *("builtins.breakpoint", "pdb.Pdb", "webbrowser.open", "socket.connect", "socket.bind"),
)
_escapes: list[tuple] | None = None  # recording only inside _watch_escapes


def _audit(event_name: str, args: tuple) -> None:
    if _escapes is None:
        return
    risky = (
        event_name in _RISKY_EVENTS
        or (event_name in ("import", "open") and _CANARY in repr(args[:1]))
        # importlib executes module code objects; code compiled from a string is not that.
        or (event_name == "exec" and getattr(args[0], "co_filename", "").startswith("<"))
    )
    if risky:
        _escapes.append(("audit", event_name, repr(args)[:200]))


_audit_installed = False


def _only_ast(source, filename, mode, flags=0, *args, **kwargs) -> bool:
    return bool(flags & ast.PyCF_ONLY_AST)


def _spy(name: str, real):
    def spy(*args, **kwargs):
        if _escapes is not None:
            caller = sys._getframe(1)
            mentions = any(isinstance(a, str) and _CANARY in a for a in args)
            # A string handed to eval or exec is source text; JAX's lazy imports exec
            # code objects, never strings.
            runs_text = name in ("eval", "exec") and args and isinstance(args[0], str)
            # ast.parse is compile(..., flags=PyCF_ONLY_AST): a syntax tree, no code object.
            parses = name == "compile" and _only_ast(*args, **kwargs)
            if (caller.f_globals is _EXPRESSION_GLOBALS or mentions or runs_text) and not parses:
                _escapes.append(("builtin", name, repr(args)[:200], caller.f_code.co_filename))
        return real(*args, **kwargs)

    return spy


@contextlib.contextmanager
def _watch_escapes():
    """Spy on the builtins and audit events a source could use to escape; yields the list
    of what was caught. Spies record calls made from expression.py, calls naming the
    canary, eval/exec of text, and risky audit events, in any thread."""
    global _escapes, _audit_installed
    if not _audit_installed:
        # Audit hooks cannot be removed; this one does nothing outside _watch_escapes.
        sys.addaudithook(_audit)
        _audit_installed = True
    real = {name: getattr(builtins, name) for name in _SPIED_BUILTINS}
    caught: list[tuple] = []
    for name, function in real.items():
        setattr(builtins, name, _spy(name, function))
    _escapes = caught
    try:
        yield caught
    finally:
        _escapes = None
        for name, function in real.items():
            setattr(builtins, name, function)


# Splice-ins that would run something if the source were ever evaluated as Python.
_ESCAPE_EXPRESSIONS = (
    f"__import__('{_CANARY}')",
    f"__import__('os').system('{_CANARY}')",
    f"open('{_CANARY}.txt', 'w')",
    f"eval('{_CANARY}')",
    f"exec('import {_CANARY}')",
    f"getattr(x, '{_CANARY}')",
    f"compile('{_CANARY}', '', 'eval')",
    f"globals()['{_CANARY}']",
    f"vars()['{_CANARY}']",
    f"breakpoint('{_CANARY}')",
    f"input('{_CANARY}')",
    f"setattr(x, '{_CANARY}', 1)",
    f"(lambda: __import__('{_CANARY}'))()",
    f"[__import__('{_CANARY}') for _ in x]",
    f"(q := __import__('{_CANARY}'))",
    "().__class__.__base__.__subclasses__()",
    f"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '{_CANARY}']",
    "x.__class__.__init__.__globals__",
    "sin.__globals__['__builtins__']",
    "x.__array_interface__",
    f"__builtins__.__dict__['__import__']('{_CANARY}')",
    f"jnp.load('{_CANARY}')",
    f"np.save('{_CANARY}', x)",
    f"sum(x, axis=__import__('{_CANARY}'))",
    f"x[__import__('{_CANARY}')]",
    f"f'{{__import__(\"{_CANARY}\")}}'",
    f"b'{_CANARY}'",
    "x.T.__class__.mro()",
    "sin(x).item()",
)
_ESCAPE_STATEMENTS = (
    f"import {_CANARY}",
    f"from {_CANARY} import *",
    f"import os; os.system('{_CANARY}')",
    f"del {_CANARY}",
    f"with open('{_CANARY}') as f: pass",
    f"def {_CANARY}(): pass",
    f"class {_CANARY}: pass",
    f"for {_CANARY} in x: pass",
    f"@eval\ndef {_CANARY}(): pass",
    f"assert __import__('{_CANARY}')",
    f"raise SystemExit('{_CANARY}')",
    f"global {_CANARY}",
    f"x.T = __import__('{_CANARY}')",
    f"{_CANARY} = __import__('{_CANARY}')",
    f"async def {_CANARY}(): pass",
)
_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")


@st.composite
def escaped_sources(draw) -> str:
    """A source (valid or not) with an escape attempt spliced in somewhere."""
    source = draw(sources())
    gadget = draw(st.sampled_from(_ESCAPE_EXPRESSIONS))
    match draw(st.integers(0, 4)):
        case 0:  # in place of a name
            names = list(_IDENTIFIER.finditer(source))
            if names:
                name = draw(st.sampled_from(names))
                return source[: name.start()] + gadget + source[name.end() :]
            return gadget
        case 1:  # as a statement line somewhere
            lines = _LINE_BREAK.split(source)
            statement = draw(st.sampled_from(_ESCAPE_STATEMENTS + _ESCAPE_EXPRESSIONS))
            lines.insert(draw(st.integers(0, len(lines))), statement)
            return "\n".join(lines)
        case 2:  # wrapped around the final expression, or added to it
            lines = _LINE_BREAK.split(source)
            lines[-1] = draw(st.sampled_from([f"({lines[-1]}) + {gadget}", f"{gadget}"]))
            return "\n".join(lines)
        case 3:  # at any character
            at = draw(st.integers(0, len(source)))
            return source[:at] + gadget + source[at:]
        case _:
            return gadget


_SOURCE_ALPHABET = (
    *"xyMAb()[]{},.:;+-*/@=<>!~%&|^ \t\r\n\x0c\x00\\0123456789eT_'\"#",
    *("é", "€", "😀", "\u2028", "\u0301", "\uff58", "\ud800", "\ufeff", "\x85"),
    *("sin(", "sum(", "where(", "lambda", " if ", " for ", '"""', "'''", "axis=", ".T"),
)


@fuzz(1500)
@given(
    st.one_of(
        st.text(),
        st.text(st.characters(codec="ascii")),
        st.lists(st.sampled_from(_SOURCE_ALPHABET), max_size=40).map("".join),
    )
)
def test_arbitrary_text_is_compiled_or_refused(source):
    with _watch_escapes() as caught:
        event(_compile_and_trace(source))
    assert not caught, caught


@fuzz(400)
@given(sources())
def test_random_grammar_trees_compile_and_trace_or_are_refused(source):
    with _watch_escapes() as caught:
        outcome = _compile_and_trace(source)
    event(outcome)
    assert not caught, caught


def test_random_grammar_trees_are_often_valid():
    """The generator is useful only if a good share of its sources get through."""
    outcomes = []

    @settings(_PROFILE, max_examples=200)
    @given(sources())
    def run(source):
        outcomes.append(_compile_and_trace(source))

    run()
    assert outcomes.count("ok") >= len(outcomes) // 5, outcomes.count("ok")


# Integer literal arithmetic is exact or refused. ------------------------------------------

_INT64 = range(-(2**63), 2**63)
# Ints about the edges of int64 and of what their squares and products stay within.
_INT_EDGES = (
    *(2**31, 2**32, 3_037_000_499, 3_037_000_500, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 10**20),
)
_LITERAL_FUNCTIONS = {  # the table functions of one or two numbers, in float64
    "abs": np.abs,
    "square": np.square,
    "sign": np.sign,
    "sum": lambda a: a,
    "max": lambda a: a,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "power": np.power,
}


@st.composite
def literal_arithmetic(draw, depth: int = 3) -> str:
    """An expression of int literals alone: + - * / ** and table functions of them."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return str(draw(st.one_of(st.integers(0, 12), st.sampled_from(_INT_EDGES))))
    sub = literal_arithmetic(depth - 1)
    match draw(st.integers(0, 6)):
        case 0:
            return f"-{draw(sub)}"
        case 1 | 2:
            return f"({draw(sub)}) {draw(st.sampled_from('+-*/'))} ({draw(sub)})"
        case 3:
            exponent = draw(st.one_of(st.integers(-3, 70).map(str), sub))
            return f"({draw(sub)}) ** ({exponent})"
        case 4:
            name = draw(st.sampled_from(["abs", "square", "sign", "sum", "max"]))
            return f"{name}({draw(sub)})"
        case _:
            name = draw(st.sampled_from(["maximum", "minimum", "power"]))
            return f"{name}({draw(sub)}, {draw(sub)})"


class _ZeroToANegativePower(ArithmeticError):
    """Refused, as Python raises ZeroDivisionError for it."""


def _exactly(node: ast.expr, past: list[bool]):
    """The exact value of a literal_arithmetic expression: ints as Python has them, without
    bound, floats (float64) from a division, a negative power or a table function on. Sets
    past[0] when an int outside int64 arises; None where the value is too large to write;
    _ZeroToANegativePower for 0 ** -n."""
    match node:
        case ast.Constant(value=int() as value):
            past[0] |= value not in _INT64
            return value
        case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int() as value)):
            past[0] |= -value not in _INT64  # a signed literal: -9223372036854775808 fits
            return -value
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            value = _exactly(operand, past)
            if type(value) is int:
                past[0] |= -value not in _INT64
            return None if value is None else -value
        case ast.BinOp(left=left, op=op, right=right):
            a, b = _exactly(left, past), _exactly(right, past)
            if a is None or b is None:
                return None
            if type(a) is int and type(b) is int and not isinstance(op, ast.Div):
                if isinstance(op, ast.Pow):
                    if b < 0:
                        if a == 0:
                            raise _ZeroToANegativePower(ast.unparse(node))
                        return np.float64(a**b)  # Python's float, as the service's
                    if abs(a) > 1 and b * math.log2(abs(a)) > 600:
                        past[0] = True
                        return None  # 9**9**9: past every float64 too
                    value = a**b
                else:
                    value = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(op)]
                past[0] |= value not in _INT64
                return value
            x, y = np.float64(a), np.float64(b)
            match op:
                case ast.Add():
                    return x + y
                case ast.Sub():
                    return x - y
                case ast.Mult():
                    return x * y
                case ast.Div():
                    return x / y
                case _ if type(b) is int:  # lax.integer_pow: the sign is the int's parity
                    magnitude = np.abs(x) ** y  # (float64 of an odd int past 2**53 is even)
                    return -magnitude if b % 2 and np.signbit(x) else magnitude
                case _:
                    return x**y
        case ast.Call(func=ast.Name(id=name), args=args):
            values = [_exactly(arg, past) for arg in args]
            if any(value is None for value in values):
                return None
            return _LITERAL_FUNCTIONS[name](*(np.float64(value) for value in values))
    raise AssertionError(ast.dump(node))


@fuzz(200)
@given(literal_arithmetic())
def test_integer_literal_arithmetic_is_exact_or_refused(source):
    """The value of `x * 0 + (literals)` is the exact one (to float64 rounding); a refusal
    only where an int past int64 arose or 0 was raised to a negative power. jnp alone
    computes such literals in int64 and wraps (2**64 is 0, square(2**32) too)."""
    past = [False]
    try:
        with np.errstate(all="ignore"):
            expected = _exactly(ast.parse(source, mode="eval").body, past)
    except _ZeroToANegativePower:
        expected, past = None, [True]
    try:
        fn = compile_expression(f"x * 0 + ({source})", ["x"], {})
        actual = float(fn(np.zeros(())))
    except InvalidArgument as error:
        assert past[0], (source, error.message)
        event("refused")
        return
    assert expected is not None, (source, actual)
    if type(expected) is int:
        assert actual == float(expected), (source, actual, expected)
        event("exact int")
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-12, err_msg=source)
        event("float")


@fuzz(400)
@given(escaped_sources())
def test_escape_attempts_are_refused_and_run_nothing(source):
    with _watch_escapes() as caught:
        outcome = _compile_and_trace(source)
    assert outcome == "refused", source
    assert not caught, caught


def test_escape_watch_would_see_an_escape():
    """The spies are live: the same gadgets, run as Python, are caught."""
    with _watch_escapes() as caught:
        with contextlib.suppress(ImportError):
            __import__(_CANARY)
        with contextlib.suppress(NameError):
            eval(_CANARY)
        with contextlib.suppress(OSError), open(f"/nonexistent/{_CANARY}"):
            pass
    assert {what[1] for what in caught} >= {"__import__", "eval", "open", "import"}, caught


def _nested(kind: str, n: int) -> str:
    """A source nested `n` levels deep in one way (or `n` long, for the flat kinds)."""
    match kind:
        case "unary":
            return "-" * n + "x"
        case "sum":
            return "+".join(["x"] * n)
        case "power":
            return "**".join(["x"] * n)
        case "parens":
            return "(" * n + "x" + ")" * n
        case "calls":
            return "sin(" * n + "x" + ")" * n
        case "lists":
            return "[" * n + "x" + "]" * n
        case "index":
            return "x" + "[0:3]" * n
        case "transpose":
            return "x" + ".T" * n
        case "lambda":
            return "lambda: " * n + "x"
        case "not":
            return "not " * n + "x"
        case "ifexp":
            return "x if x else " * n + "x"
        case "where":
            return "where(x > 0, " * n + "x" + ", x)" * n
        case "stack":
            return "sum(stack([" * n + "x" + "]))" * n
        case "bindings":
            return "t0 = x\n" + "".join(f"t{i} = t{i - 1} + 1\n" for i in range(1, n)) + f"t{n - 1}"
        case "wide":
            return "stack([" + ", ".join(["x"] * n) + "])"
        case "spaces":
            return "x" + " " * n
        case "comments":
            return "# c\n" * n + "x"
        case "continuations":
            return "x + \\\n" * n + "x"
    raise AssertionError(kind)


_NESTINGS = (
    *("unary", "sum", "power", "parens", "calls", "lists", "index", "transpose", "lambda"),
    *("not", "ifexp", "where", "stack", "bindings", "wide", "spaces", "comments"),
    "continuations",
)


@fuzz(150)
@given(
    st.sampled_from(_NESTINGS),
    st.one_of(st.integers(1, 200), st.integers(200, 30_000), st.sampled_from([63, 64, 65, 128])),
)
def test_deep_and_long_sources_are_compiled_or_refused(kind, n):
    event(f"{kind}: {_compile_and_trace(_nested(kind, n))}")


@pytest.mark.parametrize("kind", ["unary", "sum", "power", "calls", "index", "transpose", "where"])
def test_nesting_up_to_the_limit_compiles_and_differentiates(kind):
    """Refusal is not the only way out: a source exactly at the depth limit compiles and
    traces under the Hessian, also at the ceiling an operator may configure (128), and one
    level more is refused by name."""
    for limits in (ExpressionLimits(), ExpressionLimits(max_depth=128)):

        def source(n):
            return f"sum({_nested(kind, n)})"

        n = max(n for n in range(1, 200) if _depth(source(n)) <= limits.max_depth)
        assert _depth(source(n)) == limits.max_depth
        fn = compile_expression(source(n), list(_INPUTS), _CONSTANTS, limits)
        assert jax.eval_shape(jax.hessian(fn), *_AVALS).shape == (3, 3)
        with pytest.raises(InvalidArgument, match="max_depth"):
            compile_expression(source(n + 1), list(_INPUTS), _CONSTANTS, limits)


def _depth(source: str) -> float:
    """Nesting depth as the compiler counts it: statements are level 0, `x` alone is 1;
    infinite where the parser itself gives up."""
    try:
        module = ast.parse(source)
    except (SyntaxError, RecursionError, MemoryError):
        return math.inf
    tokens = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    stack = [(statement, 0) for statement in module.body]
    deepest = 0
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend(
            (child, level + 1)
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, tokens)
        )
    return deepest
