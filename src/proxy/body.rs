//! Request body wrappers: the size limit on primary bodies and the buffered
//! body that a copy carries.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{client::BoxError, errors::BodyLimitExceeded};

pin_project! {
    /// Fails the body with [`BodyLimitExceeded`] once more than `limit`
    /// bytes have passed, so a streaming (chunked) upload over the limit is
    /// cut off instead of forwarded whole.
    pub struct LimitBody<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
    }
}

impl<B> LimitBody<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> Body for LimitBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded {
                            limit: *this.limit,
                        }))));
                    }
                    *this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A complete, buffered request body: the data chunks as the client sent
/// them, then the trailers if there were any.
#[derive(Debug, Default)]
pub struct BufferedBody {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    remaining: u64,
}

impl BufferedBody {
    pub fn new(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks: chunks.into(),
            trailers,
            remaining,
        }
    }

    /// Body length in bytes, without trailers.
    pub fn len(&self) -> u64 {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    pub fn has_trailers(&self) -> bool {
        self.trailers.is_some()
    }
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            self.remaining -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // With trailers the length is not exact on the wire for HTTP/1.1,
        // where trailers need chunked framing.
        if self.trailers.is_some() {
            let mut hint = SizeHint::new();
            hint.set_lower(self.remaining);
            hint
        } else {
            SizeHint::with_exact(self.remaining)
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn limit_body_passes_at_limit() {
        let body = LimitBody::new(Full::new(Bytes::from_static(b"12345")), 5);
        let collected = body.collect().await.expect("body at the limit passes");
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"12345"));
    }

    #[tokio::test]
    async fn limit_body_fails_over_limit() {
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"1234"))),
            Ok(Frame::data(Bytes::from_static(b"56"))),
        ];
        let body = LimitBody::new(StreamBody::new(futures_util::stream::iter(frames)), 5);
        let error = body
            .collect()
            .await
            .expect_err("6 bytes exceed a limit of 5");
        assert!(
            error.downcast_ref::<BodyLimitExceeded>().is_some(),
            "{error}"
        );
    }

    #[tokio::test]
    async fn buffered_body_replays_chunks_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = BufferedBody::new(
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")],
            Some(trailers.clone()),
        );
        assert_eq!(body.len(), 3);
        let collected = body.collect().await.expect("buffered body never fails");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abc"));
    }
}
