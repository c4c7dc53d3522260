//! Speculative decoding: draft tokens for a decoding sequence, which the next step verifies in
//! one forward pass (see [`SpeculativeConfig`]). Two methods propose them:
//!
//! - **Prompt lookup** ([`NgramLookup`]): an answer that copies from its prompt (a summary
//!   quoting it, a rewrite, a code edit, a JSON extraction) repeats n-grams the sequence already
//!   holds: when its last `n` tokens occurred before, the tokens that followed them then are a
//!   likely continuation now. Nothing new is loaded and nothing crosses the hand-off: the drafts
//!   come from the tokens alone, here, at planning.
//! - **A draft model** ([`SpeculativeMethod::DraftModel`]): a smaller model of the same
//!   vocabulary, whose KV lives in the target's blocks after the target's layers. The scheduler
//!   only reserves the drafts' slots; the engine runs the draft to fill them before the step.

use std::path::PathBuf;

/// How the decode steps speculate (vLLM's `--speculative-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// Where the drafts come from (`method`).
    pub method: SpeculativeMethod,
    /// Draft tokens proposed per step at most (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
    /// No drafts in a step with more decoding sequences than this (`disable_by_batch_size`):
    /// a large batch already reads each weight for many tokens, and its verification rows cost
    /// more than the drafts save.
    pub disable_by_batch_size: usize,
}

/// Where a speculative step's drafts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// Prompt lookup in the sequence's own tokens (`"method": "ngram"`).
    Ngram(NgramLookup),
    /// A draft model's greedy tokens (`"method": "draft_model"`, `"model": path`): a GGUF of the
    /// same vocabulary and KV geometry as the target.
    DraftModel {
        /// The draft's GGUF file.
        model: PathBuf,
    },
}

/// Prompt lookup's suffix lengths (vLLM's `prompt_lookup_max` and `prompt_lookup_min`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramLookup {
    /// The longest suffix looked up (`prompt_lookup_max`).
    pub prompt_lookup_max: usize,
    /// The shortest suffix looked up (`prompt_lookup_min`).
    pub prompt_lookup_min: usize,
}

/// The default of [`SpeculativeConfig::disable_by_batch_size`] for prompt lookup: measured with
/// `pdserve-spec-bench --concurrent 2,3,4,6` and drafting at every size, verifying pays up to
/// three decoding sequences (1.18× and 1.20× at 2 and 3) and not at four (0.93-0.96×): with the
/// weights prefetched, each extra row costs a larger share of a step.
pub const DISABLE_BY_BATCH_SIZE: usize = 3;

/// The default of [`SpeculativeConfig::disable_by_batch_size`] with a draft model, whose k passes
/// cost each sequence the draft's share of a step: measured with the F16 / Q4_1 SmolLM2 pair
/// (the draft about 40% of a target step), drafting pays for one sequence only. A much smaller
/// draft raises it.
pub const DRAFT_MODEL_DISABLE_BY_BATCH_SIZE: usize = 1;

/// One sequence's draft length and back-off, adapted to how its drafts fared: the length follows
/// the drafts it accepted last (one more after all were), and a step whose drafts were all
/// rejected pauses drafting for 1, 2, 4 ... 64 tokens, so text the drafts cannot predict costs
/// little.
#[derive(Debug, Clone, Default)]
pub(super) struct Adaptive {
    /// Drafts to propose next; 0: as many as the config allows.
    len: usize,
    /// No drafts before the sequence has generated this many tokens.
    resume_at: usize,
    /// Tokens of the next pause.
    next_pause: usize,
    /// The drafts planned last were a [`NgramLookup::second_row`]'s, which leave the length and
    /// the pauses as they are.
    second_row: bool,
}

/// The longest pause of [`Adaptive`].
const MAX_PAUSE: usize = 64;

impl Adaptive {
    /// Drafts the sequence may propose now, having generated `num_generated` tokens.
    pub(super) fn limit(&self, config: &SpeculativeConfig, num_generated: usize) -> usize {
        if num_generated < self.resume_at {
            0
        } else if self.len == 0 {
            config.num_speculative_tokens
        } else {
            self.len.min(config.num_speculative_tokens)
        }
    }

