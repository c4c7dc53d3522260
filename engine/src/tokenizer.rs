//! Tokenizer from GGUF metadata.
//!
//! Builds a Hugging Face tokenizer from `tokenizer.ggml.*` keys, so that ids
//! match llama.cpp's for the same file: byte-level BPE for `gpt2` files
//! (Llama 3, SmolLM, Qwen), and for SentencePiece `llama` files (Gemma) a BPE
//! over the pieces with byte fallback whose merges come from the pieces'
//! scores, which is the merge order llama.cpp's SentencePiece tokenizer
//! follows (and how Hugging Face converts such vocabularies). candle-core's GGUF
//! tokenizer helper is deliberately not used: for `tokenizer.ggml.pre =
//! smollm` it adds a leading space ("Hello" becomes "ĠHello"), which shifts
//! every prompt.
//!
//! The tokenizer never adds BOS by itself when `tokenizer.ggml.add_bos_token`
//! is false (the chat template writes its own special tokens); when it is
//! true, a template post-processor prepends BOS the way llama.cpp does.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

/// GGUF `token_type` of an ordinary vocabulary entry; in byte-level files
/// every other type (control, user-defined, unknown, unused, byte) becomes a
/// special token.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `token_type`s SentencePiece files use besides normal pieces.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// llama.cpp's `qwen2` pre-tokenizer pattern (Qwen2's `tokenizer.json`).
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's word-boundary mark, which stands for a space in pieces.
const SPACE_MARK: &str = "\u{2581}";

/// Why a tokenizer could not be built from GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(&'static str),
    #[error("GGUF metadata key `{key}` has the wrong type: {source}")]
    BadValue { key: &'static str, source: candle_core::Error },
    #[error("unsupported tokenizer.ggml.model `{0}` (supported: `gpt2` byte-level BPE, `llama` SentencePiece)")]
    UnsupportedModel(String),
    #[error("unsupported tokenizer.ggml.pre `{0}` (supported: smollm, qwen2, gpt2, default)")]
    UnsupportedPreTokenizer(String),
    #[error("malformed merge #{index} `{merge}` (expected two tokens separated by one space)")]
    BadMerge { index: usize, merge: String },
    #[error("{key} = {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenIdOutOfRange { key: &'static str, id: u32, vocab_size: usize },
    #[error("building the tokenizer failed: {0}")]
    Build(String),
}

fn get<'a>(content: &'a Content, key: &'static str) -> Result<&'a Value, TokenizerError> {
    content.metadata.get(key).ok_or(TokenizerError::MissingKey(key))
}

fn bad(key: &'static str) -> impl Fn(candle_core::Error) -> TokenizerError {
    move |source| TokenizerError::BadValue { key, source }
}

