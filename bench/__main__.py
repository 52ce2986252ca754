"""`python -m bench [NAME ...] [--quick] [--list]`: run benchmarks, regenerate docs/benchmarks.*."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from bench.record import Benchmark, load, run_benchmark, save

# Modules holding benchmarks, each with a BENCHMARKS list, in the order docs/benchmarks.md shows.
MODULES = ("bench.tuning", "bench.utility", "bench.queries", "bench.cost")

console = Console()


def registry() -> dict[str, Benchmark]:
    found: dict[str, Benchmark] = {}
    for module in MODULES:
        for benchmark in importlib.import_module(module).BENCHMARKS:
            found[benchmark.name] = benchmark
    return found


def main(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="benchmarks to run (default: all but those marked 'when named')"),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="smaller variants: the whole set within 5 minutes")
    ] = False,
    list_only: Annotated[bool, typer.Option("--list", help="list the benchmarks and stop")] = False,
) -> None:
    """Run silofed's benchmarks and regenerate docs/benchmarks.md and docs/benchmarks.json."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    benchmarks = registry()
    if list_only:
        for benchmark in benchmarks.values():
            named = "" if benchmark.default else " (when named)"
            console.print(f"{benchmark.name}: {benchmark.title}{named}")
        return
    chosen = names or [name for name, b in benchmarks.items() if b.default]
    unknown = [n for n in chosen if n not in benchmarks]
    if unknown:
        console.print(
            f"[red]unknown benchmark(s) {', '.join(unknown)}[/red]; known: {', '.join(benchmarks)}"
        )
        raise typer.Exit(2)
    for name in chosen:
        console.print(f"[bold]{name}[/bold]: {benchmarks[name].title}{' (quick)' if quick else ''}")
        entry = run_benchmark(benchmarks[name], quick=quick)
        # saved after each benchmark, so that a later failure keeps the earlier ones; the file is
        # read again just before, so that a benchmark run elsewhere meanwhile is kept too
        results = load()
        results["benchmarks"][name] = entry
        save(results, benchmarks)
        console.print(f"  done in {entry['seconds']} s")


if __name__ == "__main__":
    sys.exit(typer.run(main))
