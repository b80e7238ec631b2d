"""Fan-out scenario of the load benchmark (`run.py --fanout`).

wrk drives two tandem processes in turn, both in front of the same primary:
one with no routes (plain proxying) and one with a fanout route whose
secondary flaps, stopped and started again on a fixed cycle. The scenario
reports the primary latency of both, the share of fanout copies that
tandem delivered directly, how the rest were dead-lettered, and how many
of those `tandem dlq replay` delivered once the secondary stayed up.

The helpers of run.py are passed in as `harness`, so the exceptions and
process registry are the ones run.py's main() handles.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from counters import http_get, parse_prometheus, read_count

# Secondary cycle: up for FLAP_UP_S, then down for FLAP_DOWN_S.
FLAP_UP_S = 2.0
FLAP_DOWN_S = 1.0
# Upper bound on waiting for the fanout queues to drain after wrk stops.
DRAIN_WAIT_S = 60.0


def fanout_config(listen_port: int, admin_port: int, primary_port: int, secondary_port: int | None,
                  spool_dir: Path) -> str:
    """Returns the tandem config: no routes when secondary_port is None."""
    head = (
        f"admin: {{listen: '127.0.0.1:{admin_port}'}}\n"
        f"outbound: {{listen: '127.0.0.1:{listen_port}', default_target: '127.0.0.1:{primary_port}'}}\n"
        "drain_timeout: 5s\n"
        "log: {level: warn}\n"
    )
    if secondary_port is None:
        return head
    return head + (
        "routes:\n"
        "  - name: bench\n"
        "    match: {path_prefix: /}\n"
        "    fanout:\n"
        f"      to: ['http://127.0.0.1:{secondary_port}']\n"
        "      timeout: 2s\n"
        "      retry: {max_attempts: 8, base_delay: 50ms, max_delay: 1s}\n"
        "      circuit_breaker: {consecutive_failures: 20, open_for: 1s}\n"
        "      queue_capacity: 10000\n"
        "      max_in_flight: 256\n"
        f"      spool_dir: '{spool_dir}'\n"
    )


def start_tandem(h, ctx, label: str, secondary_port: int | None, spool_dir: Path):
    """Starts tandem and returns (server, listen port, admin port)."""
    listen_port, admin_port = h.free_ports(2)
    config = ctx.run_dir / f"{label}.yaml"
    config.write_text(fanout_config(listen_port, admin_port, ctx.primary_port, secondary_port, spool_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    argv = [ctx.binaries.tandem, "proxy", "--config", str(config), "--workers", "1"]
    server = ctx.registry.start(label, argv, ctx.run_dir / f"{label}.log", env=env)
    ready_url = f"http://127.0.0.1:{admin_port}/ready"
    h.wait_ready(server, lambda: http_get(ready_url)[0] == 200, f"GET {ready_url} returning 200")
    return server, listen_port, admin_port


class Flapper:
    """Stops and restarts the secondary on a fixed cycle in a thread, and
    sums the requests each incarnation counted before it was stopped."""

    def __init__(self, h, ctx, port: int) -> None:
        self.h, self.ctx, self.port = h, ctx, port
        self.counted = 0
        self.cycles = 0
        self.server = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.server = self.h.start_upstream(self.ctx, "secondary-flapping", self.port, [])
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLAP_UP_S):
            self._take_down()
            if self._stop.wait(FLAP_DOWN_S):
                break
            self.server = self.h.start_upstream(self.ctx, "secondary-flapping", self.port, [])
            self.cycles += 1

    def _take_down(self) -> None:
        count = read_count(self.port)
        self.counted += count or 0
        self.ctx.registry.stop(self.server)
        self.server = None

    def stop_flapping(self) -> None:
        """Ends the cycle and leaves the secondary up."""
        self.halt()
        if self.server is None:
            self.server = self.h.start_upstream(self.ctx, "secondary-flapping", self.port, [])

    def halt(self) -> None:
        """Ends the cycle. Calling it again does nothing."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def total_received(self) -> int:
        return self.counted + (read_count(self.port) or 0)


