"""Jaxpr equations as the channel analysis sees them: the primitive families it follows, the inner
jaxpr of a call, the layer and source line of an equation (for error messages), and tracing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
try:  # file:line of an equation, for error messages (jax internals: optional)
    from jax._src import source_info_util
except ImportError:  # pragma: no cover
    source_info_util = None
from jax.extend import core as jcore

UNARY = {"neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p",
          "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
          "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "square", "erf",
          "erfc", "erf_inv", "lgamma", "digamma", "not", "real", "imag", "conj",
          "population_count", "clz", "integer_pow", "convert_element_type", "copy", "copy_p",
          "reduce_precision", "stop_gradient", "sharding_constraint", "mesh_cast", "reshard",
          "bitcast_convert_type"}
NARY = {"add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "and",
         "or", "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp", "add_any",
         "complex", "shift_left", "shift_right_logical", "shift_right_arithmetic"}
REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
WINDOW = {"reduce_window_max", "reduce_window_min", "reduce_window_sum"}
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass
class State:
    desc: list  # per axis: a class list (row-major factors)
    data: bool  # depends on the model input
    src: tuple | None = None  # (leaf key, per-axis leaf axis or None): a variable, moved as is
    const: bool = False  # computed from literals and constants only: carries no channels


def sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, list] | None:
    key = CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    j = eqn.params[key]
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def location(eqn, outer=()) -> str:
    """'layer 'stage1_block0/conv2' (file:line), inside resize' for an equation; `outer` are the
    call equations around it (outermost first), whose layer and line stand in for missing ones."""
    eqns = [eqn, *reversed(outer)]
    stacks = [str(e.source_info.name_stack) for e in eqns]
    stack = next((x for x in stacks if "/" in x), "")
    layer = stack.split("/", 1)[1] if stack else ""
    line = ""
    if source_info_util is not None:
        line = next((x for x in (source_info_util.summarize(e.source_info) for e in eqns) if x),
                    "")
    calls = [str(e.params.get("name", e.primitive.name)) for e in outer]
    out = f"layer {layer!r}" if layer else "the model's top level"
    out += f" ({line})" if line else ""
    return out + (f", inside {' > '.join(calls)}" if calls else "")



def trace(fn: Callable, args: tuple):
    """The closed jaxpr of `fn(*args)`."""
    return jax.make_jaxpr(fn)(*args)

