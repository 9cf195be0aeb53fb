"""Micro-batching: concurrent requests gathered into token-budget batches for one worker thread.

One request at a time leaves most of a forward pass's width unused; a batch of many costs little more
than one. The batcher takes the oldest waiting request and, when more requests came together around
recent batches (a batch's requests and those that waited meanwhile) than now wait, waits up to
``max_wait`` (from when that request arrived or the model became free) for as many with the same
parameters, or until their estimated tokens fill the budget, then runs them as one dataset on the
worker thread. So a lone client never waits (its recent batches were itself alone), and clients
that send together are answered together. While a batch runs, new requests queue up, so under load batches
grow by themselves. Inference never runs on the event loop: health checks and metrics answer while
the model works.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RECENT_BATCHES = 8  # how many batches' sizes say how many requests come together


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


class Full(Exception):
    """As many requests wait as the batcher holds (``max_queue``)."""


@dataclass
class Job:
    """One request's parsed inputs waiting for a batch."""

    examples: list[Any]
    parameters: dict[str, Any]
    key: str  # requests share a batch only when their parameters are identical
    tokens: int  # estimated, for the budget
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers :class:`Job` s into batches and runs ``predict(examples, parameters) -> results`` (one
    result per example, in order) on a single worker thread."""

    def __init__(self, predict: Callable[[list[Any], dict[str, Any]], list[Any]], *, max_batch_tokens: int,
                 max_wait: float, on_batch: Callable[[int, int, float, list[float]], None] | None = None,
                 max_queue: int = 0):
        self.predict = predict
        self.max_queue = max_queue  # 0: unbounded
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait  # seconds; 0: every request runs alone
        self.on_batch = on_batch
        self.pending: list[Job] = []
        # How many requests came together around each of the last few batches (see _loop).
        self.recent: collections.deque[int] = collections.deque(maxlen=RECENT_BATCHES)
        self._free_since = 0.0  # when the last batch ended
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        # One thread: torch already spreads one forward pass over every core.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-inference")

    def start(self) -> None:
        """Start gathering (call from the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kiln-batcher")

    async def submit(self, examples: list[Any], parameters: dict[str, Any], key: str, tokens: int) -> list[Any]:
        """Predict ``examples`` in the next batch their parameters allow; raises what prediction raised."""
        if self._closing:
            raise Closed("the server is shutting down")
        if self.max_queue and sum(not job.future.done() for job in self.pending) >= self.max_queue:
            raise Full(f"{self.max_queue} requests are already waiting")
        job = Job(examples, parameters, key, tokens, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Take no new requests, finish every waiting one, then stop the worker thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.pending = [job for job in self.pending if not job.future.done()]  # callers that went away
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self.pending[0]
            while self.max_wait > 0 and not self._closing and self._waiting_for(first.key):
                # Waiting starts when the request arrived or the model became free, whichever is later:
                # time spent behind a running batch gathered nothing.
                remaining = max(first.arrived, self._free_since) + self.max_wait - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(first)
            started = time.monotonic()
            await self._run(loop, batch)
            # The batch's clients send again once answered, and those that came meanwhile wait: as many
            # requests are likely to come together next (two groups that alternate merge into one).
            self.recent.append(len(batch) + sum(not job.future.done() for job in self.pending))
            self._free_since = time.monotonic()
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(len(job.examples) for job in batch), time.monotonic() - started,
                              [started - job.arrived for job in batch])

    def _waiting_for(self, key: str) -> bool:
        """Whether to wait for more requests like the oldest: fewer wait than came together recently, and
        their tokens leave room in the budget."""
        jobs = [job for job in self.pending if job.key == key]
        return len(jobs) < max(self.recent, default=1) and sum(job.tokens for job in jobs) < self.max_batch_tokens

    def _take(self, first: Job) -> list[Job]:
        """The oldest job, and after it, in arrival order, those with its parameters that fit the budget."""
        batch, tokens = [first], first.tokens
        if self.max_wait > 0:
            for job in self.pending[1:]:
                if job.key == first.key and tokens + job.tokens <= self.max_batch_tokens:
                    batch.append(job)
                    tokens += job.tokens
        taken = {id(job) for job in batch}
        self.pending = [job for job in self.pending if id(job) not in taken]
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        """Predict a batch as one dataset. When that fails, each request runs alone, so only the one
        at fault (a KilnError about its input, say) gets the error and the others their results."""
        examples = [example for job in batch for example in job.examples]
        try:
            results = await loop.run_in_executor(self._executor, self.predict, examples, batch[0].parameters)
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0], error=err)
                return
            for job in batch:
                try:
                    _settle(job, await loop.run_in_executor(self._executor, self.predict, job.examples,
                                                            job.parameters))
                except Exception as alone:
                    _settle(job, error=alone)
            return
        start = 0
        for job in batch:
            _settle(job, results[start:start + len(job.examples)])
            start += len(job.examples)


def _settle(job: Job, results: list[Any] | None = None, error: BaseException | None = None) -> None:
    if job.future.done():  # the caller went away meanwhile
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(results)
