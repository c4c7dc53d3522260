//! OpenTelemetry across the cluster: a disaggregated request makes one
//! trace over the router, the prefill worker and the decode worker, exported
//! over OTLP to an in-process receiver, with each worker's spans under the
//! router's and the kv-transfer hop under the decode worker's. The trace
//! continues the one the HTTP client named in its `traceparent` header.

// The test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use tests::{start_decode_env, start_prefill_env, start_router_env};
use tonic::{Request, Response, Status};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    any_value::Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received { service: service.clone(), span }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a free local port; returns its endpoint URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("local address");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The client's own trace and span, as a gateway in front of the router would send them.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

const SERVICES: [&str; 3] = ["router", "prefill-worker", "decode-worker"];

/// The first span of `service` named `name` in `trace`.
fn find<'a>(spans: &'a [Received], trace: &[u8], service: &str, name: &str) -> Option<&'a Span> {
    spans.iter().find(|r| r.service == service && r.span.name == name && r.span.trace_id == trace).map(|r| &r.span)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_covers_router_prefill_kv_transfer_and_decode() {
    let _turn = tests::take_turn();
    let receiver = Receiver::default();
    let endpoint = receiver.serve().await;
    // A short batch delay keeps the test quick; the shutdown flush is what it relies on.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let mut prefill = start_prefill_env("127.0.0.1:0", &[], &env);
    let mut decode = start_decode_env(&[], &env);
    let mut router = start_router_env(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"], &env);

    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", router.url()))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&body)
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    response.bytes().await.expect("the answer");

    // Stopped gracefully, each process flushes its last spans before it exits.
    for process in [&router, &decode, &prefill] {
        process.send_sigterm();
    }
    for (name, process) in [("router", &mut router), ("decode", &mut decode), ("prefill", &mut prefill)] {
        let status = process.wait_exit(Duration::from_secs(60));
        assert!(status.is_some_and(|s| s.success()), "{name} exited with {status:?}");
    }

    // Exports are in by now; the poll only covers a receiver still storing them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.spans();
        let seen: BTreeSet<&str> = spans.iter().map(|r| r.service.as_str()).collect();
        if SERVICES.iter().all(|s| seen.contains(s)) || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let mut traces_of: HashMap<&str, BTreeSet<Vec<u8>>> = HashMap::new();
    for r in &spans {
        traces_of.entry(r.service.as_str()).or_default().insert(r.span.trace_id.clone());
    }
    for service in SERVICES {
        assert!(traces_of.contains_key(service), "no spans from {service}; got {:?}", traces_of.keys());
    }
    let shared: Vec<&Vec<u8>> =
        traces_of["router"].iter().filter(|t| traces_of["prefill-worker"].contains(*t)).collect();
    let shared: Vec<&Vec<u8>> = shared.into_iter().filter(|t| traces_of["decode-worker"].contains(*t)).collect();
    assert_eq!(shared.len(), 1, "trace ids covering all three services: {shared:?}");
    let trace = shared[0].as_slice();

    assert_eq!(trace, hex(CLIENT_TRACE), "the cluster's trace continues the client's");
    let root = find(&spans, trace, "router", "request").expect("the router's request span");
    assert_eq!(root.parent_span_id, hex(CLIENT_SPAN), "the router's request span is under the client's span");
    let router_spans: BTreeSet<&[u8]> = spans
        .iter()
        .filter(|r| r.service == "router" && r.span.trace_id == trace)
        .map(|r| r.span.span_id.as_slice())
        .collect();

    let prefill_span = find(&spans, trace, "prefill-worker", "prefill").expect("the prefill worker's prefill span");
    assert!(
        router_spans.contains(prefill_span.parent_span_id.as_slice()),
        "the prefill span's parent is a router span"
    );
    let decode_span = find(&spans, trace, "decode-worker", "decode").expect("the decode worker's decode span");
    assert!(router_spans.contains(decode_span.parent_span_id.as_slice()), "the decode span's parent is a router span");

    let kv_pull = find(&spans, trace, "decode-worker", "kv_pull").expect("the decode worker's kv_pull span");
    assert_eq!(kv_pull.parent_span_id, decode_span.span_id, "kv_pull runs under the decode span");
    let kv_serve = find(&spans, trace, "prefill-worker", "kv_serve").expect("the prefill worker's kv_serve span");
    assert_eq!(kv_serve.parent_span_id, kv_pull.span_id, "kv_serve answers kv_pull");
}
