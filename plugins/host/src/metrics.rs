//! Metrics plugins define with `proxy_define_metric`, kept process-wide so every instance of a
//! plugin adds to the same series, and read out by the embedder for its Prometheus endpoint.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::abi::{MetricKind, Status};

/// Histogram bucket upper bounds, as Envoy's default histogram buckets (milliseconds-friendly).
pub const HISTOGRAM_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Every plugin metric of the process.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    inner: RwLock<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<(String, MetricKindKey), u32>,
    list: Vec<Metric>,
}

type MetricKindKey = u8;

#[derive(Debug)]
struct Metric {
    name: String,
    kind: MetricKind,
    value: AtomicI64,
    /// Histogram: observation count per bucket (plus +Inf), and the sum.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// One metric's value at the time of reading.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A counter.
    Counter(u64),
    /// A gauge.
    Gauge(i64),
    /// A histogram: cumulative counts per [`HISTOGRAM_BUCKETS`] bound, then the total count, and
    /// the sum of observations.
    Histogram {
        /// Cumulative count per bucket bound.
        buckets: Vec<u64>,
        /// Total observations.
        count: u64,
        /// Sum of observations.
        sum: u64,
    },
}

impl PluginMetrics {
    /// Defines a metric, or returns the id it already has: every instance of a plugin defines
    /// the same names.
    pub(crate) fn define(&self, kind: MetricKind, name: &str) -> u32 {
        let key = (name.to_owned(), kind as MetricKindKey);
        if let Some(&id) = self.inner.read().expect("metrics").by_name.get(&key) {
            return id;
        }
        let mut r = self.inner.write().expect("metrics");
        if let Some(&id) = r.by_name.get(&key) {
            return id;
        }
        let id = r.list.len() as u32;
        let buckets = match kind {
            MetricKind::Histogram => (0..=HISTOGRAM_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            _ => Box::default(),
        };
        r.list.push(Metric {
            name: name.to_owned(),
            kind,
            value: AtomicI64::new(0),
            buckets,
            sum: AtomicU64::new(0),
        });
        r.by_name.insert(key, id);
        id
    }

    pub(crate) fn increment(&self, id: u32, delta: i64) -> Status {
        let r = self.inner.read().expect("metrics");
        let Some(m) = r.list.get(id as usize) else {
            return Status::NotFound;
        };
        match m.kind {
            MetricKind::Counter if delta < 0 => Status::BadArgument,
            MetricKind::Counter | MetricKind::Gauge => {
                m.value.fetch_add(delta, Ordering::Relaxed);
                Status::Ok
            }
            MetricKind::Histogram => Status::BadArgument,
        }
    }

    pub(crate) fn record(&self, id: u32, value: u64) -> Status {
        let r = self.inner.read().expect("metrics");
        let Some(m) = r.list.get(id as usize) else {
            return Status::NotFound;
        };
        match m.kind {
            MetricKind::Counter | MetricKind::Gauge => {
                m.value.store(value as i64, Ordering::Relaxed);
            }
            MetricKind::Histogram => {
                let slot = HISTOGRAM_BUCKETS
                    .iter()
                    .position(|&b| value as f64 <= b)
                    .unwrap_or(HISTOGRAM_BUCKETS.len());
                m.buckets[slot].fetch_add(1, Ordering::Relaxed);
                m.sum.fetch_add(value, Ordering::Relaxed);
            }
        }
        Status::Ok
    }

    /// A counter's or gauge's value; histograms cannot be read back (Envoy: BAD_ARGUMENT).
    pub(crate) fn get(&self, id: u32) -> Result<u64, Status> {
        let r = self.inner.read().expect("metrics");
        let m = r.list.get(id as usize).ok_or(Status::NotFound)?;
        match m.kind {
            MetricKind::Histogram => Err(Status::BadArgument),
            _ => Ok(m.value.load(Ordering::Relaxed) as u64),
        }
    }

    /// Every metric with its name and value, in definition order.
    pub fn snapshot(&self) -> Vec<(String, MetricValue)> {
        let r = self.inner.read().expect("metrics");
        r.list
            .iter()
            .map(|m| {
                let value = match m.kind {
                    MetricKind::Counter => {
                        MetricValue::Counter(m.value.load(Ordering::Relaxed).max(0) as u64)
                    }
                    MetricKind::Gauge => MetricValue::Gauge(m.value.load(Ordering::Relaxed)),
                    MetricKind::Histogram => {
                        let mut total = 0;
                        let mut buckets = Vec::with_capacity(HISTOGRAM_BUCKETS.len());
                        for (i, b) in m.buckets.iter().enumerate() {
                            total += b.load(Ordering::Relaxed);
                            if i < HISTOGRAM_BUCKETS.len() {
                                buckets.push(total);
                            }
                        }
                        MetricValue::Histogram {
                            buckets,
                            count: total,
                            sum: m.sum.load(Ordering::Relaxed),
                        }
                    }
                };
                (m.name.clone(), value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms() {
        let m = PluginMetrics::default();
        let c = m.define(MetricKind::Counter, "requests");
        assert_eq!(m.define(MetricKind::Counter, "requests"), c);
        let g = m.define(MetricKind::Gauge, "inflight");
        let h = m.define(MetricKind::Histogram, "size");
        assert_eq!(m.increment(c, 2), Status::Ok);
        assert_eq!(m.increment(c, -1), Status::BadArgument);
        assert_eq!(m.increment(g, -3), Status::Ok);
        assert_eq!(m.record(h, 7), Status::Ok);
        assert_eq!(m.record(h, 70_000), Status::Ok);
        assert_eq!(m.increment(h, 1), Status::BadArgument);
        assert_eq!(m.get(c), Ok(2));
        assert_eq!(m.get(g), Ok(-3i64 as u64));
        assert_eq!(m.get(h), Err(Status::BadArgument));
        assert_eq!(m.get(42), Err(Status::NotFound));
        let snap = m.snapshot();
        assert_eq!(snap[0], ("requests".into(), MetricValue::Counter(2)));
        let MetricValue::Histogram {
            buckets,
            count,
            sum,
        } = &snap[2].1
        else {
            panic!("histogram expected");
        };
        assert_eq!((*count, *sum), (2, 70_007));
        // 7 falls in the 10 bucket (index 3); 70,000 in 300,000 (index 15).
        assert_eq!(buckets[2], 0);
        assert_eq!(buckets[3], 1);
        assert_eq!(buckets[15], 2);
    }
}
