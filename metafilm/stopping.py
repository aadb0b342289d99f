"""Stopping a long run cleanly: a first SIGTERM or Ctrl-C asks the run to stop once the step in
progress is done and its checkpoint written; a second one stops at once.

A job scheduler sends SIGTERM and waits a grace period (commonly 30 s) before SIGKILL; a step lasts
seconds, so the run keeps everything it trained. A validation in progress is abandoned instead
(it can take a minute): the run then stops with its last scheduled checkpoint, and the resumed run
repeats the step from there, exactly.

The command line owns the signal handlers (`handle_signals`); training and pretraining only ask
`StopRequest.due` at a step boundary and call `StopRequest.stop` there.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `kill`): handled like Ctrl-C."""


class StopRequest:
    """Whether a signal asked the run to stop, and which one (`signal`)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def due(self) -> bool:
        """True once a first signal arrived: stop at this step boundary."""
        return self.signal is not None

    def stop(self) -> None:
        """End the run now, as the signal asked (raises `Terminated` or `KeyboardInterrupt`)."""
        raise Terminated if self.signal == signal.SIGTERM else KeyboardInterrupt

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:  # the second signal: no more waiting
            self.signal = signum
            self.stop()
        self.signal = signum
        print(
            "\nmetafilm: stopping once this step and its checkpoint are done (a validation in "
            "progress is abandoned); signal again to stop at once",
            file=sys.stderr,
            flush=True,
        )


def _stop_at_once(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def handle_signals(deferred: bool) -> Iterator[StopRequest | None]:
    """Install the handlers of SIGTERM and SIGINT for the duration of a command.

    With `deferred`, both only set the yielded `StopRequest` (the command checks it at step
    boundaries); without, SIGTERM raises `Terminated` at once, like Ctrl-C. Outside the main
    thread (where Python refuses handlers) nothing is installed and None is yielded.
    """
    request = StopRequest()
    handlers = {signal.SIGTERM: request._handle if deferred else _stop_at_once}
    if deferred:
        handlers[signal.SIGINT] = request._handle
    try:
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    except ValueError:  # not the main thread: leave signals alone
        yield None
        return
    try:
        yield request if deferred else None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
