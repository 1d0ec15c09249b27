"""Where ground-truth jobs run: in this process, on joblib's loky workers, or on a
dask.distributed cluster (ARCHITECTURE.md §5). Each executor yields every job with its results
as it finishes; only the driver writes records."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from zest.data import LM_PREFIX
from zest.data.files import absolute_dataset_spec
from zest.errors import InvalidInputError
from zest.groundtruth.jobs import Job
from zest.groundtruth.run import run_job
from zest.models import absolute_spec

#: Seconds without any finished job and without any worker before a dask run gives up.
DASK_NO_WORKER_SECONDS = 60.0

Finished = Iterator[tuple[Job, list[dict[str, Any]]]]


def execute(jobs: Sequence[Job], n_jobs: int, backend: str, scheduler: str | None) -> Finished:
    """Runs ``jobs`` with ``backend`` (``loky``: serially when ``n_jobs`` is 1, else on
    ``n_jobs`` workers; ``dask``: on the cluster at ``scheduler``), yielding each job with its
    results as it finishes."""
    if backend == "dask":
        yield from execute_on_dask(jobs, scheduler)
    elif n_jobs <= 1:
        for job in jobs:
            yield job, run_job(job)
    else:
        yield from execute_on_loky(jobs, n_jobs)


def execute_on_loky(jobs: Sequence[Job], n_jobs: int) -> Finished:
    """Runs ``jobs`` on ``n_jobs`` reusable loky (joblib) worker processes."""
    from concurrent.futures import as_completed

    from joblib.externals.loky import get_reusable_executor

    # workers watch the driver and exit when it is gone (a `kill -9` of the driver must not
    # leave them training, or idling for minutes)
    executor = get_reusable_executor(max_workers=n_jobs, initializer=exit_with_driver,
                                     initargs=(os.getpid(),))
    futures = {executor.submit(run_job, job): job for job in jobs}
    for future in as_completed(futures):
        yield futures[future], future.result()


def exit_with_driver(driver_pid: int) -> None:
    """Worker initializer: a daemon thread that ends the worker once its driver has died (the
    worker is then re-parented, so its parent process id changes)."""

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="zest-driver-watch", daemon=True).start()


def shippable(job: Job) -> Job:
    """The job with its data set, model folder and checkpoint paths made absolute, so that
    workers started in another folder find the files the driver found (the records keep the
    user's spec)."""
    pair = job.pair
    task_prefix = LM_PREFIX if pair.dataset.startswith(LM_PREFIX) else ""
    dataset = task_prefix + absolute_dataset_spec(pair.dataset[len(task_prefix):])
    checkpoint = str(Path(pair.checkpoint).expanduser().resolve()) if pair.checkpoint else None
    return replace(job, pair=replace(pair, model=absolute_spec(pair.model),
                                     dataset=dataset, checkpoint=checkpoint))


def execute_on_dask(jobs: Sequence[Job], scheduler: str | None) -> Finished:
    """Runs ``jobs`` on the dask.distributed cluster at ``scheduler``; gives up (finished rows
    kept) when the scheduler is lost or the cluster has had no worker for
    :data:`DASK_NO_WORKER_SECONDS`."""
    try:
        from dask.distributed import Client, wait
    except ImportError:
        raise InvalidInputError("the dask backend needs dask.distributed; run: pip install "
                                "'zest[dask]'") from None
    try:
        client = Client(scheduler, timeout=15)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InvalidInputError(f"cannot reach the dask scheduler at {scheduler!r} "
                                f"({type(exc).__name__}); start it with `dask scheduler` and "
                                "check the address") from None
    with client:
        futures = {client.submit(run_job, shippable(job), pure=False): job for job in jobs}
        pending = set(futures)
        waited = 0.0
        while pending:
            try:
                done, pending = wait(pending, timeout=5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                waited = 0.0
                yield futures[future], future.result()
            if done:
                continue
            try:
                workers = client.scheduler_info().get("workers", {})
            except (OSError, TimeoutError) as exc:
                raise InvalidInputError(f"lost the dask scheduler at {scheduler!r} "
                                        f"({type(exc).__name__}); finished rows are kept: "
                                        "restart it and rerun to resume") from None
            waited = waited + 5 if not workers else 0.0
            if waited >= DASK_NO_WORKER_SECONDS:
                raise InvalidInputError(f"the dask cluster at {scheduler!r} has had no worker "
                                        f"for {int(waited)} s; finished rows are kept: start "
                                        f"workers (dask worker {scheduler}) and rerun to "
                                        "resume")
