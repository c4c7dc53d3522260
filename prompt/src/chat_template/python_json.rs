//! The `tojson` filter as Hugging Face defines it for chat templates: Python's
//! `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`. Tool schemas reach the prompt through it, so its spacing
//! is part of what the model was trained on: `{"a": 1, "b": [2, 3]}`, where
//! minijinja's own filter writes `{"a":1,"b":[2,3]}` and escapes `<` and `&`.

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

/// How Python's `json.dumps` was asked to write.
struct Style {
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// `value | tojson(indent=None, separators=None, sort_keys=False, ensure_ascii=False)`.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => " ".repeat(usize::try_from(v).map_err(|_| invalid("indent must be a count or a string"))?),
        }),
    };
    // Python's defaults: a space after the comma only when not indenting.
    let (item, key) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) if pair.len() == 2 => (pair[0].clone(), pair[1].clone()),
        Some(_) => return Err(invalid("separators must be a pair")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = Style {
        indent,
        item_separator: item,
        key_separator: key,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    let mut out = String::new();
    write(&json, &style, 0, &mut out);
    // Safe: the text is JSON, not markup, as in HF's templates.
    Ok(Value::from_safe_string(out))
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {message}"))
}

fn write(value: &serde_json::Value, style: &Style, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(i, style, depth + 1, out);
                write(item, style, depth + 1, out);
            }
            close(style, depth, out);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                separate(i, style, depth + 1, out);
                string(key, style, out);
                out.push_str(&style.key_separator);
                write(item, style, depth + 1, out);
            }
            close(style, depth, out);
            out.push('}');
        }
        J::Array(_) => out.push_str("[]"),
        J::Object(_) => out.push_str("{}"),
        J::String(s) => string(s, style, out),
        // Null, booleans and numbers are written alike by both.
        other => out.push_str(&other.to_string()),
    }
}

/// Before the `i`th item: the separator after the one before it, then the indentation.
fn separate(i: usize, style: &Style, depth: usize, out: &mut String) {
    if i > 0 {
        out.push_str(&style.item_separator);
    }
    newline(style, depth, out);
}

/// Before a closing bracket: back to the parent's indentation.
fn close(style: &Style, depth: usize, out: &mut String) {
    newline(style, depth, out);
}

fn newline(style: &Style, depth: usize, out: &mut String) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

/// A JSON string: serde_json escapes what Python does (quote, backslash, control characters, the
/// short forms `\n` `\t` ...); with `ensure_ascii` every other non-ASCII character too, as UTF-16
/// escapes.
fn string(s: &str, style: &Style, out: &mut String) {
    let escaped = serde_json::Value::from(s).to_string();
    if !style.ensure_ascii {
        out.push_str(&escaped);
        return;
    }
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

#[cfg(test)]
mod tests;
