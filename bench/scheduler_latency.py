"""Benchmark: how long the scheduler takes to choose, in the default order and by priority.

    python bench/scheduler_latency.py [--items 10000] [--votes 100000] [--calls 200] [--db URL]

Seeds 10k items (60k comparisons) and 100k votes (bench/export.py), times `next_assignment` for
`--calls` choices in the default order (fewest votes first), then gives every comparison a random
priority (as `rlhf.prioritize` would) and times the same choices by priority. Prints p50 and p95
of each, and their ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, select  # noqa: E402

from annotate.scheduler import next_assignment  # noqa: E402
from bench.export import seed  # noqa: E402
from db import Annotator, Comparison, ComparisonPriority, Project, open_db  # noqa: E402


def time_choices(factory, calls: int) -> list[float]:
    rng, times = random.Random(0), []
    with factory() as s:
        project = s.scalar(select(Project).where(Project.name == "bench"))
        people = list(s.scalars(select(Annotator.id)))
        for k in range(calls):
            t0 = time.perf_counter()
            next_assignment(s, people[k % len(people)], project, rng=rng)
            times.append(time.perf_counter() - t0)
    return sorted(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--votes", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--db", default=None, help="an empty database (default: a new SQLite file)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="storypref-sched-"))
    _, factory = open_db(args.db or f"sqlite:///{tmp}/sched.db")
    seed(factory, args.items, args.votes, str(tmp / "media"))
    results = {"default": time_choices(factory, args.calls)}
    with factory.begin() as s:
        project = s.scalar(select(Project).where(Project.name == "bench"))
        ids = list(s.scalars(select(Comparison.id).where(Comparison.project_id == project.id)))
        rng = random.Random(1)
        s.execute(insert(ComparisonPriority), [{"comparison_id": c, "project_id": project.id, "priority": rng.random(), "scored_by": "bench"} for c in ids])
    results["by priority"] = time_choices(factory, args.calls)
    for name, times in results.items():
        print(f"{name:12} p50 {1000 * statistics.median(times):6.2f} ms   p95 {1000 * times[int(0.95 * len(times))]:6.2f} ms   ({len(ids):,} comparisons)")
    ratio = statistics.median(results["by priority"]) / statistics.median(results["default"])
    print(f"by priority / default (p50): {ratio:.2f}×")


if __name__ == "__main__":
    main()
