//! Transparent proxying with iptables: an application's connection to the
//! primary is redirected to the proxy (`REDIRECT` in the nat OUTPUT chain),
//! and the proxy finds the primary through `SO_ORIGINAL_DST`.
//!
//! Each test creates its own network namespace, so the rules and servers
//! never touch the host's network. This needs root, `ip` and `iptables`
//! (Debian: `apt-get install iptables`); without them the tests fail unless
//! `TANDEM_SKIP_NETNS=1` is set. Every step is bounded in time, and a guard
//! kills the processes it started (by PID) and deletes the namespace.

mod support;

use std::{
    io::BufRead,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use support::{
    process::{run_with_limit, BinaryProxy, TempDir},
    MetricsSnapshot,
};

/// The proxy runs as this user, which the REDIRECT rule exempts so that the
/// proxy's own connection to the primary is not sent back to itself.
const PROXY_UID: &str = "65534";
const PRIMARY_PORT: u16 = 8080;
const SECONDARY_PORT: u16 = 9090;
const PROXY_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15000;
const STEP_LIMIT: Duration = Duration::from_secs(10);

/// An HTTP server that returns 200 and `primary PATH` for every GET. Given a
/// file, it also appends each request (path and headers) to it as a JSON
/// line, which makes it the recording secondary. It prints `ready` once
/// bound.
const SERVER_PY: &str = r#"
import http.server, json, socket, sys

host, port = sys.argv[1], int(sys.argv[2])
record = sys.argv[3] if len(sys.argv) > 3 else None

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"path": self.path, "headers": dict(self.headers.items())}) + "\n")
        body = ("primary " + self.path).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

server = Server((host, port), Handler)
print("ready", flush=True)
server.serve_forever()
"#;

/// Fetches a URL and prints the status, a newline and the body, also for
/// error statuses.
const FETCH_PY: &str = r#"
import sys, urllib.error, urllib.request
try:
    response = urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError as error:
    response = error
print(response.status)
print(response.read().decode(), end="")
"#;

/// Finds `name` on PATH or in the sbin directories, where `ip` and
/// `iptables` live.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|candidate| candidate.is_file());
    found
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            Some(line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Returns the absolute path of a program that [`prerequisites_missing`]
/// found.
fn program(name: &str) -> String {
    let path = find_program(name).unwrap_or_else(|| panic!("expected `{name}` to be installed"));
    path.to_str().expect("program paths are UTF-8").to_string()
}

/// Returns the missing prerequisites as a message, or `None` when the test
/// can run. With `TANDEM_SKIP_NETNS=1` a missing prerequisite skips the
/// test; otherwise it fails it.
fn prerequisites_missing(iptables: &str) -> Option<String> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (network namespaces and iptables need CAP_NET_ADMIN)".to_string());
    }
    for program in ["ip", iptables, "setpriv", "python3"] {
        if find_program(program).is_none() {
            missing.push(format!("the `{program}` command"));
        }
    }
    if missing.is_empty() {
        return None;
    }
    let message = format!(
        "this test needs {}; install iptables with `apt-get install iptables` (ip: iproute2, \
         setpriv: util-linux), or set TANDEM_SKIP_NETNS=1 to skip it",
        missing.join(", ")
    );
    if std::env::var("TANDEM_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("skipped: {message}");
        return Some(message);
    }
    panic!("{message}");
}

/// A network namespace with loopback up and the processes started in it.
/// Dropping it kills those processes by PID and deletes the namespace.
struct Netns {
    name: String,
    /// Absolute path of `ip`, which may live outside PATH (in /usr/sbin).
    ip: String,
    children: Vec<Child>,
    python: String,
    dir: TempDir,
}

impl Netns {
    fn create(suffix: &str) -> Self {
        let name = format!("tandem-test-{}-{suffix}", std::process::id());
        let ip = program("ip");
        let output = run_with_limit(Command::new(&ip).args(["netns", "add", &name]), STEP_LIMIT);
        assert!(
            output.status.success(),
            "expected `ip netns add {name}` to succeed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut netns = Self {
            name,
            ip,
            children: Vec::new(),
            python: String::new(),
            dir: TempDir::new("tandem-netns"),
        };
        let ip = netns.ip.clone();
        netns.run(&[&ip, "link", "set", "lo", "up"]);
        // The real interpreter, not a shell shim, so that its PID is the one
        // the guard kills.
        let output = run_with_limit(
            Command::new(program("python3")).args(["-c", "import sys; print(sys.executable)"]),
            STEP_LIMIT,
        );
        netns.python = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(
            !netns.python.is_empty(),
            "expected python3 to report its executable"
        );
        netns
    }

    /// Returns `ip netns exec NAME` followed by `args`.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.ip);
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// Runs a command in the namespace and returns its output, failing the
    /// test when it fails.
    fn run(&self, args: &[&str]) -> Output {
        let output = self.try_run(args);
        assert!(
            output.status.success(),
            "expected {args:?} in {} to succeed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn try_run(&self, args: &[&str]) -> Output {
        run_with_limit(&mut self.command(args), STEP_LIMIT)
    }

    /// Starts the Python server in the namespace and waits for `ready`.
    fn start_server(&mut self, host: &str, port: u16, record: Option<&str>) {
        let port = port.to_string();
        let mut args = vec![self.python.as_str(), "-c", SERVER_PY, host, port.as_str()];
        args.extend(record);
        let mut child = self
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("expected the test server to start");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.children.push(child);
        let (ready, wait) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if line.is_ok_and(|line| line.trim() == "ready") {
                    let _ = ready.send(());
                }
            }
        });
        assert!(
            wait.recv_timeout(STEP_LIMIT).is_ok(),
            "expected the test server on {host}:{port} to be ready within {STEP_LIMIT:?}"
        );
    }

    /// Fetches `url` from inside the namespace; returns status and body.
    fn fetch(&self, url: &str) -> (u16, String) {
        let output = self.run(&[&self.python, "-c", FETCH_PY, url]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
        let status = status
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("expected a status from {url}, got {text:?}"));
        (status, body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run_with_limit(
            Command::new(&self.ip).args(["netns", "del", &self.name]),
            STEP_LIMIT,
        );
    }
}