    /// Notes where the drafts just planned came from: the adaptive length, or a second row.
    pub(super) fn proposed(&mut self, second_row: bool) {
        self.second_row = second_row;
    }

    /// Takes a verified step that accepted `accepted` drafts, the sequence now at
    /// `num_generated` tokens.
    pub(super) fn verified(&mut self, accepted: usize, num_generated: usize) {
        if self.second_row {
            return;
        }
        if accepted == 0 {
            let pause = self.next_pause.max(1);
            self.resume_at = num_generated + pause;
            self.next_pause = (pause * 2).min(MAX_PAUSE);
            self.len = 1;
        } else {
            self.next_pause = 1;
            // All accepted or not, one more than were: after a full acceptance that is one more
            // than were drafted (`limit` caps it at the config's).
            self.len = accepted + 1;
        }
    }
}

impl SpeculativeConfig {
    /// Prompt lookup with `num_speculative_tokens` drafts and vLLM's default suffix lengths.
    pub fn ngram(num_speculative_tokens: usize) -> Self {
        Self {
            method: SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max: 4, prompt_lookup_min: 2 }),
            num_speculative_tokens,
            disable_by_batch_size: DISABLE_BY_BATCH_SIZE,
        }
    }

    /// The draft model's file, for the draft-model method.
    pub fn draft_model(&self) -> Option<&std::path::Path> {
        match &self.method {
            SpeculativeMethod::DraftModel { model } => Some(model),
            SpeculativeMethod::Ngram(_) => None,
        }
    }

    /// vLLM's `--speculative-config` JSON: `{"method": "ngram", "num_speculative_tokens": K}`,
    /// with `prompt_lookup_max` (default 4, or `prompt_lookup_min` if larger) and
    /// `prompt_lookup_min` (default 2, or `prompt_lookup_max` if smaller); or
    /// `{"method": "draft_model", "model": PATH, "num_speculative_tokens": K}` (the method may be
    /// left out when `model` is given). Both take `disable_by_batch_size` (default
    /// [`DISABLE_BY_BATCH_SIZE`], or [`DRAFT_MODEL_DISABLE_BY_BATCH_SIZE`] with a draft model).
    /// Any other method or key is refused by name.
    pub fn from_json(text: &str) -> Result<Self, SpeculativeConfigError> {
        let fail = |message: String| Err(SpeculativeConfigError(message));
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => return fail(format!("not JSON: {e}")),
        };
        let Some(object) = value.as_object() else { return fail("expected a JSON object".into()) };
        let keys = [
            "method",
            "model",
            "num_speculative_tokens",
            "prompt_lookup_max",
            "prompt_lookup_min",
            "disable_by_batch_size",
        ];
        if let Some(key) = object.keys().find(|k| !keys.contains(&k.as_str())) {
            return fail(format!("`{key}` is not supported (keys: {})", keys.join(", ")));
        }
        let method = match (object.get("method").map(|m| m.as_str()), object.contains_key("model")) {
            (Some(Some("ngram")), _) => "ngram",
            (Some(Some("draft_model")), _) | (None, true) => "draft_model",
            (Some(Some(other)), _) => {
                return fail(format!("method `{other}` is not supported: \"ngram\" (prompt lookup) or \"draft_model\""))
            }
            (Some(None), _) => return fail("`method` must be a string".into()),
            (None, false) => return fail("`method` is required: \"ngram\" or \"draft_model\"".into()),
        };
        let count = |key: &str| -> Result<Option<usize>, SpeculativeConfigError> {
            let Some(v) = object.get(key) else { return Ok(None) };
            match v.as_u64() {
                Some(n @ 1..=64) => Ok(Some(n as usize)),
                _ => Err(SpeculativeConfigError(format!("`{key}` must be a whole number from 1 to 64, not {v}"))),
            }
        };
        let Some(num_speculative_tokens) = count("num_speculative_tokens")? else {
            return fail("`num_speculative_tokens` is required".into());
        };
        let method = if method == "ngram" {
            if object.contains_key("model") {
                return fail("`model` is for \"method\": \"draft_model\", not \"ngram\"".into());
            }
            let (max, min) = (count("prompt_lookup_max")?, count("prompt_lookup_min")?);
            let prompt_lookup_max = max.unwrap_or(min.unwrap_or(0).max(4));
            let prompt_lookup_min = min.unwrap_or(prompt_lookup_max.min(2));
            if prompt_lookup_min > prompt_lookup_max {
                return fail(format!(
                    "`prompt_lookup_min` ({prompt_lookup_min}) is above `prompt_lookup_max` ({prompt_lookup_max})"
                ));
            }
            SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max, prompt_lookup_min })
        } else {
            if let Some(key) = ["prompt_lookup_max", "prompt_lookup_min"].into_iter().find(|k| object.contains_key(*k))
            {
                return fail(format!("`{key}` is for \"method\": \"ngram\", not \"draft_model\""));
            }
            match object.get("model").map(|m| m.as_str()) {
                Some(Some(path)) if !path.is_empty() => SpeculativeMethod::DraftModel { model: PathBuf::from(path) },
                Some(_) => return fail("`model` must be the draft model's GGUF path".into()),
                None => return fail("`model` is required with \"method\": \"draft_model\"".into()),
            }
        };
        let disable_by_batch_size = match object.get("disable_by_batch_size") {
            None if matches!(method, SpeculativeMethod::DraftModel { .. }) => DRAFT_MODEL_DISABLE_BY_BATCH_SIZE,
            None => DISABLE_BY_BATCH_SIZE,
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
                None => return fail(format!("`disable_by_batch_size` must be a whole number, not {v}")),
            },
        };
        Ok(Self { method, num_speculative_tokens, disable_by_batch_size })
    }
}