def tandem_sums(admin_port: int) -> dict[str, float]:
    """Reads the fanout totals of route "bench" from tandem's /metrics."""
    status, _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    if status != 200:
        return {}
    sums: dict[str, float] = {}
    for name, labels, value in parse_prometheus(body):
        if labels.get("route") not in ("bench", None):
            continue
        key = None
        if name == "tandem_dispatch_due_total":
            key = "due"
        elif name == "tandem_requests_total" and labels.get("role") == "fanout":
            key = "delivered"
        elif name == "tandem_fanout_dead_lettered_total":
            key = f"dead_lettered_{labels.get('reason')}"
        elif name == "tandem_dispatch_shed_total" and labels.get("mode") == "fanout":
            key = f"shed_{labels.get('reason')}"
        elif name == "tandem_fanout_queue_depth":
            key = "queue_depth"
        elif name == "tandem_fanout_retries_total":
            key = "retries"
        if key:
            sums[key] = sums.get(key, 0.0) + value
    return sums


def settled(sums: dict[str, float]) -> bool:
    """True when every due copy has an outcome."""
    outcomes = sums.get("delivered", 0.0) + sum(v for k, v in sums.items() if k.startswith(("dead_lettered_", "shed_")))
    return sums.get("due", 0.0) == outcomes


def latency_row(name: str, wrk: dict) -> dict:
    seconds = wrk["duration_us"] / 1e6
    return {
        "proxy": name,
        "requests": wrk["requests"],
        "rps": round(wrk["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": wrk["p50_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "p99_9_ms": wrk["p99_9_us"] / 1000,
        "errors": {k.removeprefix("errors_"): v for k, v in wrk.items() if k.startswith("errors_") and v},
    }


def measure_plain(h, ctx) -> dict:
    server, listen_port, _ = start_tandem(h, ctx, "tandem-plain", None, ctx.run_dir / "unused-spool")
    try:
        if ctx.args.warmup > 0:
            h.run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, ctx.args.warmup, ctx.args,
                      ctx.run_dir / "plain-warmup.wrk.log")
        wrk = h.run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, ctx.args.duration, ctx.args,
                        ctx.run_dir / "plain.wrk.log")
    finally:
        ctx.registry.stop(server)
    return latency_row("tandem, no routes", wrk)


def measure_fanout(h, ctx) -> tuple[dict, dict]:
    spool_dir = ctx.run_dir / "spool"
    (secondary_port,) = h.free_ports(1)
    flapper = Flapper(h, ctx, secondary_port)
    flapper.start()
    try:
        server, listen_port, admin_port = start_tandem(h, ctx, "tandem-fanout", secondary_port, spool_dir)
    except BaseException:
        flapper.halt()
        raise
    try:
        if ctx.args.warmup > 0:
            h.run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, ctx.args.warmup, ctx.args,
                      ctx.run_dir / "fanout-warmup.wrk.log")
        wrk = h.run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, ctx.args.duration, ctx.args,
                        ctx.run_dir / "fanout.wrk.log")
        flapper.stop_flapping()
        deadline = time.monotonic() + DRAIN_WAIT_S
        sums = tandem_sums(admin_port)
        while not settled(sums) and time.monotonic() < deadline:
            time.sleep(0.5)
            sums = tandem_sums(admin_port)
    finally:
        flapper.halt()
        ctx.registry.stop(server)

    due = sums.get("due", 0.0)
    delivered = sums.get("delivered", 0.0)
    spooled = sum(v for k, v in sums.items() if k.startswith("dead_lettered_"))
    replay = replay_spool(h, ctx, spool_dir)
    received = flapper.total_received()
    ctx.registry.stop(flapper.server)
    copies = {
        "secondary_cycles": flapper.cycles,
        "flap_up_s": FLAP_UP_S,
        "flap_down_s": FLAP_DOWN_S,
        "due": int(due),
        "delivered_directly": int(delivered),
        "delivered_directly_pct": round(100 * delivered / due, 2) if due else None,
        "dead_lettered": {k.removeprefix("dead_lettered_"): int(v) for k, v in sums.items()
                          if k.startswith("dead_lettered_") and v},
        "shed": {k.removeprefix("shed_"): int(v) for k, v in sums.items() if k.startswith("shed_") and v},
        "retries": int(sums.get("retries", 0.0)),
        "settled": settled(sums),
        "replayed": replay["delivered"],
        "delivered_after_replay_pct": round(100 * (delivered + replay["delivered"]) / due, 2) if due else None,
        "spooled": int(spooled),
        "secondary_received": received,
    }
    return latency_row("tandem, fanout to a flapping secondary", wrk), copies


