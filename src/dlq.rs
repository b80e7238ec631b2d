//! `tandem dlq list` and `tandem dlq replay`: reading the dead-letter spool
//! and re-sending its records.
//!
//! Replay keeps `replay.lock` in the spool directory locked for its whole
//! run, so two replays never overlap. It locks the spool file only while it
//! reads the records and while it rewrites the file, so a running proxy
//! keeps appending in between. The rewrite copies those appended records
//! into the new file. Records are removed only after their secondary
//! responded with a 2xx status.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::BodyExt;

use crate::{
    proxy::{
        client::{self, Client, Proto},
        secondary::{file_body, PreparedRequest, SecondaryUrl},
    },
    spool::{
        self, lock_exclusive, reader, spool_path, try_lock_exclusive, unlock, Entry, RecordEntry,
        SpoolReader, REPLAY_LOCK_NAME,
    },
};

/// Record filter of a command.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub route: Option<String>,
    /// Only records dead-lettered at or after this time.
    pub since: Option<SystemTime>,
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub dry_run: bool,
    /// Timeout of one re-sent request, response body included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra trust roots for `https://` secondaries, beyond the Mozilla
    /// root store.
    pub trusted_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// Counts of one command run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub selected: usize,
    pub delivered: usize,
    pub failed: usize,
    pub corrupt: usize,
}

/// Parses `--since`: a duration back from now such as `90m` or `2h`, or an
/// RFC 3339 time such as `2024-05-01T12:00:00Z`.
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "invalid --since {text:?}: expected a duration such as 30m or 2h, or a time \
             such as 2024-05-01T12:00:00Z"
        )
    })
}

impl Filter {
    fn selects(&self, record: &RecordEntry) -> bool {
        if let Some(route) = &self.route {
            if record.meta.route != *route {
                return false;
            }
        }
        if let Some(since) = self.since {
            if record.meta.dead_lettered_at_ms < spool::unix_millis(since) {
                return false;
            }
        }
        true
    }
}

/// Prints the selected records of every spool directory to `out`, one per
/// line after a header line, and damaged records to `err`.
pub fn list(
    dirs: &[PathBuf],
    filter: &Filter,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    // A missing directory fails before anything is printed, so a script
    // that reads the output never gets a header without records.
    for dir in dirs {
        if !dir.is_dir() {
            anyhow::bail!(
                "spool directory {} not found: check --spool-dir, or spool_dir in the config's \
                 fanout routes",
                dir.display()
            );
        }
    }
    writeln!(
        out,
        "TIME\tROUTE\tSECONDARY\tMETHOD\tURL\tREASON\tATTEMPTS\tSIZE\tIDEMPOTENCY-KEY\tLAST-ERROR"
    )?;
    for dir in dirs {
        let Some(reader) = open_spool(dir, err)? else {
            continue;
        };
        lock_exclusive(reader.file()).context("failed to lock the spool file")?;
        let end = reader.len();
        let entries = end.and_then(|end| reader.scan(end));
        let _ = unlock(reader.file());
        let entries =
            entries.with_context(|| format!("failed to read {}", reader.path().display()))?;
        for entry in &entries {
            match entry {
                Entry::Record(record) if filter.selects(record) => {
                    totals.selected += 1;
                    let meta = &record.meta;
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        format_time(meta.dead_lettered_at_ms),
                        meta.route,
                        meta.secondary,
                        meta.method,
                        meta.url,
                        meta.reason,
                        meta.attempts,
                        record.body_len,
                        meta.idempotency_key,
                        meta.last_error,
                    )?;
                }
                Entry::Record(_) => {}
                Entry::Corrupt(span) => {
                    totals.corrupt += 1;
                    report_corrupt(err, reader.path(), span)?;
                }
            }
        }
    }
    Ok(totals)
}

