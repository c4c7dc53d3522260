//! Schemathesis (PyPI) against the router's own `/openapi.json`: thousands
//! of generated requests, valid and not, on every operation, and not one
//! server error, response off its schema, or undocumented status. The router
//! runs over a mock decode worker, so the time goes to the API surface.

// The test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::path::PathBuf;

use tests::process::Process;
use tests::{model_path, start_router, take_turn, workspace_root};

/// Seconds schemathesis may spend; `PDSERVE_SCHEMATHESIS_SECS` runs it longer by hand.
const DEFAULT_SECS: &str = "45";

fn schemathesis() -> PathBuf {
    let st = workspace_root().join(".venv/bin/st");
    assert!(st.is_file(), "{} is missing: run scripts/setup.sh, which installs schemathesis", st.display());
    st
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_on_the_openapi_document() {
    let _turn = take_turn();
    let model = model_path();
    let decode =
        Process::start("decode-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model.to_str().unwrap()]);
    let router = start_router(&[], &[&decode], &[]);
    let secs = std::env::var("PDSERVE_SCHEMATHESIS_SECS").unwrap_or_else(|_| DEFAULT_SECS.into());
    // Its crash cache goes in a scratch folder, not the checkout.
    let scratch = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(schemathesis())
        .current_dir(scratch.path())
        .args(["run", &format!("{}/openapi.json", router.url())])
        // Every check but one: the schema is looser than validation in places
        // (a float such as 1.0 for an integer field, fields that exclude each
        // other), so some schema-valid bodies are rightly refused with 400.
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        // A fixed seed: CI generates the same cases on every run (a failure
        // reproduces); longer random runs are for `st run` by hand.
        .args(["--max-time", &secs, "--workers", "2", "--seed", "20261206"])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout.lines().skip_while(|l| !l.contains("SUMMARY")).collect::<Vec<_>>().join("\n");
    println!("{summary}");
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("generated"), "no test cases ran:\n{stdout}");
}
