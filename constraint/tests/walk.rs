//! Random walks under a constraint, over a small byte-level vocabulary: every token the mask
//! allows is drawn at random, so each walk is an answer a model could give. Every walk must
//! match the constraint, and end exactly where the constraint may end.

use std::sync::Arc;

use constraint::{Constraint, ConstraintError, Grammar, Vocabulary, Whitespace};
use prompt::decode::Decoder;
use serde_json::{json, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The 256 byte tokens, a few multi-byte ones, and two end-of-sequence tokens (ids 300, 301).
fn decoder() -> (Decoder, usize, Vec<u32>) {
    decoder_with(&[])
}

/// [`decoder`] with `tags` as added (not special) tokens from id 302, as Qwen3 has its think tags.
fn decoder_with(tags: &[&str]) -> (Decoder, usize, Vec<u32>) {
    let alphabet = ByteLevel::alphabet();
    let mut chars: Vec<char> = alphabet.into_iter().collect();
    chars.sort_unstable();
    let mut vocab: Vec<(String, u32)> = chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    for word in ["\"n", "am", "\":", "Ġ1", "12", "ĠĠ", "tr", "ue", "{\"", "\"}"] {
        let id = vocab.len() as u32;
        vocab.push((word.to_string(), id));
    }
    let merges: Vec<(String, String)> = Vec::new();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Pad to id 300, then the two eos tokens.
    let pad: Vec<AddedToken> =
        (tokenizer.get_vocab_size(true)..300).map(|i| AddedToken::from(format!("<pad{i}>"), true)).collect();
    tokenizer.add_special_tokens(&pad);
    tokenizer.add_special_tokens(&[AddedToken::from("<eos>", true), AddedToken::from("<eot>", true)]);
    let eos = vec![tokenizer.token_to_id("<eos>").unwrap(), tokenizer.token_to_id("<eot>").unwrap()];
    assert_eq!(eos, [300, 301]);
    tokenizer.add_tokens(&tags.iter().map(|t| AddedToken::from(*t, false)).collect::<Vec<_>>());
    (Decoder::new(Arc::new(tokenizer)), 302 + tags.len(), eos)
}

fn vocabulary() -> (Vocabulary, Decoder, Vec<u32>) {
    let (decoder, size, eos) = decoder();
    (Vocabulary::new(&decoder, size, &eos).unwrap(), decoder, eos)
}

/// xorshift: a seeded draw with no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One walk: the text before the end-of-sequence token, or `None` if it ran out of steps.
fn walk(vocab: &Vocabulary, decoder: &Decoder, eos: &[u32], c: &Constraint, seed: u64) -> Option<String> {
    let (mut grammar, _) = vocab.compile(c).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    for _ in 0..200 {
        let mut logits = vec![0.0f32; vocab.vocab_size()];
        grammar.mask(&mut logits);
        let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize] == 0.0).collect();
        assert!(!allowed.is_empty(), "the mask allows nothing after {:?}", decoder.decode(&out, false));
        // Ending is as likely as any one token, so walks are not all short.
        let token = allowed[rng.below(allowed.len())];
        if eos.contains(&token) {
            assert!(eos.iter().all(|t| allowed.contains(t)), "every eos token is allowed together");
            return Some(decoder.decode(&out, false).unwrap());
        }
        grammar.accept(token);
        out.push(token);
    }
    None
}

fn walks(c: &Constraint) -> Vec<String> {
    let (vocab, decoder, eos) = vocabulary();
    (0..60).filter_map(|seed| walk(&vocab, &decoder, &eos, c, seed)).collect()
}

#[test]
fn choice_walks_give_exactly_one_choice() {
    let choices = vec!["positive".to_string(), "negative".into(), "neutral, mostly".into()];
    let got = walks(&Constraint::Choice(choices.clone()));
    assert_eq!(got.len(), 60);
    for text in &got {
        assert!(choices.contains(text), "{text:?}");
    }
    assert!(choices.iter().all(|c| got.contains(c)), "every choice is reachable: {got:?}");
}

