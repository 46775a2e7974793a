"""Every benchmark, one after another, then one table of all their figures.

    python -m bench [--repeats N | --quick]

Each benchmark runs in a subprocess of its own, so that its Ray cluster is gone before the
next one starts. The combined figures, named <benchmark>.<figure> next to each benchmark's
run time, go to bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, Summary, write_result

# Benchmark module -> its repeats when none are given; None: it takes no --repeats.
SUITE: dict[str, int | None] = {
    "cold_start": 3,
    "throughput": 2,
    "latency": 2,
    "prompt_cache": 3,
    "hops": 2,
    "embeddings": 3,
    "gguf": 3,
    "structured": 3,
    "input_grammar": 5,
    "adapters": 2,
    "speculation": 2,
    "memory": None,
}


def run_benchmark(name: str, repeats: int | None) -> tuple[bool, float]:
    """Run `python -m bench.<name>` with its output on this terminal; (succeeded, seconds)."""
    command = [sys.executable, "-m", f"bench.{name}"]
    if repeats is not None:
        command += ["--repeats", str(repeats)]
    print(f"\n=== {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)
    return done.returncode == 0, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--repeats", type=int, help="repeats for every benchmark that has them")
    choice.add_argument("--quick", action="store_true", help="one repeat for every benchmark")
    args = parser.parse_args()
    override = 1 if args.quick else args.repeats

    figures: dict[str, Summary | float] = {}
    failed: list[str] = []
    for name, default in SUITE.items():
        repeats = None if default is None else override or default
        succeeded, seconds = run_benchmark(name, repeats)
        if not succeeded:
            # Its JSON file, if any, is from an earlier run: left out of this summary.
            failed.append(name)
            continue
        result = json.loads((RESULTS / f"{name}.json").read_text())
        figures.update({f"{name}.{key}": value for key, value in result["figures"].items()})
        figures[f"{name}.run_time_s"] = seconds

    if figures:
        print("\n=== all benchmarks")
        write_result("summary", figures)
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
