//! The dead-letter spool: fanout copies that were not delivered, kept on
//! disk until `tandem dlq replay` sends them.
//!
//! One spool directory contains the append-only file [`SPOOL_FILE_NAME`],
//! the `bodies/` directory with request bodies too large for memory while
//! their copies await delivery, and the lock files of the proxy that uses
//! the directory and of `tandem dlq replay`.
//! The file format is in [`format`]. Writers and `tandem dlq replay` take
//! an exclusive `flock(2)` on the spool file around each append and each
//! rewrite. A writer reopens the path when a rewrite replaced the file
//! under it, so the two never interleave bytes or lose an append.

pub mod format;
pub mod reader;
pub mod writer;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use bytes::Bytes;
use http::HeaderMap;

pub use format::{RecordMeta, FORMAT_VERSION};
pub use reader::{Entry, RecordEntry, SpoolReader};
pub use writer::Spool;

/// Name of the spool file inside the spool directory.
pub const SPOOL_FILE_NAME: &str = "dead-letter.spool";
/// Directory, inside the spool directory, of large bodies awaiting delivery.
pub const BODY_DIR_NAME: &str = "bodies";
/// Lock file that keeps two `tandem dlq replay` runs apart.
pub const REPLAY_LOCK_NAME: &str = "replay.lock";
/// Lock file a proxy holds while it uses the directory.
pub const PROXY_LOCK_NAME: &str = "proxy.lock";

/// A copy handed to the spool, with the metadata of its record.
pub struct DeadLetter {
    pub meta: RecordMeta,
    pub body: LetterBody,
}

/// The complete request body of a dead letter.
pub enum LetterBody {
    /// Chunks kept in memory.
    Memory(Vec<Bytes>),
    /// A body file in the spool directory. The file is deleted when the
    /// last reference is dropped, which is after its record is written.
    File(std::sync::Arc<BodyFile>),
}

/// A request body written to `bodies/` because it was larger than the
/// route's `max_body_bytes`. Dropping it deletes the file.
#[derive(Debug)]
pub struct BodyFile {
    path: PathBuf,
    len: u64,
}

/// Errors of opening or reading a spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool_dir {dir}: {action} failed: {source}")]
    Io {
        dir: String,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "spool_dir {dir} is in use by another tandem proxy; give each proxy its own \
         spool_dir"
    )]
    InUse { dir: String },
    #[error(
        "{path} is not a tandem dead-letter spool file: its first bytes are not the \
         spool magic number"
    )]
    NotASpool { path: String },
    #[error(
        "{path} has spool format version {found}, but this tandem reads version \
         {FORMAT_VERSION} only; use the tandem release that wrote it"
    )]
    UnsupportedVersion { path: String, found: u32 },
}

// === impl LetterBody ===

impl LetterBody {
    pub fn len(&self) -> u64 {
        match self {
            LetterBody::Memory(chunks) => chunks.iter().map(|c| c.len() as u64).sum(),
            LetterBody::File(file) => file.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// === impl BodyFile ===

impl BodyFile {
    /// Takes ownership of a complete body file of `len` bytes.
    pub fn new(path: PathBuf, len: u64) -> Self {
        Self { path, len }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(%error, path = %self.path.display(), "failed to delete a body file");
            }
        }
    }
}

// === helpers ===

/// Returns the path of the spool file in `dir`.
pub fn spool_path(dir: &Path) -> PathBuf {
    dir.join(SPOOL_FILE_NAME)
}

/// Takes an exclusive `flock(2)` on `file`, waiting for other holders.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive).map_err(io::Error::from)
}

/// Takes an exclusive `flock(2)` on `file` if the lock is free. Returns
/// false when another open file has it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

pub fn unlock(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::Unlock).map_err(io::Error::from)
}

/// Milliseconds since the Unix epoch; 0 for times before it.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Copies a header map into the record's byte form, keeping every value.
pub fn header_pairs(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests;
