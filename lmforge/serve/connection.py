"""Slow clients: uvicorn's HTTP/1.1 protocol with a deadline for the request headers.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive` seconds, but only once a
response has been sent, and any byte that arrives cancels that timer: a client that opens a connection
and sends nothing, or sends its headers a byte at a time, holds the connection (and its file
descriptor) forever. This protocol gives the request line + headers `header_timeout` seconds from the
moment the connection opens or the previous response ends; h11 already bounds their size
(`h11_max_incomplete_event_size`). The body has its own timeout (auth.BodyLimitMiddleware, 408).

    uvicorn.Config(app, http=guarded_h11(header_timeout=10.0), timeout_keep_alive=5)
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadlineH11(H11Protocol):
    header_timeout: float = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        # IDLE: h11 has not seen a complete request line + headers since the deadline was set.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def guarded_h11(header_timeout: float = 10.0) -> type[H11Protocol]:
    """The protocol class to pass as uvicorn.Config(http=...)."""
    return type("GuardedH11Protocol", (_HeaderDeadlineH11,), {"header_timeout": float(header_timeout)})
