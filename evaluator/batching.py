"""Dynamic batching of concurrent embedding requests (asyncio, no Ray), used by the service.

Requests from many trials arrive at an async actor one coroutine each. Each request's images are
split into chunks of at most `max_batch_size`; a single batcher task takes chunks off a queue
until the batch is full or `max_wait_ms` has passed since its first chunk, runs one model
forward on the whole batch in a worker thread (so new requests keep queueing meanwhile), and
hands each request its own rows back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Chunk:
    images: np.ndarray
    future: asyncio.Future


@dataclass
class BatchStats:
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # images per forward, in order
    requests: int = 0
    images: int = 0


class ImageBatcher:
    """Batch `embed(images)` calls across concurrent callers.

    embed_batch: takes a list of uint8 NHWC arrays (sizes may differ between them) and returns
        one float32 (n_i, D) array per input, in order; runs in `executor`'s thread.
    max_batch_size: most images in one forward (also the chunk size of a large request).
    max_wait_ms: how long the first chunk of a batch waits for company, in milliseconds.
    """

    def __init__(self, embed_batch: Callable[[list[np.ndarray]], list[np.ndarray]],
                 max_batch_size: int = 64, max_wait_ms: float = 10.0,
                 executor: ThreadPoolExecutor | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.embed_batch = embed_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        # One thread: the model runs one batch at a time; more threads would only fight for it.
        self.executor = executor or ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="clip-batch")
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Chunk] | None = None
        self._carry: _Chunk | None = None  # a chunk that did not fit in the previous batch
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._queue = self._queue or asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run_forever())

    async def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeddings of `images` (uint8 NHWC, already validated), float32 (N, D)."""
        self._start()
        loop = asyncio.get_running_loop()
        chunks = [_Chunk(images[i:i + self.max_batch_size], loop.create_future())
                  for i in range(0, len(images), self.max_batch_size)]
        self.stats.requests += 1
        self.stats.images += len(images)
        for c in chunks:
            self._queue.put_nowait(c)
        parts = await asyncio.gather(*(c.future for c in chunks))
        return np.concatenate(parts)

    async def _next(self, timeout: float | None) -> _Chunk | None:
        if self._carry is not None:
            chunk, self._carry = self._carry, None
            return chunk
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Chunk]:
        batch = [await self._next(None)]
        size = len(batch[0].images)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            chunk = await self._next(deadline - time.monotonic())
            if chunk is None:
                break
            if size + len(chunk.images) > self.max_batch_size:
                self._carry = chunk
                break
            batch.append(chunk)
            size += len(chunk.images)
        return batch

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [c for c in batch if not c.future.done()]  # caller cancelled (timeout)
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.batch_sizes.append(sum(len(c.images) for c in batch))
            try:
                out = await loop.run_in_executor(self.executor, self.embed_batch,
                                                 [c.images for c in batch])
            except Exception as err:  # the whole forward failed: every caller in it hears why
                for c in batch:
                    if not c.future.done():
                        c.future.set_exception(err)
                continue
            for c, emb in zip(batch, out):
                if not c.future.done():
                    c.future.set_result(emb)
