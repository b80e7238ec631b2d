"""Formatting of load benchmark results as a console line and Markdown
tables."""

from __future__ import annotations


def summary_line(row: dict) -> str:
    """Returns one console line with the main numbers of a result row."""
    return (
        f"{row['target']:>6} secondary={row['secondary']:<9} {row['rps']:>9.0f} req/s "
        f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
        f"cpu {row.get('cpu_us_per_request')} us/req rss {row.get('peak_rss_mib')} MiB "
        f"copies {row.get('copies_reached_pct')}%"
    )


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    """Formats a table cell, with a dash for a value that was not measured."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value:,}{suffix}"


def notes_for(row: dict) -> str:
    """Summarizes wrk errors and each proxy's own account of the copies."""
    notes = []
    if row.get("disturbed"):
        runs = "its only run" if row["attempts"] == 1 else f"all {row['attempts']} runs"
        notes.append(f"disturbed by other programs in {runs}")
    errors = {k: v for k, v in row.get("errors", {}).items() if v}
    if errors:
        notes.append("wrk errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))

    tandem = row.get("tandem")
    if tandem:
        notes.append(tandem_note(tandem))

    envoy = row.get("envoy_secondary")
    if envoy:
        counters = ", ".join(f"{k.removeprefix('upstream_')} {v}" for k, v in envoy.items() if v)
        notes.append(f"secondary cluster: {counters}")

    nginx = row.get("nginx_error_log")
    if nginx and (nginx["upstream_timed_out"] or nginx["connection_refused"]):
        notes.append(
            f"error log: {nginx['upstream_timed_out']} timed out, {nginx['connection_refused']} refused"
        )

    if row.get("secondary_established_at_end"):
        notes.append(f"{row['secondary_established_at_end']} connections to the secondary open at the end")
    return "; ".join(notes)


def tandem_note(tandem: dict) -> str:
    """Describes tandem's copy accounting: due = delivered + shed."""
    if "error" in tandem:
        return f"metrics: {tandem['error']}"

    reasons = ", ".join(f"{r} {v}" for r, v in tandem["shed_by_reason"].items()) or "none"
    note = (
        f"due {fmt(tandem['due'])} = delivered {fmt(tandem['delivered'])} "
        f"+ shed {fmt(tandem['shed'])} ({reasons}) + unaccounted {fmt(tandem['unaccounted'])}"
    )
    if tandem.get("in_flight_at_wrk_end"):
        note += f"; {tandem['in_flight_at_wrk_end']} in flight when wrk stopped"
    if tandem.get("in_flight_at_end"):
        note += f", {tandem['in_flight_at_end']} still in flight after the copy timeout"
    return note


def results_table(rows: list[dict]) -> str:
    """Returns the Markdown table of all result rows."""
    header = (
        "| secondary | target | req/s | p50 ms | p99 ms | proxy CPU s | CPU µs/req | peak RSS MiB "
        "| copies reached | other CPU s | notes |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for row in rows:
        if "not_measured" in row:
            lines.append(
                f"| {row['secondary']} | {row['target']} | not measured | | | | | | | | {row['not_measured']} |"
            )
            continue
        lines.append(
            f"| {row['secondary']} | {row['target']} | {fmt(row['rps'], 0)} | {fmt(row['p50_ms'], 2)} "
            f"| {fmt(row['p99_ms'], 2)} | {fmt(row['proxy_cpu_s'], 2)} | {fmt(row['cpu_us_per_request'], 1)} "
            f"| {fmt(row['peak_rss_mib'], 1)} | {fmt(row.get('copies_reached_pct'), 1, '%')} "
            f"| {fmt(row['other_cpu_s'], 2)} | {notes_for(row)} |"
        )
    return header + "\n".join(lines) + "\n"


COLUMNS = """\
Columns: req/s, p50 and p99 come from wrk. Proxy CPU s is utime + stime of
the proxy and its child processes during the measured run, from
/proc/PID/stat; CPU µs/req divides it by wrk's completed requests. Peak RSS
is VmHWM from /proc/PID/status, summed over nginx's master and worker.
Copies reached is the secondary's request count divided by the requests the
primary received in the same window. Other CPU s is machine-wide busy CPU
time that neither wrk nor a benchmark server used (other programs, kernel
softirq work, tick rounding); a large value means the run was disturbed.
"""


def ratio(a, b) -> str:
    """Formats a / b, with a dash when either side is missing."""
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def ratios_table(rows: list[dict]) -> str:
    """Compares tandem with Envoy, and with the direct run, per secondary state."""
    measured = {(r["target"], r["secondary"]): r for r in rows if "not_measured" not in r}
    direct = measured.get(("direct", "none"))
    lines = []
    for state in dict.fromkeys(r["secondary"] for r in rows if r["secondary"] != "none"):
        tandem = measured.get(("tandem", state))
        if tandem is None:
            continue
        envoy = measured.get(("envoy", state))
        if envoy is None and direct is None:
            continue
        lines.append(
            f"| {state} "
            f"| {ratio(tandem['rps'], envoy and envoy['rps'])} "
            f"| {ratio(tandem['p99_ms'], envoy and envoy['p99_ms'])} "
            f"| {ratio(tandem['cpu_us_per_request'], envoy and envoy['cpu_us_per_request'])} "
            f"| {ratio(tandem['peak_rss_mib'], envoy and envoy['peak_rss_mib'])} "
            f"| {ratio(tandem['rps'], direct and direct['rps'])} "
            f"| {ratio(tandem['p99_ms'], direct and direct['p99_ms'])} |"
        )
    if not lines:
        return ""
    header = (
        "| secondary | tandem/Envoy req/s | tandem/Envoy p99 | tandem/Envoy CPU/req | tandem/Envoy RSS "
        "| tandem/direct req/s | tandem/direct p99 |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    return header + "\n".join(lines) + "\n"


def markdown_report(meta: dict, rows: list[dict]) -> str:
    """Returns the Markdown report: parameters, versions, results, ratios."""
    params = meta["parameters"]
    parts = [
        f"## Load benchmark, {meta['started']}\n",
        f"wrk -t{params['threads']} -c{params['connections']}, {params['duration_s']} s per run "
        f"after {params['warmup_s']} s of warm-up; copy timeout {params['mirror_timeout_s']} s; "
        f"slow secondary responds after {params['slow_delay_ms']} ms.\n",
        "".join(f"- {name}: {value}\n" for name, value in meta["versions"].items())
        + f"- CPUs busy before the servers started: {meta.get('busy_cpus_before_start')}\n",
        results_table(rows),
        COLUMNS,
    ]
    ratios = ratios_table(rows)
    if ratios:
        parts.append(
            "Each ratio is tandem's value divided by the other target's, so above 1 means more "
            "throughput, or more latency, CPU or memory.\n"
        )
        parts.append(ratios)
    return "\n".join(parts)

