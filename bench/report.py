"""Medians over rounds, ours/peer ratios and the fraction of the hello ceiling: printed, JSON and a PNG chart.

The peers are the seed stack's variants (seed-sync, seed-async), each a target of its own in the measurements.
"""

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
# wrk's socket error kinds, in its own order; any non-2xx status is counted apart.
SOCKET_ERRORS = ("connect", "read", "write", "timeout")


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 2) if present else None


def _ratio(ours: float | None, peer: float | None) -> float | None:
    return round(ours / peer, 2) if ours is not None and peer else None


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
        "max_ms": max((run.max_ms for run in runs if run.max_ms is not None), default=None),
        # Requests still unanswered when wrk stopped: wrk counts a timeout only for a response that comes late, so a
        # request never answered shows here and nowhere else.
        "unanswered": sum(run.sent - run.requests for run in runs if run.sent is not None),
        "non_2xx": dict(statuses),
        "socket_errors": dict(socket_errors),
    }


def summarize(measurements: list[Measurement], scenarios: list[str], peers: list[str],
              not_comparable: set[str]) -> dict[str, Any]:
    """summary[scenario][target][mode] = medians; plus the fraction of hello and, per peer, the ours/peer ratios
    (summary[scenario]["ratios"][peer]), or NOT_COMPARABLE for the scenarios the peers cannot run."""
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
        if peers:
            entry["ratios"] = {
                peer: NOT_COMPARABLE if scenario in not_comparable else _ratios(ours, entry.get(peer, {}))
                for peer in peers}
    return summary


def _ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    """ours/peer: above 1 is better for req/s, below 1 is better for latency."""
    def pick(side: dict[str, Any], mode: str, metric: str) -> float | None:
        return side.get(mode, {}).get(metric)

    return {
        "rps": _ratio(pick(ours, "saturation", "rps"), pick(peer, "saturation", "rps")),
        "p99_ms": _ratio(pick(ours, "saturation", "p99_ms"), pick(peer, "saturation", "p99_ms")),
        "rate_p99_ms": _ratio(pick(ours, "rate", "p99_ms"), pick(peer, "rate", "p99_ms")),
        "many_rps": _ratio(pick(ours, "many", "rps"), pick(peer, "many", "rps")),
    }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _cell(value: Any, width: int) -> str:
    text = _number(value) if value is None or isinstance(value, float) else str(value)
    return text.rjust(width)


def _pair(side: dict[str, Any], *metrics: str) -> str:
    """Latency percentiles as one cell, e.g. "59 / 187" (ms)."""
    values = [side.get(metric) for metric in metrics]
    return "-" if all(value is None for value in values) else " / ".join(_number(value) for value in values)


def _short(peer: str) -> str:
    return peer.removeprefix("seed-")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    widths = [max(len(str(head[0])), *(len(str(row[0])) for row in rows))]
    widths += [max(len(h), 7, *(len(str(row[i])) for row in rows if i < len(row) and isinstance(row[i], str)))
               for i, h in enumerate(head[1:], start=1)]

    def line(cells: list[Any]) -> str:
        # A row may stop early: a peer's search row is one "n/a" note.
        rest = (_cell(cell, width) for cell, width in zip(cells[1:], widths[1:], strict=False))
        return "  ".join([str(cells[0]).ljust(widths[0]), *rest])

    return [line(head), *(line(row) for row in rows)]


