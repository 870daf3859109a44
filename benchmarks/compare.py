"""Regression guard for the call-decision benchmark (not a timed test).

    .venv/bin/python -m benchmarks.compare BASELINE.json NEW.json [--tolerance 0.25] [--p99-floor-ms 2]

Compares two ``benchmarks/outbound_bench.py --json`` results (the stored
baseline is ``benchmarks/baseline-outbound.json``) and exits 1 when the new
run is worse beyond the tolerance:

* saturation throughput (decisions/s) of a mode dropped, or fsguard's CPU
  time per decision at saturation rose, by more than ``tolerance``
  (default 25%);
* the cache/live saturation ratio dropped by more than ``tolerance``;
* an offered-rate step that the baseline sustained is now overloaded, or
  lost calls (errors, timeouts, wrong verdicts) beyond 0.5% of its calls;
* the beyond-capacity step left calls without a verdict, or lost more;
* the p99 decision latency of an offered-rate step the baseline sustained
  with fsguard's CPU at most ``--p99-max-load`` busy (default 60%) rose by
  more than ``tolerance`` *and* by more than ``--p99-floor-ms`` (default
  2 ms: sub-millisecond jitter of a quiet step is not a regression).  Closer
  to saturation the tail is queueing and moves several-fold between two
  runs of the same commit; such p99s, and those of saturation steps (the
  closed loop's queue), are shown, not judged.

Steps are matched by mode and name; steps present in only one file are
listed, not judged (a ``--quick`` run has fewer steps than a full one:
compare like with like).  A different CPU model, a run that flagged CPU
contention, or a generator ceiling (null app) that moved beyond the
tolerance is reported as a warning: timings only compare on the same
machine, quiet.  Exit codes: 0 no regression, 1 regression, 2 unusable input.

Meant to be run by hand or by a separate, non-gating CI job, never by the
test suite: the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"compare: cannot read {path}: {exc}") from None
    if data.get("benchmark") != "outbound" or "modes" not in data:
        raise SystemExit(f"compare: {path} is not an outbound_bench result")
    return data


def steps(result: dict) -> dict[tuple[str, str], dict]:
    out = {}
    for mode, block in result["modes"].items():
        for step in block.get("steps", []):
            out[(mode, step["name"])] = step
    return out


def ceiling(result: dict) -> float | None:
    """The generator's ceiling (calls/s against the null app): a fact about the machine, not fsguard."""
    return (result.get("generator_ceiling") or {}).get("decisions_per_s")


def lost(step: dict) -> float:
    calls = max(step.get("calls", 0), 1)
    return (step.get("error_count", 0) + step.get("not_started", 0)) / calls


