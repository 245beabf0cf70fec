"""The two kinds of failure every lgm_ray command tells apart.

* :class:`InputError` — bad input a user can fix (a spec, a flag, a path, a weights file, a shard
  set): raised before work starts wherever it can be checked. Its message names the problem and
  the fix. Every command prints it as one line ``error: …`` and exits with :data:`EXIT_INPUT` (2).
* :class:`RunFailedError` — a run that started and then failed; its message says what was kept and
  how to continue. Commands print it as one line and exit with :data:`EXIT_FAILED` (1).

The packages' own error classes (``ConfigError``, ``SpecError``, ``ShardError``,
``BackboneWeightsError``, ``ReportError``, …) derive from these, so a caller catches one class.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input, found before work started: the message names the problem and the fix."""


class RunFailedError(RuntimeError):
    """A run that started and then failed; the message names what it kept and how to continue."""