#[test]
fn regex_walks_match_in_full() {
    let rx = r"[a-c]{2,4}-\d{1,3}(x|yz)?";
    let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    let got = walks(&Constraint::Regex(rx.into()));
    assert!(got.len() >= 50, "{} walks ended", got.len());
    for text in &got {
        assert!(full.is_match(text), "{text:?}");
    }
}

#[test]
fn json_walks_are_valid_against_the_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 1, "maximum": 12},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
        },
        "required": ["name", "ok", "n"],
        "additionalProperties": false
    });
    let got = walks(&Constraint::Json { schema, whitespace: Whitespace::Compact });
    assert!(got.len() >= 40, "{} walks ended", got.len());
    for text in &got {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 5), "{text}");
        assert!(o["ok"].is_boolean(), "{text}");
        assert!(o["n"].as_i64().is_some_and(|n| (1..=12).contains(&n)), "{text}");
        if let Some(tags) = o.get("tags") {
            let tags = tags.as_array().unwrap();
            assert!(tags.len() <= 2 && tags.iter().all(|t| t == "a" || t == "b"), "{text}");
        }
        assert!(o.keys().all(|k| ["name", "ok", "n", "tags"].contains(&k.as_str())), "{text}");
        // Compact layout: one line, a space after each separator.
        assert!(!text.contains('\n') && text.contains("\": "), "{text:?}");
    }
}

#[test]
fn lark_walks_derive_from_the_grammar() {
    let lark = r#"start: greeting " " name
greeting: "hi" | "hello"
name: /[A-Z][a-z]{1,3}/"#;
    let full = regex::Regex::new("^(hi|hello) [A-Z][a-z]{1,3}$").unwrap();
    let got = walks(&Constraint::Lark(lark.into()));
    assert!(got.len() >= 50);
    for text in &got {
        assert!(full.is_match(text), "{text:?}");
    }
}

#[test]
fn no_end_before_the_answer_is_complete() {
    let (vocab, _, eos) = vocabulary();
    let (mut grammar, _) = vocab.compile(&Constraint::Choice(vec!["ab".into()])).unwrap();
    let mut logits = vec![0.0f32; vocab.vocab_size()];
    grammar.mask(&mut logits);
    assert!(eos.iter().all(|&t| logits[t as usize] == f32::NEG_INFINITY));
    let a = (0..logits.len()).find(|&t| logits[t] == 0.0).unwrap() as u32;
    grammar.accept(a);
    grammar.accept(a + 1); // "b" follows "a" in the byte alphabet
    assert!(grammar.is_complete());
    let mut logits = vec![0.0f32; vocab.vocab_size()];
    grammar.mask(&mut logits);
    let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize] == 0.0).collect();
    assert_eq!(allowed, eos, "once complete, only the end may follow");
}

#[test]
fn a_forbidden_token_ends_the_answer_instead_of_leaving_the_constraint() {
    let (vocab, _, eos) = vocabulary();
    let (mut grammar, _) = vocab.compile(&Constraint::Regex("[0-9]+".into())).unwrap();
    grammar.accept(u32::from(b'x'));
    let mut logits = vec![0.0f32; vocab.vocab_size()];
    grammar.mask(&mut logits);
    let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize] == 0.0).collect();
    assert_eq!(allowed, eos);
}

#[test]
fn bad_constraints_are_refused_with_a_reason() {
    let (vocab, _, _) = vocabulary();
    let refused = |c: Constraint| match vocab.compile(&c) {
        Err(ConstraintError::Invalid(reason)) => reason,
        Ok(_) => panic!("{c:?} compiled"),
        Err(e) => panic!("{c:?}: {e}"),
    };
    refused(Constraint::Regex("[a-".into()));
    refused(Constraint::Regex("(unclosed".into()));
    refused(Constraint::Lark("start: missing_rule".into()));
    refused(Constraint::Choice(vec![]));
    let reason =
        refused(Constraint::Json { schema: json!({"type": "object", "if": {}}), whitespace: Whitespace::Compact });
    assert!(reason.contains("if"), "{reason}");
    refused(Constraint::Json {
        schema: json!({"type": "string", "format": "no-such-format"}),
        whitespace: Whitespace::Compact,
    });
    refused(Constraint::Json { schema: json!([1]), whitespace: Whitespace::Compact });
    refused(Constraint::Json {
        schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
        whitespace: Whitespace::Compact,
    });
}

