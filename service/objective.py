"""Requests over data sets, checked: an Objective from its wire form, and curvature requests.

Every check that depends on the request alone happens here, before any work, and says what
was wrong and how to fix it; the servicer decodes tensors and maps errors to statuses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from hessd.proto.kinds import BuiltinLoss, DiagonalEstimator, Kind, Method, Operator, Reduction
from hessd.service import curvature
from hessd.service.curvature import NO_DATA, CurvatureRequest, Objective
from hessd.service.errors import InvalidArgument
from hessd.service.expression import compile_expression
from hessd.service.program import Program
from hessd.service.variable import Wrt

__all__ = [
    "NO_DATA",
    "CurvatureOptions",
    "DataSet",
    "ObjectiveOptions",
    "columns",
    "make_curvature_request",
    "make_objective",
]

MAX_MC_SAMPLES = 1000
DEFAULT_TARGET = "y"
# Kinds an objective gives: of L, or of its operator.
OBJECTIVE_KINDS = (Kind.VALUE, Kind.GRADIENT, Kind.HVP, Kind.HESSIAN, Kind.DIAGONAL, Kind.SOLVE,
                   Kind.GRADIENT_STATISTICS)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """The wire's Objective, its enums resolved and its tensors decoded (by name)."""

    data: Mapping[str, np.ndarray]
    reduction: Reduction = Reduction.MEAN
    chunk_size: int = 0
    operator: Operator = Operator.HESSIAN_OPERATOR
    loss: BuiltinLoss | str | None = None
    target: str = ""
    seed: int = 0
    mc_samples: int = 0


@dataclasses.dataclass(frozen=True)
class DataSet:
    """An Objective and the arrays that follow the point arguments (data, target,
    weights); `names` are the program inputs the data replaces."""

    objective: Objective
    arrays: list[np.ndarray]
    names: frozenset[str]


@dataclasses.dataclass(frozen=True)
class CurvatureOptions:
    estimator: DiagonalEstimator | None = None
    num_matvecs: int = 0
    seed: int = 0
    damping: float = 0.0
    tolerance: float = 0.0
    max_iterations: int = 0