impl std::fmt::Display for SpeculativeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.method {
            SpeculativeMethod::Ngram(l) => {
                write!(f, "ngram, lookup {}..={}", l.prompt_lookup_min, l.prompt_lookup_max)?
            }
            SpeculativeMethod::DraftModel { model } => write!(f, "draft model {}", model.display())?,
        }
        write!(f, ", {} tokens", self.num_speculative_tokens)
    }
}

impl NgramLookup {
    /// Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    /// `tokens` that occurred before, from `prompt_lookup_max` tokens down to
    /// `prompt_lookup_min`; empty when none did. A copy that runs into the end of `tokens` goes
    /// on with what it copied (as LZ77 copies overlap): text that repeats is predicted to go on
    /// repeating.
    pub fn propose(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        if k == 0 {
            return Vec::new();
        }
        let longest = self.prompt_lookup_max.min(tokens.len().saturating_sub(1));
        for n in (self.prompt_lookup_min.max(1)..=longest).rev() {
            let suffix = &tokens[tokens.len() - n..];
            // The latest start `p` of an earlier occurrence: it must be followed by a token.
            let found = (0..tokens.len() - n).rev().find(|&p| &tokens[p..p + n] == suffix);
            if let Some(p) = found {
                let mut drafts = Vec::with_capacity(k);
                for j in p + n..p + n + k {
                    let token = tokens.get(j).copied().unwrap_or_else(|| drafts[j - tokens.len()]);
                    drafts.push(token);
                }
                return drafts;
            }
        }
        Vec::new()
    }
}

impl NgramLookup {
    /// The one draft a sequence decoding alone verifies when [`Self::propose`] has none (its
    /// suffixes did not occur before, or its drafts are paused): the token that followed the
    /// latest earlier occurrence of its longest suffix that did occur, down to its last token
    /// alone; empty when even that token is new. Not adaptive, as its cost is not a drafts':
    /// a lone decode's step reads every weight for one row, and the second row rides along on
    /// the same reads (with SmolLM2-135M on 2 cores, measured in the engine, a step of 2 rows
    /// costs 1.1-1.25× one), so a draft accepted more than a fifth of the time pays: measured,
    /// 47% on answers that copy, about 20% (even) in open chat.
    pub fn second_row(&self, tokens: &[u32]) -> Vec<u32> {
        Self { prompt_lookup_min: 1, ..*self }.propose(tokens, 1)
    }
}

