"""The generation thread of `flashinfer serve`: the only thread that touches the
model and the prompt caches. Jobs come in a queue, in arrival order; each one's
tokens go back through its own queue of events to the HTTP thread that answers it
(server.py).

A job's events: ("token", GenerationResponse) per token, then ("end", summary) when
its reply is finished (a finish_reason) or ("error", APIError) when it is cut: the
server stops (503, code "server_stopped") or generation fails (500).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ..chat import io_delta
from ..generate import make_repetition_penalty, make_sampler, stream_generate
from ..prompt_cache import LRUPromptCache
from .openai_api import APIError, CompletionRequest


def _stopping_error(generated: int | None = None) -> APIError:
    cut = (
        "before this request started"
        if generated is None
        else f"after {generated} generated tokens, before the reply was finished"
    )
    return APIError(
        503, f"the server stopped {cut}", None, "server_stopped", "server_error"
    )


@dataclass
class Job:
    """A request in the queue, and the way its results come back.

    events: ("token", GenerationResponse) per token, then ("end", summary) when the
        reply is finished or ("error", APIError) when it is cut; the HTTP thread
        reads them.
    cancelled: set by the HTTP thread when its client went away.
    """

    request: CompletionRequest
    number: int
    arrived: float = field(default_factory=time.perf_counter)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The generation thread: the only one that touches the model and the prompt
    caches (`cache_stats` is its snapshot of them for the HTTP threads)."""

    def __init__(
        self,
        model,
        tokenizer,
        defaults,
        log,
        prompt_cache_size: int = 10,
        prompt_cache_bytes: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.log = log
        self.caches = LRUPromptCache(prompt_cache_size, prompt_cache_bytes)
        self.cache_stats = self.caches.stats()
        self.jobs: queue.Queue = queue.Queue()
        self._submitted = 0
        self._submit_lock = threading.Lock()  # numbers follow the queue's order
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, request: CompletionRequest) -> Job:
        """Queue `request`; its job's events say how it goes (at once "error"
        when the server is stopping)."""
        with self._submit_lock:
            self._submitted += 1
            job = Job(request, self._submitted)
            if self._stopping.is_set():
                job.events.put(("error", _stopping_error()))
            else:
                self.jobs.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Cut the job in progress at its next token, refuse the queued ones, and
        end the thread."""
        with self._submit_lock:
            self._stopping.set()
            self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set() or self._stopping.is_set():
                job.events.put(("error", _stopping_error()))
                continue
            try:
                self._generate(job)
            except Exception as err:  # a failure of this request, not of the server
                self.log(f"request {job.number}: failed: {err!r}")
                message = f"generation failed: {err}"
                job.events.put(("error", APIError(500, message, kind="server_error")))

    def _generate(self, job: Job) -> None:
        request, d = job.request, self.defaults
        seed = d.seed if request.seed is None else request.seed
        sampler = make_sampler(
            temp=request.temperature,
            top_p=request.top_p,
            top_k=d.top_k,
            min_p=d.min_p,
            seed=seed,
        )
        processors = []
        if d.repetition_penalty is not None:
            size = d.repetition_context_size
            processors.append(make_repetition_penalty(d.repetition_penalty, size))
        started, before, last = time.perf_counter(), self.model.io_stats(), None
        cache = self.caches.fetch(self.model, request.ids)
        try:
            for last in stream_generate(
                self.model,
                self.tokenizer,
                request.ids,
                max_tokens=request.max_tokens,
                sampler=sampler,
                logits_processors=processors,
                stop=request.stop,
                prompt_cache=cache,
            ):
                job.events.put(("token", last))
                if job.cancelled.is_set() or self._stopping.is_set():
                    break
        finally:  # a failed or cut generation leaves a cache `prepare` repairs
            self.caches.insert(cache)
            self.cache_stats = self.caches.stats()
        seconds = time.perf_counter() - started
        summary = {
            "request": job.number,
            "queued_s": round(started - job.arrived, 4),
            "seconds": round(seconds, 4),
            "flash": io_delta(before, self.model.io_stats()),
        }
        if last is not None and last.finish_reason:
            job.events.put(("end", summary))
            state = last.finish_reason
        else:
            generated = 0 if last is None else last.generation_tokens
            job.events.put(("error", _stopping_error(generated)))
            state = "cancelled" if job.cancelled.is_set() else "cut: the server stops"
        if last is not None:
            self.log(
                f"request {job.number}: {last.prompt_tokens} prompt tokens "
                f"({last.cached_tokens} cached), {last.generation_tokens} generated "
                f"in {seconds:.2f} s ({state})"
            )