def compare(base: dict, new: dict, tolerance: float, p99_floor_ms: float,
            p99_max_load: float = 60.0) -> tuple[list[str], list[str], list[str]]:
    """(regressions, warnings, report lines)."""
    regressions: list[str] = []
    warnings: list[str] = []
    lines: list[str] = []
    if base.get("run") != new.get("run"):
        warnings.append(f"comparing a {base.get('run')} run with a {new.get('run')} run")
    if base.get("machine", {}).get("cpu_model") != new.get("machine", {}).get("cpu_model"):
        warnings.append(f"different CPU: {base.get('machine', {}).get('cpu_model')!r} vs "
                        f"{new.get('machine', {}).get('cpu_model')!r}")
    for name, result in (("baseline", base), ("new run", new)):
        if result.get("summary", {}).get("contaminated_steps"):
            warnings.append(f"the {name} saw CPU contention in {result['summary']['contaminated_steps']} step(s)")
    old_ceiling, new_ceiling = ceiling(base), ceiling(new)
    if old_ceiling and new_ceiling and abs(new_ceiling - old_ceiling) > tolerance * old_ceiling:
        warnings.append(f"the generator's own ceiling moved from {old_ceiling:.0f} to {new_ceiling:.0f} calls/s: "
                        f"the machine or the generator differs, timings may not be comparable")
    old_steps, new_steps = steps(base), steps(new)
    lines.append(f"{'mode':<9} {'step':<28} {'metric':<15} {'baseline':>10} {'new':>10} {'change':>8}  verdict")

    def row(key, metric, old, cur, bad: bool, note: str = "") -> None:
        change = f"{(cur - old) / old * 100:+.0f}%" if old else "-"
        verdict = "REGRESSION" if bad else "ok"
        lines.append(f"{key[0]:<9} {key[1]:<28} {metric:<15} {old:>10.2f} {cur:>10.2f} {change:>8}  {verdict}{note}")
        if bad:
            regressions.append(f"{key[0]} {key[1]}: {metric} {old:.2f} -> {cur:.2f} ({change})")

    for key, old in old_steps.items():
        cur = new_steps.get(key)
        if old.get("skipped"):
            continue
        if cur is None:
            warnings.append(f"step {key[0]} / {key[1]} is missing from the new run")
            continue
        if cur.get("skipped"):
            if not old.get("overload"):
                regressions.append(f"{key[0]} {key[1]}: sustained in the baseline, skipped now "
                                   f"(a lower rate overloaded)")
                lines.append(f"{key[0]:<9} {key[1]:<28} {'skipped':<15} {'':>10} {'':>10} {'':>8}  REGRESSION")
            continue
        if old.get("kind") == "closed":
            # Saturation: judged on throughput and on fsguard's CPU per decision (the steadiest figure);
            # its latency is the queue of the closed loop.
            row(key, "decisions/s", old["decisions_per_s"], cur["decisions_per_s"],
                cur["decisions_per_s"] < old["decisions_per_s"] * (1 - tolerance))
            row(key, "CPU ms/decision", old["target_cpu_ms_per_call"], cur["target_cpu_ms_per_call"],
                cur["target_cpu_ms_per_call"] > old["target_cpu_ms_per_call"] * (1 + tolerance))
            row(key, "p99 ms (info)", old["latency_ms"]["p99"], cur["latency_ms"]["p99"], False, " (not judged)")
            if lost(cur) > lost(old) + 0.005:
                regressions.append(f"{key[0]} {key[1]}: {lost(cur):.2%} of calls lost (baseline {lost(old):.2%})")
            continue
        if old.get("kind") == "beyond":
            # Offered beyond capacity on purpose: judged on every call getting a verdict, not on timings.
            if cur.get("without_verdict", 0) > old.get("without_verdict", 0) or lost(cur) > lost(old) + 0.005:
                regressions.append(f"{key[0]} {key[1]}: {cur.get('without_verdict', 0)} calls without a verdict, "
                                   f"{lost(cur):.2%} lost (baseline {old.get('without_verdict', 0)}, {lost(old):.2%})")
            continue
        if old.get("overload"):
            continue  # an overloaded step's latency is its queue: not a reference
        if cur.get("overload"):
            regressions.append(f"{key[0]} {key[1]}: sustained in the baseline, overloaded now "
                               f"({cur['decisions_per_s']:.0f} decisions/s)")
            lines.append(f"{key[0]:<9} {key[1]:<28} {'overload':<15} {'no':>10} {'yes':>10} {'':>8}  REGRESSION")
            continue
        old_p99, cur_p99 = old["latency_ms"]["p99"], cur["latency_ms"]["p99"]
        load = old.get("target_cpu_pct", 0)
        if load <= p99_max_load:
            row(key, "p99 ms", old_p99, cur_p99,
                cur_p99 > old_p99 * (1 + tolerance) and cur_p99 - old_p99 > p99_floor_ms)
        else:
            # Near saturation the tail is queueing: it moves several-fold between identical runs.
            row(key, "p99 ms (info)", old_p99, cur_p99, False, f" (not judged: fsguard {load:.0f}% busy)")
        if lost(cur) > lost(old) + 0.005:
            regressions.append(f"{key[0]} {key[1]}: {lost(cur):.2%} of calls lost (baseline {lost(old):.2%})")
            lines.append(f"{key[0]:<9} {key[1]:<28} {'lost calls':<15} {lost(old):>10.2%} {lost(cur):>10.2%} "
                         f"{'':>8}  REGRESSION")
    for key in new_steps.keys() - old_steps.keys():
        warnings.append(f"step {key[0]} / {key[1]} is new (not in the baseline)")
    old_ratio = base.get("summary", {}).get("cache_live_ratio")
    new_ratio = new.get("summary", {}).get("cache_live_ratio")
    if old_ratio and new_ratio is not None:
        row(("summary", "cache/live"), "ratio", old_ratio, new_ratio, new_ratio < old_ratio * (1 - tolerance))
    return regressions, warnings, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.25, help="allowed relative change (default 0.25)")
    parser.add_argument("--p99-floor-ms", type=float, default=2.0,
                        help="p99 increases smaller than this many ms are never a regression (default 2)")
    parser.add_argument("--p99-max-load", type=float, default=60.0, metavar="PERCENT",
                        help="judge p99 only on steps where fsguard's CPU was at most this busy in the baseline "
                             "(default 60)")
    args = parser.parse_args(argv)
    if not 0 < args.tolerance < 1:
        parser.error("--tolerance must be in (0, 1)")
    try:
        base, new = load(args.baseline), load(args.new)
        regressions, warnings, lines = compare(base, new, args.tolerance, args.p99_floor_ms, args.p99_max_load)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    except (KeyError, TypeError) as exc:
        print(f"compare: unexpected result layout: {exc!r}", file=sys.stderr)
        return 2
    print(f"baseline: {args.baseline} ({base.get('created')}, {base.get('run')} run)")
    print(f"new:      {args.new} ({new.get('created')}, {new.get('run')} run)")
    print(f"tolerance {args.tolerance:.0%}, p99 floor {args.p99_floor_ms:g} ms, p99 judged up to "
          f"{args.p99_max_load:g}% fsguard CPU\n")
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}")
    if regressions:
        print(f"\n{len(regressions)} regression(s):")
        for regression in regressions:
            print(f"  {regression}")
        return 1
    print("\nno regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
