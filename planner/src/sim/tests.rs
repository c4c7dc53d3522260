//! Hand-computed timelines. The test profile (`cost::tests::profile`): a
//! prefill step costs 10 ms + 1 ms per token, a decode step 20 ms + 1 ms per
//! sequence, a hand-off 5 ms + 1 ms per prompt token.

use super::*;
use crate::cost::tests::profile;

const EPS: f64 = 1e-9;

fn req(input: u32, output: u32) -> TraceRequest {
    TraceRequest { input, output }
}

fn run(topology: Topology, requests: &[TraceRequest], arrivals: &[f64]) -> Vec<Outcome> {
    simulate(&profile(), topology, EngineLimits::default(), requests, arrivals)
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < EPS, "{what}: {actual} != {expected}");
}

#[test]
fn one_request_disaggregated() {
    let out = run(Topology::new(1, 1), &[req(100, 5)], &[1.0]);
    // Prefill: one step of 100 tokens, 10 + 100 ms.
    assert_close(out[0].first_token, 1.110, "first token");
    assert_close(out[0].ttft(), 0.110, "ttft");
    // Hand-off 5 + 100 ms, then 4 decode steps of 21 ms for tokens 2..=5.
    assert_close(out[0].finish, 1.110 + 0.105 + 4.0 * 0.021, "finish");
    assert_close(out[0].tpot(), (0.105 + 0.084) / 4.0, "tpot");
}

#[test]
fn one_request_colocated() {
    let out = run(Topology::new(0, 1), &[req(100, 5)], &[0.0]);
    assert_close(out[0].ttft(), 0.110, "ttft");
    // No hand-off: TPOT is exactly the decode step time.
    assert_close(out[0].tpot(), 0.021, "tpot");
}

#[test]
fn decode_steps_pay_for_their_context() {
    let mut cost = profile();
    cost.decode.per_context_token_s = 1e-5;
    let out = simulate(&cost, Topology::new(1, 1), EngineLimits::default(), &[req(100, 5)], &[0.0]);
    // The 4 decode steps attend over 101, 102, 103 and 104 tokens.
    let decode = 4.0 * 0.021 + 1e-5 * f64::from(101 + 102 + 103 + 104);
    assert_close(out[0].finish, 0.110 + 0.105 + decode, "finish");
}

#[test]
fn single_token_answers_end_at_the_prefill() {
    let out = run(Topology::new(1, 1), &[req(50, 1)], &[0.0]);
    assert_close(out[0].finish, 0.060, "finish");
    assert_eq!(out[0].tpot(), 0.0);
}

#[test]
fn a_busy_prefill_worker_queues_then_batches() {
    // Request 0 starts a step alone; 1 and 2 arrive during it and share the next.
    let out = run(Topology::new(1, 1), &[req(100, 2), req(100, 2), req(100, 2)], &[0.0, 0.05, 0.06]);
    assert_close(out[0].first_token, 0.110, "first");
    assert_close(out[1].first_token, 0.110 + 0.210, "second");
    assert_close(out[2].first_token, 0.110 + 0.210, "third");
    assert_close(out[1].ttft(), 0.270, "second ttft");
}

#[test]
fn the_token_budget_chunks_a_long_prompt() {
    let limits = EngineLimits { max_num_seqs: 64, max_num_batched_tokens: 64 };
    let out = simulate(&profile(), Topology::new(1, 1), limits, &[req(100, 2)], &[0.0]);
    // 64 tokens, then 36: two steps, two fixed costs.
    assert_close(out[0].first_token, 0.074 + 0.046, "first token");
}

#[test]
fn router_spreads_prefills_and_decodes() {
    let reqs = [req(100, 5), req(100, 5)];
    let out = run(Topology::new(2, 2), &reqs, &[0.0, 0.0]);
    // Each on its own prefill and decode worker: both as if alone.
    for o in &out {
        assert_close(o.ttft(), 0.110, "ttft");
        assert_close(o.tpot(), (0.105 + 0.084) / 4.0, "tpot");
    }
    // One decode worker: both land at 0.215 s, but the first to land starts
    // a step alone (21 ms); the other joins the next, and then they share
    // steps of batch 2 (22 ms) until request 0 has its 5 tokens.
    let out = run(Topology::new(2, 1), &reqs, &[0.0, 0.0]);
    assert_close(out[0].finish, 0.215 + 0.021 + 3.0 * 0.022, "0 finish");
    assert_close(out[1].finish, 0.215 + 0.021 + 3.0 * 0.022 + 0.021, "1 finish");
}

#[test]
fn colocated_mixes_prefill_into_decode_steps() {
    // Request 0 (prompt 100) runs alone first; request 1 (prompt 50) arrives
    // during that step and is prefilled in the next, beside 0's first decode.
    let out = run(Topology::new(0, 1), &[req(100, 3), req(50, 3)], &[0.0, 0.01]);
    assert_close(out[0].first_token, 0.110, "0 first");
    // Mixed step: max(10, 20) fixed + 50 prefill tokens + 1 decode = 71 ms.
    assert_close(out[1].first_token, 0.110 + 0.071, "1 first");
    // Then both decode together (22 ms): 0 finishes, then 1 alone (21 ms).
    assert_close(out[0].finish, 0.181 + 0.022, "0 finish");
    assert_close(out[1].finish, 0.203 + 0.021, "1 finish");
}
