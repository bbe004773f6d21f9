"""Claims per second on the job table, SQLite against PostgreSQL, with 1, 4 and 16 concurrent claimers.

    python -m bench.job_table [--jobs 2000] [--claimers 1,4,16] [--postgres URL]

Each claimer is a process with its own store connection, as an engine is, and
a no-op engine: it loops claim -> finish, with nothing in between, until the
queue is empty. Before each row the queue is filled afresh through
``JobStore.enqueue``, as the watcher fills it (one small file per job). Printed
per row: jobs claimed and finished per second over the whole queue, and the
median and 95th-percentile seconds of one ``claim`` call.

The PostgreSQL rows need a server. ``--postgres URL`` names a database the
bench may fill (each row gets a fresh database made beside it, so the URL's
role must be allowed to create databases); without it, the bench starts a
throwaway server of its own where Debian's ``postgresql`` binaries are
installed (``tests/postgres.py``, the tests' server, but with fsync on as in
production), and leaves PostgreSQL out where they are not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

LEASE_SECONDS = 300.0


def fill(location: str, folder: Path, jobs: int) -> float:
    """Queue ``jobs`` distinct small files; returns seconds per enqueue."""
    from fixative.daemon.store import JobStore
    from fixative.engine.options import EngineOptions

    options = EngineOptions()
    store = JobStore(location)
    started = time.perf_counter()
    for number in range(jobs):
        path = folder / f"{number:06d}.png"
        path.write_bytes(number.to_bytes(4, "big"))
        store.enqueue(path, options, inbox=folder)
    seconds = time.perf_counter() - started
    store.close()
    return seconds / jobs


def claimer(location: str, start, results, name: str) -> None:
    """Claim and finish until the queue is empty; puts the seconds each claim took on ``results``."""
    from fixative.daemon.store import JobStore

    store = JobStore(location)
    claims: list[float] = []
    start.wait()
    while True:
        began = time.perf_counter()
        job = store.claim(name, LEASE_SECONDS)
        claims.append(time.perf_counter() - began)
        if job is None:
            break
        store.finish(job.id, name, f"/out/{job.relative_path}", {})
    store.close()
    results.put(claims[:-1])  # the last claim found nothing


def measure(location: str, claimers: int, jobs: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        enqueue_seconds = fill(location, Path(folder), jobs)
    # Processes, not a pool: a barrier is shared by inheritance only. Spawned, so
    # that no store connection crosses a fork.
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(claimers + 1), context.Queue()
    processes = [context.Process(target=claimer, args=(location, start, results, f"claimer-{n}"))
                 for n in range(claimers)]
    for process in processes:
        process.start()
    start.wait(timeout=120)
    began = time.perf_counter()
    latencies = [seconds for _ in processes for seconds in results.get(timeout=600)]
    wall = time.perf_counter() - began
    for process in processes:
        process.join()
    if len(latencies) != jobs:
        raise RuntimeError(f"{len(latencies)} claims for {jobs} jobs: a job was claimed twice or never")
    quantiles = statistics.quantiles(latencies, n=20)
    return {"jobs_per_second": jobs / wall, "claim_median": statistics.median(latencies),
            "claim_p95": quantiles[18], "enqueue": enqueue_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--claimers", default="1,4,16")
    parser.add_argument("--postgres", metavar="URL", help="a database the bench may fill (default: a throwaway server)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.claimers.split(",")]

    from tests.postgres import Cluster, server_binaries  # the tests' throwaway server: run from the repository root

    cluster = None
    backends: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        backends["sqlite"] = lambda n: str(Path(folder) / f"jobs-{n}.db")
        if args.postgres:
            backends["postgresql"] = lambda n: fresh_database(args.postgres, f"bench_{n}")
        elif (binaries := server_binaries()) is not None:
            cluster = Cluster(binaries, durable=True)
            backends["postgresql"] = lambda n: cluster.database()
        else:
            print("PostgreSQL left out: no server binaries (install Debian's postgresql package)")
        try:
            print(f"{args.jobs} jobs per row, claim -> finish with a no-op engine, one process per claimer")
            print(f"{'table':<11} {'claimers':>8} {'jobs/s':>8} {'claim median ms':>16} {'claim p95 ms':>13} "
                  f"{'enqueue ms':>11}")
            for name, location_for in backends.items():
                for row, claimers in enumerate(counts):
                    figures = measure(location_for(row), claimers, args.jobs)
                    print(f"{name:<11} {claimers:>8} {figures['jobs_per_second']:>8.0f} "
                          f"{figures['claim_median'] * 1000:>16.2f} {figures['claim_p95'] * 1000:>13.2f} "
                          f"{figures['enqueue'] * 1000:>11.2f}", flush=True)
        finally:
            if cluster is not None:
                cluster.remove()
    return 0


def fresh_database(url: str, name: str) -> str:
    """A new database beside the one ``url`` names (dropped first if a former run left it)."""
    from urllib.parse import urlsplit

    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return urlsplit(url)._replace(path=f"/{name}").geturl()


if __name__ == "__main__":
    sys.exit(main())
