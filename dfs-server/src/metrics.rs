//! `Metrics`: the Prometheus registry of one process (services or client), exposed as text at
//! `GET /metrics`. Latency histograms are labelled by what they time (HTTP route, push stage,
//! FUSE op); counters kept elsewhere as atomics (fsyncs, bytes) are read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type Read = Box<dyn Fn() -> u64 + Send + Sync>;

/// Counters read from atomics when scraped.
#[derive(Default)]
struct Readings(Mutex<Vec<(&'static str, &'static str, Read)>>);

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readings")
    }
}

#[derive(Debug)]
struct ReadingsCollector(Arc<Readings>);

impl Collector for ReadingsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        for (name, help, read) in readings.iter() {
            let counter = ConstCounter::new(read());
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

fn histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// One process's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    latency: Family<Labels, Histogram>,
    readings: Arc<Readings>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with the latency family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dfs");
        let latency = Family::<Labels, Histogram>::new_with_constructor(histogram as fn() -> _);
        registry.register(
            "latency_seconds",
            "Latency by kind (http, push_stage, fuse_op, ...) and name",
            latency.clone(),
        );
        let readings = Arc::new(Readings::default());
        registry.register_collector(Box::new(ReadingsCollector(readings.clone())));
        Metrics {
            registry: Mutex::new(registry),
            latency,
            readings,
        }
    }

    /// Records one timed event of `kind` (e.g. `http`) named `name` (e.g. the route).
    pub fn observe(&self, kind: &'static str, name: &str, took: Duration) {
        self.latency
            .get_or_create(&vec![("kind", kind.to_owned()), ("name", name.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// Exposes the counter `read()` as `dfs_<name>_total` (name without prefix and suffix).
    pub fn counter(&self, name: &'static str, help: &'static str, read: Read) {
        self.readings
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, help, read));
    }

    /// Exposes an atomic as a counter.
    pub fn counter_of(&self, name: &'static str, help: &'static str, value: Arc<AtomicU64>) {
        self.counter(name, help, Box::new(move || value.load(Ordering::Relaxed)));
    }

    /// The text exposition (Prometheus / OpenMetrics text format).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            tracing::warn!("encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_histograms_and_counters() {
        let m = Metrics::new();
        m.observe("http", "/v1/nodes/{id}", Duration::from_millis(3));
        let n = Arc::new(AtomicU64::new(41));
        m.counter_of("fsyncs", "fsyncs made", n.clone());
        n.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("dfs_latency_seconds_bucket{"), "{text}");
        assert!(text.contains("name=\"/v1/nodes/{id}\""), "{text}");
        assert!(text.contains("dfs_fsyncs_total 42"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
