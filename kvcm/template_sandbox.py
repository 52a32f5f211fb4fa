"""A jinja2 sandbox that meters what a render spends: a deadline and an output budget.

jinja's own sandbox stops a template from reaching Python internals, but not from spending
without bound: ``{{ 'x' * 10**9 }}`` allocates a gigabyte, three nested ``range(100000)``
loops run for days. A template renders on the caller's thread, which cannot be interrupted
from outside, so the render has to check its own limits as it goes. It does so

- at every iteration of every ``{% for %}`` loop: the code generator wraps each loop's
  iterable, so a loop whose body calls nothing and prints nothing is still metered;
- at every call (macros, methods, globals): the sandbox routes all of them through
  ``call``;
- at ``*`` and ``**``: the operands say how large the result would be before it is built, so
  a string, list or integer multiplied past the budget is refused instead of allocated;
- on every piece of output the template yields, and on the final text.

``+`` is not intercepted: templates concatenate on every line, and an intercepted operator
costs a Python call each time (intercepting ``+`` made rendering Qwen's template for a
20-turn chat take 80% more instructions). A sum is no larger than its operands together;
what can still grow fast is a string doubled in a loop, which runs into the memory limit of
its worker process (request templates) or is the operator's own template.

Metering is per render: :func:`render` puts a meter into the render's context under a name
no template can spell, and every check reads it from there, so compiled templates stay
shared between threads and renders with different limits.

What this cannot stop is a single call into C that is expensive by itself (a filter asked
for a gigabyte of padding, say). Templates the operator installed are trusted not to do
that; templates from requests therefore render in worker processes that can be killed
(kvcm/template_pool.py).
"""

from __future__ import annotations

import time
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.sandbox

__all__ = ["LimitExceeded", "Limits", "MeteredEnvironment", "render"]

# Render-context key of the meter and name of the loop-wrapping filter: neither is a jinja
# identifier, so template code can neither read the meter nor call the filter.
_METER = "kvcm meter"
_METERED = "kvcm metered"

# An integer result of more bits than this is refused (its decimal text alone would be
# ~300 k digits, far past anything a prompt holds).
_MAX_INT_BITS = 1 << 20


class LimitExceeded(Exception):
    """A render went over its Limits; ``limit`` is ``"time"`` or ``"output"``."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.message = message
        self.limit = limit


class Limits:
    """What one render may spend: ``timeout`` seconds and ``max_output`` characters."""

    __slots__ = ("timeout", "max_output")

    def __init__(self, timeout: float, max_output: int):
        if not (timeout > 0 and max_output > 0):
            raise ValueError("template limits must be positive")
        self.timeout = timeout
        self.max_output = max_output

    def __repr__(self) -> str:
        return f"Limits(timeout={self.timeout!r}, max_output={self.max_output!r})"


class _Meter:
    __slots__ = ("deadline", "limits")

    def __init__(self, limits: Limits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"chat template rendering took longer than {self.limits.timeout:g} s",
                                "time")

    def size(self, size: int) -> None:
        if size > self.limits.max_output:
            raise LimitExceeded(f"chat template output would be {size} characters, over the limit of "
                                f"{self.limits.max_output}", "output")


def _meter(context: Any) -> _Meter | None:
    return context.parent.get(_METER)


class _MeteredIterable:
    """A loop's iterable, ticking the meter once per item; keeps len() for ``loop.length``."""

    __slots__ = ("iterable", "meter")

    def __init__(self, iterable: Any, meter: _Meter):
        self.iterable = iterable
        self.meter = meter

    def __iter__(self) -> Any:
        tick = self.meter.tick
        for item in self.iterable:
            tick()
            yield item

    def __len__(self) -> int:
        return len(self.iterable)


@jinja2.pass_context
def _metered(context: Any, iterable: Any) -> Any:
    meter = _meter(context)
    return iterable if meter is None else _MeteredIterable(iterable, meter)


class _MeteredCodeGenerator(jinja2.compiler.CodeGenerator):
    def visit_Template(self, node: jinja2.nodes.Template, frame: Any = None) -> None:
        # before any code is generated: the generator collects the filters a template uses
        # from the whole tree first
        for loop in node.find_all(jinja2.nodes.For):
            if not (isinstance(loop.iter, jinja2.nodes.Filter) and loop.iter.name == _METERED):
                loop.iter = jinja2.nodes.Filter(loop.iter, _METERED, [], [], None, None,
                                                lineno=loop.iter.lineno)
        super().visit_Template(node, frame)


_SEQUENCES = (str, list, tuple)


def _check_product(meter: _Meter, operator: str, left: Any, right: Any) -> None:
    """Refuses a sequence repeated, or an integer raised, past the budget before it is built."""
    if operator == "*":
        if isinstance(left, _SEQUENCES) and isinstance(right, int):
            meter.size(len(left) * max(right, 0))
        elif isinstance(right, _SEQUENCES) and isinstance(left, int):
            meter.size(len(right) * max(left, 0))
    elif (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
          and left.bit_length() * right > _MAX_INT_BITS):
        raise LimitExceeded("chat template computes an integer of more than %d bits" % _MAX_INT_BITS, "output")


class MeteredEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose renders check the meter :func:`render` gives them
    (without one, a render runs unmetered, exactly as in the plain sandbox)."""

    code_generator_class = _MeteredCodeGenerator
    intercepted_binops = frozenset(("*", "**"))

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.filters[_METERED] = _metered

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        meter = _meter(__context)
        if meter is not None:
            meter.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        meter = _meter(context)
        if meter is not None:
            _check_product(meter, operator, left, right)
        return super().call_binop(context, operator, left, right)


def render(template: jinja2.Template, variables: dict[str, Any], limits: Limits | None) -> str:
    """``template.render(**variables)``, metered by ``limits`` (None: unmetered). Raises
    LimitExceeded, or whatever the template raises."""
    if limits is None:
        return template.render(**variables)
    meter = _Meter(limits)
    variables = dict(variables)
    variables[_METER] = meter
    context = template.new_context(variables)
    pieces = []
    size = 0
    for piece in template.root_render_func(context):
        size += len(piece)
        meter.size(size)
        meter.tick()
        pieces.append(piece)
    return "".join(pieces)
