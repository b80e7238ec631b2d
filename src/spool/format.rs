//! The spool file format, version 1. All integers are little-endian.
//!
//! ```text
//! file header, 16 bytes:
//!   magic    8 bytes  "TNDMDLQ\0"
//!   version  u32      1
//!   flags    u32      0, reserved
//! then records, each:
//!   marker       4 bytes  "TDLR"
//!   payload_len  u64      bytes of payload that follow the record header
//!   payload_crc  u32      CRC-32 (IEEE) of the payload
//!   header_crc   u32      CRC-32 (IEEE) of the 16 bytes before it
//!   payload:
//!     meta_len   u32, then meta_len bytes of metadata (below)
//!     body_len   u64, then body_len bytes of request body
//! metadata, in this order:
//!   accepted_at_ms u64, dead_lettered_at_ms u64 (Unix epoch milliseconds)
//!   attempts u32, http_version u8 (1 = HTTP/1.1, 2 = HTTP/2)
//!   route, secondary, reason, method, url, idempotency_key, first_error,
//!   last_error: each a string (u32 length, then UTF-8 bytes)
//!   headers: u32 count, then per header a name string and a value
//!     (u32 length, then the raw value bytes)
//!   has_trailers u8 (0 or 1), then trailers in the form of headers
//! ```
//!
//! The header checksum lets a reader trust `payload_len` before it reads
//! the payload, and the marker lets it find the next record after a damaged
//! record header.

use std::io::{self, Read};

/// Magic number at the start of every spool file.
pub const MAGIC: [u8; 8] = *b"TNDMDLQ\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const FILE_HEADER_LEN: u64 = 16;
/// Marker at the start of every record.
pub const RECORD_MARKER: [u8; 4] = *b"TDLR";
pub const RECORD_HEADER_LEN: u64 = 20;

/// Everything a record stores except the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// When the proxy accepted the copy.
    pub accepted_at_ms: u64,
    /// When the copy was handed to the spool.
    pub dead_lettered_at_ms: u64,
    /// Attempts made before the copy was spooled; 0 when none was made.
    pub attempts: u32,
    /// 1 for HTTP/1.1, 2 for HTTP/2.
    pub http_version: u8,
    pub route: String,
    /// The secondary's configured base URL.
    pub secondary: String,
    pub reason: String,
    pub method: String,
    /// The full URL the copy is sent to.
    pub url: String,
    pub idempotency_key: String,
    /// Error of the first failed attempt; empty when none was made.
    pub first_error: String,
    /// Error of the last failed attempt; empty when none was made.
    pub last_error: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub trailers: Option<Vec<(String, Vec<u8>)>>,
}

/// Returns the 16-byte file header of this format version.
pub fn file_header() -> [u8; FILE_HEADER_LEN as usize] {
    let mut header = [0u8; FILE_HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// Checks a file header. Returns the version it names, or `None` when the
/// magic number is wrong.
pub fn parse_file_header(header: &[u8; FILE_HEADER_LEN as usize]) -> Option<u32> {
    if header[..8] != MAGIC {
        return None;
    }
    Some(u32::from_le_bytes(
        header[8..12].try_into().expect("4 bytes"),
    ))
}

/// Builds a record header for a payload of `payload_len` bytes.
pub fn record_header(payload_len: u64, payload_crc: u32) -> [u8; RECORD_HEADER_LEN as usize] {
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    header[..4].copy_from_slice(&RECORD_MARKER);
    header[4..12].copy_from_slice(&payload_len.to_le_bytes());
    header[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..16]);
    header[16..20].copy_from_slice(&header_crc.to_le_bytes());
    header
}

/// A record header whose marker and checksum are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub payload_len: u64,
    pub payload_crc: u32,
}

/// Parses a record header; `None` when the marker or checksum is wrong.
pub fn parse_record_header(header: &[u8; RECORD_HEADER_LEN as usize]) -> Option<RecordHeader> {
    if header[..4] != RECORD_MARKER {
        return None;
    }
    let stored_crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if crc32fast::hash(&header[..16]) != stored_crc {
        return None;
    }
    Some(RecordHeader {
        payload_len: u64::from_le_bytes(header[4..12].try_into().expect("8 bytes")),
        payload_crc: u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")),
    })
}

// === metadata ===

impl RecordMeta {
    /// Encodes the metadata in the record's byte form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&self.accepted_at_ms.to_le_bytes());
        out.extend_from_slice(&self.dead_lettered_at_ms.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.push(self.http_version);
        for text in [
            &self.route,
            &self.secondary,
            &self.reason,
            &self.method,
            &self.url,
            &self.idempotency_key,
            &self.first_error,
            &self.last_error,
        ] {
            put_bytes(&mut out, text.as_bytes());
        }
        put_headers(&mut out, &self.headers);
        match &self.trailers {
            Some(trailers) => {
                out.push(1);
                put_headers(&mut out, trailers);
            }
            None => out.push(0),
        }
        out
    }

