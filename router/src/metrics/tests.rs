//! The request guard's bookkeeping; the HTTP flow is in `http_tests.rs`.

use super::*;

/// The value of the sample line starting with `series` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn stats() -> Vec<ModelScrape> {
    vec![scrape("m", AdmissionStats { queued: 3, in_flight: vec![1, 0], active: vec![true, true] })]
}

fn scrape(name: &str, admission: AdmissionStats) -> ModelScrape {
    ModelScrape { name: name.into(), admission, pools: Vec::new() }
}

#[test]
fn guard_counts_once_and_times_only_successes() {
    let metrics = Arc::new(Metrics::new());
    let mut ok = RequestGuard::new(metrics.clone(), "/v1/completions".into());
    ok.set_status(StatusCode::OK);
    drop(ok);
    let mut bad = RequestGuard::new(metrics.clone(), "/v1/completions".into());
    bad.set_status(StatusCode::BAD_REQUEST);
    drop(bad);
    // Dropped before any answer: the client left while queued.
    drop(RequestGuard::new(metrics.clone(), "/v1/completions".into()));

    let text = metrics.render(&stats()).unwrap();
    let requests = |status: &str| {
        sample(&text, &format!("pdserve_router_requests_total{{endpoint=\"/v1/completions\",status=\"{status}\"}}"))
    };
    assert_eq!(requests("200"), Some(1.0));
    assert_eq!(requests("400"), Some(1.0));
    assert_eq!(requests("499"), Some(1.0));
    assert_eq!(sample(&text, "pdserve_router_e2e_request_latency_seconds_count"), Some(1.0));
}

#[test]
fn admission_gauges_come_from_the_stats() {
    let metrics = Metrics::new();
    let text = metrics.render(&stats()).unwrap();
    assert_eq!(sample(&text, "pdserve_router_admission_queue_depth{model=\"m\"}"), Some(3.0));
    assert_eq!(sample(&text, "pdserve_router_inflight_requests{model=\"m\",worker=\"0\"}"), Some(1.0));
    assert_eq!(sample(&text, "pdserve_router_inflight_requests{model=\"m\",worker=\"1\"}"), Some(0.0));
    // Two models: each its own series; a model gone loses its series.
    let text = metrics
        .render(&[
            scrape("m", AdmissionStats { queued: 0, in_flight: vec![0, 2], active: vec![true, true] }),
            scrape("n/v2", AdmissionStats { queued: 5, in_flight: vec![1], active: vec![true] }),
        ])
        .unwrap();
    assert_eq!(sample(&text, "pdserve_router_admission_queue_depth{model=\"m\"}"), Some(0.0));
    assert_eq!(sample(&text, "pdserve_router_inflight_requests{model=\"m\",worker=\"1\"}"), Some(2.0));
    assert_eq!(sample(&text, "pdserve_router_admission_queue_depth{model=\"n/v2\"}"), Some(5.0));
    assert_eq!(sample(&text, "pdserve_router_inflight_requests{model=\"n/v2\",worker=\"0\"}"), Some(1.0));
    let text = metrics.render(&[]).unwrap();
    assert_eq!(sample(&text, "pdserve_router_admission_queue_depth{model=\"m\"}"), None);
}

#[test]
fn routers_do_not_share_counts() {
    let (a, b) = (Metrics::new(), Metrics::new());
    a.count_prompt_tokens("m", 4);
    let b_text = b.render(&stats()).unwrap();
    assert_eq!(sample(&b_text, "pdserve_router_prompt_tokens_total{model=\"m\"}"), None);
    assert_eq!(sample(&a.render(&stats()).unwrap(), "pdserve_router_prompt_tokens_total{model=\"m\"}"), Some(4.0));
}
