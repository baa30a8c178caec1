"""The model's queue: one job at a time, first come first served, on one worker thread.

The HTTP side never touches the model: it submits a job (a function of the job itself) and waits for
its future. Waiting jobs know their place; a job whose client went away is taken out unrun (or, running,
interrupted), so a vanished client never holds the queue.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class JobInterruptedError(Exception):
    """Raised inside a job's step callback to stop sampling (interrupt, skip or a vanished client)."""

    def __init__(self, latents: Any = None):
        super().__init__("interrupted")
        self.latents = latents


@dataclass
class Job:
    """One request's work, and what /progress reports about it."""

    run: Callable[[Job], Any]
    kind: str = "txt2img"
    id_task: str = field(default_factory=lambda: f"task({uuid.uuid4().hex[:15]})")
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.time)
    started: float = 0.0  # monotonic, when it started running
    # progress, written by the worker only
    step: int = 0
    steps: int = 0  # model calls of one batch
    batch: int = 0
    batches: int = 1
    latents: Any = None  # of the latest step (previews)
    preview_id: int = 0
    textinfo: str | None = None
    # control, written by the HTTP side
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # the client went away: nobody wants the result

    @property
    def fraction(self) -> float:
        if not self.steps:
            return 0.0
        return min(1.0, (self.batch * self.steps + self.step) / (self.batches * self.steps))


class JobQueue:
    """A FIFO of jobs and the thread that runs them, one at a time."""

    def __init__(self) -> None:
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self.current: Job | None = None
        self.finished: dict[str, float] = {}  # id_task -> when it ended (for /internal/progress)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="sd-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is stopping")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def position(self, id_task: str) -> int | None:
        """0 for the running job, n for the n-th waiting one, None when unknown (or done)."""
        with self._lock:
            if self.current is not None and self.current.id_task == id_task:
                return 0
            for index, job in enumerate(self._waiting, 1):
                if job.id_task == id_task:
                    return index
        return None

    def waiting(self) -> list[Job]:
        with self._lock:
            return list(self._waiting)

    def abandon(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop it if it runs."""
        job.abandoned = True
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()
                return
        job.interrupted.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            if self.current is not None:
                self.current.interrupted.set()
            self._lock.notify()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self.current = job
            if not job.future.set_running_or_notify_cancel():
                with self._lock:
                    self.current = None
                continue
            job.started = time.monotonic()
            result, error = None, None
            try:
                result = job.run(job)
            except BaseException as raised:  # handed to the waiting request, never lost
                error = raised
            with self._lock:  # done in the queue's books before the client hears it
                self.current = None
                self.finished[job.id_task] = time.time()
                while len(self.finished) > 1000:  # bounded memory of old ids
                    self.finished.pop(next(iter(self.finished)))
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
