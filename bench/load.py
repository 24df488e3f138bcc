"""Load with wrk: tokens and task ids for the scenario scripts, one wrk run, and its result."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jwt

from .servers import OPENER

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
RESULT_PREFIX = "BENCH_RESULT "
TOKEN_TTL = 6 * 3600
IDS_PER_USER = 200
WRK_TIMEOUT = "10s"  # a request slower than this counts as a socket timeout


@dataclass(frozen=True)
class Load:
    """How wrk drives a scenario: as fast as possible (over 64 or 1,000 connections), or at a fixed total rate
    (one connection per thread)."""

    mode: str  # "saturation", "rate" or "many" (saturation with --many-connections open at once)
    duration: int
    connections: int
    rate: float | None = None

    @property
    def threads(self) -> int:
        return self.connections if self.rate else min(2, self.connections)


@dataclass
class Measurement:
    target: str
    scenario: str
    mode: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None = None
    sent: int | None = None  # requests written (common.lua counts them): sent - requests were unanswered at the end
    late: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def non_2xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if not status.startswith("2"))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "non_2xx": self.non_2xx}


def make_token(secret: str, user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + TOKEN_TTL}, secret, algorithm="HS256")


def fetch_task_ids(base_url: str, user: str, token: str, per_user: int, rng: random.Random) -> list[str]:
    """IDS_PER_USER of the user's task ids, from a random page of the list (page 1 if that one is empty)."""
    pages = max(1, per_user // IDS_PER_USER)
    for page in (rng.randint(1, pages), 1):
        url = f"{base_url}/api/{user}/tasks?page_size={IDS_PER_USER}&page={page}"
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        with OPENER.open(urllib.request.Request(url, headers=headers), timeout=30) as response:
            ids = [task["id"] for task in json.load(response)]
        if ids:
            return ids
    raise RuntimeError(f"{base_url}: {user} has no tasks")


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_lua_data(path: Path, users: dict[str, tuple[str, list[str]]], titles: list[str]) -> None:
    """The scenario scripts' data: {users = {{id=, auth=, tasks={...}}, ...}, titles = {...}}."""
    lines = ["return {", "  titles = {" + ", ".join(map(_lua_string, titles)) + "},", "  users = {"]
    for user, (token, ids) in users.items():
        tasks = ", ".join(map(_lua_string, ids))
        lines.append(f"    {{id = {_lua_string(user)}, auth = {_lua_string('Bearer ' + token)}, tasks = {{{tasks}}}}},")
    lines += ["  },", "}", ""]
    path.write_text("\n".join(lines))


def ensure_wrk() -> str:
    """wrk's path; as root on Debian it is installed from Debian's package when missing."""
    if path := shutil.which("wrk"):
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing Debian's package", flush=True)
        install = ["apt-get", "install", "-y", "-qq", "wrk"]
        if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(install, stdout=subprocess.DEVNULL, check=True)
        if path := shutil.which("wrk"):
            return path
    raise SystemExit("bench: wrk is required (Debian: apt-get install wrk)")


def wrk_command(url: str, scenario: str, load: Load) -> list[str]:
    command = ["wrk", f"-t{load.threads}", f"-c{load.connections}", f"-d{load.duration}s", "--timeout", WRK_TIMEOUT,
               "-s", str(SCENARIO_DIR / f"{scenario}.lua")]
    if not load.rate:
        command.append("--latency")
    return [*command, url]


def run_wrk(url: str, scenario: str, load: Load, data: Path, log: Path) -> dict[str, Any]:
    """Run one scenario; returns the JSON that the script's done() printed. wrk's whole output goes to log."""
    env = {**os.environ, "BENCH_DATA": str(data), "BENCH_CONNECTIONS": str(load.connections)}
    env.pop("BENCH_RATE", None)
    if load.rate:
        env["BENCH_RATE"] = str(load.rate)
    command = wrk_command(url, scenario, load)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=load.duration + 60)
    with log.open("a") as output:
        output.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    for line in result.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"wrk {scenario} printed no result (exit {result.returncode}):\n{result.stderr[-2000:]}")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value / 1000, 2)


def measurement(raw: dict[str, Any], target: str, scenario: str, load: Load, round_: int) -> Measurement:
    """Saturation: wrk's own latency. Fixed rate: latency from the scheduled send time (see common.lua)."""
    seconds = raw["duration_us"] / 1e6
    latency = raw["scheduled_us"] if load.rate else raw["latency_us"]
    requests = int(raw["requests"])
    return Measurement(
        target=target, scenario=scenario, mode=load.mode, round=round_, requests=requests, seconds=round(seconds, 2),
        rps=round(requests / seconds, 1) if seconds else 0.0,
        p50_ms=_ms(latency.get("p50")), p95_ms=_ms(latency.get("p95")), p99_ms=_ms(latency.get("p99")),
        max_ms=_ms(latency.get("max")), sent=int(raw["sent"]) if "sent" in raw else None,
        late=int(raw.get("late", 0)),
        statuses={status: int(count) for status, count in raw["statuses"].items()},
        socket_errors={kind: int(count) for kind, count in raw["errors"].items() if kind != "status" and count},
    )