/// Why a speculative config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpeculativeConfigError(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(k: usize, min: usize, max: usize) -> SpeculativeConfig {
        SpeculativeConfig {
            method: SpeculativeMethod::Ngram(lookup(min, max)),
            num_speculative_tokens: k,
            disable_by_batch_size: DISABLE_BY_BATCH_SIZE,
        }
    }

    fn lookup(min: usize, max: usize) -> NgramLookup {
        NgramLookup { prompt_lookup_max: max, prompt_lookup_min: min }
    }

    #[test]
    fn the_draft_length_follows_what_was_accepted_and_rejections_pause_drafting() {
        let config = config(4, 1, 3);
        let mut a = Adaptive::default();
        assert_eq!(a.limit(&config, 0), 4);
        a.verified(2, 3);
        assert_eq!(a.limit(&config, 3), 3, "two accepted: three next");
        a.verified(3, 7);
        assert_eq!(a.limit(&config, 7), 4, "all accepted: one more, within the config");
        // Nothing accepted: a pause of 1 token, then 2, then 4; an acceptance resets it.
        a.verified(0, 8);
        assert_eq!((a.limit(&config, 8), a.limit(&config, 9)), (0, 1));
        a.verified(0, 10);
        assert_eq!((a.limit(&config, 11), a.limit(&config, 12)), (0, 1));
        a.verified(0, 13);
        assert_eq!((a.limit(&config, 16), a.limit(&config, 17)), (0, 1));
        a.verified(1, 19);
        assert_eq!(a.limit(&config, 19), 2);
        a.verified(0, 20);
        assert_eq!(a.limit(&config, 21), 1, "the pause starts again at one token");
        for _ in 0..10 {
            a.verified(0, 100);
        }
        assert_eq!((a.limit(&config, 163), a.limit(&config, 164)), (0, 1), "at most 64 tokens");
    }

    #[test]
    fn the_tokens_after_the_latest_earlier_occurrence_of_the_suffix_are_proposed() {
        // "1 2 3 4 5 ... 1 2 3 9 ... 1 2 3": the latest earlier "1 2 3" is followed by 9.
        let tokens = [1, 2, 3, 4, 5, 7, 1, 2, 3, 9, 8, 6, 1, 2, 3];
        assert_eq!(lookup(1, 3).propose(&tokens, 3), [9, 8, 6]);
        // Past the end of the text, the copy goes on with what it copied.
        assert_eq!(lookup(1, 3).propose(&tokens, 8), [9, 8, 6, 1, 2, 3, 9, 8]);
        assert_eq!(lookup(1, 3).propose(&tokens, 2), [9, 8]);
        assert!(lookup(1, 3).propose(&tokens, 0).is_empty());
    }

    #[test]
    fn the_longest_suffix_that_occurred_before_wins() {
        // "2 3" occurred after 7 (latest) but "1 2 3" only after 0: the longer match leads.
        let tokens = [0, 1, 2, 3, 4, 7, 2, 3, 5, 1, 2, 3];
        assert_eq!(lookup(1, 3).propose(&tokens, 1), [4]);
        // With at most 2 tokens looked up, "2 3" is matched, latest first.
        assert_eq!(lookup(1, 2).propose(&tokens, 1), [5]);
    }

    #[test]
    fn nothing_is_proposed_without_an_earlier_occurrence_of_a_long_enough_suffix() {
        assert!(lookup(2, 4).propose(&[1, 2, 3, 4, 5], 4).is_empty());
        // "5" alone occurred before, but the shortest suffix looked up is 2 tokens.
        assert!(lookup(2, 4).propose(&[5, 1, 2, 3, 5], 4).is_empty());
        assert_eq!(lookup(1, 4).propose(&[5, 1, 2, 3, 5], 4), [1, 2, 3, 5]);
        assert!(lookup(1, 4).propose(&[], 4).is_empty());
        assert!(lookup(1, 4).propose(&[7], 4).is_empty());
    }

    #[test]
    fn a_second_row_is_the_token_after_the_longest_suffix_that_occurred_down_to_one_token() {
        // No "3 5" before: the config's lookup (2..4) has nothing, the last token alone does.
        let tokens = [5, 1, 2, 3, 4, 5, 7, 3, 5];
        assert!(lookup(2, 4).propose(&tokens, 4).is_empty());
        assert_eq!(lookup(2, 4).second_row(&tokens), [7]);
        // A longer suffix that occurred still wins, and only one token is drafted.
        assert_eq!(lookup(2, 4).second_row(&[9, 5, 1, 2, 3, 5, 1]), [2]);
        assert!(lookup(2, 4).second_row(&[1, 2, 3]).is_empty(), "a new last token");
    }

    #[test]
    fn a_text_that_repeats_is_predicted_to_go_on_repeating() {
        assert_eq!(lookup(1, 3).propose(&[4, 4, 4, 4], 3), [4, 4, 4]);
        assert_eq!(lookup(1, 2).propose(&[1, 2, 1, 2, 1], 5), [2, 1, 2, 1, 2]);
    }

    #[test]
    fn speculative_config_takes_vllms_ngram_json_and_refuses_the_rest_by_name() {
        let config = |k, max, min| config(k, min, max);
        let batch = r#"{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 9}"#;
        assert_eq!(SpeculativeConfig::from_json(batch).map(|c| c.disable_by_batch_size), Ok(9));
        assert_eq!(
            SpeculativeConfig::from_json(r#"{"method": "ngram", "num_speculative_tokens": 5}"#),
            Ok(config(5, 4, 2))
        );
        let full =
            r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 6, "prompt_lookup_min": 3}"#;
        assert_eq!(SpeculativeConfig::from_json(full), Ok(config(3, 6, 3)));
        let min_only = r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5}"#;
        assert_eq!(SpeculativeConfig::from_json(min_only), Ok(config(3, 5, 5)));
        let draft = |json| {
            SpeculativeConfig::from_json(json)
                .map(|c| (c.draft_model().map(PathBuf::from), c.num_speculative_tokens, c.disable_by_batch_size))
        };
        let want = Ok((Some(PathBuf::from("d.gguf")), 3, DRAFT_MODEL_DISABLE_BY_BATCH_SIZE));
        assert_eq!(draft(r#"{"method": "draft_model", "model": "d.gguf", "num_speculative_tokens": 3}"#), want);
        assert_eq!(draft(r#"{"model": "d.gguf", "num_speculative_tokens": 3}"#), want, "the method follows `model`");
        for (bad, named) in [
            (r#"{"method": "eagle", "num_speculative_tokens": 3}"#, "eagle"),
            (r#"{"method": "ngram", "num_speculative_tokens": 3, "model": "x"}"#, "model"),
            (r#"{"method": "draft_model", "num_speculative_tokens": 3}"#, "model"),
            (r#"{"model": "d.gguf", "num_speculative_tokens": 3, "prompt_lookup_max": 2}"#, "prompt_lookup_max"),
            (r#"{"model": 7, "num_speculative_tokens": 3}"#, "model"),
            (r#"{"model": "d.gguf", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}"#, "draft_tensor"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
            (r#"{"num_speculative_tokens": 3}"#, "method"),
            (r#"{"method": "ngram", "num_speculative_tokens": 0}"#, "num_speculative_tokens"),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3}"#,
                "prompt_lookup_min",
            ),
            ("ngram", "JSON"),
        ] {
            let error = SpeculativeConfig::from_json(bad).unwrap_err().to_string();
            assert!(error.contains(named), "{bad}: {error}");
        }
    }
}
