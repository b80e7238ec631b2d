"""Linux process helpers for the load benchmark: signals by PID, and the
CPU time, peak RSS, threads and TCP connections of the servers under test,
read from /proc."""

from __future__ import annotations

import os
import re
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_stat_fields(pid: int) -> list[str] | None:
    """Returns the fields of /proc/PID/stat that follow the command name, so
    index 0 is field 3 (state) of proc(5)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """Returns the PID of root followed by all of its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = read_stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(parents.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """Returns utime + stime of root and its live descendants, in seconds."""
    ticks = 0
    for pid in process_tree(root):
        fields = read_stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def peak_rss_kib(root: int) -> int:
    """Returns the sum of VmHWM over root and its live descendants, in KiB."""
    total = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1))
    return total


def thread_count(root: int) -> int:
    """Returns the number of threads of root and its live descendants."""
    total = 0
    for pid in process_tree(root):
        fields = read_stat_fields(pid)
        if fields is not None:
            total += int(fields[17])
    return total


def machine_cpu_ticks() -> tuple[int, int]:
    """Returns (busy, total) ticks of all CPUs from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def established_connections_to(port: int) -> int:
    """Counts client-side TCP connections in ESTABLISHED state to 127.0.0.1:port."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if remote_port == port and parts[3] == "01":
                count += 1
    return count

