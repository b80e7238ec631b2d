//! The spool writer: a thread per spool directory that appends dead
//! letters and flushes them with fsync on an interval.
//!
//! Appends run on a thread of their own because they are blocking file I/O
//! that may wait for the lock `tandem dlq replay` holds while it rewrites
//! the file. Callers hand letters over an unbounded channel, so they never
//! wait for disk I/O.
//!
//! NOTE: the channel has no bound, so a disk slower than the rate of new
//! dead letters grows memory until it catches up. Only letters whose write
//! failed are capped, by `MAX_RETRY_BYTES`.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    format::{self, FILE_HEADER_LEN},
    lock_exclusive, spool_path, try_lock_exclusive, unlock, DeadLetter, LetterBody, SpoolError,
    BODY_DIR_NAME, PROXY_LOCK_NAME,
};
use crate::{proxy::metrics::FanoutMetrics, readiness::Readiness};

/// Letters whose write failed are kept in memory and retried on every
/// flush tick, up to this many bytes of in-memory bodies. Beyond it the
/// oldest are lost, with an error log each.
const MAX_RETRY_BYTES: u64 = 256 * 1024 * 1024;

/// Handle to the writer of one spool directory. Clones share the writer.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    metrics: FanoutMetrics,
    /// The held `proxy.lock`, released by [`Spool::close`].
    owner: Mutex<Option<File>>,
}

enum Command {
    Append(Box<DeadLetter>),
    /// Writes what is pending, flushes with fsync and stops the thread.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// State owned by the writer thread.
struct Writer {
    path: PathBuf,
    component: String,
    file: Option<File>,
    /// Last known size of the spool file, as counted in the gauge.
    size: u64,
    dirty: bool,
    failing: bool,
    retry: VecDeque<Box<DeadLetter>>,
    retry_bytes: u64,
    metrics: FanoutMetrics,
    readiness: Readiness,
}

// === impl Spool ===

impl Spool {
    /// Opens the spool in `dir`, creating the directory and the file as
    /// needed, and starts its writer thread. Fails when the directory is
    /// not writable or the file is not a spool of this format version.
    pub fn open(
        dir: &Path,
        fsync_interval: Duration,
        metrics: FanoutMetrics,
        readiness: Readiness,
    ) -> Result<Spool, SpoolError> {
        let io_error = |action: &'static str| {
            let dir = dir.display().to_string();
            move |source| SpoolError::Io {
                dir,
                action,
                source,
            }
        };
        std::fs::create_dir_all(dir.join(BODY_DIR_NAME))
            .map_err(io_error("creating the directory"))?;
        // One proxy per directory: a second one would delete the first
        // one's body files below and interleave its queue's dead letters.
        let owner = File::create(dir.join(PROXY_LOCK_NAME)).map_err(io_error("creating a file"))?;
        if !try_lock_exclusive(&owner).map_err(io_error("locking proxy.lock"))? {
            return Err(SpoolError::InUse {
                dir: dir.display().to_string(),
            });
        }
        remove_orphan_bodies(dir);
        // Creating a file proves the directory is writable, which opening an
        // existing spool file for writing alone would not.
        let probe = dir.join(BODY_DIR_NAME).join(".write-probe");
        File::create(&probe).map_err(io_error("creating a file"))?;
        let _ = std::fs::remove_file(&probe);

        let path = spool_path(dir);
        let file = open_file(&path).map_err(io_error("opening the spool file"))?;
        lock_exclusive(&file).map_err(io_error("locking the spool file"))?;
        let checked = check_or_write_header(&file, &path);
        let _ = unlock(&file);
        let size = checked?;
        metrics.spool_bytes.add(size as i64);

