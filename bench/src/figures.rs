//! Each figure: run our side, run llama.cpp's, fill in a [`Figure`].
//!
//! A side that fails records its error in the figure instead of ending the run, so one missing tool
//! never hides the other figures.

use crate::ours::{self, Ours};
use crate::report::{Bound, Figure, Target};
use crate::rss;
use bench::llama_cpp::{median, BatchedRow, LlamaCpp};
use std::path::Path;

/// Prompt and generation lengths of figures 1 and 2.
const DECODE_PROMPT: usize = 128;
const DECODE_TOKENS: usize = 128;
const PARALLEL: usize = 16;
const PREFILL_PROMPT: usize = 512;
const CACHED_PREFIX: usize = 1024;
const SUFFIX: usize = 32;
const TTFT_ROUNDS: usize = 3;
const RSS_SEQS: usize = 64;
const RSS_TOKENS: usize = 1024;
const RSS_GENERATED: usize = 24;

fn progress(what: &str) {
    eprintln!("{}: {what}", crate::NAME);
}

/// Figures 1–3 (those `wanted`): decode at 1 and 16 sequences, prefill of 512 tokens.
pub async fn throughput(
    ours: &Ours,
    llama: Option<&LlamaCpp>,
    wanted: &dyn Fn(u8) -> bool,
) -> anyhow::Result<Vec<Figure>> {
    let ge = |value| Target { bound: Bound::AtLeast, value };
    let mut single = Figure::new(1, "decode, 1 sequence (128+128)", "tok/s", "ours / llama.cpp", ge(1.0));
    let mut parallel = Figure::new(2, "decode, 16 sequences, aggregate", "tok/s", "ours / llama.cpp", ge(1.3));
    let mut prefill = Figure::new(3, "prefill, 512-token prompt", "tok/s", "ours / llama.cpp", ge(1.0));
    if !(1..=3).any(wanted) {
        return Ok(Vec::new());
    }

    // Ours: one engine with prefix caching off, sized for the biggest of the three.
    let blocks = ours::blocks_for(PARALLEL, DECODE_PROMPT + DECODE_TOKENS) + ours::blocks_for(1, PREFILL_PROMPT);
    let engine = ours.engine(blocks, PARALLEL, false);
    let prompts = ours.prompts()?;
    ours::warm_up(&engine, &prompts).await?;
    for (figure, seqs) in [(&mut single, 1), (&mut parallel, PARALLEL)] {
        if !wanted(figure.number) {
            continue;
        }
        progress(&format!("figure {}: ours, {seqs} × ({DECODE_PROMPT} + {DECODE_TOKENS}) tokens", figure.number));
        let result = async {
            let timelines = ours::run(&engine, prompts.batch(seqs, DECODE_PROMPT)?, DECODE_TOKENS as u32).await?;
            ours::decode_tokens_per_sec(&timelines)
        }
        .await;
        match result {
            Ok(tps) => figure.ours = Some(tps),
            Err(e) => figure.errors.push(format!("ours: {e:#}")),
        }
    }
    if wanted(3) {
        progress(&format!("figure 3: ours, prefill of {PREFILL_PROMPT} tokens"));
        match ours::run(&engine, vec![prompts.next(PREFILL_PROMPT)?], 1).await {
            Ok(t) => prefill.ours = Some(PREFILL_PROMPT as f64 / t[0].ttft_secs()),
            Err(e) => prefill.errors.push(format!("ours: {e:#}")),
        }
    }
    drop(engine);

    if let Some(llama) = llama {
        let npl: Vec<usize> =
            [(1, 1), (2, PARALLEL)].into_iter().filter(|&(n, _)| wanted(n)).map(|(_, pl)| pl).collect();
        if !npl.is_empty() {
            progress(&format!(
                "figures 1–2: llama-batched-bench -npp {DECODE_PROMPT} -ntg {DECODE_TOKENS} -npl {npl:?}"
            ));
            match llama.batched_bench(DECODE_PROMPT, DECODE_TOKENS, &npl) {
                Ok(rows) => {
                    for row in rows {
                        let figure = if row.pl == 1 { &mut single } else { &mut parallel };
                        figure.llama_cpp = Some(row.speed_tg);
                        figure.notes.push(batched_note(&row));
                    }
                }
                Err(e) => {
                    single.errors.push(format!("llama.cpp: {e:#}"));
                    parallel.errors.push(format!("llama.cpp: {e:#}"));
                }
            }
        }
        if wanted(3) {
            progress(&format!("figure 3: llama-batched-bench -npp {PREFILL_PROMPT} -ntg 1 -npl 1"));
            // One decode step after the prompt: -ntg 0 would print a division by zero.
            match llama.batched_bench(PREFILL_PROMPT, 1, &[1]) {
                Ok(rows) => {
                    prefill.llama_cpp = Some(rows[0].speed_pp);
                    prefill.notes.push(batched_note(&rows[0]));
                }
                Err(e) => prefill.errors.push(format!("llama.cpp: {e:#}")),
            }
        }
    }
    single.notes.push("decode tok/s: tokens after every sequence's first, over first-to-last token time (S_TG)".into());
    prefill.notes.push("ours: prompt tokens / time from submit to first token; llama.cpp: S_PP".into());
    let mut out = Vec::new();
    for mut figure in [single, parallel, prefill] {
        if wanted(figure.number) {
            figure.set_ratio_vs_llama();
            out.push(figure);
        }
    }
    Ok(out)
}

