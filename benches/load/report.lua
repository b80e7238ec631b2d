-- wrk script that prints the run's totals and latency percentiles as one
-- JSON line prefixed with "BENCH_JSON ", for run.py to parse. Latencies are
-- in microseconds.
done = function(summary, latency, requests)
  local errors = summary.errors
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors_connect":%d', errors.connect),
    string.format('"errors_read":%d', errors.read),
    string.format('"errors_write":%d', errors.write),
    string.format('"errors_status":%d', errors.status),
    string.format('"errors_timeout":%d', errors.timeout),
    string.format('"latency_mean_us":%.1f', latency.mean),
    string.format('"latency_max_us":%d', latency.max),
  }
  for _, p in ipairs({50, 90, 99, 99.9}) do
    local name = string.gsub(string.format("p%g_us", p), "%.", "_")
    table.insert(fields, string.format('"%s":%d', name, latency:percentile(p)))
  end
  io.write("BENCH_JSON {" .. table.concat(fields, ",") .. "}\n")
end
