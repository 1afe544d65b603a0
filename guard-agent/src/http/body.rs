//! Bodies on the pipeline: buffering a request body up to the inspection
//! limit (the rest streams through unbuffered), and a response body wrapper
//! that counts bytes, keeps the start for an excerpt, and hands the
//! finished record over when the response ends.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the pipeline sends (up or down).
pub type PipeBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(b: impl Into<Bytes>) -> PipeBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// A request body read for inspection.
pub enum Buffered {
    /// All of it, at most the limit.
    Complete(Bytes),
    /// The first `limit` bytes; `rest` streams the remainder.
    Partial { head: Bytes, rest: Incoming },
}

/// Reads `body` until its end or until `limit` bytes are buffered.
pub async fn buffer_up_to(mut body: Incoming, limit: usize) -> Result<Buffered, hyper::Error> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Buffered::Partial {
                    head: buf.freeze(),
                    rest: body,
                });
            }
        }
    }
    Ok(Buffered::Complete(buf.freeze()))
}

/// `head` followed by the rest of a streaming body; `streamed` counts the
/// bytes of the rest as they pass.
pub fn chain(head: Bytes, rest: Incoming, streamed: Arc<AtomicU64>) -> PipeBody {
    ChainBody {
        head: Some(head),
        rest,
        streamed,
    }
    .boxed_unsync()
}

struct ChainBody {
    head: Option<Bytes>,
    rest: Incoming,
    streamed: Arc<AtomicU64>,
}

impl Body for ChainBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(h) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        let polled = Pin::new(&mut self.rest).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                self.streamed.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }
}

/// Called once when a recorded response body ends (or is dropped): total
/// bytes and the first bytes seen.
pub type OnEnd = Box<dyn FnOnce(u64, Bytes, Option<String>) + Send>;

/// Wraps a response body: counts bytes, keeps up to `keep` bytes, calls
/// `on_end` exactly once.
pub struct RecordingBody {
    inner: Incoming,
    bytes: u64,
    head: BytesMut,
    keep: usize,
    error: Option<String>,
    on_end: Option<OnEnd>,
}

impl RecordingBody {
    pub fn new(inner: Incoming, keep: usize, on_end: OnEnd) -> Self {
        Self {
            inner,
            bytes: 0,
            head: BytesMut::new(),
            keep,
            error: None,
            on_end: Some(on_end),
        }
    }

    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(
                self.bytes,
                std::mem::take(&mut self.head).freeze(),
                self.error.take(),
            );
        }
    }
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    if this.head.len() < this.keep {
                        let take = (this.keep - this.head.len()).min(d.len());
                        this.head.extend_from_slice(&d[..take]);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.error = Some(format!("response body failed: {e}"));
                this.finish();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        if self.on_end.is_some() && !self.inner.is_end_stream() && self.error.is_none() {
            self.error = Some("the client stopped reading before the response ended".into());
        }
        self.finish();
    }
}
