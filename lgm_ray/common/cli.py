"""What every ``python -m lgm_ray.…`` command does with a failure: one line, a documented exit code.

:func:`run_command` calls a command's body and maps :class:`~lgm_ray.common.errors.InputError` to
``error: …`` and exit 2, :class:`~lgm_ray.common.errors.RunFailedError` to ``error: …`` and exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lgm_ray.common.errors import EXIT_FAILED, EXIT_INPUT, InputError, RunFailedError


def fail(message: object, code: int = EXIT_INPUT) -> int:
    """Print ``error: message`` on stderr (one line) and return ``code``."""
    text = " ".join(str(message).split())
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command's body; its return value (None: 0) or the exit code of the failure it raised."""
    try:
        code = body()
    except InputError as exc:
        return fail(exc, EXIT_INPUT)
    except RunFailedError as exc:
        return fail(exc, EXIT_FAILED)
    return 0 if code is None else int(code)
