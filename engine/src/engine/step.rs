//! The step thread: it owns the scheduler and the samplers, applies the handles' commands
//! between steps, and runs each step.
//!
//! # One step
//!
//! ```text
//! drain commands ─► drop requests whose receiver is gone ─► schedule (plan)
//!   ─► [write lock: write provided KV, copy forked blocks, forward]
//!   ─► sample per sequence (one token per choice of a forking row)
//!   ─► scheduler.finish_step ─► [write lock: copy the new forks' blocks]
//!   ─► publish stats ─► send events
//! ```
//!
//! A request with `n > 1` choices has one sampler per choice; it is over
//! (and leaves the live set) when its last choice's `Finished` is sent.

use super::shared::{Shared, MAX_PENDING_KV_EVENTS};
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits};
use crate::kv::cache::KvStorage;
use crate::kv::landing::{KvLanding, Landings};
use crate::request::{Command, EngineEvent, EngineRequest, FailureKind, KvSource, RequestError, Submission};
use crate::sampler::{argmax, Sampler};
use crate::scheduler::{
    BlockCopy, NewSequence, ProvidedData, ProvidedKv, SampledToken, ScheduledSeq, Scheduler, StepPlan,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, PoisonError};
use tokio::sync::mpsc::UnboundedSender;

/// The step thread's view of a live request.
pub(super) struct Client {
    events: UnboundedSender<EngineEvent>,
    /// One per choice.
    samplers: Vec<Sampler>,
    /// Choices that have not heard `Finished` yet.
    unfinished: usize,
}

/// State owned by the step thread.
pub(super) struct StepLoop {
    pub(super) model: Arc<dyn Forward>,
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) scheduler: Scheduler,
    pub(super) clients: HashMap<String, Client>,
    pub(super) default_seed: u64,
    /// Requests seeded from `default_seed` so far.
    pub(super) num_unseeded: u64,
    pub(super) sync_replies: Vec<mpsc::Sender<()>>,
    /// Admitted requests whose hand-off may still be landing, until a step
    /// of theirs has run (and so waited for every layer).
    pub(super) landings: HashMap<String, Arc<KvLanding>>,
    /// Submissions still landing that arrived while the engine was busy:
    /// admitted once their landing settles, or as soon as the engine idles.
    pub(super) held_back: Vec<Submission>,
}

impl StepLoop {
    pub(super) fn run(mut self) {
        let mut handles_gone = false;
        loop {
            handles_gone |= self.drain_commands();
            self.admit_held_back(false);
            self.drop_closed_clients();
            self.settle();
            let plan = self.scheduler.schedule();
            if plan.is_empty() && !self.held_back.is_empty() {
                // Idle now: a landing hand-off may stream into its first step.
                self.admit_held_back(true);
                continue;
            }
            if plan.is_empty() {
                // Nothing runs and nothing waiting fits: only a command can
                // change that, so block for one.
                self.settle();
                if handles_gone {
                    break;
                }
                match self.commands.recv() {
                    Ok(command) => self.apply(command),
                    Err(_) => break,
                }
                continue;
            }
            self.execute(plan);
            self.settle();
        }
        tracing::debug!(num_waiting = self.scheduler.num_waiting(), "engine step loop stopped: every handle is gone");
    }

