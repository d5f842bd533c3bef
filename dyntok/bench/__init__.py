"""``dyntok bench``: train, evaluate and time every method against dense and static baselines, from a spec.

Quick start::

    from dyntok.bench import builtin_spec_path, load_spec, run_benchmark

    spec = load_spec(builtin_spec_path("cpu"))
    results = run_benchmark(spec, "reports/cpu")   # also writes results.json, leaderboard.md and plots

See docs/benchmark.md for the spec format, the profiles, caching and how to read the report.
"""
from .cache import EntryCache, training_key
from .plan import Plan, select_entries
from .runner import prepare, run_benchmark
from .spec import (PROFILES, BenchSpec, BudgetPoint, Entry, SpecError, SpeedSettings, builtin_spec_path, load_spec,
                   parse_spec)

__all__ = ["BenchSpec", "BudgetPoint", "Entry", "EntryCache", "PROFILES", "Plan", "SpecError", "SpeedSettings",
           "builtin_spec_path", "load_spec", "parse_spec", "prepare", "run_benchmark", "select_entries",
           "training_key"]