        let (commands, receiver) = mpsc::channel();
        let writer = Writer {
            component: format!("spool {}", dir.display()),
            path,
            file: Some(file),
            size,
            dirty: false,
            failing: false,
            retry: VecDeque::new(),
            retry_bytes: 0,
            metrics: metrics.clone(),
            readiness,
        };
        std::thread::Builder::new()
            .name("tandem-spool".to_string())
            .spawn(move || writer.run(receiver, fsync_interval))
            .map_err(io_error("starting the writer thread"))?;
        tracing::info!(dir = %dir.display(), bytes = size, "dead-letter spool opened");
        Ok(Spool {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                commands: Mutex::new(Some(commands)),
                metrics,
                owner: Mutex::new(Some(owner)),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Returns the directory for large bodies awaiting delivery.
    pub fn body_dir(&self) -> PathBuf {
        self.shared.dir.join(BODY_DIR_NAME)
    }

    /// Hands a letter to the writer thread without waiting.
    pub fn submit(&self, letter: DeadLetter) {
        let commands = self
            .shared
            .commands
            .lock()
            .expect("spool channel lock is never poisoned");
        let sent = match commands.as_ref() {
            Some(sender) => sender.send(Command::Append(Box::new(letter))).map_err(|e| {
                let Command::Append(letter) = e.0 else {
                    unreachable!("only appends are sent here")
                };
                letter
            }),
            None => Err(Box::new(letter)),
        };
        if let Err(letter) = sent {
            self.shared.metrics.spool_write_errors.inc();
            tracing::error!(
                dir = %self.shared.dir.display(),
                route = %letter.meta.route,
                secondary = %letter.meta.secondary,
                idempotency_key = %letter.meta.idempotency_key,
                "dead letter lost: the spool was already closed"
            );
        }
    }

    /// Writes every letter handed over so far, flushes with fsync and stops
    /// the writer thread. Letters submitted later are lost and logged.
    pub async fn close(&self) {
        let sender = self
            .shared
            .commands
            .lock()
            .expect("spool channel lock is never poisoned")
            .take();
        let Some(sender) = sender else {
            return;
        };
        let (done, closed) = tokio::sync::oneshot::channel();
        if sender.send(Command::Close(done)).is_ok() {
            let _ = closed.await;
        }
        self.shared
            .owner
            .lock()
            .expect("spool owner lock is never poisoned")
            .take();
    }
}

// === impl Writer ===

impl Writer {
    fn run(mut self, commands: mpsc::Receiver<Command>, fsync_interval: Duration) {
        let mut last_sync = Instant::now();
        loop {
            let wait = if self.dirty || !self.retry.is_empty() {
                fsync_interval.saturating_sub(last_sync.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            match commands.recv_timeout(wait) {
                Ok(Command::Append(letter)) => self.append(letter),
                Ok(Command::Close(done)) => {
                    self.retry_failed();
                    self.sync();
                    let _ = done.send(());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.retry_failed();
                    self.sync();
                    return;
                }
            }
            if last_sync.elapsed() >= fsync_interval {
                self.retry_failed();
                self.sync();
                last_sync = Instant::now();
            }
        }
    }

    fn append(&mut self, letter: Box<DeadLetter>) {
        // Later letters wait behind earlier failed ones, so the file keeps
        // the order in which copies were spooled.
        if !self.retry.is_empty() {
            self.keep_for_retry(letter);
            return;
        }
        match self.write(&letter) {
            Ok(()) => self.recovered(),
            Err(error) => {
                self.failed(&error, &letter);
                self.keep_for_retry(letter);
            }
        }
    }

    fn retry_failed(&mut self) {
        while let Some(letter) = self.retry.pop_front() {
            match self.write(&letter) {
                Ok(()) => {
                    self.retry_bytes -= memory_bytes(&letter);
                    self.recovered();
                }
                Err(error) => {
                    self.failed(&error, &letter);
                    self.retry.push_front(letter);
                    return;
                }
            }
        }
    }

    fn keep_for_retry(&mut self, letter: Box<DeadLetter>) {
        self.retry_bytes += memory_bytes(&letter);
        self.retry.push_back(letter);
        while self.retry_bytes > MAX_RETRY_BYTES {
            let Some(lost) = self.retry.pop_front() else {
                break;
            };
            self.retry_bytes -= memory_bytes(&lost);
            tracing::error!(
                route = %lost.meta.route,
                secondary = %lost.meta.secondary,
                idempotency_key = %lost.meta.idempotency_key,
                max_bytes = MAX_RETRY_BYTES,
                "dead letter lost: the spool cannot be written and the letters waiting \
                 for it exceed the memory bound"
            );
        }
    }

    fn failed(&mut self, error: &io::Error, letter: &DeadLetter) {
        self.metrics.spool_write_errors.inc();
        self.failing = true;
        tracing::error!(
            %error,
            path = %self.path.display(),
            route = %letter.meta.route,
            secondary = %letter.meta.secondary,
            idempotency_key = %letter.meta.idempotency_key,
            "failed to write a dead letter to the spool; it stays in memory and is retried"
        );
        self.readiness.fail(
            &self.component,
            format!(
                "failed to write a dead letter to {}: {error}",
                self.path.display()
            ),
        );
    }

    fn recovered(&mut self) {
        self.dirty = true;
        if self.failing {
            self.failing = false;
            self.readiness.recover(&self.component);
            tracing::info!(path = %self.path.display(), "spool writes succeed again");
        }
    }

    /// Appends one record under the file lock. A failed append is cut off
    /// again, so the file never keeps half a record.
    fn write(&mut self, letter: &DeadLetter) -> io::Result<()> {
        let file = self.locked_file()?;
        let result = append_record(&file, letter);
        let _ = unlock(&file);
        self.file = Some(file);
        let size = result?;
        self.metrics.spool_bytes.add(size as i64 - self.size as i64);
        self.size = size;
        Ok(())
    }

    /// Returns the spool file, locked. A file that `tandem dlq replay`
    /// replaced or an operator deleted since the last append is reopened.
    fn locked_file(&mut self) -> io::Result<File> {
        loop {
            let file = match self.file.take() {
                Some(file) => file,
                None => {
                    let file = open_file(&self.path)?;
                    // The replaced file was counted at its old size.
                    self.metrics.spool_bytes.sub(self.size as i64);
                    self.size = 0;
                    file
                }
            };
            lock_exclusive(&file)?;
            let current = match std::fs::metadata(&self.path) {
                Ok(on_disk) => {
                    let open = file.metadata()?;
                    on_disk.ino() == open.ino() && on_disk.dev() == open.dev()
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => false,
                Err(error) => {
                    let _ = unlock(&file);
                    return Err(error);
                }
            };
            if current {
                if file.metadata()?.len() == 0 {
                    file.write_all_at(&format::file_header(), 0)?;
                }
                return Ok(file);
            }
            let _ = unlock(&file);
        }
    }

    fn sync(&mut self) {
        if !self.dirty {
            return;
        }
        let Some(file) = &self.file else {
            return;
        };
        match file.sync_data() {
            Ok(()) => self.dirty = false,
            Err(error) => {
                self.metrics.spool_write_errors.inc();
                tracing::error!(%error, path = %self.path.display(), "failed to fsync the spool");
                self.readiness.fail(
                    &self.component,
                    format!("failed to fsync {}: {error}", self.path.display()),
                );
                self.failing = true;
            }
        }
    }
}

fn memory_bytes(letter: &DeadLetter) -> u64 {
    match &letter.body {
        LetterBody::Memory(_) => letter.body.len(),
        LetterBody::File(_) => 0,
    }
}

fn open_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Writes the file header into an empty file, or checks the header of an
/// existing one. Returns the file size. The caller holds the lock.
fn check_or_write_header(file: &File, path: &Path) -> Result<u64, SpoolError> {
    let io_error = |source| SpoolError::Io {
        dir: path.parent().unwrap_or(path).display().to_string(),
        action: "reading the spool file header",
        source,
    };
    let len = file.metadata().map_err(io_error)?.len();
    if len == 0 {
        file.write_all_at(&format::file_header(), 0)
            .map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        return Ok(FILE_HEADER_LEN);
    }
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    if len < FILE_HEADER_LEN {
        return Err(SpoolError::NotASpool {
            path: path.display().to_string(),
        });
    }
    file.read_exact_at(&mut header, 0).map_err(io_error)?;
    match format::parse_file_header(&header) {
        Some(format::FORMAT_VERSION) => Ok(len),
        Some(found) => Err(SpoolError::UnsupportedVersion {
            path: path.display().to_string(),
            found,
        }),
        None => Err(SpoolError::NotASpool {
            path: path.display().to_string(),
        }),
    }
}

/// Appends one record at the end of `file` and returns the new file size.
fn append_record(file: &File, letter: &DeadLetter) -> io::Result<u64> {
    let start = file.metadata()?.len();
    let result = write_record_at(file, start, letter);
    if result.is_err() {
        let _ = file.set_len(start);
    }
    result
}

fn write_record_at(file: &File, start: u64, letter: &DeadLetter) -> io::Result<u64> {
    let meta = letter.meta.encode();
    let body_len = letter.body.len();
    let payload_len = 4 + meta.len() as u64 + 8 + body_len;
    let mut hasher = crc32fast::Hasher::new();
    let mut offset = start + format::RECORD_HEADER_LEN;
    let mut put = |bytes: &[u8], offset: &mut u64| -> io::Result<()> {
        hasher.update(bytes);
        file.write_all_at(bytes, *offset)?;
        *offset += bytes.len() as u64;
        Ok(())
    };

    // A zeroed record header until the payload is complete: a crash in
    // between leaves a record that readers report and skip.
    file.write_all_at(&[0u8; format::RECORD_HEADER_LEN as usize], start)?;
    put(&(meta.len() as u32).to_le_bytes(), &mut offset)?;
    put(&meta, &mut offset)?;
    put(&body_len.to_le_bytes(), &mut offset)?;
    match &letter.body {
        LetterBody::Memory(chunks) => {
            for chunk in chunks {
                put(chunk, &mut offset)?;
            }
        }
        LetterBody::File(body) => {
            let mut source = File::open(body.path())?.take(body_len);
            let mut buffer = vec![0u8; 64 * 1024];
            let mut copied = 0;
            loop {
                let n = source.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                put(&buffer[..n], &mut offset)?;
                copied += n as u64;
            }
            if copied != body_len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "body file {} has {copied} bytes, expected {body_len}",
                        body.path().display()
                    ),
                ));
            }
        }
    }
    let header = format::record_header(payload_len, hasher.finalize());
    file.write_all_at(&header, start)?;
    Ok(offset)
}

/// Deletes body files left by a proxy that stopped without settling their
/// copies. No queue refers to them any more.
fn remove_orphan_bodies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join(BODY_DIR_NAME)) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(
            dir = %dir.display(),
            files = removed,
            "deleted body files of copies that a previous run left unsettled"
        );
    }
}
