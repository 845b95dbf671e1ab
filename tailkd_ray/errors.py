"""The package's user-facing errors: one family under ``TailKDError``.

The CLI prints any ``TailKDError`` as one line (``tailkd <command>: <message>``, the traceback only with
``--debug``), so every message names the input at fault and what to do. Each kind also derives from the
built-in class it was raised as before (``ValueError`` / ``RuntimeError``), so ``except ValueError``
callers keep working. Programming errors (API misuse inside pure functions, e.g. tensor shapes in
``core/losses.py``) stay plain ``ValueError``s.

Errors raised inside Ray tasks, actors or training workers reach the driver wrapped in Ray's own
exceptions; ``find_tailkd_error`` digs the original out of them.
"""

from __future__ import annotations

import re
import sys
from typing import Optional


class TailKDError(Exception):
    """Base of the errors a user can fix: bad config, data, cache, vocabulary or cluster."""


class ConfigError(TailKDError, ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class DataError(TailKDError, ValueError):
    """The corpus cannot be read as configured; the message names the file (and line) and what to do."""


class CacheError(TailKDError, ValueError):
    """The summary cache is missing, unfinished, unreadable or was computed from other inputs than the config."""


class CheckpointError(TailKDError, RuntimeError):
    """No intact training checkpoint to resume from (every one is damaged, incomplete or missing), or one
    damaged while in use; the message names each checkpoint and what is wrong with it."""


class VocabularyError(TailKDError, ValueError):
    """Teacher, student and data tokenizer do not share one vocabulary (sizes, token tables or token ids)."""


class NonFiniteLogitsError(TailKDError, ValueError):
    """Teacher logits hold NaN or +inf (or a position's are all −inf); ``position`` is the index of the first bad
    position (leading dims), ``token`` the first bad vocabulary entry there (None: all −inf), ``context`` what
    was scored (e.g. the teacher and block), prefixed to the message."""

    def __init__(self, position: tuple[int, ...], token: Optional[int], context: str = ""):
        self.position, self.token, self.context = position, token, context
        where = "every vocabulary entry is -inf" if token is None else f"vocabulary entry {token}"
        super().__init__(f"{context + ': ' if context else ''}teacher logits are not finite at position {position} "
                         f"({where}); check the teacher's dtype/overflow or its input tokens there")

    def __reduce__(self):  # the default would rebuild it from the message alone (Ray pickles errors)
        return (type(self), (self.position, self.token, self.context))


class PlacementError(TailKDError, RuntimeError):
    """No alive node (or not enough of them) can host the requested actors or workers."""


class SearchError(TailKDError, RuntimeError):
    """No trial of a Tune search completed; the message counts the trials by status, quotes the first trial's
    error and names the results table and the trials' logs."""


class NonFiniteLossError(TailKDError, FloatingPointError):
    """A training step's loss or gradient norm is NaN/inf; the message names the step, the rank(s), the term
    (CLM or divergence) and the values seen."""


def find_tailkd_error(error: BaseException) -> Optional[TailKDError]:
    """The ``TailKDError`` behind ``error``: itself, or the original one wrapped by Ray on its way to the driver.

    Ray 2.60 wraps a remote failure as ``RayTaskError`` (original in ``.cause``; its ``as_instanceof_cause()``
    twin is an instance of the original class but prints Ray's traceback), and Ray Train V2 collects per-rank
    failures in ``WorkerGroupError.worker_failures`` or the controller's in ``ControllerError.controller_failure``.
    Ray Data raises a UDF's failure as ``UserCodeException`` *from* the original, a link lost when it is sent to
    the driver: only the remote traceback's text survives, so the error is rebuilt from its last
    ``tailkd_ray.errors.<Kind>: <message>`` line (message only: no attributes, first line only).
    """
    seen: set[int] = set()
    pending: list[Optional[BaseException]] = [error]
    remote_texts = []
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = _ray_task_cause(current)
        if isinstance(current, TailKDError) and cause is None:
            return current
        if cause is not None:
            remote_texts.append(str(current))
        pending.extend([cause, getattr(current, "controller_failure", None),
                        *getattr(current, "worker_failures", {}).values(), current.__cause__, current.__context__])
    for text in remote_texts:
        rebuilt = _from_traceback_text(text)
        if rebuilt is not None:
            return rebuilt
    return None


def _ray_task_cause(error: BaseException) -> Optional[BaseException]:
    ray_exceptions = sys.modules.get("ray.exceptions")  # not imported: nothing can be wrapped by Ray
    if ray_exceptions is not None and isinstance(error, ray_exceptions.RayTaskError):
        return error.cause
    return None


_TRACEBACK_LINE = re.compile(rf"^{re.escape(__name__)}\.(\w+): (.*)$", re.MULTILINE)


def _from_traceback_text(text: str) -> Optional[TailKDError]:
    """The last (outermost) ``TailKDError`` a formatted traceback names, rebuilt with its message."""
    for name, message in reversed(_TRACEBACK_LINE.findall(text)):
        kind = globals().get(name)
        if isinstance(kind, type) and issubclass(kind, TailKDError):
            rebuilt = kind.__new__(kind)
            Exception.__init__(rebuilt, message)  # bypasses NonFiniteLogitsError's structured constructor
            return rebuilt
    return None
