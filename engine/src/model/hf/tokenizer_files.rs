//! The tokenizer side of a Hugging Face folder: `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens) and
//! `generation_config.json` (stop tokens).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::config::{read_json, Fields, HfConfig};
use crate::model::{ModelError, ModelInfo};
use crate::request::Pooling;

/// Where the tokenizer files are.
pub(super) struct TokenizerFiles {
    json: PathBuf,
    /// `tokenizer_config.json`, when there is one.
    config: Option<PathBuf>,
    /// `chat_template.jinja` (newer transformers save the template there), when there is one.
    template: Option<PathBuf>,
}

impl TokenizerFiles {
    /// The model folder's tokenizer, or `custom`: a `tokenizer.json` file or a
    /// folder holding one. A custom tokenizer without its own
    /// `tokenizer_config.json` uses the model's.
    pub fn locate(model_dir: &Path, custom: Option<&Path>) -> Result<Self, ModelError> {
        let (json, dir) = match custom {
            None => (model_dir.join("tokenizer.json"), model_dir.to_path_buf()),
            Some(p) if p.is_dir() => (p.join("tokenizer.json"), p.to_path_buf()),
            Some(p) => (p.to_path_buf(), p.parent().unwrap_or(Path::new(".")).to_path_buf()),
        };
        if !json.is_file() {
            return Err(ModelError::TokenizerFile { path: json, reason: "no such file".into() });
        }
        let beside = |name: &str| [&dir, model_dir].into_iter().map(|d| d.join(name)).find(|p| p.is_file());
        Ok(Self { json, config: beside("tokenizer_config.json"), template: beside("chat_template.jinja") })
    }

    /// The tokenizer, without the padding and truncation some `tokenizer.json` files carry
    /// (sentence encoders pad to 128): a prompt is its own tokens, and one too long for the
    /// context is refused, never cut silently.
    pub fn load(&self) -> Result<Tokenizer, ModelError> {
        let mut tokenizer = Tokenizer::from_file(&self.json)
            .map_err(|e| ModelError::TokenizerFile { path: self.json.clone(), reason: e.to_string() })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::TokenizerFile { path: self.json.clone(), reason: e.to_string() })?;
        Ok(tokenizer)
    }

    /// What the serving layers need to know, from the tokenizer files,
    /// `config.json` and `generation_config.json` (if `generation` exists).
    pub fn model_info(
        &self,
        tokenizer: &Tokenizer,
        hf: &HfConfig,
        generation: &Path,
        model_name: String,
    ) -> Result<ModelInfo, ModelError> {
        let json = match &self.config {
            Some(path) => read_json(path)?,
            None => Value::Object(Default::default()),
        };
        let config_path = self.config.clone().unwrap_or_else(|| self.json.with_file_name("tokenizer_config.json"));
        let f = Fields::new(&config_path, &json)?;

        let chat_template = match Self::chat_template(&f)? {
            Some(t) => Some(t),
            None => match &self.template {
                Some(path) => Some(
                    std::fs::read_to_string(path).map_err(|source| ModelError::Read { path: path.clone(), source })?,
                ),
                None => None,
            },
        };
        let bos_text = special_token(&f, "bos_token")?;
        let eos_text = special_token(&f, "eos_token")?;
        let known = |key: &str, text: &str| {
            tokenizer
                .token_to_id(text)
                .ok_or_else(|| f.bad(key, format!("`{text}` is not in the tokenizer's vocabulary")))
        };
        let bos_token_id = match &bos_text {
            Some(text) => Some(known("bos_token", text)?),
            None => hf.bos_token_id,
        };

        // config.json's ids come first (vLLM's primary EOS), then any that
        // generation_config.json adds, else tokenizer_config.json's token.
        let mut eos_token_ids = hf.eos_token_ids.clone();
        if generation.is_file() {
            let gen_json = read_json(generation)?;
            for id in Fields::new(generation, &gen_json)?.token_ids("eos_token_id")? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if eos_token_ids.is_empty() {
            if let Some(text) = &eos_text {
                eos_token_ids.push(known("eos_token", text)?);
            }
        }
        let Some(&first_eos) = eos_token_ids.first() else {
            return Err(
                f.bad("eos_token", "is missing here, and config.json and generation_config.json have no eos_token_id")
            );
        };
        if let Some(&id) = eos_token_ids.iter().chain(&bos_token_id).find(|&&id| id as usize >= hf.config.vocab_size) {
            return Err(f.bad(
                "eos_token_id",
                format!("token id {id} is outside the model's vocabulary of {}", hf.config.vocab_size),
            ));
        }
        let text_of = |id: u32| tokenizer.id_to_token(id).unwrap_or_default();

        Ok(ModelInfo {
            model_name,
            chat_template,
            context_length: hf.config.context_length,
            bos_token: bos_text.clone().or_else(|| bos_token_id.map(text_of)).unwrap_or_default(),
            bos_token_id,
            eos_token: eos_text.unwrap_or_else(|| text_of(first_eos)),
            eos_token_ids,
            add_bos_token: match f.opt_bool("add_bos_token")? {
                Some(add) => add,
                None => post_processor_adds(tokenizer, bos_token_id),
            },
            encoder: false,
            pooling: None,
            embedding_size: hf.config.hidden,
        })
    }

    /// An encoder's serving metadata: no chat template and no stop tokens (it
    /// never generates); its tokenizer's post-processor adds its special tokens.
    pub fn encoder_info(
        model_name: String,
        context_length: usize,
        embedding_size: usize,
        pooling: Option<Pooling>,
    ) -> ModelInfo {
        ModelInfo {
            model_name,
            chat_template: None,
            context_length,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            bos_token: String::new(),
            eos_token: String::new(),
            add_bos_token: false,
            encoder: true,
            pooling,
            embedding_size,
        }
    }

    /// `chat_template`: a string, or a list of `{name, template}` of which
    /// `default` is the one for chat.
    fn chat_template(f: &Fields) -> Result<Option<String>, ModelError> {
        match f.get("chat_template") {
            None => Ok(None),
            Some(Value::String(t)) => Ok(Some(t.clone())),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .map(|t| t.get("template").and_then(Value::as_str).map(str::to_string))
                .ok_or_else(|| f.bad("chat_template", "is a list without a `default` entry"))?
                .map(Some)
                .ok_or_else(|| f.bad("chat_template", "has a `default` entry without a `template` string")),
            Some(other) => Err(f.bad("chat_template", format!("is {other}, expected a string or a list"))),
        }
    }
}

/// A special token's text: a string, or an added-token object with `content`.
fn special_token(f: &Fields, key: &str) -> Result<Option<String>, ModelError> {
    match f.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => v
            .get("content")
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| f.bad(key, format!("is {v}, expected a string or an object with `content`"))),
    }
}

/// Whether the tokenizer's post-processor prepends BOS (Llama 3's does, and
/// its tokenizer_config.json has no `add_bos_token`). The router encodes
/// without special tokens and adds BOS itself when this is set, so text
/// prompts start as transformers would start them.
fn post_processor_adds(tokenizer: &Tokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    tokenizer.encode("", true).is_ok_and(|e| e.get_ids().first() == Some(&bos))
}
