//! Logging and tracing for the binaries: human-readable lines on stderr,
//! filtered by `RUST_LOG` (default `info`), and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the same spans exported over
//! OTLP/gRPC so one request can be followed across processes.
//!
//! A request's trace crosses processes in W3C `traceparent` gRPC metadata:
//! the caller [`inject`]s its current span's context, the callee
//! [`extract`]s it and makes it the parent of its handler's span.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The standard variable that turns OTLP export on (e.g. `http://127.0.0.1:4317`).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard variable that overrides the `service.name` of exported spans.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";

/// How long shutdown may wait for the last spans to reach the collector: a
/// collector that is gone must not hold a stopping process for long.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why OTLP export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The tonic exporter spawns its connection on the current tokio runtime.
    #[error("OTLP export needs a tokio runtime")]
    NoRuntime,
    /// The exporter rejected its configuration (such as a malformed endpoint).
    #[error("building the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps OTLP export alive; dropping it flushes the spans still batched and
/// shuts the exporter down. Hold it to the end of `main`, past graceful
/// shutdown, or the last spans of the process are lost.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else { return };
        // The batch processor's thread exports through a tonic channel that
        // lives on the tokio runtime: blocking this worker must leave the
        // runtime free to drive it.
        let shutdown = move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        let result = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(shutdown)
            }
            _ => shutdown(),
        };
        if let Err(e) = result {
            eprintln!("flushing OTLP spans at exit: {e}");
        }
    }
}

/// Installs the global subscriber: the stderr log lines, and OTLP export of
/// spans when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, under `service_name`
/// unless `OTEL_SERVICE_NAME` overrides it. Safe to call once per process;
/// export needs a tokio runtime (without one it is skipped with a warning).
pub fn init(service_name: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let wanted = std::env::var(OTLP_ENDPOINT_ENV).is_ok_and(|v| !v.trim().is_empty());
    let (provider, error) = match wanted.then(|| provider(service_name)) {
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    // Each layer filters for itself: `RUST_LOG=warn` quiets the log lines,
    // never the request's spans, which are at `info`. Below `info` are the
    // dependencies' own spans (hyper, h2), the exporter's included.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name.to_string()))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    if let Some(e) = error {
        tracing::warn!(error = %e, "OTLP span export is off");
    }
    TelemetryGuard { provider }
}

fn provider(service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    // The endpoint, timeout and headers come from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let name = std::env::var(SERVICE_NAME_ENV)
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service_name.to_string());
    let resource = Resource::builder().with_service_name(name).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Writes the current span's trace context into outgoing gRPC metadata as a
/// W3C `traceparent` (nothing when the span is not sampled or not exported).
pub fn inject(metadata: &mut MetadataMap) {
    inject_span(&tracing::Span::current(), metadata);
}

/// Writes `span`'s trace context into outgoing gRPC metadata, for a call
/// built before the future that runs inside `span` is polled.
pub fn inject_span(span: &tracing::Span, metadata: &mut MetadataMap) {
    inject_context(&span.context(), metadata);
}

/// Writes `cx` into `metadata` as W3C trace context.
pub fn inject_context(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// The trace context a caller sent in gRPC metadata; an empty context when
/// it sent none, so [`set_parent`] leaves the span a root.
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Makes `span` a child of the caller's span carried in `metadata`.
pub fn set_parent(span: &tracing::Span, metadata: &MetadataMap) {
    // Fails only for a span that already started exporting: it keeps its parent.
    let _ = span.set_parent(extract(metadata));
}

/// The current span's W3C `traceparent` value, for protocols that are not
/// gRPC (kv-transfer carries it in its pull request); `None` without one.
pub fn current_traceparent() -> Option<String> {
    let mut fields = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut fields);
    fields.remove("traceparent")
}

/// Makes `span` a child of the span a W3C `traceparent` value names.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let fields = std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let _ = span.set_parent(TraceContextPropagator::new().extract(&fields));
}

/// Makes `span` a child of the span an HTTP caller named in its W3C
/// `traceparent` header, so a gateway's trace continues into the cluster.
pub fn set_parent_from_http(span: &tracing::Span, headers: &tonic::codegen::http::HeaderMap) {
    let _ = span.set_parent(TraceContextPropagator::new().extract(&HttpExtractor(headers)));
}

struct HttpExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

    fn remote_span() -> SpanContext {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn inject_then_extract_round_trips_the_span_context() {
        let sent = remote_span();
        let mut metadata = MetadataMap::new();
        inject_context(&Context::new().with_remote_span_context(sent.clone()), &mut metadata);
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let received = extract(&metadata);
        assert_eq!(received.span().span_context(), &sent);
    }

    #[test]
    fn an_http_traceparent_header_parents_the_span() {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let received = TraceContextPropagator::new().extract(&HttpExtractor(&headers));
        assert_eq!(received.span().span_context(), &remote_span());
    }

    #[test]
    fn metadata_without_trace_context_extracts_no_parent() {
        let received = extract(&MetadataMap::new());
        assert!(!received.span().span_context().is_valid());
    }
}
