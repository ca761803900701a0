"""Several load processes: each drives a share of the connections, the parent merges results."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Sequence
from typing import Any

from .load import CLOSE_WAIT, PROGRESS_INTERVAL, LoadWorker, ProgressCallback, Target, WorkerResult

PROG = "tcp-upper-bench"
#: Extra time granted to worker processes to start (spawn imports the package anew).
SPAWN_ALLOWANCE = 30.0


def _worker_process(target: Target, conn_ids: Sequence[int], pipe: Any) -> None:
    """Body of a worker process: connect, report, wait for "go", run, report the result."""
    # The parent owns Ctrl-C and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = LoadWorker(target, conn_ids)
    try:
        failure = worker.connect()
        pipe.send(("connected", worker.result.connect_s, failure))
        if failure is None and pipe.recv() == "go":
            result = worker.run(lambda elapsed, requests, errors: pipe.send(
                ("progress", elapsed, requests, errors)))
            pipe.send(("result", result))
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone: nobody left to report to
    finally:
        worker.close()
        pipe.close()


def _receive(pipe: Any) -> Any:
    try:
        return pipe.recv()
    except (EOFError, OSError):
        return None


def _stop_processes(procs: list[Any]) -> None:
    """Wait briefly for each worker, then terminate and finally kill any that remain."""
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)


def _await_connected(target: Target, pipes: list[Any]) -> tuple[float, str | None]:
    """Phase 1: every worker connects before the load starts anywhere, so connecting and
    loading are measured apart. Returns the slowest connect time, or why it failed."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + target.timeout + SPAWN_ALLOWANCE
    waiting = set(pipes)
    connect_s = 0.0
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            return connect_s, f"los procesos de carga no conectaron con {target.label} a tiempo"
        for pipe in wait(list(waiting), left):
            waiting.discard(pipe)
            message = _receive(pipe)
            if message is None:
                return connect_s, "un proceso de carga terminó de forma inesperada"
            if message[2] is not None:
                return connect_s, str(message[2])
            connect_s = max(connect_s, message[1])
    return connect_s, None


def _collect(target: Target, pipes: list[Any],
             on_progress: ProgressCallback | None) -> tuple[WorkerResult | None, str | None]:
    """Phase 2: relay progress, merge every worker's result."""
    from multiprocessing.connection import wait

    merged = WorkerResult()
    latest = {pipe: (0, 0) for pipe in pipes}
    start = time.monotonic()
    deadline = start + target.duration + 2 * target.timeout + CLOSE_WAIT + SPAWN_ALLOWANCE
    next_progress = start + PROGRESS_INTERVAL
    waiting = set(pipes)
    while waiting:
        now = time.monotonic()
        if now >= deadline:
            return None, "los procesos de carga no terminaron a tiempo"
        for pipe in wait(list(waiting), max(0.0, min(deadline, next_progress) - now)):
            message = _receive(pipe)
            if message is None:
                return None, "un proceso de carga terminó de forma inesperada"
            if message[0] == "progress":
                latest[pipe] = (message[2], message[3])
            elif message[0] == "result":
                merged.merge(message[1])
                waiting.discard(pipe)
        now = time.monotonic()
        if now >= next_progress:
            if on_progress is not None:
                on_progress(now - start, sum(r for r, _ in latest.values()),
                            sum(e for _, e in latest.values()))
            next_progress += PROGRESS_INTERVAL
    return merged, None


def _run_processes(target: Target, chunks: list[range],
                   on_progress: ProgressCallback | None) -> tuple[WorkerResult | None, str | None]:
    """Run one worker process per chunk; return the merged result, or why the run failed."""
    import multiprocessing

    # spawn: a fork of a process that has threads (a test suite, an embedding program) is unsafe.
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        for index, chunk in enumerate(chunks):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_process, args=(target, chunk, theirs),
                               name=f"{PROG}-{index}", daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(ours)
        connect_s, failure = _await_connected(target, pipes)
        if failure is not None:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("abort")
            return None, failure
        for pipe in pipes:
            pipe.send("go")
        merged, failure = _collect(target, pipes, on_progress)
        if merged is not None:
            merged.connect_s = connect_s
        return merged, failure
    finally:
        for pipe in pipes:
            pipe.close()
        _stop_processes(procs)


def run_load(target: Target, conns: int, processes: int,
             on_progress: ProgressCallback | None = None) -> tuple[WorkerResult | None, str | None]:
    """Run the benchmark: in this process when *processes* is 1, else in that many workers.

    Returns ``(result, None)`` once the run completed (its errors are in the result), or
    ``(None, reason)`` when it could not run at all, e.g. the server refused the connections.
    """
    if processes <= 1:
        worker = LoadWorker(target, range(conns))
        try:
            failure = worker.connect()
            if failure is not None:
                return None, failure
            return worker.run(on_progress), None
        finally:
            worker.close()
    share, extra = divmod(conns, processes)
    chunks, first = [], 0
    for index in range(processes):
        count = share + (index < extra)
        chunks.append(range(first, first + count))
        first += count
    return _run_processes(target, chunks, on_progress)
