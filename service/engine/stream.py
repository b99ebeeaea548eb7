"""The asyncio side of one request: what the HTTP layer iterates over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.engine.types import GenerationResult, TokenDelta


class GenerationStream:
    """Token deltas of one request, in order, ending with its :class:`GenerationResult`.

    Filled by the engine's scheduler thread (through the event loop, never directly) and consumed
    with ``async for``. Cancelling the task that iterates it cancels the request too, so a handler
    torn down by a client disconnect frees its batch slot without further bookkeeping.
    """

    def __init__(self, request_id: str, on_cancel: Callable[[GenerationStream], None]) -> None:
        self.request_id = request_id
        self.result: GenerationResult | None = None
        self._queue: asyncio.Queue[TokenDelta | GenerationResult] = asyncio.Queue()
        self._on_cancel = on_cancel
        # Written here, read by the scheduler thread at its next step; a bool store is atomic.
        self.cancel_requested = False
        self.ended = False  # a result was queued; anything after it is dropped

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); a no-op once it has ended."""
        if self.result is None and not self.cancel_requested:
            self.cancel_requested = True
            self._on_cancel(self)

    def _put(self, item: TokenDelta | GenerationResult) -> None:
        """Called on the event loop by the engine. The first result ends the stream: a late one (the
        scheduler finishing a request the deadline backstop already ended) is dropped."""
        if self.ended:
            return
        self.ended = isinstance(item, GenerationResult)
        self._queue.put_nowait(item)

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self.result is not None:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, GenerationResult):
            self.result = item
            raise StopAsyncIteration
        return item

    async def collect(self) -> GenerationResult:
        """Consume the stream to its end and return the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result