    /// Applies every queued command without blocking. True if every handle
    /// is gone.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.apply(command),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit(submission) if self.shared.failure.get().is_some() => {
                // Sent before the engine failed: it hears why, like the others.
                let request_id = submission.request.request_id.clone();
                self.admit_request(*submission);
                let reason = self.shared.failure.get().cloned().unwrap_or_default();
                self.scheduler.fail(
                    &[&request_id],
                    &RequestError::new(FailureKind::Engine, format!("the engine has failed: {reason}")),
                );
            }
            Command::Submit(submission) => {
                let busy = self.scheduler.num_running() + self.scheduler.num_waiting() > 0;
                if busy && still_landing(&submission.request) {
                    self.held_back.push(*submission);
                } else {
                    self.admit_request(*submission);
                }
            }
            Command::Abort(request_id) => {
                // One held back is admitted first, to hear its abort like any other.
                if let Some(at) = self.held_back.iter().position(|s| s.request.request_id == request_id) {
                    let submission = self.held_back.remove(at);
                    self.admit_request(submission);
                }
                self.scheduler.abort(&request_id);
                self.landings.remove(&request_id);
            }
            Command::Release(ids) => {
                tracing::debug!(blocks = ?ids, "releasing held blocks");
                self.scheduler.release(&ids);
            }
            Command::Reserve { num_blocks, mut empty, reply } => {
                let reservation = self.scheduler.reserve(num_blocks).map(|ids| {
                    empty.ids = ids;
                    empty
                });
                tracing::debug!(num_blocks, granted = reservation.is_some(), "KV blocks reserved for a hand-off");
                // A receiver that is gone hands the reservation back here,
                // whose drop queues an Unreserve.
                let _ = reply.send(reservation);
            }
            Command::Unreserve(ids) => {
                tracing::debug!(blocks = ?ids, "freeing reserved KV blocks");
                self.scheduler.unreserve(&ids);
            }
            Command::Retain(ids) => self.scheduler.retain_reserved(&ids),
            Command::Sync(reply) => self.sync_replies.push(reply),
        }
    }

    fn admit_request(&mut self, Submission { request, events }: Submission) {
        let seed = request.sampling.seed.unwrap_or_else(|| {
            self.num_unseeded += 1;
            self.default_seed.wrapping_add(self.num_unseeded)
        });
        let provided = match request.kv {
            KvSource::Compute => None,
            KvSource::Provided { data, first_tokens } => {
                Some(ProvidedKv { kv: ProvidedData::Bytes(data), first_tokens })
            }
            KvSource::Reserved { mut blocks, first_tokens, landing } => {
                if let Some(landing) = landing {
                    self.landings.insert(request.request_id.clone(), landing);
                }
                let ids = blocks.take();
                // The puller wrote (or is writing) them through the arena.
                for kv in self.shared.kv.iter() {
                    kv.write().unwrap_or_else(PoisonError::into_inner).mark_written(&ids);
                }
                Some(ProvidedKv { kv: ProvidedData::InBlocks(ids), first_tokens })
            }
        };
        tracing::debug!(
            request_id = %request.request_id,
            prompt_len = request.prompt_token_ids.len(),
            max_tokens = request.sampling.max_tokens,
            provided_kv = provided.is_some(),
            pin_on_finish = request.pin_on_finish,
            priority = request.priority,
            seed,
            "queued"
        );
        let n = request.n.max(1) as usize;
        let mut samplers: Vec<Sampler> = (0..n)
            .map(|choice| {
                Sampler::new(&request.sampling, seed)
                    .with_stream(choice as u64)
                    .with_eos(self.scheduler.eos_token_ids())
                    .with_prompt(&request.prompt_token_ids)
                    .with_grammar(request.grammar.clone())
            })
            .collect();
        if let Some(p) = &provided {
            // Generated token 1 of each choice, for the penalties and `min_tokens`.
            for (sampler, &first) in samplers.iter_mut().zip(&p.first_tokens) {
                sampler.record(first);
            }
        }
        self.clients.insert(request.request_id.clone(), Client { events, samplers, unfinished: n });
        // A prompt computed elsewhere has no logits here to score it with.
        let prompt_logprobs = if provided.is_some() { None } else { request.sampling.prompt_logprobs };
        self.scheduler.add(NewSequence {
            request_id: request.request_id,
            prompt: request.prompt_token_ids,
            max_tokens: request.sampling.max_tokens as usize,
            stop_token_ids: request.sampling.stop_token_ids,
            ignore_eos: request.sampling.ignore_eos,
            min_tokens: request.sampling.min_tokens as usize,
            pin_on_finish: request.pin_on_finish,
            cache_salt: request.cache_salt.map(String::into_bytes).unwrap_or_default(),
            provided,
            priority: request.priority,
            n,
            prompt_logprobs,
            pooling: request.pooling,
        });
    }

    /// Drops requests whose receiver is gone before spending a step on them
    /// (a waiting request never gets a send that could fail).
    fn drop_closed_clients(&mut self) {
        let closed: Vec<String> =
            self.clients.iter().filter(|(_, c)| c.events.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in closed {
            self.drop_request(&id);
        }
    }

    /// Admits held-back submissions whose landing settled, or all of them.
    fn admit_held_back(&mut self, all: bool) {
        let (ready, waiting): (Vec<Submission>, Vec<Submission>) =
            std::mem::take(&mut self.held_back).into_iter().partition(|s| all || !still_landing(&s.request));
        self.held_back = waiting;
        for submission in ready {
            self.admit_request(submission);
        }
    }

    fn drop_request(&mut self, request_id: &str) {
        self.landings.remove(request_id);
        self.scheduler.remove(request_id);
        self.clients.remove(request_id);
        self.shared.live().remove(request_id);
    }

    /// Runs one planned step: provided KV writes and the forward pass under
    /// the KV write lock, then sampling.
    fn execute(&mut self, mut plan: StepPlan) {
        let landings: Vec<(String, Arc<KvLanding>)> = plan
            .seqs
            .iter()
            .filter_map(|s| self.landings.remove(&s.request_id).map(|l| (s.request_id.clone(), l)))
            .collect();
        // Block copies (a fork's partial block) and models that do not wait
        // per layer need the whole KV in place before the step.
        if !self.model.waits_for_layers() || !plan.block_copies.is_empty() {
            for (_, landing) in &landings {
                let _ = landing.wait_for(usize::MAX);
            }
        }
        let span = tracing::debug_span!(
            "engine_step",
            num_seqs = plan.seqs.len(),
            num_tokens = plan.num_tokens(),
            num_kv_writes = plan.kv_writes.len()
        );
        let _entered = span.enter();
        let mut failed_writes = Vec::new();
        let num_ranks = self.shared.kv.len();
        for (rank, kv) in self.shared.kv.iter().enumerate() {
            let mut kv = kv.write().unwrap_or_else(PoisonError::into_inner);
            for w in &plan.kv_writes {
                // Every rank's hand-off bytes, one after another (see `read_blocks`).
                let per_rank = w.data.len() / num_ranks;
                let data = &w.data[rank * per_rank..(rank + 1) * per_rank];
                // The scheduler checked the size and the ids come from the
                // block manager, so this is a bug path.
                if let Err(e) = kv.write_blocks(&w.block_ids, data) {
                    tracing::error!(request_id = %w.request_id, rank, error = %e, "writing provided KV failed");
                    failed_writes.push((w.request_id.clone(), e.to_string()));
                }
            }
            // After the writes: a fork at admission copies provided KV.
            copy_blocks(&mut kv, &plan.block_copies);
        }
        failed_writes.dedup_by(|a, b| a.0 == b.0);
        let result = (!plan.seqs.is_empty()).then(|| {
            let step = || {
                // A draft model writes its tokens into the plan before the batch is made of it.
                if let Some(draft) = self.model.draft() {
                    self.draft_tokens(draft, &mut plan, &landings)?;
                }
                let mut batch = plan.to_batch();
                batch.landings = Landings(landings.iter().map(|(_, l)| l.clone()).collect());
                self.model.forward_ranks(&batch, &self.shared.kv)
            };
            // A panicking model fails this batch, not the whole engine.
            match catch_unwind(AssertUnwindSafe(step)) {
                Ok(result) => result.map_err(StepFailure::from),
                Err(panic) => Err(StepFailure { message: panic_message(panic.as_ref()), fatal: false }),
            }
        });
        for (request_id, error) in failed_writes {
            self.scheduler.fail(
                &[request_id.as_str()],
                &RequestError::new(FailureKind::KvWrite, format!("writing provided KV failed: {error}")),
            );
        }
        // The step waited for every layer: each landing is complete or
        // failed, and a failed one's row must not be sampled into a token.
        for (request_id, landing) in &landings {
            if let Some(reason) = landing.failure() {
                tracing::warn!(%request_id, %reason, "KV hand-off failed while streaming in");
                self.scheduler.fail(
                    &[request_id],
                    &RequestError::new(FailureKind::Handoff, format!("the KV hand-off failed: {reason}")),
                );
            }
        }
        let Some(result) = result else { return };
        let logits = result.and_then(|logits| {
            self.check_logits(&plan, logits).map_err(|message| StepFailure { message, fatal: false })
        });
        match logits {
            Ok(mut logits) => {
                // Each sequence's rows in turn: every token's when it scores its prompt, else
                // the last token's when it samples (a prefill chunk that is not the last has none).
                let mut sampled: Vec<Vec<SampledToken>> = Vec::with_capacity(plan.seqs.len());
                let mut first_row = 0;
                let pooled = std::mem::take(&mut logits.hidden);
                let mut hidden = pooled.as_slice();
                for s in &plan.seqs {
                    if s.num_hidden_rows() > 0 {
                        let (rows, rest) = hidden.split_at(s.num_hidden_rows());
                        self.scheduler.report_hidden(s, rows);
                        hidden = rest;
                    }
                    let rows = s.num_rows();
                    if s.all_logits {
                        self.scheduler.report_prompt_logprobs(s, |i| logits.row(first_row + i));
                    }
                    sampled.push(if !s.need_logits {
                        Vec::new()
                    } else if s.drafts.is_empty() {
                        self.sample_row(s, logits.row_mut(first_row + rows - 1))
                    } else {
                        let vocab = logits.vocab_size;
                        self.verify(s, logits.data[first_row * vocab..(first_row + rows) * vocab].chunks_mut(vocab))
                    });
                    first_row += rows;
                }
                self.scheduler.finish_step_with(&plan, sampled);
                // Forks just made copy their partial prompt block now, before
                // any block freed in this step can be reused.
                let copies = self.scheduler.take_block_copies();
                if !copies.is_empty() {
                    for kv in &self.shared.kv {
                        copy_blocks(&mut kv.write().unwrap_or_else(PoisonError::into_inner), &copies);
                    }
                }
            }
            Err(StepFailure { message, fatal: false }) => {
                tracing::error!(error = %message, "forward pass failed; failing its sequences");
                let ids: Vec<&str> = plan.seqs.iter().map(|s| s.request_id.as_str()).collect();
                self.scheduler
                    .fail(&ids, &RequestError::new(FailureKind::Forward, format!("forward pass failed: {message}")));
            }
            Err(StepFailure { message, fatal: true }) => self.fail_engine(&message),
        }
    }

    /// Fills the draft slots of the plan's speculating sequences with `draft`'s greedy tokens:
    /// its first pass feeds each sequence's new token, after the tokens the draft missed if any
    /// (`draft_catch_up`; see [`crate::model::Drafted`]), each further pass the draft before, one token per sequence
    /// per pass, into the slots' own KV positions. Greedy drafts are a deterministic proposal,
    /// which [`Self::verify`]'s rejection sampling expects.
    fn draft_tokens(
        &self,
        draft: &dyn Forward,
        plan: &mut StepPlan,
        landings: &[(String, Arc<KvLanding>)],
    ) -> Result<(), ForwardError> {
        let drafting: Vec<usize> = (0..plan.seqs.len()).filter(|&i| !plan.seqs[i].drafts.is_empty()).collect();
        let Some(longest) = drafting.iter().map(|&i| plan.seqs[i].drafts.len()).max() else { return Ok(()) };
        // The draft reads the KV a hand-off is still landing.
        for (request_id, landing) in landings {
            if drafting.iter().any(|&i| &plan.seqs[i].request_id == request_id) {
                let _ = landing.wait_for(usize::MAX);
            }
        }
        for j in 0..longest {
            let fed: Vec<usize> = drafting.iter().copied().filter(|&i| plan.seqs[i].drafts.len() > j).collect();
            let mut batch = ForwardBatch::default();
            for &i in &fed {
                let s = &plan.seqs[i];
                let known = s.tokens.len() - s.drafts.len();
                if j == 0 {
                    // The tokens the draft missed (decodes that did not draft), then the new one.
                    let tokens: Vec<u32> = s.draft_catch_up.iter().chain(&s.tokens[..known]).copied().collect();
                    let start = s.context_start - s.draft_catch_up.len();
                    batch.push(&tokens, start, s.prompt_len, s.block_table.clone(), true);
                } else {
                    let at = known + j - 1;
                    batch.push(&s.tokens[at..at + 1], s.context_start + at, s.prompt_len, s.block_table.clone(), true);
                }
            }
            let logits = draft.forward_ranks(&batch, &self.shared.kv)?;
            for (row, &i) in fed.iter().enumerate() {
                let token = argmax(logits.row(row));
                let s = &mut plan.seqs[i];
                let known = s.tokens.len() - s.drafts.len();
                s.drafts[j] = token;
                s.tokens[known + j] = token;
            }
        }
        Ok(())
    }

    /// No step can run any more: fails every request, now and from now on
    /// (see [`EngineError::Failed`]).
    fn fail_engine(&mut self, reason: &str) {
        tracing::error!(%reason, "the engine has failed; failing every request");
        let _ = self.shared.failure.set(reason.to_string());
        for submission in std::mem::take(&mut self.held_back) {
            self.admit_request(submission);
        }
        let ids: Vec<String> = self.clients.keys().cloned().collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.scheduler.fail(&ids, &RequestError::new(FailureKind::Engine, format!("the engine has failed: {reason}")));
        self.landings.clear();
    }

    /// The tokens of one logits row: one per choice in `s.choices`, each from
    /// its own sampler. A single choice samples the row in place; several
    /// each take a copy (sampling processes the row).
    fn sample_row(&mut self, s: &ScheduledSeq, row: &mut [f32]) -> Vec<SampledToken> {
        let Some(client) = self.clients.get_mut(&s.request_id) else {
            return s.choices.clone().map(|_| SampledToken { id: argmax(row), logprobs: None }).collect();
        };
        let single = s.choices.len() == 1;
        let raw = if single { Vec::new() } else { row.to_vec() };
        s.choices
            .clone()
            .map(|choice| {
                let sampler = &mut client.samplers[choice as usize];
                let (id, logprobs) = if single {
                    sampler.sample_with_logprobs(row)
                } else {
                    sampler.sample_with_logprobs(&mut raw.clone())
                };
                SampledToken { id, logprobs }
            })
            .collect()
    }

    /// A speculative decode's tokens: row `i` (the logits after the fed token and drafts
    /// `..i`) is sampled as without speculation, and while it samples draft `i` the next row is
    /// sampled too. Returns the accepted drafts, then the first token that is not one.
    ///
    /// The drafts are a deterministic proposal, so this is rejection sampling that keeps the
    /// distribution: draft `d` is accepted with probability `p(d)`, and when it is not, the token
    /// drawn is distributed as `p` without `d`. It takes one draw from the sequence's seeded
    /// stream per token, as decoding without drafts does: the same seed gives the same tokens.
    fn verify<'a>(&mut self, s: &ScheduledSeq, rows: impl Iterator<Item = &'a mut [f32]>) -> Vec<SampledToken> {
        let mut tokens = Vec::with_capacity(s.drafts.len() + 1);
        let mut sampler = self.clients.get_mut(&s.request_id).map(|c| &mut c.samplers[s.choices.start as usize]);
        for (row, draft) in rows.zip(s.drafts.iter().map(Some).chain([None])) {
            let (id, logprobs) = match sampler.as_mut() {
                Some(sampler) => sampler.sample_with_logprobs(row),
                // Dropped since the plan: its tokens go nowhere.
                None => (argmax(row), None),
            };
            tokens.push(SampledToken { id, logprobs });
            if draft != Some(&id) {
                break;
            }
        }
        tokens
    }

    fn check_logits(&self, plan: &StepPlan, logits: Logits) -> Result<Logits, String> {
        let rows = plan.num_logits();
        let expected = rows * self.shared.vocab_size;
        if logits.vocab_size != self.shared.vocab_size || logits.data.len() != expected {
            return Err(format!(
                "model returned {} logits of vocab {} for {rows} sequences, expected vocab {} ({expected} values)",
                logits.data.len(),
                logits.vocab_size,
                self.shared.vocab_size
            ));
        }
        let hidden: usize = plan.seqs.iter().map(ScheduledSeq::num_hidden_rows).sum();
        if logits.hidden.len() != hidden {
            return Err(format!("model returned {} hidden states, expected {hidden}", logits.hidden.len()));
        }
        Ok(logits)
    }

    /// Publishes stats, then delivers events, then answers syncs. A request
    /// whose receiver is gone is dropped on its first failed send.
    fn settle(&mut self) {
        let events = self.scheduler.take_events();
        // Which events end their request: an error, or its last choice's `Finished`.
        let terminal: Vec<bool> = events
            .iter()
            .map(|(id, event)| match event {
                EngineEvent::Token { .. } | EngineEvent::PromptLogprobs { .. } | EngineEvent::Embedding(_) => false,
                EngineEvent::Error(_) => true,
                EngineEvent::Finished { .. } => self.clients.get_mut(id).is_none_or(|c| {
                    c.unfinished = c.unfinished.saturating_sub(1);
                    c.unfinished == 0
                }),
            })
            .collect();
        {
            let mut live = self.shared.live();
            for ((id, _), _) in events.iter().zip(&terminal).filter(|(_, &t)| t) {
                live.remove(id);
            }
        }
        self.publish_stats();
        let mut gone = Vec::new();
        let mut released_undelivered = false;
        for ((id, event), terminal) in events.into_iter().zip(terminal) {
            let Some(client) = self.clients.get(&id) else {
                continue;
            };
            let pinned = match &event {
                EngineEvent::Finished { pinned_blocks: Some(blocks), .. } => Some(blocks.clone()),
                _ => None,
            };
            let delivered = client.events.send(event).is_ok();
            // Nobody learned of these pins, so nobody would ever release them.
            if let (false, Some(blocks)) = (delivered, pinned) {
                self.scheduler.release(&blocks);
                released_undelivered = true;
            }
            if terminal {
                self.clients.remove(&id);
            } else if !delivered {
                gone.push(id);
            }
        }
        for id in &gone {
            self.drop_request(id);
        }
        if !gone.is_empty() || released_undelivered {
            self.publish_stats();
        }
        for reply in self.sync_replies.drain(..) {
            let _ = reply.send(());
        }
    }

    fn publish_stats(&mut self) {
        let kv_events = self.scheduler.take_kv_events();
        if !kv_events.is_empty() {
            let mut pending = self.shared.kv_events.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend(kv_events);
            // Nobody drains them (yet): keep memory bounded. A router index
            // that misses old events only under-counts cached blocks.
            if pending.len() > MAX_PENDING_KV_EVENTS {
                let excess = pending.len() - MAX_PENDING_KV_EVENTS;
                tracing::debug!(dropped = excess, "KV events not taken in time; dropping the oldest");
                pending.drain(..excess);
            }
        }
        let (s, sched) = (&self.shared, &self.scheduler);
        s.num_running.store(sched.num_running(), Ordering::Release);
        s.num_waiting.store(sched.num_waiting(), Ordering::Release);
        s.pending_prefill_tokens.store(sched.num_pending_prefill_tokens(), Ordering::Release);
        s.free_blocks.store(sched.num_free_blocks(), Ordering::Release);
        s.cached_blocks.store(sched.num_cached_blocks(), Ordering::Release);
        s.held_blocks.store(sched.num_held_blocks(), Ordering::Release);
        s.num_preemptions.store(sched.num_preemptions(), Ordering::Release);
        s.speculation.lock().unwrap_or_else(PoisonError::into_inner).clone_from(sched.speculation());
    }
}

/// Whether a request's KV is still streaming in.
fn still_landing(request: &EngineRequest) -> bool {
    matches!(&request.kv, KvSource::Reserved { landing: Some(landing), .. } if !landing.is_settled())
}

/// Why a step's forward pass failed, and whether any later step can succeed.
struct StepFailure {
    message: String,
    /// A broken tensor-parallel group: every later step would fail too.
    fatal: bool,
}

impl From<ForwardError> for StepFailure {
    fn from(error: ForwardError) -> Self {
        let fatal = matches!(error, ForwardError::Comm(_));
        Self { message: error.to_string(), fatal }
    }
}

/// Copies each block's KV to its destination (forks' partial prompt blocks).
/// Both ids come from the block manager, so a failure is a bug: logged.
fn copy_blocks(kv: &mut KvStorage, copies: &[BlockCopy]) {
    for c in copies {
        if let Err(e) = kv.copy_block(c.src, c.dst) {
            tracing::error!(src = c.src, dst = c.dst, error = %e, "copying a forked block failed");
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the model panicked: {message}")
}