def _saturation_table(summary: dict[str, Any], scenarios: list[str], peers: list[str],
                      ours_label: str) -> tuple[list[str], list[list[Any]]]:
    """req/s side by side, the ratios (the last peer first: async, the one to beat), the fraction of hello, then
    p50 / p99 per server."""
    head = ["scenario", f"{ours_label} req/s", *(f"{_short(peer)} req/s" for peer in peers),
            *(f"ours/{_short(peer)}" for peer in reversed(peers)), "of hello",
            f"{ours_label} p50/p99 ms", *(f"{_short(peer)} p50/p99 ms" for peer in peers)]
    rows = []
    for scenario in ["hello", *scenarios]:
        entry = summary.get(scenario, {})
        ours = entry.get("hello" if scenario == "hello" else "ours", {}).get("saturation", {})
        fraction = 1.0 if scenario == "hello" else entry.get("ours_fraction_of_hello")
        ratios = entry.get("ratios", {})
        if scenario == "hello" or any(ratios.get(peer) == NOT_COMPARABLE for peer in peers):
            peer_rps: list[Any] = ["-" if scenario == "hello" else "n/a"] * len(peers)
            peer_ratios: list[Any] = ["-" if scenario == "hello" else "n/a"] * len(peers)
            peer_latency: list[Any] = ["-" if scenario == "hello" else "n/a (ignores filters)"] * len(peers)
        else:
            sides = [entry.get(peer, {}).get("saturation", {}) for peer in peers]
            peer_rps = [side.get("rps") for side in sides]
            peer_ratios = [(ratios.get(peer) or {}).get("rps") for peer in reversed(peers)]
            peer_latency = [_pair(side, "p50_ms", "p99_ms") for side in sides]
        rows.append([scenario, ours.get("rps"), *peer_rps, *peer_ratios,
                     f"{fraction:.0%}" if fraction is not None else "-", _pair(ours, "p50_ms", "p99_ms"),
                     *peer_latency])
    return head, rows


def _rate_table(summary: dict[str, Any], scenarios: list[str], peers: list[str],
                ours_label: str) -> tuple[list[str], list[list[Any]]]:
    head = ["scenario", f"{ours_label} req/s", "p50/p95/p99 ms"]
    for peer in peers:
        head += [f"{_short(peer)} req/s", "p50/p95/p99 ms", f"ours/{_short(peer)} p99"]
    rows = []
    for scenario in scenarios:
        entry = summary.get(scenario, {})
        ours = entry.get("ours", {}).get("rate", {})
        row = [scenario, ours.get("rps"), _pair(ours, "p50_ms", "p95_ms", "p99_ms")]
        for peer in peers:
            ratio = entry.get("ratios", {}).get(peer)
            if ratio == NOT_COMPARABLE:
                row += ["n/a", "n/a", "n/a"]
                continue
            side = entry.get(peer, {}).get("rate", {})
            row += [side.get("rps"), _pair(side, "p50_ms", "p95_ms", "p99_ms"), (ratio or {}).get("rate_p99_ms")]
        rows.append(row)
    return head, rows


def _error_counts(side: dict[str, Any]) -> dict[str, int]:
    counts = {kind: side.get("socket_errors", {}).get(kind, 0) for kind in SOCKET_ERRORS}
    counts["non-2xx"] = sum(side.get("non_2xx", {}).values())
    return counts


def _many_table(summary: dict[str, Any], scenarios: list[str], peers: list[str], ours_label: str,
                connections: int, timeout_ms: float) -> tuple[list[str], list[list[Any]]]:
    """One row per scenario and server: median req/s and latency, the slowest response, errors summed over the
    rounds, and the requests left unanswered when each run ended.

    held: no socket error and no non-2xx (wrk's "timeout" counts the responses slower than its timeout), the
    slowest response within the timeout, and, as wrk cannot see a request that is never answered, at least as many
    responses per round as connections."""
    head = ["scenario", "server", "req/s", "p50/p99 ms", "max ms", "requests", "unanswered", *SOCKET_ERRORS,
            "non-2xx", "held"]
    rows = []
    for scenario in scenarios:
        entry = summary.get(scenario, {})
        for target, label in [("ours", ours_label), *((peer, peer) for peer in peers)]:
            side = entry.get(target, {}).get("many")
            if side is None:
                continue
            counts = _error_counts(side)
            slowest = side.get("max_ms")
            held = not any(counts.values()) and side["requests"] >= connections * side["rounds"] and (
                slowest is not None and slowest < timeout_ms)
            rows.append([scenario, label, side.get("rps"), _pair(side, "p50_ms", "p99_ms"), slowest, side["requests"],
                         side.get("unanswered", "-"), *counts.values(), "yes" if held else "NO"])
    return head, rows


