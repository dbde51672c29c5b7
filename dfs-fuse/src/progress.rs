//! `Progress`: when bytes of a transfer last moved. Uploads and downloads are bounded by time
//! without progress, not by a total deadline: a healthy multi-GiB transfer that keeps moving is
//! never cut off, and a stuck one (a server stopped, a half-open connection) ends within the
//! window.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a transfer (or a whole push, across its attempts) last made progress. Cheap to clone;
/// clones share the clock.
#[derive(Debug, Clone)]
pub struct Progress {
    start: Instant,
    /// Milliseconds after `start` of the last progress.
    last_ms: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Progress made now.
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records progress now.
    pub fn tick(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Counts as progress until `extra` from now (work known to be under way that shows none).
    pub fn hold(&self, extra: Duration) {
        let ms = u64::try_from((self.start.elapsed() + extra).as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When progress was last made.
    pub fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing moved for `window`.
    pub async fn stalled(&self, window: Duration) {
        loop {
            let at = self.last() + window;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }

    /// `deadline`, or later while progress keeps coming: `window` after the last progress.
    pub fn extend(&self, deadline: Instant, window: Duration) -> Instant {
        deadline.max(self.last() + window)
    }
}

/// Runs `work` unless `progress` shows nothing moved for `window`; then the error `stalled()`.
pub async fn unless_stalled<T, E>(
    work: impl std::future::Future<Output = Result<T, E>>,
    progress: &Progress,
    window: Duration,
    stalled: impl FnOnce() -> E,
) -> Result<T, E> {
    tokio::select! {
        r = work => r,
        () = progress.stalled(window) => Err(stalled()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_transfer_that_keeps_moving_is_never_cut_off() {
        let p = Progress::new();
        let work = {
            let p = p.clone();
            async move {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    p.tick();
                }
                Ok::<_, &str>("done")
            }
        };
        let r = unless_stalled(work, &p, Duration::from_secs(3), || "stalled").await;
        assert_eq!(r, Ok("done"), "20 s of steady progress with a 3 s window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_transfer_ends_one_window_after_its_last_progress() {
        let p = Progress::new();
        let started = Instant::now();
        let work = {
            let p = p.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                p.tick();
                std::future::pending::<()>().await;
                Ok::<_, &str>("never")
            }
        };
        let r = unless_stalled(work, &p, Duration::from_secs(3), || "stalled").await;
        assert_eq!(r, Err("stalled"));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
