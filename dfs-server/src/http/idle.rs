//! Bounded idle time for request bodies, on every service: a body that sends nothing for
//! `idle` while the handler waits for it fails with an error, so a half-open connection (a
//! laptop that sleeps mid-upload) never holds a file's write mutex, or anything else a handler
//! holds while reading, for longer than that.
//!
//! Only time spent *waiting* for the client counts: the clock starts when the handler asks for
//! more and the body has nothing yet, so a handler that first waits for a lock, or is slow to
//! read, never makes its client look idle.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// Default idle bound of a request body.
pub const DEFAULT_BODY_IDLE: Duration = Duration::from_secs(30);

/// The error a body that went idle ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}; giving up on it")]
pub struct BodyIdle(pub Duration);

/// A request body that fails after `idle` of waiting without data.
pub struct IdleBody {
    inner: Body,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl IdleBody {
    /// Wraps `inner`.
    pub fn new(inner: Body, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(idle = ?this.idle, "request body went idle; dropping the request");
                        Poll::Ready(Some(Err(axum::Error::new(BodyIdle(this.idle)))))
                    }
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
    let req = axum::extract::Request::from_parts(parts, Body::new(IdleBody::new(body, idle)));
    next.run(req).await
}