/// Redirects the namespace's connections to the primary port into the
/// proxy (listening on `listen_host`), sends one request to the primary on
/// `loopback` and checks that the proxy forwarded it there and copied it to
/// the secondary.
fn redirect_and_mirror(iptables: &str, suffix: &str, loopback: &str, listen_host: &str) {
    if prerequisites_missing(iptables).is_some() {
        return;
    }
    let iptables_path = program(iptables);
    let iptables = iptables_path.as_str();
    let setpriv = program("setpriv");
    let mut netns = Netns::create(suffix);
    let bracketed = if loopback.contains(':') {
        format!("[{loopback}]")
    } else {
        loopback.to_string()
    };

    let probe = netns.try_run(&[iptables, "-t", "nat", "-L", "OUTPUT", "-n"]);
    if !probe.status.success() {
        let message = format!(
            "`{iptables} -t nat` does not work in a network namespace here: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        if iptables.ends_with("ip6tables") {
            eprintln!("skipped: {message}");
            return;
        }
        panic!("expected iptables to work: {message}");
    }

    let record = netns.dir.path().join("secondary.jsonl");
    let record = record.to_str().expect("temp paths are UTF-8").to_string();
    netns.start_server(loopback, PRIMARY_PORT, None);
    netns.start_server(loopback, SECONDARY_PORT, Some(&record));

    // No default target: only SO_ORIGINAL_DST can name the primary.
    let yaml = format!(
        "admin:\n  listen: \"{bracketed}:{ADMIN_PORT}\"\noutbound:\n  listen: \"{listen_host}:{PROXY_PORT}\"\n\
         drain_timeout: 2s\nroutes:\n  - name: r\n    match: {{path_prefix: /}}\n    \
         mirror: {{to: \"http://{bracketed}:{SECONDARY_PORT}\"}}\n"
    );
    let launcher = [
        &netns.ip,
        "netns",
        "exec",
        &netns.name,
        &setpriv,
        "--reuid",
        PROXY_UID,
        "--regid",
        PROXY_UID,
        "--clear-groups",
    ];
    let proxy = BinaryProxy::start_blocking(&launcher, &yaml);

    netns.run(&[
        iptables,
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        &PRIMARY_PORT.to_string(),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        PROXY_UID,
        "-j",
        "REDIRECT",
        "--to-ports",
        &PROXY_PORT.to_string(),
    ]);

    let (status, body) = netns.fetch(&format!("http://{bracketed}:{PRIMARY_PORT}/redirected?x=1"));
    assert_eq!(
        status,
        200,
        "expected the primary's 200 through the redirect; proxy log:\n{}",
        proxy.stderr()
    );
    assert_eq!(
        body, "primary /redirected?x=1",
        "expected the primary's body"
    );

    let (status, metrics) = netns.fetch(&format!("http://{bracketed}:{ADMIN_PORT}/metrics"));
    assert_eq!(
        status, 200,
        "expected the proxy's /metrics inside the namespace"
    );
    let metrics = MetricsSnapshot::parse(&metrics);
    assert_eq!(
        metrics.primary("r"),
        1,
        "expected the proxy to have forwarded exactly one primary request; proxy log:\n{}",
        proxy.stderr()
    );
    assert_eq!(
        metrics.sum("tandem_proxy_errors_total", &[]),
        0.0,
        "expected no proxy error; proxy log:\n{}",
        proxy.stderr()
    );

    let deadline = Instant::now() + STEP_LIMIT;
    let copy = loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break serde_json::from_str::<serde_json::Value>(line).expect("the record is JSON");
        }
        assert!(
            Instant::now() < deadline,
            "expected the secondary to record the copy within {STEP_LIMIT:?}; proxy log:\n{}",
            proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        copy["path"], "/redirected?x=1",
        "expected the copy's path and query"
    );
    let header = |name: &str| {
        copy["headers"]
            .as_object()
            .and_then(|headers| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
            .and_then(|(_, v)| v.as_str())
            .map(str::to_string)
    };
    assert_eq!(
        header("tandem-dispatch").as_deref(),
        Some("mirror"),
        "expected the copy tagged"
    );
    assert_eq!(
        header("host"),
        Some(format!("{bracketed}:{SECONDARY_PORT}")),
        "expected the secondary's authority as Host"
    );
    drop(proxy);
}

#[test]
fn iptables_redirect_reaches_primary_ipv4() {
    redirect_and_mirror("iptables", "v4", "127.0.0.1", "127.0.0.1");
}

#[test]
fn ip6tables_redirect_reaches_primary_ipv6() {
    redirect_and_mirror("ip6tables", "v6", "::1", "[::1]");
}

/// A proxy listening on `[::]` gets redirected IPv4 connections with
/// IPv4-mapped addresses and must still find their original destination.
#[test]
fn dual_stack_listener_redirect_ipv4() {
    redirect_and_mirror("iptables", "dual", "127.0.0.1", "[::]");
}