def make_objective(
    program: Program,
    options: ObjectiveOptions,
    wrt: Wrt,
    shared: Sequence[str],
    columns: int,
    budget: int,
    device_bytes: int,
) -> DataSet:
    """Check an objective against the program and fill in its chunk."""
    if not options.data:
        raise InvalidArgument(
            "objective.data is empty: give the per-example inputs (each (N, *shape)), "
            "and the target when a loss is set"
        )
    inputs = {s.name: (i, s) for i, s in enumerate(program.inputs)}
    target_name = options.target or DEFAULT_TARGET
    if options.loss is not None and target_name in inputs:
        raise InvalidArgument(
            f"the target {target_name!r} is an input of the model; name the targets in "
            "objective.loss.target differently from every input"
        )
    known = set(inputs) | ({target_name} if options.loss is not None else set())
    unknown = sorted(set(options.data) - known)
    if unknown:
        raise InvalidArgument(
            f"objective.data names {unknown}, which are not inputs of the function"
            + (f" nor the target {target_name!r}" if options.loss is not None else "")
            + f"; its inputs are {list(inputs)}"
        )
    names = [n for n in inputs if n in options.data]
    if not names:
        raise InvalidArgument(
            "objective.data holds no input of the function: give at least one per-example "
            f"input of {list(inputs)}"
        )
    wrt_names = {program.inputs[i].name for i in wrt.indices}
    for name in names:
        if name in wrt_names:
            raise InvalidArgument(
                f"input {name!r} is both in objective.data and in wrt; the variable has one "
                "value per point (send it in inputs), the data one per example"
            )
        if name in shared:
            raise InvalidArgument(f"input {name!r} is both in objective.data and in shared")
    counts = {name: array.shape[0] if array.ndim else None for name, array in options.data.items()}
    for name, array in options.data.items():
        if array.ndim == 0:
            raise InvalidArgument(
                f"objective.data {name!r} is a scalar; each entry needs a leading example axis"
            )
    examples = next(iter(counts.values()))
    if any(c != examples for c in counts.values()):
        raise InvalidArgument(
            "the arrays of objective.data differ in their number of examples: "
            + ", ".join(f"{n} has {c}" for n, c in counts.items())
            + "; every entry needs the same leading axis N"
        )
    assert examples is not None
    if examples == 0:
        raise InvalidArgument("objective.data has no examples (N = 0)")
    arrays = []
    for name in names:
        _, signature = inputs[name]
        array = options.data[name]
        if array.shape[1:] != signature.shape or array.dtype != signature.dtype:
            raise InvalidArgument(
                f"objective.data {name!r} has shape {array.shape} {array.dtype.name}; it needs "
                f"(N, *{signature.shape}) {signature.dtype.name}"
            )
        arrays.append(array)
    loss = options.loss
    if loss is None:
        if program.output_shape != ():
            raise InvalidArgument(
                f"the function's output has shape {program.output_shape}; without a loss an "
                "objective needs a scalar per-example term. Set objective.loss (mse, "
                "softmax_cross_entropy, or an expression in output and target) to treat the "
                "function as a model"
            )
        if options.operator.needs_loss:
            raise InvalidArgument(
                f"operator {options.operator.value} needs the model and its loss given apart: "
                "set objective.loss and register the model (its output, not the loss); for a "
                "scalar per-example loss use operator hessian or empirical_fisher"
            )
    else:
        if target_name not in options.data:
            raise InvalidArgument(
                f"the loss needs targets: add objective.data {target_name!r} (N, ...), or name "
                "the entry that holds them in objective.loss.target"
            )
        arrays.append(_check_target(program, loss, target_name, options.data[target_name]))
        if options.operator is Operator.FISHER and not isinstance(loss, BuiltinLoss):
            raise InvalidArgument(
                "operator fisher samples labels from the model's predictive distribution, "
                "which only a built-in loss (mse, softmax_cross_entropy) defines; use ggn "
                "(its expectation) or empirical_fisher"
            )
    if not 0 <= options.mc_samples <= MAX_MC_SAMPLES:
        raise InvalidArgument(
            f"mc_samples must be between 0 and {MAX_MC_SAMPLES}, got {options.mc_samples}"
        )
    if options.chunk_size < 0:
        raise InvalidArgument(f"chunk_size must be ≥ 0, got {options.chunk_size}")
    objective = Objective(
        data=tuple(inputs[n][0] for n in names),
        examples=examples,
        chunk=1,
        reduction=options.reduction,
        operator=options.operator,
        loss=loss,
        seed=options.seed,
        mc_samples=options.mc_samples or 1,
    )
    chunk = curvature.chunk_for(
        program, wrt, objective, columns, budget, options.chunk_size, device_bytes
    )
    objective = dataclasses.replace(objective, chunk=chunk)
    # The arrays as sent (resident ones included): no copy. The scan takes whole chunks and
    # then the N mod chunk examples left as one more step.
    arrays.append(objective.weights(program.output_dtype))
    return DataSet(objective, arrays, frozenset(names))