fn string_array(content: &Content, key: &'static str) -> Result<Vec<String>, TokenizerError> {
    get(content, key)?.to_vec().map_err(bad(key))?.iter().map(|v| v.to_string().cloned().map_err(bad(key))).collect()
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` keys.
///
/// The result round-trips through `to_string(false)` and `Tokenizer::from_str`
/// with identical ids, which is how the router receives it.
pub fn from_gguf(content: &Content) -> Result<Tokenizer, TokenizerError> {
    let model = get(content, "tokenizer.ggml.model")?.to_string().map_err(bad("tokenizer.ggml.model"))?;
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(bad("tokenizer.ggml.token_type"))?
            .iter()
            .map(|t| t.to_i32().map_err(bad("tokenizer.ggml.token_type")))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let (mut tokenizer, post) = match model.as_str() {
        "gpt2" => byte_level_bpe(content, &tokens, &types)?,
        "llama" => sentencepiece(content, &tokens, &types)?,
        other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
    };

    let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v.to_bool().map_err(bad("tokenizer.ggml.add_bos_token"))?,
        None => false,
    };
    let post: Option<PostProcessorWrapper> = if add_bos {
        let key = "tokenizer.ggml.bos_token_id";
        let bos = get(content, key)?.to_u32().map_err(bad(key))?;
        let bos_text = tokens
            .get(bos as usize)
            .ok_or(TokenizerError::TokenIdOutOfRange { key, id: bos, vocab_size: tokens.len() })?
            .clone();
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos_text} $A"))
            .and_then(|b| b.try_pair(format!("{bos_text} $A {bos_text} $B")))
            .map_err(TokenizerError::Build)?
            .special_tokens(vec![(bos_text, bos)])
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        Some(match post {
            Some(p) => PostSequence::new(vec![p, template.into()]).into(),
            None => template.into(),
        })
    } else {
        post
    };
    tokenizer.with_post_processor(post);
    Ok(tokenizer)
}

/// A `gpt2` file: byte-level BPE with the file's merges and pre-tokenizer,
/// and its post-processor (the byte-level offsets fix-up).
fn byte_level_bpe(
    content: &Content,
    tokens: &[String],
    types: &[i32],
) -> Result<(Tokenizer, Option<PostProcessorWrapper>), TokenizerError> {
    // Files written before the key existed used plain GPT-2 splitting.
    let pre = match content.metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(bad("tokenizer.ggml.pre"))?.clone(),
        None => "default".to_string(),
    };
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM's Hugging Face tokenizer splits every digit on its own
        // before the GPT-2 regex; llama.cpp's `smollm` pre-type matches it.
        "smollm" => PreSequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        // Qwen's split: contractions, letters with one leading non-letter,
        // single digits, punctuation runs, newlines (llama.cpp's `qwen2`).
        "qwen2" => {
            let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    };

    let vocab: Vocab = tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
    let merges: Merges = string_array(content, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(index, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_string(), b.to_string())),
            _ => Err(TokenizerError::BadMerge { index, merge: m }),
        })
        .collect::<Result<_, _>>()?;
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(byte_level));
    // User-defined tokens (Qwen3's `<think>`, `<tool_call>`) are text, as in llama.cpp and HF:
    // matched in any input, and kept when special tokens are skipped on decode; the rest
    // (control tokens) are special.
    let added = |special: bool| -> Vec<AddedToken> {
        let wanted = |ty: i32| ty != TOKEN_TYPE_NORMAL && (ty == TOKEN_TYPE_USER_DEFINED) != special;
        let chosen = tokens.iter().zip(types).filter(|(_, &ty)| wanted(ty));
        chosen.map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false)).collect()
    };
    tokenizer.add_special_tokens(&added(true));
    tokenizer.add_tokens(&added(false));
    Ok((tokenizer, Some(byte_level.into())))
}

/// A SentencePiece (`llama`) file, as llama.cpp tokenizes it: spaces become
/// `▁` (no space is prepended unless `tokenizer.ggml.add_space_prefix`),
/// user-defined pieces (Gemma's runs of spaces and newlines) are split out
/// of the raw text first, then adjacent pieces merge by the score of what
/// they form, highest first, and what no piece covers falls back to bytes.
fn sentencepiece(
    content: &Content,
    tokens: &[String],
    types: &[i32],
) -> Result<(Tokenizer, Option<PostProcessorWrapper>), TokenizerError> {
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = get(content, key)?
        .to_vec()
        .map_err(bad(key))?
        .iter()
        .map(|v| v.to_f32().map_err(bad(key)))
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(TokenizerError::Build(format!(
            "{} tokens but {} scores and {} token types",
            tokens.len(),
            scores.len(),
            types.len()
        )));
    }
    let mut vocab = Vocab::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    // Every split of a piece into two pieces is a merge, ranked by the
    // piece's score, then by the pieces' ids (Hugging Face's conversion).
    let mut ranked: Vec<(f32, u32, u32, u32, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !matches!(types[id], TOKEN_TYPE_NORMAL | TOKEN_TYPE_USER_DEFINED) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..split]), vocab.get(&piece[split..])) {
                ranked.push((scores[id], id as u32, l, r, split));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges: Merges = ranked
        .iter()
        .map(|&(_, id, _, _, split)| {
            let piece = &tokens[id as usize];
            (piece[..split].to_string(), piece[split..].to_string())
        })
        .collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = content.metadata.get("tokenizer.ggml.unknown_token_id") {
        let key = "tokenizer.ggml.unknown_token_id";
        let id = unk.to_u32().map_err(bad(key))?;
        let text =
            tokens.get(id as usize).ok_or(TokenizerError::TokenIdOutOfRange { key, id, vocab_size: tokens.len() })?;
        builder = builder.unk_token(text.clone());
    }
    let bpe = builder.build().map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let space_prefix = match content.metadata.get("tokenizer.ggml.add_space_prefix") {
        Some(v) => v.to_bool().map_err(bad("tokenizer.ggml.add_space_prefix"))?,
        None => true,
    };
    if space_prefix {
        return Err(TokenizerError::Build(
            "SentencePiece vocabularies that prepend a space (add_space_prefix) are not implemented".into(),
        ));
    }
    let spaces = Replace::new(" ", SPACE_MARK).map_err(|e| TokenizerError::Build(e.to_string()))?;
    tokenizer.with_normalizer(Some(spaces));
    let decoder: DecoderWrapper = DecoderSequence::new(vec![
        Replace::new(SPACE_MARK, " ").map_err(|e| TokenizerError::Build(e.to_string()))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])
    .into();
    tokenizer.with_decoder(Some(decoder));
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == ty)
            .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
    tokenizer.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
    Ok((tokenizer, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::str::FromStr;

    fn model_path() -> PathBuf {
        let path = std::env::var_os("PDSERVE_MODEL").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
        assert!(path.exists(), "model {} not found: run scripts/fetch-model.sh or set PDSERVE_MODEL", path.display());
        path
    }

    fn golden() -> serde_json::Value {
        let path = std::env::var_os("PDSERVE_GOLDEN").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/smollm2-greedy.json")
        });
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("golden file {}: {e} (set PDSERVE_GOLDEN)", path.display()));
        serde_json::from_str(&text).expect("golden JSON")
    }

    fn tokenizer() -> Tokenizer {
        let mut file = std::fs::File::open(model_path()).unwrap();
        let content = Content::read(&mut file).unwrap();
        from_gguf(&content).unwrap()
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn no_leading_space_and_digits_split() {
        let tok = tokenizer();
        let enc = tok.encode("Hello", true).unwrap();
        assert_eq!(enc.get_tokens(), ["Hello"]);
        let enc = tok.encode("x 2024", true).unwrap();
        assert_eq!(enc.get_tokens(), ["x", "Ġ", "2", "0", "2", "4"]);
    }

    #[test]
    fn special_tokens_parse_and_skip_on_decode() {
        let tok = tokenizer();
        let ids = ids(&tok, "<|im_start|>user\nHi<|im_end|>");
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nHi<|im_end|>");
    }

    /// Qwen3's tags are user-defined tokens: matched in text, and kept on decode when special
    /// tokens are skipped, as llama.cpp and HF keep them (the reasoning parser reads them).
    #[test]
    fn user_defined_tokens_are_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny/qwen3.gguf");
        let content = Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
        let tok = from_gguf(&content).unwrap();
        let ids = ids(&tok, "<|im_start|><think>x</think><|im_end|>");
        assert_eq!(ids, [1, 398, 3 + u32::from(b'x'), 399, 2], "three specials, then the bytes in order");
        assert_eq!(tok.decode(&ids, true).unwrap(), "<think>x</think>");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|><think>x</think><|im_end|>");
    }

    #[test]
    fn golden_prompts_tokenize_exactly() {
        let tok = tokenizer();
        let golden = golden();
        let records = golden["records"].as_array().expect("records");
        assert!(!records.is_empty());
        for r in records {
            let text = r["prompt_text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(r["prompt_token_ids"].clone()).unwrap();
            assert_eq!(ids(&tok, text), want, "record {}", r["id"]);
            let completion: Vec<u32> = serde_json::from_value(r["completion_token_ids"].clone()).unwrap();
            assert_eq!(
                tok.decode(&completion, true).unwrap().trim_end_matches(['\u{fffd}']),
                r["completion_text"].as_str().unwrap().trim_end_matches(['\u{fffd}']),
                "record {}",
                r["id"]
            );
        }
    }

    #[test]
    fn json_round_trip_keeps_ids() {
        let tok = tokenizer();
        let json = tok.to_string(false).unwrap();
        let back = Tokenizer::from_str(&json).unwrap();
        let golden = golden();
        let mut texts: Vec<String> = golden["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["prompt_text"].as_str().unwrap().to_string())
            .collect();
        texts.push("Numbers 12345, émojis 🦀 and   spaces\t\n".to_string());
        for t in &texts {
            assert_eq!(ids(&tok, t), ids(&back, t), "{t:?}");
        }
        let sample = ids(&tok, &texts[0]);
        assert_eq!(tok.decode(&sample, true).unwrap(), back.decode(&sample, true).unwrap());
    }

    /// Gemma 3's SentencePiece vocabulary (`scripts/fetch-model.sh gemma3`,
    /// or `PDSERVE_GEMMA3`) and llama.cpp's ids for it.
    fn gemma() -> (Tokenizer, serde_json::Value) {
        let path = std::env::var_os("PDSERVE_GEMMA3").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/gemma-3-270m-q4_k_m.gguf")
        });
        assert!(path.exists(), "{} not found: run scripts/fetch-model.sh gemma3", path.display());
        let content = Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
        let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/gemma3-greedy.json");
        let golden = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
        (from_gguf(&content).unwrap(), golden)
    }

    #[test]
    fn sentencepiece_gives_llama_cpps_ids() {
        let (tok, golden) = gemma();
        let json = tok.to_string(false).unwrap();
        let back = Tokenizer::from_str(&json).unwrap();
        for case in golden["tokenizations"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
            let got = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{text:?}");
            assert_eq!(back.encode(text, false).unwrap().get_ids(), want, "{text:?} after the JSON round trip");
            assert_eq!(tok.decode(&got, false).unwrap(), text, "{text:?} decodes back");
        }
        for r in golden["records"].as_array().unwrap() {
            let text = r["prompt_text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(r["prompt_token_ids"].clone()).unwrap();
            // Chats carry `<bos>` in their text; raw prompts get it from the file's add_bos_token.
            let raw = r.get("prompt").is_some();
            assert_eq!(tok.encode(text, raw).unwrap().get_ids(), want, "record {}", r["id"]);
            let stops: Vec<u32> = serde_json::from_value(golden["stop_token_ids"].clone()).unwrap();
            let completion: Vec<u32> = serde_json::from_value(r["completion_token_ids"].clone()).unwrap();
            let text_ids: Vec<u32> = completion.into_iter().filter(|id| !stops.contains(id)).collect();
            assert_eq!(
                tok.decode(&text_ids, true).unwrap().trim_end_matches(['\u{fffd}']),
                r["completion_text"].as_str().unwrap().trim_end_matches(['\u{fffd}']),
                "record {}",
                r["id"]
            );
        }
    }
}
