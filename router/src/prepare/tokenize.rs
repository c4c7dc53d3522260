//! Prompts to token ids, the way vLLM does it.
//!
//! A rendered chat already holds every special token the template wants
//! (BOS included), so it is encoded without adding any; special-token text in
//! it is still parsed into ids because the tokenizer splits on added tokens
//! first. A plain completion prompt gets BOS only if the model card says so.

use crate::fleet::model::{Model, Serves};
use crate::prepare::error::ValidationError;
use prompt::chat_template::{ChatTemplate, RenderOptions, TemplateMessage};

/// A chat's rendering, checked: the tools offered and vLLM's template options.
/// The default is what a chat request that sets no option renders: the
/// model's template with the generation prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRender {
    /// Tools for the template's `tools`; `None` offers none.
    pub tools: Option<Vec<serde_json::Value>>,
    /// End the prompt with the assistant's turn header.
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open for the model to continue.
    pub continue_final_message: bool,
    /// The request's own Jinja template, replacing the model's.
    pub chat_template: Option<String>,
    /// Extra template variables.
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Renders the chat template and tokenizes the result.
pub fn chat_prompt(model: &Model, messages: &[TemplateMessage]) -> Result<Vec<u32>, ValidationError> {
    chat_prompt_with_tools(model, messages, None)
}

/// [`chat_prompt`] with the tools offered to the model (the template's `tools`).
pub fn chat_prompt_with_tools(
    model: &Model,
    messages: &[TemplateMessage],
    tools: Option<&[serde_json::Value]>,
) -> Result<Vec<u32>, ValidationError> {
    render_chat(model, messages, &ChatRender { tools: tools.map(<[_]>::to_vec), ..ChatRender::default() })
}

/// Renders the chat as `render` asks (the request's own template, when it
/// brings one) and tokenizes the result.
pub fn render_chat(
    model: &Model,
    messages: &[TemplateMessage],
    render: &ChatRender,
) -> Result<Vec<u32>, ValidationError> {
    // A request's template is compiled for that request only: it is the
    // client's, and most requests use the model's.
    let own;
    let template = match &render.chat_template {
        Some(source) => {
            own = ChatTemplate::new(source, &model.bos_token, &model.eos_token).map_err(|e| {
                ValidationError::Unsupported { field: "chat_template", reason: format!("does not compile: {e}") }
            })?;
            &own
        }
        None => model.template.as_ref().ok_or(ValidationError::Unsupported {
            field: "messages",
            reason: "the model has no chat template; use /v1/completions or send `chat_template`".into(),
        })?,
    };
    let options = RenderOptions {
        tools: render.tools.as_deref(),
        add_generation_prompt: render.add_generation_prompt,
        continue_final_message: render.continue_final_message,
        kwargs: render.kwargs.as_ref(),
    };
    let text = template.render_with(messages, &options).map_err(|e| ValidationError::Template(e.to_string()))?;
    encode(model, &text)
}

/// Tokenizes a completion prompt, with BOS first when the model wants it.
pub fn text_prompt(model: &Model, text: &str) -> Result<Vec<u32>, ValidationError> {
    text_ids(model, text, true)
}

