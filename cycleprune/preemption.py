"""Stopping cleanly on SIGTERM: a flag the training loops check, never work in the handler.

Kubernetes sends SIGTERM when it evicts or preempts a pod and SIGKILL once the grace period
(``terminationGracePeriodSeconds``, 30 s by default) is over. Saving a checkpoint inside a
signal handler is unsafe (the handler runs between two Python bytecodes, possibly in the middle
of a train step), so :class:`SigtermGuard`'s handler only records the request and sets
``model.stop_training`` on the models it watches: Keras checks that flag after every batch
without any per-batch callback, ``fit`` returns after the call of its train function in
progress (one step, or ``steps_per_execution`` steps), and the caller
writes a checkpoint of the exact step and raises :class:`PreemptedError`. A rerun with the same
checkpoint folder resumes from there.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

# 128 + SIGTERM: the exit status a shell reports for a process ended by SIGTERM.
EXIT_CODE = 143


class PreemptedError(RuntimeError):
    """The stage stopped on SIGTERM after writing a checkpoint; run it again to resume.

    Attributes:
        step: The global step saved in the checkpoint.
        checkpoint: The checkpoint's path prefix (``None`` if there was nothing to save).
    """

    def __init__(self, step: int, checkpoint: str | None) -> None:
        self.step = int(step)
        self.checkpoint = checkpoint
        super().__init__(
            f"Stopped on SIGTERM at step {self.step}; checkpoint: {checkpoint or 'none'}. "
            "Run the stage again with the same checkpoint folder to resume."
        )


class SigtermGuard:
    """A context manager that turns SIGTERM into a flag, then restores the previous handler.

    Only the main thread may install signal handlers; elsewhere (e.g. a test runner's worker
    thread) the guard does nothing and :attr:`requested` stays ``False``.

    Example::

        with SigtermGuard() as guard:
            guard.watch(model)            # model.stop_training = True on SIGTERM
            model.fit(...)
            if guard.requested:
                save_checkpoint()
                raise PreemptedError(step, path)
    """

    def __init__(self) -> None:
        self.requested = False
        self._models: list[Any] = []
        self._previous: Any = None
        self._installed = False

    def watch(self, model: Any) -> None:
        """Set ``model.stop_training`` when SIGTERM arrives (or now, if it already has)."""
        self._models.append(model)
        if self.requested:
            model.stop_training = True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            logger.warning("SIGTERM: stopping after the current step to write a checkpoint.")
        self.requested = True
        for model in self._models:
            model.stop_training = True

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False
        self._models.clear()
