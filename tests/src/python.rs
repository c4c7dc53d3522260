//! The project's Python clients (`tests/python/`), run against a router.

use std::path::PathBuf;

use crate::workspace_root;

/// The Python that has `openai`, `jsonschema` and `lm_eval` installed: `PDSERVE_PYTHON`, else the
/// project's venv (scripts/setup.sh).
pub fn python() -> PathBuf {
    std::env::var_os("PDSERVE_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// Runs `tests/python/{script} {router_url}/v1 {model} {extra...}` with the project's Python and
/// checks it succeeded and printed `ok_line`; returns what it printed.
pub async fn run_client(script: &str, router_url: &str, model: &str, extra: &[&str], ok_line: &str) -> String {
    let python = python();
    assert!(
        python.is_file(),
        "{} is missing: run scripts/test.sh, which installs the openai package",
        python.display()
    );
    let script = workspace_root().join("tests/python").join(script);
    let base = format!("{router_url}/v1");
    let output =
        tokio::process::Command::new(&python).arg(&script).arg(&base).arg(model).args(extra).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{} failed:\n{stdout}\n{stderr}", script.display());
    assert!(stdout.contains(ok_line), "{stdout}");
    stdout
}