/// Tokenizes text; `add_special_tokens` (vLLM's flag) puts BOS first when
/// the model wants it, which is all the special tokens this router adds.
pub fn text_ids(model: &Model, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ValidationError> {
    if model.serves == Serves::Embeddings {
        // An encoder's special tokens come from its tokenizer's post-processor, around the text.
        if text.len() > model.max_prompt_bytes {
            return Err(ValidationError::TextTooLong { bytes: text.len(), context_length: model.context_length });
        }
        let encoding =
            model.tokenizer.encode(text, add_special_tokens).map_err(|e| ValidationError::Tokenize(e.to_string()))?;
        return Ok(encoding.get_ids().to_vec());
    }
    let ids = encode(model, text)?;
    Ok(if add_special_tokens { with_bos(model, ids) } else { ids })
}

/// `ids` with BOS first when the model card asks for one.
pub fn with_bos(model: &Model, ids: Vec<u32>) -> Vec<u32> {
    model.bos_token_id.into_iter().chain(ids).collect()
}

/// Checks that every id of a pre-tokenized prompt is in the vocabulary.
pub fn token_id_prompt(model: &Model, ids: &[i64]) -> Result<Vec<u32>, ValidationError> {
    vocab_ids(model, "prompt", ids)
}

/// Checks that every id is in the vocabulary; errors name `field`.
pub fn vocab_ids(model: &Model, field: &'static str, ids: &[i64]) -> Result<Vec<u32>, ValidationError> {
    ids.iter()
        .map(|&id| {
            u32::try_from(id).ok().filter(|&id| id < model.vocab_size).ok_or(ValidationError::TokenOutOfVocab {
                field,
                value: id,
                vocab_size: model.vocab_size,
            })
        })
        .collect()
}

/// Token ids back to text, special tokens kept (as vLLM's `/detokenize`,
/// which decodes with the tokenizer's defaults).
pub fn decode(model: &Model, ids: &[u32]) -> Result<String, ValidationError> {
    decode_with(model, ids, false)
}

/// Token ids back to text, special tokens left out when `skip_special_tokens`.
pub fn decode_with(model: &Model, ids: &[u32], skip_special_tokens: bool) -> Result<String, ValidationError> {
    model.decoder.decode(ids, skip_special_tokens).map_err(|e| ValidationError::Tokenize(e.to_string()))
}

/// Each id's token as the vocabulary spells it (vLLM's `token_strs`).
pub fn token_strs(model: &Model, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default()).collect()
}

fn encode(model: &Model, text: &str) -> Result<Vec<u32>, ValidationError> {
    // Tokenizing megabytes takes seconds: refuse what cannot fit first.
    if text.len() > model.max_prompt_bytes {
        return Err(ValidationError::TextTooLong { bytes: text.len(), context_length: model.context_length });
    }
    model.encoder.encode(text).map_err(|e| ValidationError::Tokenize(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{card, ids};

    #[test]
    fn a_text_longer_than_any_context_is_refused_before_tokenizing() {
        let model = Model::from_card(&card(), None).unwrap();
        let limit = model.max_prompt_bytes;
        // 64 tokens of context, "<|im_start|>" the longest spelling (12 bytes), 4 times over.
        assert_eq!(limit, 64 * 12 * 4);
        let err = text_prompt(&model, &"a".repeat(limit + 1)).unwrap_err();
        assert!(matches!(err, ValidationError::TextTooLong { bytes, context_length: 64 } if bytes == limit + 1));
        assert_eq!(text_prompt(&model, &"a".repeat(limit)).unwrap().len(), limit, "at the bound it is tokenized");
    }

    #[test]
    fn chat_prompt_parses_special_tokens_without_extra_bos() {
        let model = Model::from_card(&card(), None).unwrap();
        let msg = TemplateMessage::text("user", "Hi");
        let got = chat_prompt(&model, &[msg]).unwrap();
        let mut want = vec![257];
        want.extend(ids("user\nHi"));
        want.push(258);
        want.extend(ids("\n"));
        want.push(257);
        want.extend(ids("assistant\n"));
        assert_eq!(got, want);
    }

    #[test]
    fn text_prompt_prepends_bos_only_when_the_card_asks() {
        let model = Model::from_card(&card(), None).unwrap();
        assert_eq!(text_prompt(&model, "ab").unwrap(), ids("ab"));
        let mut with_bos = card();
        with_bos.add_bos_token = true;
        let model = Model::from_card(&with_bos, None).unwrap();
        assert_eq!(text_prompt(&model, "ab").unwrap(), [256, 97, 98]);
    }

    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        let model = Model::from_card(&card(), None).unwrap();
        assert_eq!(token_id_prompt(&model, &[1, 258]).unwrap(), [1, 258]);
        assert!(token_id_prompt(&model, &[259]).is_err());
        assert!(token_id_prompt(&model, &[-1]).is_err());
    }
}