def _check_target(
    program: Program, loss: BuiltinLoss | str, name: str, target: np.ndarray
) -> np.ndarray:
    out = program.output_shape
    what = f"the target {name!r}"
    match loss:
        case BuiltinLoss.MSE:
            if target.shape[1:] != out or not np.issubdtype(target.dtype, np.floating):
                raise InvalidArgument(
                    f"{what} has shape {target.shape} {target.dtype.name}; mse needs floats "
                    f"shaped like the model's output: (N, *{out})"
                )
            return _exact_cast(target, program.output_dtype, what)
        case BuiltinLoss.SOFTMAX_CROSS_ENTROPY:
            if len(out) != 1:
                raise InvalidArgument(
                    f"softmax_cross_entropy needs a model whose output is a vector of logits "
                    f"(classes,); this one's has shape {out}"
                )
            (classes,) = out
            if np.issubdtype(target.dtype, np.integer):
                if target.ndim != 1:
                    raise InvalidArgument(
                        f"{what} has shape {target.shape}; integer class labels are (N,)"
                    )
                if target.size and (target.min() < 0 or target.max() >= classes):
                    raise InvalidArgument(
                        f"{what} holds labels from {target.min()} to {target.max()}; the model "
                        f"has {classes} classes, so labels run from 0 to {classes - 1}"
                    )
                return target.astype(np.int32)
            if target.shape[1:] != out or not np.issubdtype(target.dtype, np.floating):
                raise InvalidArgument(
                    f"{what} has shape {target.shape} {target.dtype.name}; softmax_cross_entropy "
                    f"takes integer labels (N,) or class probabilities (N, {classes})"
                )
            return _exact_cast(target, program.output_dtype, what)
    # An expression in `output` and `target`: it must give a scalar per example.
    try:
        fn = compile_expression(loss, ["output", "target"], {})
        value = jax.eval_shape(
            fn,
            jax.ShapeDtypeStruct(out, program.output_dtype),
            jax.ShapeDtypeStruct(target.shape[1:], target.dtype),
        )
    except InvalidArgument as e:
        raise InvalidArgument(f"objective.loss.expression: {e.message}") from None
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"objective.loss.expression cannot be evaluated: {e}") from None
    if value.shape != ():
        raise InvalidArgument(
            f"objective.loss.expression gives shape {value.shape}; a loss is a scalar per "
            "example (reduce it, e.g. with sum(...))"
        )
    return target


