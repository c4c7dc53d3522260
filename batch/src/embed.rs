//! `--embed`: an embedding batch, like vLLM's `LLM.embed`. Each input line is
//! `{"prompt": text}` or `{"prompt_token_ids": [...]}`, with an optional `id`;
//! each output line `{"line", "id", "embedding": [...], "usage": {"prompt_tokens"}}`, or
//! `{"line", "id", "error"}` for an input the engine refused. Unknown fields (a sampling
//! parameter, `messages`) are errors, so nothing asked is silently dropped.

use engine::offline::Prompt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::input::{each_line, LineError};

/// One input of an embedding batch.
#[derive(Debug, Clone)]
pub struct EmbedLine {
    /// 1-based line number in the file.
    pub number: usize,
    pub id: Option<Value>,
    pub prompt: Prompt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    id: Option<Value>,
    prompt: Option<String>,
    prompt_token_ids: Option<Vec<u32>>,
}

/// Parses every non-blank line; on failure, every bad line.
pub fn parse(text: &str) -> Result<Vec<EmbedLine>, Vec<LineError>> {
    each_line(text, parse_line, |number, (id, prompt)| EmbedLine { number, id, prompt })
}

fn parse_line(raw: &str) -> Result<(Option<Value>, Prompt), String> {
    let line: RawLine = serde_json::from_str(raw)
        .map_err(|e| format!("{e} (an embedding line is {{\"id\"?, \"prompt\" | \"prompt_token_ids\"}})"))?;
    let prompt = match (line.prompt, line.prompt_token_ids) {
        (Some(text), None) if !text.is_empty() => Prompt::Text(text),
        (Some(_), None) => return Err("prompt is empty".into()),
        (None, Some(ids)) if !ids.is_empty() => Prompt::TokenIds(ids),
        (None, Some(_)) => return Err("prompt_token_ids is empty".into()),
        _ => return Err("needs exactly one of \"prompt\" or \"prompt_token_ids\"".into()),
    };
    Ok((line.id, prompt))
}

/// The record of an embedded line.
pub fn success(line: &EmbedLine, embedding: &[f32], prompt_tokens: usize) -> Value {
    json!({ "line": line.number, "id": line.id, "embedding": embedding, "usage": { "prompt_tokens": prompt_tokens } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_ids_parse_and_bad_lines_are_all_named() {
        let lines = parse("{\"id\": 7, \"prompt\": \"a cat\"}\n\n{\"prompt_token_ids\": [1, 2]}\n").unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].number, lines[0].id.clone()), (1, Some(json!(7))));
        assert!(matches!(&lines[1].prompt, Prompt::TokenIds(ids) if ids == &[1, 2]));
        let bad = "{\"prompt\": \"x\", \"temperature\": 0.5}\n{\"messages\": []}\n{\"prompt\": \"\"}\n{}\n";
        let errors = parse(bad).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.number).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!(errors[0].message.contains("temperature"), "{}", errors[0]);
        assert!(errors[1].message.contains("messages"), "{}", errors[1]);
    }
}
