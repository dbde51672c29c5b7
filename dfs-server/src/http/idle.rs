//! Bounded idle time for request bodies, on every service: a body that sends nothing for
//! `idle` while the handler waits for it fails with an error, so a half-open connection (a
//! laptop that sleeps mid-upload) never holds a file's write mutex, or anything else a handler
//! holds while reading, for longer than that.
//!
//! Only time spent *waiting* for the client counts: the clock starts when the handler asks for
//! more and the body has nothing yet, so a handler that first waits for a lock, or is slow to
//! read, never makes its client look idle. A body of declared length must also arrive within
//! the transfer time allowed for that size (`common::api::transfer_timeout`, counted from the
//! handler's first read), so a sender that trickles a byte now and then cannot hold on either.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// Default idle bound of a request body.
pub const DEFAULT_BODY_IDLE: Duration = Duration::from_secs(30);

/// The error a body that went idle, or too slow, ends with.
#[derive(Debug, thiserror::Error)]
pub enum BodyStalled {
    /// Nothing for the idle bound.
    #[error("the request body sent nothing for {0:?}; giving up on it")]
    Idle(Duration),
    /// Not all of it within the transfer time for its size.
    #[error("the request body did not arrive within {0:?}, the time allowed for its size")]
    TooSlow(Duration),
}

/// A request body that fails after `idle` of waiting without data.
pub struct IdleBody {
    inner: Body,
    idle: Duration,
    /// Time allowed for the whole body, when its length is declared.
    total: Option<Duration>,
    /// When the handler first read.
    started: Option<tokio::time::Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl IdleBody {
    /// Wraps `inner`.
    pub fn new(inner: Body, idle: Duration) -> Self {
        let total = http_body::Body::size_hint(&inner)
            .exact()
            .map(common::api::transfer_timeout);
        IdleBody {
            inner,
            idle,
            total,
            started: None,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let now = tokio::time::Instant::now();
        let started = *this.started.get_or_insert(now);
        let too_late = this.total.map(|t| started + t);
        let stalled = |e: BodyStalled| {
            tracing::warn!(error = %e, "dropping the request");
            Poll::Ready(Some(Err(axum::Error::new(e))))
        };
        if let (Some(at), Some(total)) = (too_late, this.total)
            && now >= at
        {
            return stalled(BodyStalled::TooSlow(total));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let idle_at = now + this.idle;
                    this.timer
                        .as_mut()
                        .reset(too_late.map_or(idle_at, |t| t.min(idle_at)));
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => match (too_late, this.total) {
                        (Some(at), Some(total)) if tokio::time::Instant::now() >= at => {
                            stalled(BodyStalled::TooSlow(total))
                        }
                        _ => stalled(BodyStalled::Idle(this.idle)),
                    },
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: every request's body gets the idle bound.
pub async fn bound_body_idle(
    axum::extract::State(idle): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    // A service forwarding a body (a primary streaming an upload to its replicas) passes on
    // its sender's pauses and adds its own waits (disk, other replicas): it gets twice the
    // bound and a margin, so that it never cuts an upload its sender is still within.
    let from_peer = parts
        .headers
        .get(common::routes::CLUSTER_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .zip(parts.extensions.get::<std::sync::Arc<super::Verifier>>())
        .is_some_and(|(key, verifier)| verifier.is_cluster_key(key));
    let idle = if from_peer {
        idle.saturating_mul(2)
            .saturating_add(Duration::from_secs(10))
    } else {
        idle
    };
    let req = axum::extract::Request::from_parts(parts, Body::new(IdleBody::new(body, idle)));
    next.run(req).await
}
