//! Tokenizer from GGUF metadata.
//!
//! Builds a Hugging Face byte-level BPE tokenizer from `tokenizer.ggml.*`
//! keys, so that ids match llama.cpp's for the same file. candle-core's GGUF
//! tokenizer helper is deliberately not used: for `tokenizer.ggml.pre =
//! smollm` it adds a leading space ("Hello" becomes "ĠHello"), which shifts
//! every prompt.
//!
//! The tokenizer never adds BOS by itself when `tokenizer.ggml.add_bos_token`
//! is false (the chat template writes its own special tokens); when it is
//! true, a template post-processor prepends BOS the way llama.cpp does.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

/// GGUF `token_type` of an ordinary vocabulary entry; every other type
/// (control, user-defined, unknown, unused, byte) becomes a special token.
const TOKEN_TYPE_NORMAL: i32 = 1;

/// Why a tokenizer could not be built from GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(&'static str),
    #[error("GGUF metadata key `{key}` has the wrong type: {source}")]
    BadValue { key: &'static str, source: candle_core::Error },
    #[error("unsupported tokenizer.ggml.model `{0}` (only `gpt2` byte-level BPE is supported)")]
    UnsupportedModel(String),
    #[error("unsupported tokenizer.ggml.pre `{0}` (supported: smollm, gpt2, default)")]
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
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.clone()));
    }
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
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    };

    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
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

    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(bad("tokenizer.ggml.token_type"))?
            .iter()
            .map(|t| t.to_i32().map_err(bad("tokenizer.ggml.token_type")))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty != TOKEN_TYPE_NORMAL)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);

    let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v.to_bool().map_err(bad("tokenizer.ggml.add_bos_token"))?,
        None => false,
    };
    let post: PostProcessorWrapper = if add_bos {
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
        PostSequence::new(vec![byte_level.into(), template.into()]).into()
    } else {
        byte_level.into()
    };
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
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
}