#[test]
fn a_vocabulary_without_a_byte_table_is_refused() {
    let tokenizer = Tokenizer::new(BPE::default());
    let decoder = Decoder::new(Arc::new(tokenizer));
    assert!(matches!(Vocabulary::new(&decoder, 10, &[0]), Err(ConstraintError::Vocabulary(_))));
}

#[test]
fn the_end_of_a_complete_answer_is_taken_without_a_failure() {
    let (vocab, _, eos) = vocabulary();
    let (mut grammar, _) = vocab.compile(&Constraint::Choice(vec!["a".into()])).unwrap();
    let mut logits = vec![0.0f32; vocab.vocab_size()];
    grammar.mask(&mut logits);
    let a = (0..logits.len()).find(|&t| logits[t] == 0.0).unwrap() as u32;
    grammar.accept(a);
    assert!(grammar.is_complete());
    grammar.accept(eos[1]);
    logits.fill(0.0);
    grammar.mask(&mut logits);
    let allowed: Vec<u32> = (0..logits.len() as u32).filter(|&t| logits[t as usize] == 0.0).collect();
    assert_eq!(allowed, eos);
    assert!(!format!("{grammar:?}").contains("failed: true"), "{grammar:?}");
}

/// The ids a grammar's mask leaves open.
fn allowed(grammar: &mut Grammar, size: usize) -> Vec<u32> {
    let mut logits = vec![0.0f32; size];
    grammar.mask(&mut logits);
    (0..size as u32).filter(|&t| logits[t as usize] == 0.0).collect()
}

/// With `<think>` and `</think>` in the vocabulary, the constraint holds the answer after the
/// reasoning: the answer may open a think block, whose tokens are free and never reach the
/// matcher, and the constrained text starts after `</think>`; a prompt's last tag decides where
/// the answer starts.
#[test]
fn the_constraint_holds_the_answer_after_the_reasoning() {
    let (decoder, size, eos) = decoder_with(&["<think>", "</think>"]);
    let vocab = Vocabulary::new(&decoder, size, &eos).unwrap();
    let think = vocab.think_tokens().expect("both tags are tokens");
    assert_eq!((think.open, think.close), (302, 303));
    let choice = Constraint::Choice(vec!["ab".into()]);
    let compile = |prompt: &[u32]| {
        let (mut grammar, _) = vocab.compile(&choice).unwrap();
        grammar.follow_prompt(prompt);
        grammar
    };
    // No tag in the prompt: "a", or a think block.
    let mut grammar = compile(&[5, 6]);
    let first = allowed(&mut grammar, size);
    assert_eq!(first.len(), 2, "{first:?}");
    let a = first[0];
    assert_eq!(first[1], think.open);
    grammar.accept(think.open);
    // Reasoning: every token, those the constraint forbids and the end included.
    assert_eq!(allowed(&mut grammar, size).len(), size);
    for token in [a + 1, a + 1, eos[0], think.open, 7] {
        grammar.accept(token);
    }
    assert!(!grammar.is_complete());
    grammar.accept(think.close);
    assert_eq!(allowed(&mut grammar, size), [a], "the answer starts after the reasoning, without a second block");
    grammar.accept(a);
    grammar.accept(a + 1);
    assert!(grammar.is_complete());
    assert_eq!(allowed(&mut grammar, size), eos);

    // Started without a block: no block later.
    let mut grammar = compile(&[]);
    grammar.accept(a);
    assert_eq!(allowed(&mut grammar, size), [a + 1]);
    // A prompt that closed the reasoning (Qwen3 with thinking off): the constraint at once.
    let mut grammar = compile(&[think.open, 9, think.close, 10]);
    assert_eq!(allowed(&mut grammar, size), [a]);
    // A prompt that opened it: free until `</think>`.
    let mut grammar = compile(&[think.close, 1, think.open, 9]);
    assert_eq!(allowed(&mut grammar, size).len(), size);
    grammar.accept(think.close);
    assert_eq!(allowed(&mut grammar, size), [a]);

    // A vocabulary without the tags: the constraint from the first token, whatever the prompt.
    let (plain, _, _) = vocabulary();
    assert!(plain.think_tokens().is_none());
    let (mut grammar, _) = plain.compile(&choice).unwrap();
    grammar.follow_prompt(&[302]);
    assert_eq!(allowed(&mut grammar, 302), [a]);
}