def replay_spool(h, ctx, spool_dir: Path) -> dict:
    """Runs `tandem dlq replay` on the spool and counts delivered records."""
    if not (spool_dir / "dead-letter.spool").exists():
        return {"delivered": 0}
    argv = [ctx.binaries.tandem, "dlq", "replay", "--spool-dir", str(spool_dir)]
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    (ctx.run_dir / "replay.log").write_text(result.stdout)
    delivered = sum(1 for line in result.stdout.splitlines() if line.startswith("delivered "))
    return {"delivered": delivered, "exit_code": result.returncode}


def markdown(meta: dict, plain: dict, fanout: dict, copies: dict) -> str:
    lines = [
        f"## Fan-out benchmark, {meta['started']}\n",
        f"wrk -t{meta['threads']} -c{meta['connections']}, {meta['duration_s']} s per run. "
        f"The secondary is up {FLAP_UP_S:g} s, then down {FLAP_DOWN_S:g} s, "
        f"{copies['secondary_cycles']} restarts in the run.\n",
        "| proxy | req/s | p50 ms | p99 ms | p99.9 ms | wrk errors |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in (plain, fanout):
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "none"
        lines.append(
            f"| {row['proxy']} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['p99_9_ms']:.2f} | {errors} |"
        )
    dead = ", ".join(f"{k} {v}" for k, v in copies["dead_lettered"].items()) or "none"
    shed = ", ".join(f"{k} {v}" for k, v in copies["shed"].items()) or "none"
    lines += [
        "",
        f"- Copies due: {copies['due']:,}; delivered directly: {copies['delivered_directly']:,} "
        f"({copies['delivered_directly_pct']}%), after {copies['retries']:,} retries.",
        f"- Dead-lettered: {dead}. Shed: {shed}. All copies settled: {copies['settled']}.",
        f"- `tandem dlq replay` with the secondary up delivered {copies['replayed']:,} more; "
        f"delivered in total: {copies['delivered_after_replay_pct']}%.",
        f"- Requests the secondary counted: {copies['secondary_received']:,} (a lower bound, "
        "because requests that reach an incarnation just before it stops are not counted).",
    ]
    return "\n".join(lines) + "\n"


def run_fanout(args, registry, h) -> int:
    """Runs the scenario and writes bench-results/fanout-<time>.{json,md}."""
    tools = h.ensure_tools(["tandem"], install=not args.no_install)
    binaries = h.build(args, ["tandem"])
    if binaries.tandem is None:
        raise h.BenchError(f"tandem is not available: {binaries.tandem_error}")

    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    h.RESULTS_DIR.mkdir(exist_ok=True)
    run_dir = h.RESULTS_DIR / f"fanout-{stamp}"
    run_dir.mkdir()
    print(f"logs and configs: {run_dir}")

    (primary_port,) = h.free_ports(1)
    ctx = h.Context(args, registry, tools, binaries, run_dir, primary_port)
    ctx.primary = h.start_upstream(ctx, "primary", primary_port, [])

    print("\n=== tandem, no routes ===", flush=True)
    plain = measure_plain(h, ctx)
    print("\n=== tandem, fanout to a flapping secondary ===", flush=True)
    fanout, copies = measure_fanout(h, ctx)

    meta = {
        "started": started.isoformat(timespec="seconds"),
        "versions": h.collect_versions(tools, binaries),
        "duration_s": args.duration,
        "connections": args.connections,
        "threads": args.threads,
    }
    report = markdown(meta, plain, fanout, copies)
    json_path = h.RESULTS_DIR / f"fanout-{stamp}.json"
    md_path = h.RESULTS_DIR / f"fanout-{stamp}.md"
    json_path.write_text(json.dumps({**meta, "latency": [plain, fanout], "copies": copies}, indent=2) + "\n")
    md_path.write_text(report)
    print("\n" + report)
    print(f"wrote {json_path} and {md_path}")
    return 0
