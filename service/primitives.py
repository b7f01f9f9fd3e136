"""The four derivatives every curvature computation is built from, for both kinds of program.

For f with the flat variable θ (p,) of a Wrt (the other inputs fixed), at one point:

    value(θ, inputs)        f                   out
    vjp(θ, inputs, u)       Jᵀ u                (p,)    u: out
    jvp(θ, inputs, v)       J v                 out     v: (p,)
    hvp(θ, inputs, u, v)    ∇²⟨u, f⟩ v          (p,)    u: out, v: (p,)

`inputs` are all the program's inputs at the point (the wrt ones are replaced by θ). Each is
a function of one point that vmaps at any depth, so objectives over data sets, curvature
operators, diagonals, solves and the spectral methods are written once, per point, over
these four.

An expression program has f at one point: the four are JAX transforms of it. A JAX-export
program has f only at a batch of rows and in reverse mode: each of the four is a batched
reverse-mode computation on the artifact (J v as the transpose of a VJP, by one more VJP;
the artifact is exported with vjp_order=2), wrapped in `custom_vmap` whose rule merges every
vmapped axis into the artifact's one batch axis of rows. The artifact is never vmapped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from hessd.service.variable import Wrt

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = ["Primitives", "from_batched", "from_point"]

Inputs = Sequence[jax.Array]


@dataclasses.dataclass(frozen=True)
class Primitives:
    """value, vjp, jvp and hvp of f at one point, over the flat variable θ (module doc)."""

    value: Callable[[jax.Array, Inputs], jax.Array]
    vjp: Callable[[jax.Array, Inputs, jax.Array], jax.Array]
    jvp: Callable[[jax.Array, Inputs, jax.Array], jax.Array]
    hvp: Callable[[jax.Array, Inputs, jax.Array, jax.Array], jax.Array]
    # Whether `value` is plain JAX, so that every transform applies to it vmapped over a
    # chunk of examples (θ shared): one batched pass per chunk instead of one per example.
    transformable: bool = False


def _flat(wrt: Wrt) -> Wrt:
    return Wrt(wrt.indices, flatten=True)


def from_point(program: Program, wrt: Wrt, fn: Callable[..., jax.Array]) -> Primitives:
    """The four for f = fn(*inputs) at one point: JAX transforms of fn."""
    flat = _flat(wrt)

    def value(theta: jax.Array, inputs: Inputs) -> jax.Array:
        f_x, _ = flat.view(program, fn, inputs)
        return f_x(theta)

    def vjp(theta: jax.Array, inputs: Inputs, u: jax.Array) -> jax.Array:
        return jax.vjp(lambda t: value(t, inputs), theta)[1](u)[0]

    def jvp(theta: jax.Array, inputs: Inputs, v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: value(t, inputs), (theta,), (v,))[1]

    def hvp(theta: jax.Array, inputs: Inputs, u: jax.Array, v: jax.Array) -> jax.Array:
        # Forward over reverse: one JVP of the VJP.
        return jax.jvp(lambda t: vjp(t, inputs, u), (theta,), (v,))[1]

    return Primitives(value=value, vjp=vjp, jvp=jvp, hvp=hvp, transformable=True)


def from_batched(program: Program, wrt: Wrt, batched_fn: Callable[..., jax.Array]) -> Primitives:
    """The four for f known only as batched_fn(*inputs) over rows, in reverse mode."""
    flat = _flat(wrt)

    def value_rows(theta: jax.Array, *inputs: jax.Array) -> jax.Array:
        f_x, _ = flat.view(program, batched_fn, inputs)
        return f_x(theta)

    def vjp_rows(theta: jax.Array, u: jax.Array, *inputs: jax.Array) -> jax.Array:
        # The rows are independent, so one VJP gives each row its own Jᵀu.
        return jax.vjp(lambda t: value_rows(t, *inputs), theta)[1](u)[0]

    def jvp_rows(theta: jax.Array, v: jax.Array, *inputs: jax.Array) -> jax.Array:
        # J v without forward mode: u ↦ Jᵀu is linear, and its VJP with v is J v.
        out = jax.eval_shape(lambda t: value_rows(t, *inputs), theta)
        zeros = jnp.zeros(out.shape, out.dtype)
        return jax.vjp(lambda u: vjp_rows(theta, u, *inputs), zeros)[1](v)[0]

    def hvp_rows(theta: jax.Array, u: jax.Array, v: jax.Array, *inputs: jax.Array) -> jax.Array:
        # Reverse over reverse: the gradient of Σ_rows ⟨Jᵀu, v⟩.
        return jax.grad(lambda t: jnp.sum(vjp_rows(t, u, *inputs) * v))(theta)

    value_p, vjp_p, jvp_p, hvp_p = (
        _point(_rows(f)) for f in (value_rows, vjp_rows, jvp_rows, hvp_rows)
    )
    return Primitives(
        value=lambda theta, inputs: value_p(theta, *inputs),
        vjp=lambda theta, inputs, u: vjp_p(theta, u, *inputs),
        jvp=lambda theta, inputs, v: jvp_p(theta, v, *inputs),
        hvp=lambda theta, inputs, u, v: hvp_p(theta, u, v, *inputs),
    )


def _broadcast(
    axis_size: int, in_batched: Sequence[Any], args: Sequence[jax.Array]
) -> list[jax.Array]:
    return [
        a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        for a, batched in zip(args, in_batched, strict=True)
    ]


def _rows(impl: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """impl over rows (every arg with the same leading axis), made vmappable: a vmapped axis
    is merged into the rows, impl runs once on all of them, and the result is split back."""

    @custom_vmap
    def rows(*args: jax.Array) -> jax.Array:
        return impl(*args)

    @rows.def_vmap
    def rule(axis_size: int, in_batched: Sequence[Any], *args: jax.Array) -> tuple[jax.Array, bool]:
        full = _broadcast(axis_size, in_batched, args)
        r = full[0].shape[1]
        merged = [a.reshape(axis_size * r, *a.shape[2:]) for a in full]
        out = rows(*merged)
        return out.reshape(axis_size, r, *out.shape[1:]), True

    return rows


def _point(rows: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """A rows function at one point (a batch of one row); under vmap, the vmapped axis is
    the rows."""

    @custom_vmap
    def point(*args: jax.Array) -> jax.Array:
        return rows(*(a[None] for a in args))[0]

    @point.def_vmap
    def rule(axis_size: int, in_batched: Sequence[Any], *args: jax.Array) -> tuple[jax.Array, bool]:
        return rows(*_broadcast(axis_size, in_batched, args)), True

    return point