/// vLLM's structural tag: free text, but a trigger can only go on as its structure (the rest of
/// `begin`, JSON valid against the schema, `end`), after which the text is free again.
#[test]
fn a_structural_tag_holds_each_triggered_structure() {
    use constraint::api::{requested, Guided, StructuredOutputs};

    let (vocab, decoder, eos) = vocabulary();
    let size = vocab.vocab_size();
    let spec = json!({"structures": [{"begin": "<f=a>", "end": "</f>", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 12}},
        "required": ["n"], "additionalProperties": false}}], "triggers": ["<f="]});
    let so = StructuredOutputs { structural_tag: Some(spec), ..StructuredOutputs::default() };
    let constraint = requested(None, Some(&so), &Guided::default()).unwrap().unwrap().constraint;
    // Each byte's own token.
    let byte_token = |b: u8| (0..size as u32).find(|&t| decoder.token_bytes(t) == Some((&[b][..], false))).unwrap();
    let shape = regex::Regex::new(r#"^hi <f=a>\{"n": ([0-9]+)\}</f>$"#).unwrap();
    for seed in 0..20 {
        let (mut grammar, _) = vocab.compile(&constraint).unwrap();
        // Free text may end at once.
        assert!(eos.iter().all(|t| allowed(&mut grammar, size).contains(t)));
        for &b in b"hi <f=" {
            assert!(allowed(&mut grammar, size).contains(&byte_token(b)), "{:?} refused", b as char);
            grammar.accept(byte_token(b));
        }
        // The trigger is out: only the structure may follow, never the end.
        let next = allowed(&mut grammar, size);
        assert_eq!(
            next,
            [byte_token(b'a')],
            "{:?}",
            next.iter().map(|&t| decoder.decode(&[t], false)).collect::<Vec<_>>()
        );
        let mut out: Vec<u32> = b"hi <f=".iter().map(|&b| byte_token(b)).collect();
        let mut rng = Rng(seed * 7919 + 1);
        while !decoder.decode(&out, false).unwrap().ends_with("</f>") {
            let choices = allowed(&mut grammar, size);
            assert!(!choices.iter().any(|t| eos.contains(t)), "ended inside the structure");
            let token = choices[rng.below(choices.len())];
            grammar.accept(token);
            out.push(token);
            assert!(out.len() < 100, "{:?}", decoder.decode(&out, false));
        }
        let text = decoder.decode(&out, false).unwrap();
        let n: u32 = shape.captures(&text).unwrap_or_else(|| panic!("{text:?}"))[1].parse().unwrap();
        assert!((1..=12).contains(&n), "{text}");
        // Free again: any text (here, every printable ASCII byte), and the end.
        let after = allowed(&mut grammar, size);
        assert!((0x20..0x7f).all(|b| after.contains(&byte_token(b))), "{after:?}");
        assert!(eos.iter().all(|t| after.contains(t)));
        // A second trigger starts a second structure.
        for &b in b" <f=" {
            grammar.accept(byte_token(b));
        }
        assert_eq!(allowed(&mut grammar, size), [byte_token(b'a')]);
    }

    let refused = |spec: serde_json::Value| {
        let so = StructuredOutputs { structural_tag: Some(spec), ..StructuredOutputs::default() };
        requested(None, Some(&so), &Guided::default()).unwrap_err().field
    };
    let field = "structured_outputs.structural_tag";
    assert_eq!(refused(json!({"structures": [], "triggers": ["<f"]})), field);
    assert_eq!(refused(json!({"structures": [{"begin": "<g>", "end": "", "schema": {}}], "triggers": ["<f"]})), field);
    assert_eq!(refused(json!({"type": "structural_tag", "format": {"type": "triggered_tags"}})), field);
    assert_eq!(refused(json!("not json")), field);
}