/// Re-sends the selected records of every spool directory and removes
/// those that got a 2xx response. With `dry_run` it only prints what it
/// would send.
pub async fn replay(
    dirs: &[PathBuf],
    filter: &Filter,
    options: &ReplayOptions,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<Totals> {
    let client = Client::new(
        options.connect_timeout,
        &client::tls_config(&options.trusted_roots),
    );
    let mut totals = Totals::default();
    for dir in dirs {
        replay_dir(dir, filter, options, &client, &mut totals, out, err).await?;
    }
    Ok(totals)
}

async fn replay_dir(
    dir: &Path,
    filter: &Filter,
    options: &ReplayOptions,
    client: &Client,
    totals: &mut Totals,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    let lock_path = dir.join(REPLAY_LOCK_NAME);
    let replay_lock = File::create(&lock_path)
        .with_context(|| format!("failed to create {}", lock_path.display()))?;
    if !try_lock_exclusive(&replay_lock)? {
        bail!(
            "another tandem dlq replay is running on {}; wait for it to finish",
            dir.display()
        );
    }
    let Some(reader) = open_spool(dir, err)? else {
        return Ok(());
    };

    lock_exclusive(reader.file()).context("failed to lock the spool file")?;
    let scanned = reader.len().and_then(|end| Ok((end, reader.scan(end)?)));
    let _ = unlock(reader.file());
    let (end, entries) =
        scanned.with_context(|| format!("failed to read {}", reader.path().display()))?;

    let mut delivered = Vec::new();
    for entry in &entries {
        let record = match entry {
            Entry::Record(record) if filter.selects(record) => record,
            Entry::Record(_) => continue,
            Entry::Corrupt(span) => {
                totals.corrupt += 1;
                report_corrupt(err, reader.path(), span)?;
                continue;
            }
        };
        totals.selected += 1;
        let meta = &record.meta;
        let what = format!(
            "{} {} (route {}, idempotency key {})",
            meta.method, meta.url, meta.route, meta.idempotency_key
        );
        if options.dry_run {
            writeln!(out, "would send {what}")?;
            continue;
        }
        let sent = tokio::time::timeout(options.timeout, send(client, &reader, record)).await;
        match sent {
            Ok(Ok(status)) if status.is_success() => {
                totals.delivered += 1;
                delivered.push(record.offset);
                writeln!(out, "delivered {what}: {status}")?;
            }
            Ok(Ok(status)) => {
                totals.failed += 1;
                writeln!(out, "failed {what}: {status}; the record stays")?;
            }
            Ok(Err(error)) => {
                totals.failed += 1;
                writeln!(
                    out,
                    "failed {what}: {}; the record stays",
                    crate::errors::chain_message(&error)
                )?;
            }
            Err(_) => {
                totals.failed += 1;
                writeln!(
                    out,
                    "failed {what}: no response within {:?}; the record stays",
                    options.timeout
                )?;
            }
        }
    }
    if delivered.is_empty() {
        return Ok(());
    }

    // Everything except the delivered records is kept: other records,
    // damaged spans (still reported by later runs) and whatever a proxy
    // appended since the scan.
    let keep: Vec<(u64, u64)> = entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::Record(record) if delivered.contains(&record.offset) => None,
            Entry::Record(record) => Some((record.offset, record.len)),
            Entry::Corrupt(span) => Some((span.offset, span.len)),
        })
        .collect();
    lock_exclusive(reader.file()).context("failed to lock the spool file")?;
    let rewritten = same_file(reader.file(), reader.path()).and_then(|same| {
        if !same {
            bail!(
                "{} was replaced while replay ran, so no record was removed; the \
                 delivered records will be sent again by the next replay",
                reader.path().display()
            );
        }
        Ok(reader::rewrite(reader.path(), reader.file(), &keep, end)?)
    });
    let _ = unlock(reader.file());
    rewritten.with_context(|| format!("failed to rewrite {}", reader.path().display()))?;
    Ok(())
}

/// Sends one record and reads the response to its end.
async fn send(
    client: &Client,
    reader: &SpoolReader,
    record: &RecordEntry,
) -> anyhow::Result<http::StatusCode> {
    let meta = &record.meta;
    let url: http::Uri = meta
        .url
        .parse()
        .with_context(|| format!("invalid URL {:?} in the record", meta.url))?;
    let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
        bail!("URL {:?} in the record is not absolute", meta.url);
    };
    let secondary =
        SecondaryUrl::parse(&format!("{scheme}://{authority}")).map_err(anyhow::Error::msg)?;
    let proto = match meta.http_version {
        2 => Proto::Http2,
        _ => Proto::Http1,
    };
    let prepared = PreparedRequest {
        method: Method::from_bytes(meta.method.as_bytes())
            .with_context(|| format!("invalid method {:?} in the record", meta.method))?,
        proto,
        scheme: scheme.clone(),
        authority: authority.clone(),
        path_and_query: url
            .path_and_query()
            .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
        headers: header_map(&meta.headers)?,
    };
    let trailers = meta.trailers.as_deref().map(header_map).transpose()?;
    let body = file_body(reader.path(), record.body_offset, record.body_len, trailers)?;
    let mut request = prepared.build(Some(meta.attempts + 1), body);
    request.headers_mut().insert(
        crate::config::DISPATCH_HEADER,
        HeaderValue::from_static("fanout"),
    );

    let addr = secondary.resolve().await?;
    let response = client
        .send(&secondary.endpoint(addr, proto), request)
        .await?;
    let (parts, body) = response.into_parts();
    body.collect().await.context("the response body failed")?;
    Ok(parts.status)
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("invalid header name {name:?} in the record"))?;
        let value = HeaderValue::from_bytes(value)
            .with_context(|| format!("invalid value of header {name} in the record"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Opens the spool of `dir`; `None` (after a note on `err`) when the
/// directory has no spool file yet.
fn open_spool(dir: &Path, err: &mut impl Write) -> anyhow::Result<Option<SpoolReader>> {
    if !dir.is_dir() {
        anyhow::bail!(
            "spool directory {} not found: check --spool-dir, or spool_dir in the config's \
             fanout routes",
            dir.display()
        );
    }
    let path = spool_path(dir);
    if !path.exists() {
        writeln!(err, "tandem: no spool file in {}", dir.display())?;
        return Ok(None);
    }
    Ok(Some(SpoolReader::open(&path)?))
}

fn same_file(file: &File, path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    let on_disk = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    Ok(open.ino() == on_disk.ino() && open.dev() == on_disk.dev())
}

fn report_corrupt(
    err: &mut impl Write,
    path: &Path,
    span: &reader::CorruptSpan,
) -> std::io::Result<()> {
    writeln!(
        err,
        "tandem: {}: corrupt record at byte offset {} ({} bytes): {}; skipped",
        path.display(),
        span.offset,
        span.len,
        span.reason
    )
}

fn format_time(unix_ms: u64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_and_times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_since("2h", now), Ok(now - Duration::from_secs(7200)));
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        let error = parse_since("yesterday", now).unwrap_err();
        assert!(error.contains("yesterday"), "{error}");
    }
}