fn batched_note(row: &BatchedRow) -> String {
    format!(
        "llama-batched-bench pp {} tg {} pl {}: T_PP {:.3} s, S_PP {:.1} t/s, T_TG {:.3} s, S_TG {:.1} t/s",
        row.pp, row.tg, row.pl, row.t_pp, row.speed_pp, row.t_tg, row.speed_tg
    )
}

/// Figure 4: TTFT with a cached 1,024-token prefix over TTFT without.
pub async fn prefix_ttft(ours: &Ours, llama: Option<&LlamaCpp>) -> anyhow::Result<Figure> {
    let target = Target { bound: Bound::AtMost, value: 0.25 };
    let mut figure = Figure::new(4, "TTFT cached / uncached, 1024-token prefix", "%", "ours cached / uncached", target);
    let prompts = ours.prompts()?;
    // Each round: a fresh prefix with one suffix (uncached), then another suffix (cached).
    let rounds = (0..TTFT_ROUNDS)
        .map(|_| Ok((prompts.next(CACHED_PREFIX)?, prompts.next(SUFFIX)?, prompts.next(SUFFIX)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    progress(&format!("figure 4: ours, {TTFT_ROUNDS} rounds of {CACHED_PREFIX} + {SUFFIX} tokens"));
    // Room for a round's two requests, plus slack so the warm prefix is never evicted.
    let engine = ours.engine(4 * ours::blocks_for(1, CACHED_PREFIX + SUFFIX), 4, true);
    let measured = async {
        ours::warm_up(&engine, &prompts).await?;
        let (mut uncached, mut cached, mut hit) = (Vec::new(), Vec::new(), 0);
        for (prefix, first, second) in &rounds {
            let t = ours::run(&engine, vec![[prefix.as_slice(), first].concat()], 1).await?;
            uncached.push(t[0].ttft_secs());
            let t = ours::run(&engine, vec![[prefix.as_slice(), second].concat()], 1).await?;
            cached.push(t[0].ttft_secs());
            hit = t[0].cached_tokens;
        }
        anyhow::Ok((median(uncached), median(cached), hit))
    }
    .await;
    drop(engine);
    match measured {
        Ok((uncached, cached, hit)) => {
            figure.ours = Some(100.0 * cached / uncached);
            figure.set_ratio(cached / uncached);
            figure.notes.push(format!(
                "ours: {:.1} ms cached ({hit} prompt tokens from the cache) / {:.1} ms uncached (median of {TTFT_ROUNDS})",
                cached * 1e3,
                uncached * 1e3
            ));
        }
        Err(e) => figure.errors.push(format!("ours: {e:#}")),
    }

    if let Some(llama) = llama {
        progress("figure 4: llama-server -np 1, cache_prompt");
        match llama.server_ttft(&rounds).await {
            Ok(t) => {
                figure.llama_cpp = Some(100.0 * t.cached_secs / t.uncached_secs);
                let computed = t.cached_prompt_n.map_or("?".to_string(), |n| n.to_string());
                figure.notes.push(format!(
                    "llama.cpp (llama-server, cache_prompt): {:.1} ms cached ({computed} prompt tokens computed) / {:.1} ms uncached (median of {TTFT_ROUNDS}, HTTP wall time)",
                    t.cached_secs * 1e3,
                    t.uncached_secs * 1e3
                ));
            }
            Err(e) => figure.errors.push(format!("llama.cpp: {e:#}")),
        }
    }
    Ok(figure)
}

/// Figure 5: peak RSS in a child process against `(weights + KV) × 1.10`.
pub fn peak_rss(model: &Path, threads: usize) -> Figure {
    let target = Target { bound: Bound::AtMost, value: 1.10 };
    let mut figure = Figure::new(5, "peak RSS, 64 seqs × 1024 tokens", "MiB", "peak RSS / (weights + KV)", target);
    progress(&format!("figure 5: ours, {RSS_SEQS} × {RSS_TOKENS} tokens in a child process (minutes)"));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    match rss::measure(model, threads, RSS_SEQS, RSS_TOKENS, RSS_GENERATED) {
        Ok(r) => {
            figure.ours = Some(mib(r.peak_rss_bytes));
            figure.set_ratio(r.peak_rss_bytes as f64 / (r.weights_bytes + r.kv_budget_bytes) as f64);
            figure.notes.push(format!(
                "budget = (weights {:.0} MiB [RSS growth across load_gguf] + KV {:.0} MiB [{} blocks × {} B = {} seqs × {} tokens]) × 1.10 = {:.0} MiB; peak = VmHWM",
                mib(r.weights_bytes),
                mib(r.kv_budget_bytes),
                r.kv_blocks,
                r.block_bytes,
                r.seqs,
                r.tokens_per_seq,
                mib(r.budget_bytes())
            ));
        }
        Err(e) => figure.errors.push(format!("ours: {e:#}")),
    }
    figure.notes.push("llama.cpp: n/a (ours only)".into());
    figure
}
