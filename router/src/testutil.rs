//! Model-free test fixtures: a byte-level BPE tokenizer whose id of each byte
//! is the byte's value, plus ChatML special tokens.

use std::str::FromStr;
use std::sync::Arc;

use proto::worker::ModelCard;
use serde_json::json;
use tokenizers::Tokenizer;

/// Id of `<eos>`.
pub const EOS: u32 = 256;

/// GPT-2's byte -> printable char table, so byte `b` gets token id `b`.
fn byte_char(b: u8) -> char {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)).count();
    char::from_u32(256 + offset as u32).unwrap()
}

/// The tokenizer JSON.
pub fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..=255u8).map(|b| (byte_char(b).to_string(), json!(b))).collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<eos>"), special(257, "<|im_start|>"), special(258, "<|im_end|>")],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// The tokenizer.
pub fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_str(&tokenizer_json()).unwrap())
}

/// The tokenizer's decoder.
pub fn decoder() -> prompt::decode::Decoder {
    prompt::decode::Decoder::new(tokenizer())
}

/// Token ids of `text`'s bytes.
pub fn ids(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// A ChatML model card with a 64-token context.
pub fn card() -> ModelCard {
    ModelCard {
        model_name: "tiny".into(),
        tokenizer_json: tokenizer_json(),
        chat_template: "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}".into(),
        context_length: 64,
        block_size: 16,
        eos_token_ids: vec![EOS],
        bos_token: "<eos>".into(),
        eos_token: "<eos>".into(),
        add_bos_token: false,
        ..ModelCard::default()
    }
}