def format_tables(summary: dict[str, Any], scenarios: list[str], meta: dict[str, Any], peers: list[str]) -> str:
    rounds = meta["rounds"]
    ours = meta.get("ours_label", "ours")
    timeout = meta.get("wrk_timeout", "10s")
    lines = [f"Saturation: wrk -t2 -c{meta['connections']} -d{meta['duration']}s --timeout {timeout}, median of "
             f"{rounds} round(s); ratios ours/peer req/s, of hello = ours / the bare Flask ceiling",
             *_table(*_saturation_table(summary, scenarios, peers, ours)), ""]
    lines += [f"Fixed rate: {meta['rate']:g} req/s over {meta['rate_connections']} connections (wrk + Lua delay(), "
              f"latency from the scheduled send), median of {rounds} round(s)",
              *_table(*_rate_table(summary, scenarios, peers, ours)), ""]
    lines += _below_rate(summary, scenarios, ["ours", *peers], meta["rate"])
    if meta.get("many_connections"):
        timeout_ms = float(timeout.removesuffix("s")) * 1000
        head, rows = _many_table(summary, scenarios, peers, ours, meta["many_connections"], timeout_ms)
        if rows:
            lines += [f"{meta['many_connections']:,} connections: wrk -t2 -c{meta['many_connections']} "
                      f"-d{meta.get('many_duration', meta['duration'])}s --timeout {timeout} (the same for every "
                      f"server), last in each server's block; median req/s and p50/p99 of {rounds} round(s); max, "
                      "requests, unanswered at the end and errors over all rounds; held = no error of any kind, "
                      "max < timeout and at least one response per connection and round", *_table(head, rows), ""]
    targets = ["ours", *peers]
    lines.append("Errors over all rounds and loads (non-2xx status x count; socket errors)  " + " | ".join(targets))
    for scenario in ["hello", *scenarios]:
        entry = summary.get(scenario, {})
        if scenario == "hello":
            cells = [_errors_text(entry.get("hello", {}))]
        else:
            cells = [_errors_text(entry[target]) if target in entry else "-" for target in targets]
        lines.append(f"  {scenario.ljust(10)} {' | '.join(cells)}")
    return "\n".join(lines)


def _errors_text(side: dict[str, Any]) -> str:
    non_2xx: Counter[str] = Counter()
    sockets: Counter[str] = Counter()
    for mode in side.values():
        non_2xx.update(mode["non_2xx"])
        sockets.update(mode["socket_errors"])
    parts = [f"{status}x{count}" for status, count in sorted(non_2xx.items())]
    parts += [f"{kind} {count}" for kind, count in sorted(sockets.items())]
    return ", ".join(parts) or "0"


def _below_rate(summary: dict[str, Any], scenarios: list[str], targets: list[str], rate: float) -> list[str]:
    """Notes for runs that could not keep the fixed rate: their latency includes the backlog that built up."""
    notes = []
    for scenario in scenarios:
        for target in targets:
            achieved = summary.get(scenario, {}).get(target, {}).get("rate", {}).get("rps")
            if achieved is not None and achieved < 0.95 * rate:
                notes.append(f"! {target} {scenario}: {achieved:g} of {rate:g} req/s, over capacity; "
                             "its latency includes the backlog")
    return [*notes, ""] if notes else []


def write_json(path: Path, meta: dict[str, Any], summary: dict[str, Any], measurements: list[Measurement]) -> None:
    document = {"meta": meta, "summary": summary, "measurements": [run.as_dict() for run in measurements]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, summary: dict[str, Any], scenarios: list[str], peers: list[str],
                meta: dict[str, Any]) -> None:
    """Three panels per scenario: req/s and p99 at saturation, p99 at the fixed rate; ours beside each peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("saturation", "rps", "req/s at saturation (higher is better)"),
              ("saturation", "p99_ms", "p99 ms at saturation (lower is better)"),
              ("rate", "p99_ms", f"p99 ms at {meta['rate']:g} req/s (lower is better)")]
    targets = [name for name in ("ours", *peers) if any(name in summary.get(s, {}) for s in scenarios)]
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
