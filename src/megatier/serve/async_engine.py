"""AsyncEngine: asyncio request handlers on one side, the single-threaded Engine on the other.

One background thread owns the Engine and steps it while any request exists; between steps it takes
new requests and aborts from a thread-safe queue, so they join or leave the running batch at once. The
Engine is never touched from the event loop: each step's updates go back in one call_soon_threadsafe,
and the loop routes them to the RequestStream of the HTTP request they belong to.

Admission is bounded: at most max_num_seqs running plus `max_queue_len` waiting sequences; beyond that
submit() raises Overloaded (HTTP 503) instead of letting the queue, and memory, grow without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass

from megatier.engine import Engine, SequenceUpdate
from megatier.errors import MegatierError
from megatier.sampling import SamplingParams
from megatier.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The server cannot take this request now (queue full, or shutting down): HTTP 503."""


class EngineFailure(Exception):
    """The engine failed while serving this request (a bug, or out of memory): HTTP 500."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # tells the engine thread to exit
_CLOSED = object()  # ends a RequestStream's iteration early


class RequestStream:
    """The updates of one API request: one engine request per prompt, `n` sequences each.

    Iterate it for (prompt_index, SequenceUpdate) until every sequence has finished. close() cancels the
    sequences still running and frees their KV pages; the server calls it however the response ends.
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str], n: int):
        self._owner = owner
        self._prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.unfinished = {rid: set(range(n)) for rid in request_ids}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._arrival = time.monotonic()
        self._last_token: dict[tuple[str, int], float] = {}

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, SequenceUpdate]:
        if not self.unfinished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    def deliver(self, update: SequenceUpdate) -> None:
        """Event loop only: queue one update and record its latencies."""
        metrics, now = self._owner.metrics, time.monotonic()
        key = (update.request_id, update.index)
        if update.new_token_ids:
            k = len(update.new_token_ids)
            last = self._last_token.get(key)
            if last is None:
                metrics.ttft.observe(now - self._arrival)
            else:
                for _ in range(k):
                    metrics.inter_token.observe((now - last) / k)
            self._last_token[key] = now
            metrics.generation_tokens.inc(k)
        self._queue.put_nowait((self._prompt_index[update.request_id], update))
        if update.finished:
            metrics.e2e.observe(now - self._arrival)
            metrics.finished.labels(update.finish_reason or "unknown").inc()
            self._finish_sequence(update.request_id, update.index)

    def fail(self, error: Exception) -> None:
        """Event loop only: end the iteration with `error` (the request's other prompts are cancelled)."""
        self._abort_unfinished()
        self._queue.put_nowait(error)

    def cancel(self) -> None:
        """End every unfinished sequence now with finish_reason "abort", as if the engine had finished it,
        so the client still gets a well-formed ending."""
        for rid, seqs in list(self.unfinished.items()):
            for index in sorted(seqs):
                self.deliver(SequenceUpdate(rid, index, [], "", True, "abort"))
            self._owner.abort(rid)

    def close(self) -> None:
        """Cancel what has not finished, silently (the client is gone or has what it needs). Idempotent."""
        self._abort_unfinished()
        self._queue.put_nowait(_CLOSED)

    def _abort_unfinished(self) -> None:
        for rid in list(self.unfinished):
            self._owner.abort(rid)
            for index in list(self.unfinished.get(rid, ())):
                self._finish_sequence(rid, index)

    def _finish_sequence(self, rid: str, index: int) -> None:
        seqs = self.unfinished.get(rid)
        if seqs is None or index not in seqs:
            return
        seqs.discard(index)
        self._owner.num_pending -= 1
        if not seqs:
            del self.unfinished[rid]
            self._owner.forget(rid)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue_len: int):
        self.engine = engine
        self.metrics = metrics
        self.capacity = engine.scheduler.max_num_seqs + max_queue_len  # sequences admitted at once
        self.num_pending = 0  # sequences admitted and not finished (event loop only)
        self.accepting = True
        self._streams: dict[str, RequestStream] = {}  # engine request id -> its stream (event loop only)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- event loop side -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will serve requests."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="megatier-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Admit one API request (one engine request per prompt) or raise: MegatierError for a prompt the
        model cannot take, Overloaded when the server is full or shutting down."""
        if not self.accepting or not self.alive:
            self.metrics.rejected.inc()
            raise Overloaded("the server is shutting down" if self.alive else "the engine thread has stopped")
        for prompt in prompts:
            self.engine.check_prompt(prompt)
        new = len(prompts) * params.n
        if self.num_pending + new > self.capacity:
            self.metrics.rejected.inc()
            raise Overloaded(
                f"the server is full ({self.num_pending} sequences in flight, room for {self.capacity}); retry later"
            )
        ids = [f"{next(self._ids)}" for _ in prompts]
        stream = RequestStream(self, ids, params.n)
        self.num_pending += new
        for rid, prompt in zip(ids, prompts, strict=True):
            self._streams[rid] = stream
            self.metrics.prompt_tokens.inc(len(prompt))
            self._inbox.put(_Add(rid, prompt, params))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new requests; give those in flight `grace_seconds` to finish, then end them with
        finish_reason "abort", so every open stream still ends with a final chunk and [DONE]."""
        self.accepting = False
        deadline = time.monotonic() + grace_seconds
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(dict.fromkeys(self._streams.values())):
            stream.cancel()

    async def stop(self) -> None:
        """Stop the engine thread (after drain, or at once: anything left is dropped)."""
        self.accepting = False
        for stream in list(dict.fromkeys(self._streams.values())):
            stream.cancel()
        if self._thread is not None:
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    def _dispatch(self, updates: list[SequenceUpdate]) -> None:
        for update in updates:
            stream = self._streams.get(update.request_id)
            if stream is not None:  # else the request was closed while this step ran
                stream.deliver(update)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for stream in dict.fromkeys(s for rid in request_ids if (s := self._streams.get(rid)) is not None):
            stream.fail(error)

    # -- engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            commands = self._take_commands(block=not self.engine.has_unfinished())
            for command in commands:
                if command is _STOP:
                    return
                self._apply(command)
            if self.engine.has_unfinished():
                self._step()

    def _take_commands(self, block: bool) -> list:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.prompt_ids, command.params, command.request_id)
        except Exception as e:
            error = e if isinstance(e, MegatierError) else EngineFailure(f"the engine refused the request: {e!r}")
            self._loop.call_soon_threadsafe(self._fail, [command.request_id], error)

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing every request in flight")
            ids = list(self.engine.requests)
            for rid in ids:
                self.engine.abort_request(rid)
            self._loop.call_soon_threadsafe(self._fail, ids, EngineFailure(f"the engine failed: {e!r}"))
            return
        scheduler = self.engine.scheduler
        self.metrics.engine_state(len(scheduler.running), len(scheduler.waiting), scheduler.num_pages_in_use)
        if self.engine.executor.cache.tiered:
            self.metrics.tier_state(self.engine.executor.cache)
        if updates:
            self._loop.call_soon_threadsafe(self._dispatch, updates)
