"""Faust's worker and table manager without the fixed waits they add to every start and stop.

faust-streaming 0.15.3 sleeps a second in ``TableManager.on_start`` so that an app may still
declare tables after it starts, and mode's ``Worker`` waits up to a second for leftover tasks
and then another second (``_sentinel_task``) before it closes the event loop. A vapipe stage
declares every table in ``FaustStage.__init__``, before its worker starts, and ends its own
tasks when the app stops, so those waits only delayed each worker's start by a second and
its exit by two: every run, restart and table recovery paid them.

``FaustStage`` passes ``TableManager`` to its app (Faust's ``TableManager`` setting) and
``actors.faust.worker`` runs the app with ``PromptWorker``. Importing this module imports
faust; only the worker process does.
"""

from __future__ import annotations

import asyncio
import logging

from faust.tables import TableManager as FaustTableManager
from faust.worker import Worker

__all__ = ["TableManager", "PromptWorker", "LOOP_CLOSE_GRACE_S"]

logger = logging.getLogger(__name__)

LOOP_CLOSE_GRACE_S = 0.05
"""The loop runs this long after the app has stopped, for transports' close callbacks (mode: 1 s)."""


class TableManager(FaustTableManager):  # type: ignore[misc]  # faust is untyped
    """Faust's table manager, starting its tables and recovery at once instead of after a second.

    Example:
        >>> faust.App("vapipe-count", TableManager="actors.faust.prompt:TableManager")  # doctest: +SKIP
    """

    async def on_start(self) -> None:
        # Faust's on_start is ``await self.sleep(1.0)`` followed by exactly this.
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class PromptWorker(Worker):  # type: ignore[misc]  # faust is untyped
    """Faust's worker, closing its event loop as soon as the app has stopped.

    Example:
        >>> PromptWorker(app, loglevel="WARNING", quiet=True).execute_from_commandline()  # doctest: +SKIP
    """

    async def _sentinel_task(self) -> None:
        # mode sleeps 1 s here, after every service has stopped, before closing the loop.
        await asyncio.sleep(LOOP_CLOSE_GRACE_S)
