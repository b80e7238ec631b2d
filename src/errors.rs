//! Error chains formatted for people.

/// Joins an error and its sources with `": "`, leaving out a source whose
/// text the message already contains. Many errors here include their
/// source in their own message, so `{:#}` would print it twice.
pub fn chain_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to connect to 127.0.0.1:9: {source}")]
    struct ConnectError {
        source: io::Error,
    }

    #[test]
    fn repeated_source_printed_once() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        let error = anyhow::Error::new(ConnectError { source: refused }).context("replay failed");
        assert_eq!(
            chain_message(&error),
            "replay failed: failed to connect to 127.0.0.1:9: connection refused"
        );
    }

    #[test]
    fn distinct_sources_all_printed() {
        let error = anyhow::anyhow!("disk full").context("failed to write the spool");
        assert_eq!(
            chain_message(&error),
            "failed to write the spool: disk full"
        );
    }
}
