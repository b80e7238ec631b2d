//! Reading a spool file: records with verified checksums, damaged spans
//! reported with their offsets, and the atomic rewrite used by replay.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use super::{
    format::{self, RecordMeta, FILE_HEADER_LEN, FORMAT_VERSION, RECORD_HEADER_LEN, RECORD_MARKER},
    SpoolError,
};

/// An open spool file whose header was checked.
pub struct SpoolReader {
    path: PathBuf,
    file: File,
}

/// One item of a spool file, in file order.
#[derive(Debug)]
pub enum Entry {
    Record(Box<RecordEntry>),
    /// Bytes that do not form a valid record. Readers skip them.
    Corrupt(CorruptSpan),
}

/// A record whose checksum matched.
#[derive(Debug, Clone)]
pub struct RecordEntry {
    /// Byte offset of the record header in the file.
    pub offset: u64,
    /// Record size in bytes, header included.
    pub len: u64,
    pub meta: RecordMeta,
    pub body_offset: u64,
    pub body_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptSpan {
    pub offset: u64,
    pub len: u64,
    pub reason: String,
}

/// Why the bytes at an offset are not a record, and where reading goes on:
/// after the record when its header was intact, else at the next valid
/// record header.
struct Damage {
    reason: String,
    next: Option<u64>,
}

impl SpoolReader {
    /// Opens a spool file and checks its header. A file of another format
    /// version is rejected, never read as this one.
    pub fn open(path: &Path) -> Result<Self, SpoolError> {
        let io_error = |action| {
            let dir = path.parent().unwrap_or(path).display().to_string();
            move |source| SpoolError::Io {
                dir,
                action,
                source,
            }
        };
        let file = File::open(path).map_err(io_error("opening the spool file"))?;
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        let len = file
            .metadata()
            .map_err(io_error("reading the spool file"))?
            .len();
        if len < FILE_HEADER_LEN {
            return Err(SpoolError::NotASpool {
                path: path.display().to_string(),
            });
        }
        file.read_exact_at(&mut header, 0)
            .map_err(io_error("reading the spool file"))?;
        match format::parse_file_header(&header) {
            Some(FORMAT_VERSION) => Ok(Self {
                path: path.to_path_buf(),
                file,
            }),
            Some(found) => Err(SpoolError::UnsupportedVersion {
                path: path.display().to_string(),
                found,
            }),
            None => Err(SpoolError::NotASpool {
                path: path.display().to_string(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? <= FILE_HEADER_LEN)
    }

    /// Reads every entry between the file header and `end`.
    pub fn scan(&self, end: u64) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut pos = FILE_HEADER_LEN;
        while pos < end {
            match self.read_record(pos, end)? {
                Ok(record) => {
                    pos += record.len;
                    entries.push(Entry::Record(Box::new(record)));
                }
                Err(damage) => {
                    let next = match damage.next {
                        Some(next) => next,
                        None => self.find_next_header(pos + 1, end)?.unwrap_or(end),
                    };
                    entries.push(Entry::Corrupt(CorruptSpan {
                        offset: pos,
                        len: next - pos,
                        reason: damage.reason,
                    }));
                    pos = next;
                }
            }
        }
        Ok(entries)
    }

    /// Returns a reader of a record's body.
    pub fn body(&self, record: &RecordEntry) -> io::Result<impl Read> {
        let mut file = self.file.try_clone()?;
        io::Seek::seek(&mut file, io::SeekFrom::Start(record.body_offset))?;
        Ok(file.take(record.body_len))
    }

    fn read_record(&self, pos: u64, end: u64) -> io::Result<Result<RecordEntry, Damage>> {
        let damaged = |reason: &str, next: Option<u64>| {
            Ok(Err(Damage {
                reason: reason.to_string(),
                next,
            }))
        };
        if end - pos < RECORD_HEADER_LEN {
            return damaged("truncated record header", Some(end));
        }
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        self.file.read_exact_at(&mut header, pos)?;
        let Some(header) = format::parse_record_header(&header) else {
            return damaged("damaged record header", None);
        };
        let payload = pos + RECORD_HEADER_LEN;
        if header.payload_len > end - payload {
            return damaged("record extends past the end of the file", None);
        }
        let next = payload + header.payload_len;
        if header.payload_len < 12 {
            return damaged(
                "record payload is shorter than its fixed fields",
                Some(next),
            );
        }

        let mut meta_len = [0u8; 4];
        self.file.read_exact_at(&mut meta_len, payload)?;
        let meta_size = u32::from_le_bytes(meta_len) as u64;
        if 4 + meta_size + 8 > header.payload_len {
            return damaged("metadata length exceeds the record", Some(next));
        }
        let mut meta = vec![0u8; meta_size as usize];
        self.file.read_exact_at(&mut meta, payload + 4)?;
        let mut body_len = [0u8; 8];
        self.file
            .read_exact_at(&mut body_len, payload + 4 + meta_size)?;
        let body_size = u64::from_le_bytes(body_len);
        let body_offset = payload + 4 + meta_size + 8;
        if body_offset.checked_add(body_size) != Some(next) {
            return damaged("body length does not match the record length", Some(next));
        }

        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&meta_len);
        hasher.update(&meta);
        hasher.update(&body_len);
        let mut body = self.file.try_clone()?;
        io::Seek::seek(&mut body, io::SeekFrom::Start(body_offset))?;
        format::hash_exact(&mut body, body_size, &mut hasher)?;
        if hasher.finalize() != header.payload_crc {
            return damaged("checksum mismatch", Some(next));
        }
        match RecordMeta::decode(&meta) {
            Ok(meta) => Ok(Ok(RecordEntry {
                offset: pos,
                len: next - pos,
                meta,
                body_offset,
                body_len: body_size,
            })),
            Err(error) => damaged(&format!("invalid metadata: {error}"), Some(next)),
        }
    }

    /// Finds the next offset from `from` with a valid record header whose
    /// record ends within `end`.
    fn find_next_header(&self, from: u64, end: u64) -> io::Result<Option<u64>> {
        const CHUNK: u64 = 64 * 1024;
        let mut start = from;
        let mut buffer = vec![0u8; CHUNK as usize];
        while start + RECORD_HEADER_LEN <= end {
            let want = CHUNK.min(end - start) as usize;
            self.file.read_exact_at(&mut buffer[..want], start)?;
            for i in 0..want.saturating_sub(RECORD_MARKER.len() - 1) {
                if buffer[i..i + RECORD_MARKER.len()] != RECORD_MARKER {
                    continue;
                }
                let candidate = start + i as u64;
                if end - candidate < RECORD_HEADER_LEN {
                    return Ok(None);
                }
                let mut header = [0u8; RECORD_HEADER_LEN as usize];
                self.file.read_exact_at(&mut header, candidate)?;
                if let Some(header) = format::parse_record_header(&header) {
                    if header.payload_len <= end - candidate - RECORD_HEADER_LEN {
                        return Ok(Some(candidate));
                    }
                }
            }
            // Overlap by the marker length so a marker across chunks is found.
            start += (want as u64)
                .saturating_sub(RECORD_MARKER.len() as u64 - 1)
                .max(1);
        }
        Ok(None)
    }
}

/// Replaces the spool file at `path` with a new one that keeps the byte
/// ranges `keep` of `source` and everything of `source` from `tail_from` to
/// its current end. The new file is written beside the old one, flushed
/// with fsync and renamed over it, so readers see either file whole. The
/// caller holds the lock on `source`.
pub fn rewrite(path: &Path, source: &File, keep: &[(u64, u64)], tail_from: u64) -> io::Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.rewrite-{}",
        super::SPOOL_FILE_NAME,
        std::process::id()
    ));
    let result = write_rewritten(&temp, source, keep, tail_from);
    let size = match result {
        Ok(size) => size,
        Err(error) => {
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
    };
    std::fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(size)
}

fn write_rewritten(
    temp: &Path,
    source: &File,
    keep: &[(u64, u64)],
    tail_from: u64,
) -> io::Result<u64> {
    let mut out = io::BufWriter::new(File::create(temp)?);
    out.write_all(&format::file_header())?;
    let mut size = FILE_HEADER_LEN;
    let end = source.metadata()?.len();
    let ranges = keep
        .iter()
        .copied()
        .chain(std::iter::once((tail_from, end.saturating_sub(tail_from))));
    for (offset, len) in ranges {
        let mut reader = source.try_clone()?;
        io::Seek::seek(&mut reader, io::SeekFrom::Start(offset))?;
        let copied = io::copy(&mut reader.take(len), &mut out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool file shrank while it was rewritten",
            ));
        }
        size += len;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(size)
}
