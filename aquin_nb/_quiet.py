"""``progress=False`` means quiet: third-party bars and warnings stay out of the way.

A verb called with ``progress=False`` (a notebook that wants clean output, a
script, the CLI's ``-q``) shows no transformers "Loading weights" bars, no
SAELens "Training SAE" bar, and no other library's deprecation or future
warnings for the duration of the call. aquin_nb's own warnings (a dictionary
that stopped fitting, an unreachable mirror) still show. Everything is restored
when the call returns; nothing changes at import.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def third_party_quiet(quiet: bool = True) -> Iterator[None]:
    """Silence other libraries' progress bars and warnings inside the block."""
    if not quiet:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # Only warnings raised outside aquin_nb: ours name the user's problem.
        warnings.filterwarnings("ignore", module=r"^(?!aquin_nb)")
        from transformers.utils import logging as hf_logging

        bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        def restore() -> None:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

        stack.callback(restore)
        yield


def quiet_unless_progress(function: F) -> F:
    """Run ``function`` inside `third_party_quiet` when it is called with ``progress=False``."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with third_party_quiet(not kwargs.get("progress", True)):
            return function(*args, **kwargs)

    return call  # type: ignore[return-value]
