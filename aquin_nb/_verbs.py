"""The verb seam: every verb reports its start and its result to listeners.

This module is stdlib-only on purpose. A verb module imports it and nothing
else to be observed; the web mirror (`aquin_nb.connect`) registers itself as a
listener, so computation never imports the network client or the cards
(DESIGN.md decision 5).

A verb called inside another verb (``simulate`` runs ``sae_diff``) is not
reported: listeners see the outer call only. A listener that raises is logged
and skipped; it never breaks the verb.

Example:
    >>> from aquin_nb import _verbs
    >>> seen = []
    >>> @_verbs.verb("sae_align")
    ... def double(x):
    ...     return 2 * x
    >>> _verbs.add_listener(seen.append)
    >>> double(21)
    42
    >>> [event.phase for event in seen], seen[1].result
    (['start', 'result'], 42)
    >>> _verbs.remove_listener(seen.append)
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, eq=False)
class VerbEvent:
    """One verb call's start (``phase="start"``) or end (``phase="result"``).

    ``function``, ``args`` and ``kwargs`` describe the call (both phases);
    ``result`` / ``error`` and ``duration_s`` are set on the ``result`` phase.
    """

    phase: str
    tool: str
    invocation_id: str
    function: Callable[..., Any] = field(repr=False)
    args: tuple[Any, ...] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)
    result: Any = field(default=None, repr=False)
    error: BaseException | None = None
    duration_s: float = 0.0


Listener = Callable[[VerbEvent], None]

_listeners: tuple[Listener, ...] = ()
_inside_verb: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aquin_inside_verb", default=False
)
VERBS: dict[str, Callable[..., Any]] = {}


def add_listener(listener: Listener) -> None:
    """Call ``listener(event)`` for every outermost verb's start and result."""
    global _listeners
    if listener not in _listeners:
        _listeners = (*_listeners, listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``; unknown listeners are ignored."""
    global _listeners
    _listeners = tuple(other for other in _listeners if other != listener)


def _notify(event: VerbEvent) -> None:
    for listener in _listeners:
        try:
            listener(event)
        except Exception:  # a listener never breaks the verb it observes
            log.exception("verb listener %r failed on %s %s", listener, event.tool, event.phase)


def verb(tool: str, *, entry_point: bool = True) -> Callable[[F], F]:
    """Make ``function`` a verb named ``tool`` that reports to the listeners.

    With no listener this costs one tuple check per call. ``VERBS`` maps each tool
    to its public entry point; a second function that reports under the same tool
    (`watch`'s per-checkpoint step reports as ``sae_trajectory``) passes
    ``entry_point=False``.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not _listeners or _inside_verb.get():
                marker = _inside_verb.set(True)
                try:
                    return function(*args, **kwargs)
                finally:
                    _inside_verb.reset(marker)
            start = VerbEvent("start", tool, uuid.uuid4().hex, function, args, kwargs)
            _notify(start)
            started = time.perf_counter()
            marker = _inside_verb.set(True)
            try:
                result = function(*args, **kwargs)
            except BaseException as error:
                _inside_verb.reset(marker)
                duration = time.perf_counter() - started
                _notify(replace(start, phase="result", error=error, duration_s=duration))
                raise
            _inside_verb.reset(marker)
            duration = time.perf_counter() - started
            _notify(replace(start, phase="result", result=result, duration_s=duration))
            return result

        if entry_point:
            VERBS[tool] = call
        return call  # type: ignore[return-value]

    return decorate
