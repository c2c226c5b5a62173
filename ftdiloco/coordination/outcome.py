"""The fate of the current outer step, shared by the Manager and its collaborators.

Nothing in an outer step raises for a failure of the distributed kind: the
first error is recorded here, the vote then says no, and the next quorum
starts clean.  The abort signal lets the training thread give up on
side-thread work (connecting, a collective) the moment the lighthouse says a
member of the quorum died, instead of at the deadline.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, TypeVar

T = TypeVar("T")


class MemberLost(RuntimeError):
    """The lighthouse reported that a member of the current quorum died."""


class StepOutcome:
    """The first error of this outer step, and whether a quorum member was lost."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.error: BaseException | None = None
        self.step = 0
        self._abort: concurrent.futures.Future[str] = concurrent.futures.Future()

    def reset(self, step: int) -> None:
        """A new outer step from committed ``step``: no error, no member lost yet."""
        self.error = None
        self.step = step
        self._abort = concurrent.futures.Future()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, error: BaseException) -> None:
        """Record why the step failed; later errors are consequences and are dropped."""
        if self.error is None:
            self.error = error
            self._log.warning("outer step failed", step=self.step, error=repr(error))

    def member_lost(self, replica_id: str) -> None:
        if not self._abort.done():
            self._abort.set_result(replica_id)

    def wait(self, future: concurrent.futures.Future[T], timeout: float, what: str) -> T:
        """Wait for side-thread work, giving up at the deadline or when a member dies."""
        abort = self._abort
        watched: list[concurrent.futures.Future[Any]] = [future, abort]
        done, _ = concurrent.futures.wait(
            watched, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if future in done:
            return future.result()
        if abort in done:
            raise MemberLost(f"{what} abandoned: quorum member {abort.result()} died")
        raise TimeoutError(f"{what} missed its {timeout:g}s deadline")

    @property
    def abort(self) -> concurrent.futures.Future[str]:
        """Set to the lost member's id when the lighthouse reports a death (LostMembers)."""
        return self._abort