    /// Decodes metadata written by [`RecordMeta::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut input = bytes;
        let accepted_at_ms = u64::from_le_bytes(take_array(&mut input)?);
        let dead_lettered_at_ms = u64::from_le_bytes(take_array(&mut input)?);
        let attempts = u32::from_le_bytes(take_array(&mut input)?);
        let [http_version] = take_array::<1>(&mut input)?;

        let mut text = || take_string(&mut input);
        let route = text()?;
        let secondary = text()?;
        let reason = text()?;
        let method = text()?;
        let url = text()?;
        let idempotency_key = text()?;
        let first_error = text()?;
        let last_error = text()?;

        let headers = take_headers(&mut input)?;
        let [has_trailers] = take_array::<1>(&mut input)?;
        let trailers = match has_trailers {
            0 => None,
            1 => Some(take_headers(&mut input)?),
            other => return Err(format!("invalid trailer flag {other}")),
        };
        if !input.is_empty() {
            return Err(format!(
                "{} unexpected bytes after the metadata",
                input.len()
            ));
        }

        Ok(Self {
            accepted_at_ms,
            dead_lettered_at_ms,
            attempts,
            http_version,
            route,
            secondary,
            reason,
            method,
            url,
            idempotency_key,
            first_error,
            last_error,
            headers,
            trailers,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)]) {
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

fn take_array<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], String> {
    if input.len() < N {
        return Err("metadata ends early".to_string());
    }
    let (head, rest) = input.split_at(N);
    *input = rest;
    Ok(head.try_into().expect("split at N"))
}

fn take_bytes<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = u32::from_le_bytes(take_array(input)?) as usize;
    if input.len() < len {
        return Err("metadata ends early".to_string());
    }
    let (head, rest) = input.split_at(len);
    *input = rest;
    Ok(head)
}

fn take_string(input: &mut &[u8]) -> Result<String, String> {
    let bytes = take_bytes(input)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| "a text field is not UTF-8".to_string())
}

fn take_headers(input: &mut &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let count = u32::from_le_bytes(take_array(input)?) as usize;
    // Each header needs at least 8 bytes, so a larger count is damage, not
    // a reason to allocate.
    if count > input.len() / 8 {
        return Err(format!("header count {count} exceeds the metadata size"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_string(input)?;
        let value = take_bytes(input)?.to_vec();
        headers.push((name, value));
    }
    Ok(headers)
}

/// Feeds `len` bytes from `reader` into `hasher`, in bounded chunks.
pub fn hash_exact(
    reader: &mut impl Read,
    mut len: u64,
    hasher: &mut crc32fast::Hasher,
) -> io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    while len > 0 {
        let want = buffer.len().min(len as usize);
        reader.read_exact(&mut buffer[..want])?;
        hasher.update(&buffer[..want]);
        len -= want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordMeta {
        RecordMeta {
            accepted_at_ms: 1_700_000_000_000,
            dead_lettered_at_ms: 1_700_000_001_000,
            attempts: 6,
            http_version: 1,
            route: "audit".into(),
            secondary: "http://127.0.0.1:9191".into(),
            reason: "attempts_exhausted".into(),
            method: "POST".into(),
            url: "http://127.0.0.1:9191/orders?id=1".into(),
            idempotency_key: "4f8e".into(),
            first_error: "connect-failure: refused".into(),
            last_error: "5xx: 503".into(),
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-raw".into(), vec![0x80, 0xff]),
            ],
            trailers: Some(vec![("grpc-status".into(), b"0".to_vec())]),
        }
    }

    #[test]
    fn meta_round_trips() {
        let meta = sample();
        assert_eq!(RecordMeta::decode(&meta.encode()), Ok(meta));
        let without_trailers = RecordMeta {
            trailers: None,
            ..sample()
        };
        assert_eq!(
            RecordMeta::decode(&without_trailers.encode()),
            Ok(without_trailers)
        );
    }

    #[test]
    fn truncated_meta_is_rejected() {
        let bytes = sample().encode();
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                RecordMeta::decode(&bytes[..cut]).is_err(),
                "decoding {cut} of {} bytes must fail",
                bytes.len()
            );
        }
    }

    #[test]
    fn record_header_checks_marker_and_crc() {
        let header = record_header(1234, 0xdead_beef);
        assert_eq!(
            parse_record_header(&header),
            Some(RecordHeader {
                payload_len: 1234,
                payload_crc: 0xdead_beef
            })
        );
        for i in 0..header.len() {
            let mut damaged = header;
            damaged[i] ^= 0x01;
            assert_eq!(
                parse_record_header(&damaged),
                None,
                "flipped bit in byte {i}"
            );
        }
    }

    #[test]
    fn file_header_names_version() {
        assert_eq!(parse_file_header(&file_header()), Some(FORMAT_VERSION));
        let mut other = file_header();
        other[0] = b'X';
        assert_eq!(parse_file_header(&other), None);
    }
}
