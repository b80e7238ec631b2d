//! The `tandem` binary as a child process, and scratch directories for its
//! config files.

use std::{
    io::BufRead,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Path of the binary that cargo built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tandem");

/// How long the binary gets to log both listening addresses.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// A directory under the system temp directory, removed when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a scratch directory");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("write a scratch file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a command to its end with `limit` on the whole run. A command that
/// takes longer is killed (by its PID, through the child handle) and fails
/// the test.
pub fn run_with_limit(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("expected {command:?} to start: {error}"));
    let started = Instant::now();
    loop {
        match child.try_wait().expect("query the child's status") {
            Some(_) => {
                return child
                    .wait_with_output()
                    .expect("collect the child's output")
            }
            None if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("expected {command:?} to finish within {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A `tandem proxy` child process with its listening addresses, killed when
/// dropped if it is still running.
pub struct BinaryProxy {
    child: Child,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl BinaryProxy {
    /// Writes `yaml` to a config file, starts `tandem proxy --config FILE`
    /// with JSON logs, and reads both listening addresses from its log.
    pub async fn start(yaml: &str) -> Self {
        let yaml = yaml.to_string();
        tokio::task::spawn_blocking(move || Self::start_blocking(&[], &yaml))
            .await
            .expect("expected the proxy to start")
    }

    /// Like [`BinaryProxy::start`], but blocks, and runs the binary through
    /// `launcher` (such as `ip netns exec NS setpriv ...`), which must exec
    /// it so that the child's PID is the proxy's.
    pub fn start_blocking(launcher: &[&str], yaml: &str) -> Self {
        let dir = TempDir::new("tandem-proxy");
        let config = dir.write("tandem.yaml", yaml);
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BINARY);
                command
            }
            None => Command::new(BINARY),
        };
        let mut child = command
            .arg("proxy")
            .arg("--config")
            .arg(&config)
            .env("TANDEM_LOG_FORMAT", "json")
            .env("TANDEM_LOG", "info")
            .env("TANDEM_WORKERS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("expected {command:?} to start: {error}"));

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (found, listening) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(listener) = parse_listening(&line) {
                    let _ = found.send(listener);
                }
                lines.lock().expect("log lock is never poisoned").push(line);
            }
        });

        let deadline = Instant::now() + STARTUP_LIMIT;
        let (mut outbound, mut admin) = (None, None);
        while outbound.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match listening.recv_timeout(left) {
                Ok((name, addr)) if name == "outbound" => outbound = Some(addr),
                Ok((name, addr)) if name == "admin" => admin = Some(addr),
                Ok(_) => {}
                Err(_) => break,
            }
        }

        let mut proxy = Self {
            child,
            outbound: "0.0.0.0:0".parse().expect("valid address"),
            admin: "0.0.0.0:0".parse().expect("valid address"),
            stderr,
            _dir: dir,
        };
        match (outbound, admin) {
            (Some(outbound), Some(admin)) => {
                proxy.outbound = outbound;
                proxy.admin = admin;
                proxy
            }
            _ => {
                // Give the log reader a moment to collect the exit message.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "expected the proxy to log both listening addresses within {STARTUP_LIMIT:?}; stderr:\n{}",
                    proxy.stderr()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM through `kill -TERM PID`.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("expected `kill` to run");
        assert!(
            status.success(),
            "expected kill -TERM {} to succeed",
            self.pid()
        );
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("query the child's status") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process logged so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .expect("log lock is never poisoned")
            .join("\n")
    }

    /// Returns a field of `/proc/PID/status` in KiB, such as `VmHWM`.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("expected /proc/PID/status of a running proxy");
        status
            .lines()
            .find_map(|line| {
                let value = line.strip_prefix(field)?.strip_prefix(':')?;
                value.trim().trim_end_matches("kB").trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("expected {field} in /proc/PID/status"))
    }
}

impl Drop for BinaryProxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses a JSON log line such as
/// `{"message":"listening","listener":"admin","addr":"127.0.0.1:4191"}`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("message")?.as_str()? != "listening" {
        return None;
    }
    let listener = value.get("listener")?.as_str()?.to_string();
    let addr = value.get("addr")?.as_str()?.parse().ok()?;
    Some((listener, addr))
}
