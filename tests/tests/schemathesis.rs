//! The router's own `/openapi.json`, checked two ways. Schemathesis (PyPI): thousands of
//! generated requests, valid and not, on every operation, and not one server error, response off
//! its schema, or undocumented status. Spectral (npm), the OpenAPI linter: nothing to say. The
//! router runs over a mock decode worker, so the time goes to the API surface.

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
        // reproduces); longer random runs are for `st run` by hand. One worker:
        // with two, Python 3.11 before 3.11.8 (Debian's) can fail inside the
        // generator itself ("AST constructor recursion depth mismatch", CPython
        // gh-106905, a race between threads compiling), a crash of the tool, not
        // a finding.
        .args(["--max-time", &secs, "--workers", "1", "--seed", "20261206"])
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

/// Spectral (npm), the OpenAPI linter, with its `oas` ruleset finds nothing in the router's own
/// `/openapi.json`, warnings included: every operation described and tagged, tags and servers
/// declared, parameters where they belong, no unused component.
#[tokio::test]
async fn spectral_finds_nothing_to_say_about_the_openapi_document() {
    let _turn = take_turn();
    let tools = std::env::var_os("PDSERVE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/tools"));
    let spectral = tools.join("spectral/node_modules/.bin/spectral");
    assert!(spectral.is_file(), "{} is missing: run scripts/setup.sh, which installs it", spectral.display());
    let model = model_path();
    let decode =
        Process::start("decode-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model.to_str().unwrap()]);
    let router = start_router(&[], &[&decode], &[]);
    let document = reqwest::get(format!("{}/openapi.json", router.url())).await.unwrap().text().await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(scratch.path().join("openapi.json"), document).unwrap();
    std::fs::write(scratch.path().join(".spectral.yaml"), "extends: [\"spectral:oas\"]\n").unwrap();
    let output = tokio::process::Command::new(&spectral)
        .current_dir(scratch.path())
        .args(["lint", "openapi.json", "--ruleset", ".spectral.yaml", "--fail-severity", "hint"])
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("running spectral");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "spectral found problems:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
}