def _exact_cast(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    cast = array.astype(dtype)
    if not np.array_equal(cast.astype(array.dtype), array, equal_nan=True):
        raise InvalidArgument(
            f"{what} is {array.dtype.name} and would change value as {dtype.name}, the model's "
            f"dtype; send it as {dtype.name}"
        )
    return cast


def make_curvature_request(
    program: Program,
    kind: Kind,
    wrt: Wrt,
    shared: tuple[int, ...],
    objective: Objective,
    options: CurvatureOptions,
    max_exact_n: int,
) -> CurvatureRequest:
    """A CurvatureRequest, its options checked against the kind and filled in."""
    p = sum(math.prod(program.inputs[i].shape) for i in wrt.indices)
    if kind not in OBJECTIVE_KINDS:
        raise InvalidArgument(
            f"kind {kind.value} does not apply to an objective over data; use one of "
            + ", ".join(k.value for k in OBJECTIVE_KINDS)
        )
    if kind is Kind.GRADIENT_STATISTICS and not objective.present:
        raise InvalidArgument(
            "gradient_statistics reduces per-example gradients over a data set: set objective"
        )
    if not objective.present and program.output_shape != ():
        raise InvalidArgument(
            f"kind {kind.value} needs a scalar function (the operator is its Hessian); this "
            f"function's output has shape {program.output_shape}. Reduce it to a scalar, or "
            "give it as a model with an objective and a loss"
        )
    if p == 0:
        raise InvalidArgument("the variable has no elements (wrt an input of shape with a 0)")
    given = {
        "diagonal_estimator": options.estimator is not None,
        "num_matvecs": options.num_matvecs != 0,
        "seed": options.seed != 0,
        "damping": options.damping != 0,
        "tolerance": options.tolerance != 0,
        "max_iterations": options.max_iterations != 0,
    }
    applies = {"diagonal_estimator": Kind.DIAGONAL, "num_matvecs": Kind.DIAGONAL,
               "seed": Kind.DIAGONAL, "damping": Kind.SOLVE, "tolerance": Kind.SOLVE,
               "max_iterations": Kind.SOLVE}  # fmt: skip
    for name, is_given in given.items():
        if is_given and applies[name] is not kind:
            raise InvalidArgument(
                f"{name} does not apply to kind {kind.value}; it applies to {applies[name].value}"
            )
    estimator = options.estimator
    if estimator is None:
        estimator = (
            DiagonalEstimator.EXACT_DIAGONAL if p <= max_exact_n else DiagonalEstimator.DIAG_PP
        )
    if kind is Kind.DIAGONAL and estimator is DiagonalEstimator.EXACT_DIAGONAL and p > max_exact_n:
        raise InvalidArgument(
            f"the exact diagonal takes p={p} matvecs with the unit vectors; this server does that "
            f"up to p={max_exact_n} (--max-exact-n). Use diagonal_estimator diag++ or hutchinson"
        )
    if kind is Kind.HESSIAN and p > max_exact_n:
        raise InvalidArgument(
            f"the dense operator of an objective is p={p} matvecs, p² numbers per point; this "
            f"server forms it up to p={max_exact_n}. Use hvp, diagonal or a spectrum instead"
        )
    num_matvecs = options.num_matvecs or curvature.DEFAULT_MATVECS
    curvature.check_matvecs("num_matvecs", num_matvecs)
    least = {DiagonalEstimator.HUTCHINSON_DIAGONAL: 2, DiagonalEstimator.DIAG_PP: 4}
    if kind is Kind.DIAGONAL and num_matvecs < least.get(estimator, 0):
        raise InvalidArgument(
            f"diagonal_estimator {estimator.value} needs num_matvecs ≥ {least[estimator]}, got "
            f"{num_matvecs}"
        )
    dtype = program.output_dtype
    if not (math.isfinite(options.damping) and options.damping >= 0):
        raise InvalidArgument(f"damping must be a finite number ≥ 0, got {options.damping}")
    tolerance = options.tolerance or float(np.sqrt(np.finfo(dtype).eps))
    if not 0 < tolerance < 1:
        raise InvalidArgument(f"tolerance must be between 0 and 1, got {options.tolerance}")
    if not 0 <= options.max_iterations <= curvature.MAX_ITERATIONS:
        raise InvalidArgument(
            f"max_iterations must be between 0 and {curvature.MAX_ITERATIONS}, got "
            f"{options.max_iterations}"
        )
    return CurvatureRequest(
        kind=kind,
        wrt=wrt,
        shared=shared,
        objective=objective,
        estimator=estimator,
        num_matvecs=num_matvecs if kind is Kind.DIAGONAL else 0,
        seed=options.seed,
        damping=options.damping,
        tolerance=tolerance if kind is Kind.SOLVE else 0.0,
        max_iterations=(options.max_iterations or min(10 * p, curvature.MAX_ITERATIONS))
        if kind is Kind.SOLVE
        else 0,
    )


def columns(
    kind: Kind | None,
    p: int,
    *,
    method: Method | None = None,
    estimator: DiagonalEstimator | None = None,
    num_matvecs: int = 0,
    max_exact_n: int = 4096,
) -> int:
    """How many vectors one pass over the data carries (for the chunk's memory)."""
    if method is not None:
        if method is Method.EXACT:
            return p
        if method is Method.TRACE:
            return max(num_matvecs or curvature.DEFAULT_MATVECS, 1)
        return 1
    if kind is Kind.HESSIAN:
        return p
    if kind is Kind.DIAGONAL:
        if estimator is None:
            estimator = (
                DiagonalEstimator.EXACT_DIAGONAL if p <= max_exact_n else DiagonalEstimator.DIAG_PP
            )
        m = num_matvecs or curvature.DEFAULT_MATVECS
        if estimator is DiagonalEstimator.EXACT_DIAGONAL:
            return p
        if estimator is DiagonalEstimator.HUTCHINSON_DIAGONAL:
            return m
        return max(m // 3, m - 2 * (m // 3))
    return 1
