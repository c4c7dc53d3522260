//! Each request's usage: its prompt tokens and the tokens it was actually
//! sent, a cancelled stream's included, recorded once when the request ends
//! (the token stream ends or is dropped) into the per-key metrics and, with
//! `--usage-log`, one JSON line appended to the usage log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{BoxStream, Stream, StreamExt};
use serde_json::json;

use super::limits::Running;
use super::Caller;
use crate::backend::BackendError;
use crate::metrics::TenantCounters;
use crate::respond::stream::Delta;

/// An append-only file of one JSON object per finished request.
#[derive(Debug)]
pub struct UsageLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl UsageLog {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// Appends one line. Written at once (no buffer), so a line is on disk
    /// when its request has ended and none is lost when the process stops.
    fn append(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(path = %self.path.display(), error = %e, "writing the usage log failed");
        }
    }
}

/// Where usage goes: the per-key counters, and the log when there is one.
#[derive(Debug, Clone)]
pub struct UsageSink {
    counters: TenantCounters,
    log: Option<Arc<UsageLog>>,
}

impl UsageSink {
    /// Usage into `counters` and, when given, `log`.
    pub fn new(counters: TenantCounters, log: Option<Arc<UsageLog>>) -> Self {
        Self { counters, log }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every choice ran to its end.
    Completed,
    /// A worker failed mid-way.
    Failed,
    /// The client went away first.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One admitted request's usage, recorded when it drops.
#[derive(Debug)]
pub struct UsageRecord {
    sink: UsageSink,
    request_id: String,
    tenant: String,
    key: String,
    model: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    started: Instant,
    /// `None` until the stream ends; dropped before that, it was cancelled.
    outcome: Option<Outcome>,
    /// The key's running place, freed with the record.
    _running: Running,
}

impl UsageRecord {
    /// The usage of `caller`'s request `request_id` on `model`, admitted
    /// now with `prompt_tokens`, holding its place `running`.
    pub fn start(
        sink: UsageSink,
        caller: &Caller,
        request_id: &str,
        model: &str,
        prompt_tokens: usize,
        running: Running,
    ) -> Self {
        Self {
            sink,
            request_id: request_id.to_owned(),
            tenant: caller.tenant().to_owned(),
            key: caller.key_id().to_owned(),
            model: model.to_owned(),
            prompt_tokens,
            completion_tokens: 0,
            started: Instant::now(),
            outcome: None,
            _running: running,
        }
    }
}

impl UsageRecord {
    /// Records how a request with no token stream (an embedding) ended.
    pub fn end(mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for UsageRecord {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or(Outcome::Cancelled);
        self.sink.counters.record(
            &self.tenant,
            &self.key,
            outcome.as_str(),
            self.prompt_tokens as u64,
            self.completion_tokens as u64,
        );
        let Some(log) = &self.sink.log else { return };
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let line = json!({
            "time_ms": time_ms,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "key": self.key,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "outcome": outcome.as_str(),
            "duration_ms": self.started.elapsed().as_millis() as u64,
        });
        log.append(line.to_string().into_bytes());
    }
}

/// `deltas`, counting into `record` the tokens each one carries.
pub fn meter(
    deltas: BoxStream<'static, Result<Delta, BackendError>>,
    record: UsageRecord,
) -> BoxStream<'static, Result<Delta, BackendError>> {
    Metered { deltas, record }.boxed()
}

struct Metered {
    deltas: BoxStream<'static, Result<Delta, BackendError>>,
    record: UsageRecord,
}

impl Stream for Metered {
    type Item = Result<Delta, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.deltas.poll_next_unpin(cx);
        match &next {
            Poll::Ready(Some(Ok(delta))) => self.record.completion_tokens += delta.token_ids.len(),
            Poll::Ready(Some(Err(_))) => self.record.outcome = Some(Outcome::Failed),
            Poll::Ready(None) => {
                self.record.outcome.get_or_insert(Outcome::Completed);
            }
            Poll::Pending => {}
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn delta(tokens: &[u32]) -> Result<Delta, BackendError> {
        Ok(Delta { token_ids: tokens.to_vec(), ..Delta::default() })
    }

    fn sink(dir: &Path) -> (Arc<Metrics>, UsageSink, PathBuf) {
        let metrics = Arc::new(Metrics::new());
        let path = dir.join("usage.jsonl");
        let log = Arc::new(UsageLog::open(&path).unwrap());
        (metrics.clone(), UsageSink::new(metrics.tenants(), Some(log)), path)
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_finished_and_a_cancelled_stream_each_log_what_they_were_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (metrics, sink, path) = sink(dir.path());
        let whole = futures::stream::iter(vec![delta(&[1, 2]), delta(&[3])]).boxed();
        let record = UsageRecord::start(sink.clone(), &Caller::Anonymous, "r1", "m", 5, Running::unlimited());
        let sent: Vec<_> = meter(whole, record).collect().await;
        assert_eq!(sent.len(), 2);

        // Three tokens sent, then the client leaves while more would come.
        let endless = futures::stream::iter(vec![delta(&[1]), delta(&[2, 3])]).chain(futures::stream::pending());
        let record = UsageRecord::start(sink, &Caller::Anonymous, "r2", "m", 7, Running::unlimited());
        let mut cut = meter(endless.boxed(), record);
        cut.next().await;
        cut.next().await;
        drop(cut);

        let logged = lines(&path);
        assert_eq!(logged.len(), 2);
        assert_eq!(
            (&logged[0]["request_id"], &logged[0]["completion_tokens"], &logged[0]["outcome"]),
            (&json!("r1"), &json!(3), &json!("completed"))
        );
        assert_eq!(
            (&logged[1]["prompt_tokens"], &logged[1]["completion_tokens"], &logged[1]["outcome"]),
            (&json!(7), &json!(3), &json!("cancelled"))
        );
        let text = metrics.render(&[]).unwrap();
        assert!(
            text.contains(r#"pdserve_router_key_completion_tokens_total{key="anonymous",tenant="anonymous"} 6"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="cancelled",tenant="anonymous"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn a_failed_stream_is_logged_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sink, path) = sink(dir.path());
        let failing = futures::stream::iter(vec![delta(&[1]), Err(BackendError::Worker("gone".into()))]).boxed();
        let record = UsageRecord::start(sink, &Caller::Anonymous, "r", "m", 1, Running::unlimited());
        let _: Vec<_> = meter(failing, record).collect().await;
        assert_eq!(lines(&path)[0]["outcome"], json!("failed"));
    }
}
