"""Counters read over HTTP during the load benchmark: the upstreams'
request counts, tandem's Prometheus metrics and Envoy's cluster stats."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# urllib would otherwise send loopback requests through an HTTP proxy set in
# the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, dict, str]:
    """Returns (status, headers, body) of a GET, with status 0 on a
    connection error or timeout."""
    try:
        with HTTP.open(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, {}, ""


def read_counts(port: int) -> tuple[int, int] | None:
    """Returns the requests a bench_upstream received and how many of them had
    a tandem-dispatch header, or None when it did not respond."""
    status, headers, body = http_get(f"http://127.0.0.1:{port}/__count")
    tagged = headers.get("dispatch-header-count", "")
    if status != 200 or not body.strip().isdigit() or not tagged.isdigit():
        return None
    return int(body), int(tagged)


def read_count(port: int) -> int | None:
    counts = read_counts(port)
    return None if counts is None else counts[0]


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parses Prometheus text exposition into (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        try:
            samples.append((match.group(1), labels, float(match.group(3))))
        except ValueError:
            continue
    return samples


@dataclass
class TandemCounters:
    """Totals for route "bench" read from tandem's /metrics. A field is None
    when tandem exports no series for it yet."""

    due: float | None = None
    delivered: float = 0.0
    shed_by_reason: dict[str, float] = field(default_factory=dict)
    primary_responses: float | None = None
    in_flight: float | None = None

    @property
    def shed(self) -> float:
        return sum(self.shed_by_reason.values())

    def minus(self, earlier: "TandemCounters") -> "TandemCounters":
        """Returns the counter increase since earlier. The in-flight gauge is
        kept as it is now, not subtracted."""

        def difference(now, before):
            return None if now is None else now - (before or 0.0)

        reasons = set(self.shed_by_reason) | set(earlier.shed_by_reason)
        return TandemCounters(
            due=difference(self.due, earlier.due),
            delivered=self.delivered - earlier.delivered,
            shed_by_reason={
                r: self.shed_by_reason.get(r, 0.0) - earlier.shed_by_reason.get(r, 0.0) for r in reasons
            },
            primary_responses=difference(self.primary_responses, earlier.primary_responses),
            in_flight=self.in_flight,
        )


def add(total: float | None, value: float) -> float:
    return (total or 0.0) + value


def read_tandem_counters(admin_port: int) -> TandemCounters | None:
    status, _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    if status != 200:
        return None
    counters = TandemCounters()
    for name, labels, value in parse_prometheus(body):
        if labels.get("route") != "bench":
            continue
        if name == "tandem_requests_total":
            # The role is "primary" or the copy's mode, and a copy of any
            # status class got a response.
            if labels.get("role") == "primary":
                counters.primary_responses = add(counters.primary_responses, value)
            else:
                counters.delivered += value
        elif name == "tandem_dispatch_due_total":
            counters.due = add(counters.due, value)
        elif name == "tandem_dispatch_shed_total":
            reason = labels.get("reason", "unknown")
            counters.shed_by_reason[reason] = counters.shed_by_reason.get(reason, 0.0) + value
        elif name == "tandem_dispatch_in_flight":
            counters.in_flight = add(counters.in_flight, value)
    return counters


ENVOY_SECONDARY_STATS = (
    "upstream_rq_total",
    "upstream_rq_completed",
    "upstream_rq_timeout",
    "upstream_rq_pending_overflow",
    "upstream_cx_connect_fail",
    "upstream_cx_total",
)


def read_envoy_secondary_stats(admin_port: int) -> dict[str, int]:
    status, _, body = http_get(f"http://127.0.0.1:{admin_port}/stats?filter=^cluster\\.secondary\\.")
    stats: dict[str, int] = {}
    if status != 200:
        return stats
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        short = name.removeprefix("cluster.secondary.")
        if short in ENVOY_SECONDARY_STATS and value.strip().isdigit():
            stats[short] = int(value)
    return stats


def nginx_error_summary(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "upstream_timed_out": text.count("upstream timed out"),
        "connection_refused": text.count("Connection refused"),
        "lines": text.count("\n"),
    }

