//! Hop-by-hop header handling (RFC 9110 section 7.6.1).

use http::{header, HeaderMap, HeaderName};

/// Removes the connection-specific headers a proxy must not forward: those
/// that RFC 9110 lists, `Proxy-Connection` and `Keep-Alive` from older
/// practice, and every header that `Connection` names.
///
/// `TE: trailers` survives, because gRPC servers require it on HTTP/2 and
/// it is the one TE value that HTTP/2 allows.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(name);
        }
    }

    let keep_te = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !keep_te {
        headers.remove(header::TE);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// True for an HTTP/1.1 request for a protocol switch (WebSocket, h2c
/// upgrade): `Connection` names `upgrade` and `Upgrade` is present.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("proxy-connection", "keep-alive".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "only x-kept remains: {headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn keeps_te_trailers_only() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.get(header::TE).unwrap(), "trailers");

        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert!(headers.get(header::TE).is_none());
    }

    #[test]
    fn detects_upgrade_requests() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_upgrade(&headers));
        headers.remove(header::UPGRADE);
        assert!(!is_upgrade(&headers));
    }
}
