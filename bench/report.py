"""Medians over rounds, the ours/seed ratios and the fraction of the hello ceiling: printed, JSON and a PNG chart."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .load import Measurement

NOT_COMPARABLE = "n/a (ignores filters)"
METRICS = ("rps", "p50_ms", "p95_ms", "p99_ms")


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 2) if present else None


def _ratio(ours: float | None, seed: float | None) -> float | None:
    return round(ours / seed, 2) if ours is not None and seed else None


def _aggregate(runs: list[Measurement]) -> dict[str, Any]:
    """Medians of each metric over the rounds; error counts summed."""
    statuses: Counter[str] = Counter()
    socket_errors: Counter[str] = Counter()
    for run in runs:
        statuses.update({status: count for status, count in run.statuses.items() if not status.startswith("2")})
        socket_errors.update(run.socket_errors)
    return {
        **{metric: _median(getattr(run, metric) for run in runs) for metric in METRICS},
        "rounds": len(runs),
        "requests": sum(run.requests for run in runs),
        "late_sends": sum(run.late for run in runs),
        "non_2xx": dict(statuses),
        "socket_errors": dict(socket_errors),
    }


def summarize(measurements: list[Measurement], scenarios: list[str], not_comparable: set[str]) -> dict[str, Any]:
    """summary[scenario][target][mode] = medians; plus fraction of hello and ours/seed ratios per scenario."""
    groups: dict[tuple[str, str, str], list[Measurement]] = {}
    for run in measurements:
        groups.setdefault((run.scenario, run.target, run.mode), []).append(run)
    summary: dict[str, Any] = {}
    for scenario in ["hello", *scenarios]:
        entry: dict[str, Any] = {}
        for (name, target, mode), runs in groups.items():
            if name == scenario:
                entry.setdefault(target, {})[mode] = _aggregate(runs)
        summary[scenario] = entry
    ceiling = summary.get("hello", {}).get("hello", {}).get("saturation", {}).get("rps")
    for scenario in scenarios:
        entry = summary[scenario]
        ours = entry.get("ours", {})
        if ceiling and "saturation" in ours:
            entry["ours_fraction_of_hello"] = round(ours["saturation"]["rps"] / ceiling, 3)
        if "seed" in entry or scenario in not_comparable:
            entry["ratio_ours_seed"] = NOT_COMPARABLE if scenario in not_comparable else _ratios(ours, entry["seed"])
    return summary


def _ratios(ours: dict[str, Any], seed: dict[str, Any]) -> dict[str, float | None]:
    """ours/seed: above 1 is better for req/s, below 1 is better for latency."""
    def pick(side: dict[str, Any], mode: str, metric: str) -> float | None:
        return side.get(mode, {}).get(metric)

    return {
        "rps": _ratio(pick(ours, "saturation", "rps"), pick(seed, "saturation", "rps")),
        "p99_ms": _ratio(pick(ours, "saturation", "p99_ms"), pick(seed, "saturation", "p99_ms")),
        "rate_p99_ms": _ratio(pick(ours, "rate", "p99_ms"), pick(seed, "rate", "p99_ms")),
    }


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = str(value)
    return text.rjust(width)


def _row(cells: list[Any], widths: list[int]) -> str:
    # A row may stop early: the seed stack's search row is one "n/a" note.
    rest = (_cell(cell, width) for cell, width in zip(cells[1:], widths[1:], strict=False))
    return "  ".join([str(cells[0]).ljust(widths[0]), *rest])


def _errors_text(side: dict[str, Any]) -> str:
    non_2xx: Counter[str] = Counter()
    sockets: Counter[str] = Counter()
    for mode in side.values():
        non_2xx.update(mode["non_2xx"])
        sockets.update(mode["socket_errors"])
    parts = [f"{status}x{count}" for status, count in sorted(non_2xx.items())]
    parts += [f"{kind} {count}" for kind, count in sorted(sockets.items())]
    return ", ".join(parts) or "0"


def _saturation_rows(summary: dict[str, Any], scenarios: list[str], compare: bool) -> list[list[Any]]:
    rows = []
    for scenario in ["hello", *scenarios]:
        entry = summary.get(scenario, {})
        ours = entry.get("hello" if scenario == "hello" else "ours", {}).get("saturation", {})
        fraction = 1.0 if scenario == "hello" else entry.get("ours_fraction_of_hello")
        row = [scenario, ours.get("rps"), ours.get("p50_ms"), ours.get("p99_ms"),
               f"{fraction:.0%}" if fraction is not None else None]
        if compare:
            row += _seed_cells(entry, "saturation", ("rps", "p50_ms", "p99_ms"), ("rps", "p99_ms"), scenario)
        rows.append(row)
    return rows


def _rate_rows(summary: dict[str, Any], scenarios: list[str], compare: bool) -> list[list[Any]]:
    rows = []
    for scenario in scenarios:
        entry = summary.get(scenario, {})
        ours = entry.get("ours", {}).get("rate", {})
        row = [scenario, ours.get("rps"), ours.get("p50_ms"), ours.get("p95_ms"), ours.get("p99_ms")]
        if compare:
            row += _seed_cells(entry, "rate", ("rps", "p50_ms", "p95_ms", "p99_ms"), ("rate_p99_ms",), scenario)
        rows.append(row)
    return rows


def _seed_cells(entry: dict[str, Any], mode: str, metrics: tuple[str, ...], ratios: tuple[str, ...],
                scenario: str) -> list[Any]:
    if scenario == "hello":
        return [None] * (len(metrics) + len(ratios))
    ratio = entry.get("ratio_ours_seed")
    if ratio == NOT_COMPARABLE:
        return [NOT_COMPARABLE]
    seed = entry.get("seed", {}).get(mode, {})
    return [*(seed.get(metric) for metric in metrics), *((ratio or {}).get(name) for name in ratios)]


def format_tables(summary: dict[str, Any], scenarios: list[str], meta: dict[str, Any], compare: bool) -> str:
    rounds = meta["rounds"]
    ours = meta.get("ours_label", "ours")
    sat_head = ["scenario", f"{ours} req/s", "p50 ms", "p99 ms", "of hello"]
    rate_head = ["scenario", f"{ours} req/s", "p50 ms", "p95 ms", "p99 ms"]
    if compare:
        sat_head += ["seed req/s", "p50 ms", "p99 ms", "ours/seed req/s", "ours/seed p99"]
        rate_head += ["seed req/s", "p50 ms", "p95 ms", "p99 ms", "ours/seed p99"]
    sections = [
        (f"Saturation: wrk -t2 -c{meta['connections']} -d{meta['duration']}s, median of {rounds} round(s)",
         sat_head, _saturation_rows(summary, scenarios, compare)),
        (f"Fixed rate: {meta['rate']:g} req/s over {meta['rate_connections']} connections (wrk + Lua delay(), "
         f"latency from the scheduled send), median of {rounds} round(s)", rate_head,
         _rate_rows(summary, scenarios, compare)),
    ]
    lines = []
    for title, head, rows in sections:
        widths = [max(len(str(head[0])), *(len(str(row[0])) for row in rows))]
        widths += [max(len(h), 7) for h in head[1:]]
        lines += [title, _row(head, widths), *(_row(row, widths) for row in rows), ""]
    lines += _below_rate(summary, scenarios, meta["rate"])
    lines.append(f"Errors over all rounds (non-2xx status x count; socket errors){'  ours | seed' if compare else ''}")
    for scenario in ["hello", *scenarios]:
        entry = summary.get(scenario, {})
        ours = _errors_text(entry.get("hello" if scenario == "hello" else "ours", {}))
        seed = f" | {_errors_text(entry['seed'])}" if compare and "seed" in entry else ""
        lines.append(f"  {scenario.ljust(10)} {ours}{seed}")
    return "\n".join(lines)


def _below_rate(summary: dict[str, Any], scenarios: list[str], rate: float) -> list[str]:
    """Notes for runs that could not keep the fixed rate: their latency includes the backlog that built up."""
    notes = []
    for scenario in scenarios:
        for target in ("ours", "seed"):
            achieved = summary.get(scenario, {}).get(target, {}).get("rate", {}).get("rps")
            if achieved is not None and achieved < 0.95 * rate:
                notes.append(f"! {target} {scenario}: {achieved:g} of {rate:g} req/s, over capacity; "
                             "its latency includes the backlog")
    return [*notes, ""] if notes else []


def write_json(path: Path, meta: dict[str, Any], summary: dict[str, Any], measurements: list[Measurement]) -> None:
    document = {"meta": meta, "summary": summary, "measurements": [run.as_dict() for run in measurements]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, summary: dict[str, Any], scenarios: list[str], meta: dict[str, Any]) -> None:
    """Three panels per scenario: req/s and p99 at saturation, p99 at the fixed rate; ours beside the seed stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("saturation", "rps", "req/s at saturation (higher is better)"),
              ("saturation", "p99_ms", "p99 ms at saturation (lower is better)"),
              ("rate", "p99_ms", f"p99 ms at {meta['rate']:g} req/s (lower is better)")]
    targets = [name for name in ("ours", "seed") if any(name in summary.get(s, {}) for s in scenarios)]
    width = 0.8 / len(targets)
    figure, axes = plt.subplots(len(panels), 1, figsize=(11, 11), constrained_layout=True)
    for axis, (mode, metric, title) in zip(axes, panels, strict=True):
        for index, target in enumerate(targets):
            values = [summary.get(s, {}).get(target, {}).get(mode, {}).get(metric) for s in scenarios]
            positions = [i + (index - (len(targets) - 1) / 2) * width for i in range(len(scenarios))]
            bars = axis.bar(positions, [v or 0 for v in values], width, label=target)
            axis.bar_label(bars, labels=["n/a" if v is None else f"{v:.0f}" for v in values], fontsize=7)
        if metric == "rps" and (ceiling := summary.get("hello", {}).get("hello", {}).get("saturation", {}).get("rps")):
            axis.axhline(ceiling, color="grey", linestyle="--", label=f"hello ceiling {ceiling:.0f}")
        axis.set_title(title)
        axis.set_xticks(range(len(scenarios)), scenarios)
        axis.legend(fontsize=8)
    figure.suptitle(f"todo-api bench {meta['started_at']} (median of {meta['rounds']} round(s))")
    figure.savefig(path, dpi=100)
    plt.close(figure)
