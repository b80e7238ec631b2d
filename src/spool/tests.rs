use std::{
    os::unix::fs::FileExt,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use super::{
    format::{FILE_HEADER_LEN, RECORD_HEADER_LEN},
    reader::rewrite,
    *,
};
use crate::{proxy::metrics::Metrics, readiness::Readiness};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tandem-spool-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn letter(n: u32, body: &str) -> DeadLetter {
    DeadLetter {
        meta: RecordMeta {
            accepted_at_ms: 1_000 + n as u64,
            dead_lettered_at_ms: 2_000 + n as u64,
            attempts: n,
            http_version: 1,
            route: "audit".into(),
            secondary: "http://127.0.0.1:9191".into(),
            reason: "attempts_exhausted".into(),
            method: "POST".into(),
            url: format!("http://127.0.0.1:9191/orders/{n}"),
            idempotency_key: format!("key-{n}"),
            first_error: "connect-failure".into(),
            last_error: "5xx: status 503".into(),
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            trailers: None,
        },
        body: LetterBody::Memory(vec![Bytes::from(body.to_string())]),
    }
}

async fn write_letters(dir: &Path, letters: Vec<DeadLetter>) -> Metrics {
    let metrics = Metrics::new();
    let spool = Spool::open(
        dir,
        Duration::from_millis(10),
        metrics.fanout().clone(),
        Readiness::new(),
    )
    .expect("spool opens");
    for letter in letters {
        spool.submit(letter);
    }
    spool.close().await;
    metrics
}

fn records(dir: &Path) -> (SpoolReader, Vec<Entry>) {
    let reader = SpoolReader::open(&spool_path(dir)).expect("spool reads");
    let end = reader.len().unwrap();
    let entries = reader.scan(end).unwrap();
    (reader, entries)
}

fn body_of(reader: &SpoolReader, record: &RecordEntry) -> String {
    let mut body = String::new();
    std::io::Read::read_to_string(&mut reader.body(record).unwrap(), &mut body).unwrap();
    body
}

fn record_offsets(entries: &[Entry]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::Record(record) => Some(record.offset),
            Entry::Corrupt(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn letters_round_trip() {
    let dir = TempDir::new();
    let file_body = dir.0.join("big.body");
    std::fs::write(&file_body, b"from a file").unwrap();
    let mut from_file = letter(3, "");
    from_file.body = LetterBody::File(std::sync::Arc::new(BodyFile::new(file_body.clone(), 11)));
    from_file.meta.trailers = Some(vec![("grpc-status".into(), b"0".to_vec())]);

    let metrics = write_letters(&dir.0, vec![letter(1, "one"), letter(2, ""), from_file]).await;

    let (reader, entries) = records(&dir.0);
    assert_eq!(entries.len(), 3, "{entries:?}");
    let bodies: Vec<String> = entries
        .iter()
        .map(|entry| match entry {
            Entry::Record(record) => body_of(&reader, record),
            Entry::Corrupt(span) => panic!("unexpected damage {span:?}"),
        })
        .collect();
    assert_eq!(bodies, vec!["one", "", "from a file"]);
    let Entry::Record(third) = &entries[2] else {
        unreachable!()
    };
    assert_eq!(third.meta.idempotency_key, "key-3");
    assert_eq!(
        third.meta.trailers,
        Some(vec![("grpc-status".to_string(), b"0".to_vec())])
    );
    assert!(!file_body.exists(), "the body file is deleted once spooled");
    assert_eq!(
        metrics.fanout().spool_bytes.get() as u64,
        reader.len().unwrap(),
        "the gauge counts the file size"
    );
}

#[tokio::test]
async fn flipped_body_byte_is_skipped() {
    let dir = TempDir::new();
    write_letters(
        &dir.0,
        vec![letter(1, "first"), letter(2, "second"), letter(3, "third")],
    )
    .await;
    let (_, entries) = records(&dir.0);
    let offsets = record_offsets(&entries);
    let Entry::Record(second) = &entries[1] else {
        unreachable!()
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(spool_path(&dir.0))
        .unwrap();
    file.write_all_at(b"X", second.body_offset + 2).unwrap();

    let (reader, entries) = records(&dir.0);
    assert_eq!(entries.len(), 3, "{entries:?}");
    let Entry::Corrupt(span) = &entries[1] else {
        panic!("the second record must be reported: {entries:?}");
    };
    assert_eq!(span.offset, offsets[1]);
    assert_eq!(span.reason, "checksum mismatch");
    let Entry::Record(third) = &entries[2] else {
        panic!("the third record must still be read: {entries:?}");
    };
    assert_eq!(body_of(&reader, third), "third");
}

#[tokio::test]
async fn flipped_header_byte_is_skipped() {
    let dir = TempDir::new();
    write_letters(
        &dir.0,
        vec![letter(1, "first"), letter(2, "second"), letter(3, "third")],
    )
    .await;
    let (_, entries) = records(&dir.0);
    let offsets = record_offsets(&entries);
    // Byte 6 is inside the payload length of the second record.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(spool_path(&dir.0))
        .unwrap();
    file.write_all_at(&[0x7f], offsets[1] + 6).unwrap();

    let (reader, entries) = records(&dir.0);
    let Entry::Corrupt(span) = &entries[1] else {
        panic!("the second record must be reported: {entries:?}");
    };
    assert_eq!(span.offset, offsets[1]);
    assert_eq!(span.len, offsets[2] - offsets[1]);
    assert_eq!(span.reason, "damaged record header");
    assert_eq!(record_offsets(&entries), vec![offsets[0], offsets[2]]);
    let Entry::Record(third) = &entries[2] else {
        unreachable!()
    };
    assert_eq!(body_of(&reader, third), "third");
}

#[tokio::test]
async fn truncated_tail_is_reported() {
    let dir = TempDir::new();
    write_letters(&dir.0, vec![letter(1, "first"), letter(2, "second")]).await;
    let path = spool_path(&dir.0);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 3).unwrap();

    let (_, entries) = records(&dir.0);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(matches!(entries[0], Entry::Record(_)));
    let Entry::Corrupt(span) = &entries[1] else {
        panic!("the cut record must be reported: {entries:?}");
    };
    assert_eq!(span.reason, "record extends past the end of the file");
}

#[tokio::test]
async fn newer_version_is_rejected() {
    let dir = TempDir::new();
    let mut header = format::file_header();
    header[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(spool_path(&dir.0), header).unwrap();

    let error = SpoolReader::open(&spool_path(&dir.0))
        .err()
        .expect("version 2 is rejected")
        .to_string();
    assert!(error.contains("version 2"), "{error}");
    assert!(error.contains("version 1"), "{error}");

    let error = Spool::open(
        &dir.0,
        Duration::from_secs(1),
        Metrics::new().fanout().clone(),
        Readiness::new(),
    )
    .err()
    .expect("the writer rejects it too")
    .to_string();
    assert!(error.contains("version 2"), "{error}");
}

#[tokio::test]
async fn foreign_file_is_rejected() {
    let dir = TempDir::new();
    std::fs::write(spool_path(&dir.0), b"not a spool file at all").unwrap();
    let error = SpoolReader::open(&spool_path(&dir.0))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("not a tandem dead-letter spool"), "{error}");
}

#[tokio::test]
async fn writer_follows_rewritten_file() {
    let dir = TempDir::new();
    let spool = Spool::open(
        &dir.0,
        Duration::from_millis(10),
        Metrics::new().fanout().clone(),
        Readiness::new(),
    )
    .unwrap();
    spool.submit(letter(1, "first"));
    spool.submit(letter(2, "second"));
    wait_for_records(&dir.0, 2).await;

    // What replay does: scan under the lock, then rewrite without the
    // first record while keeping anything appended after the scan.
    let (reader, entries) = records(&dir.0);
    let end = reader.len().unwrap();
    spool.submit(letter(3, "third"));
    wait_for_records(&dir.0, 3).await;
    lock_exclusive(reader.file()).unwrap();
    let Entry::Record(second) = &entries[1] else {
        unreachable!()
    };
    rewrite(
        reader.path(),
        reader.file(),
        &[(second.offset, second.len)],
        end,
    )
    .unwrap();
    unlock(reader.file()).unwrap();

    spool.submit(letter(4, "fourth"));
    spool.close().await;

    let (reader, entries) = records(&dir.0);
    let bodies: Vec<String> = entries
        .iter()
        .map(|entry| match entry {
            Entry::Record(record) => body_of(&reader, record),
            Entry::Corrupt(span) => panic!("unexpected damage {span:?}"),
        })
        .collect();
    assert_eq!(bodies, vec!["second", "third", "fourth"]);
}

#[tokio::test]
async fn failed_write_is_reported_and_retried() {
    let dir = TempDir::new();
    let readiness = Readiness::new();
    let metrics = Metrics::new();
    let spool = Spool::open(
        &dir.0,
        Duration::from_millis(20),
        metrics.fanout().clone(),
        readiness.clone(),
    )
    .unwrap();
    // A regular file where the spool file's directory was makes every
    // reopen fail, even for root.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"in the way").unwrap();
    spool.submit(letter(1, "kept in memory"));

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while readiness.problems().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never failed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(metrics.fanout().spool_write_errors.get() >= 1);
    let problem = readiness.problems().join("\n");
    assert!(
        problem.contains("failed to write a dead letter"),
        "{problem}"
    );

    // Once the directory is back, the retry writes the letter and the
    // proxy is ready again.
    std::fs::remove_file(&dir.0).unwrap();
    std::fs::create_dir_all(&dir.0).unwrap();
    while !readiness.problems().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never recovered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spool.close().await;
    let (reader, entries) = records(&dir.0);
    let [Entry::Record(record)] = entries.as_slice() else {
        panic!("one record expected: {entries:?}");
    };
    assert_eq!(body_of(&reader, record), "kept in memory");
}

async fn wait_for_records(dir: &Path, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, entries) = records(dir);
        if record_offsets(&entries).len() >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn header_sizes_match_layout() {
    assert_eq!(format::file_header().len() as u64, FILE_HEADER_LEN);
    assert_eq!(format::record_header(0, 0).len() as u64, RECORD_HEADER_LEN);
}

#[tokio::test]
async fn second_proxy_on_same_dir_is_rejected() {
    let dir = TempDir::new();
    let open = || {
        Spool::open(
            &dir.0,
            Duration::from_secs(1),
            Metrics::new().fanout().clone(),
            Readiness::new(),
        )
    };
    let first = open().expect("first opens");
    let error = open().err().expect("second is rejected").to_string();
    assert!(error.contains("in use by another tandem proxy"), "{error}");
    first.close().await;
    open()
        .expect("the directory is free after close")
        .close()
        .await;
}
