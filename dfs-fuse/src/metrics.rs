//! `ClientMetrics`: what the client measures about itself — latency per FUSE op and per stage
//! of a push (lock, upload; the primary reports replicate and commit on its own `/metrics`),
//! and the latest push latencies for `dfs status`. Served at `dfs mount --metrics ADDR`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use dfs_server::metrics::Metrics;

/// How many recent push latencies `dfs status` summarises.
const RECENT: usize = 256;

/// The client's metrics.
#[derive(Default)]
pub struct ClientMetrics {
    /// The Prometheus registry.
    pub registry: Metrics,
    recent_pushes: Mutex<VecDeque<Duration>>,
}

impl ClientMetrics {
    /// One FUSE operation.
    pub fn fuse_op(&self, op: &'static str, took: Duration) {
        self.registry.observe("fuse_op", op, took);
    }

    /// One stage of a push.
    pub fn stage(&self, stage: &'static str, took: Duration) {
        self.registry.observe("push_stage", stage, took);
    }

    /// A whole push, from the close to the acknowledgement.
    pub fn push_done(&self, took: Duration) {
        self.registry.observe("push_stage", "total", took);
        let mut r = self.recent_pushes.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(took);
    }

    /// (median, 99th percentile) of the recent pushes, if any.
    pub fn recent_push_latency(&self) -> Option<(Duration, Duration)> {
        let mut v: Vec<Duration> = self
            .recent_pushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }
}
