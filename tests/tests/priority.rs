//! The router's admission queue over real workers: with one request in
//! flight per worker, a priority -10 request sent after twenty priority 10
//! ones runs (and so finishes) before them, on both paths.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tests::{Cluster, ClusterOptions};

/// Sends the requests and returns the names in the order they finished.
async fn completion_order(router: &str, model: &str) -> Vec<String> {
    let url = format!("{router}/v1/completions");
    let client = reqwest::Client::new();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let send = |name: String, priority: i32, max_tokens: u32| {
        let (client, url, finished) = (client.clone(), url.clone(), finished.clone());
        let body = json!({"model": model, "prompt": "Count to one hundred:", "max_tokens": max_tokens,
                          "temperature": 0, "ignore_eos": true, "priority": priority});
        tokio::spawn(async move {
            let r = client.post(&url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{name}");
            let _: Value = r.json().await.unwrap();
            finished.lock().unwrap().push(name);
        })
    };
    // Holds the only slot while the others queue behind it.
    let mut tasks = vec![send("slow".into(), 0, 200)];
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        tasks.push(send(format!("low-{i}"), 10, 2));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.push(send("urgent".into(), -10, 2));
    for task in tasks {
        task.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    order
}

#[tokio::test]
async fn a_better_priority_runs_before_earlier_waiters() {
    let options =
        ClusterOptions { router_args: vec!["--max-inflight-per-worker".into(), "1".into()], ..Default::default() };
    let cluster = Cluster::start(options);
    let model = cluster.model_name().await;
    for router in [cluster.router.url(), cluster.colocated_router.url()] {
        let order = completion_order(router, &model).await;
        assert_eq!(order.len(), 22);
        assert_eq!(order[..2], ["slow", "urgent"], "{router}: {order:?}");
    }
}
