//! Observability: Prometheus metrics and the HTTP endpoint that serves them
//! with `/healthz` and `/readyz`.

pub mod http;
pub mod logfmt;
pub mod metrics;

pub use metrics::metrics;
