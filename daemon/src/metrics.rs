//! Prometheus metrics (`GET /metrics`), via the `prometheus-client` crate.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of per-model metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// Model name.
    pub model: String,
}

/// Label of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Model name (empty when the request named no known model).
    pub model: String,
    /// `ok`, `timeout`, `cancelled`, `busy`, `invalid`, `error`.
    pub outcome: String,
}

type Hist = Family<ModelLabel, Histogram, fn() -> Histogram>;

fn ttft_histogram() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn token_histogram() -> Histogram {
    // 0.25 ms … ~4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    queue_depth: Family<ModelLabel, Gauge>,
    active: Family<ModelLabel, Gauge>,
    tokens: Family<ModelLabel, Counter>,
    prefix_tokens: Family<ModelLabel, Counter>,
    ttft: Hist,
    token_latency: Hist,
    load_seconds: Family<ModelLabel, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Register everything.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ember");
        let m = Metrics {
            requests: Family::default(),
            queue_depth: Family::default(),
            active: Family::default(),
            tokens: Family::default(),
            prefix_tokens: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram as fn() -> Histogram),
            token_latency: Family::new_with_constructor(token_histogram as fn() -> Histogram),
            load_seconds: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by model and outcome",
            m.requests.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "active_sequences",
            "Sequences being generated",
            m.active.clone(),
        );
        registry.register("generated_tokens", "Tokens generated", m.tokens.clone());
        registry.register(
            "prefix_reused_tokens",
            "Prompt tokens taken from the KV cache of an earlier request (prefix reuse)",
            m.prefix_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From request received to first token",
            m.ttft.clone(),
        );
        registry.register(
            "token_latency_seconds",
            "Time between consecutive tokens of a request",
            m.token_latency.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time the model took to load",
            m.load_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count a request's outcome.
    pub fn outcome(&self, model: &str, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabel {
                model: model.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Handles for one model's metrics.
    pub fn model(&self, name: &str) -> ModelMetrics {
        let l = ModelLabel { model: name.into() };
        ModelMetrics {
            name: name.into(),
            queue_depth: self.queue_depth.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            tokens: self.tokens.get_or_create(&l).clone(),
            prefix_tokens: self.prefix_tokens.get_or_create(&l).clone(),
            ttft: self.ttft.get_or_create(&l).clone(),
            token_latency: self.token_latency.get_or_create(&l).clone(),
            load_seconds: self.load_seconds.get_or_create(&l).clone(),
            requests: self.requests.clone(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One model's metric handles (cheap clones of shared atomics).
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    name: String,
    /// Requests waiting.
    pub queue_depth: Gauge,
    /// Sequences in the running batch.
    pub active: Gauge,
    /// Tokens generated.
    pub tokens: Counter,
    /// Prompt tokens served from the prefix cache.
    pub prefix_tokens: Counter,
    /// Time to first token.
    pub ttft: Histogram,
    /// Inter-token latency.
    pub token_latency: Histogram,
    /// Load time.
    pub load_seconds: Gauge<f64, AtomicU64>,
    requests: Family<OutcomeLabel, Counter>,
}

impl ModelMetrics {
    /// Count a request's outcome for this model.
    pub fn outcome(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabel {
                model: self.name.clone(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        let mm = m.model("demo");
        mm.outcome("ok");
        mm.tokens.inc_by(5);
        mm.ttft.observe(0.02);
        mm.queue_depth.set(3);
        let text = m.render();
        assert!(
            text.contains("ember_requests_total{model=\"demo\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ember_generated_tokens_total{model=\"demo\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("ember_queue_depth{model=\"demo\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ember_time_to_first_token_seconds_count{model=\"demo\"} 1"),
            "{text}"
        );
    }
}
