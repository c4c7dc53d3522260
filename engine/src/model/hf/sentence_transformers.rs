//! A Sentence-Transformers folder's own settings: the pooling its `Pooling`
//! module does (`1_Pooling/config.json`) and the length it truncates inputs to
//! (`sentence_bert_config.json`), so that embeddings come out as
//! `SentenceTransformer.encode` makes them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::{read_json, Fields};
use crate::model::ModelError;
use crate::request::Pooling;

/// The pooling the folder's `Pooling` module names, if it has one.
pub(super) fn pooling(dir: &Path) -> Result<Option<Pooling>, ModelError> {
    let Some(path) = pooling_config(dir)? else { return Ok(None) };
    let json = read_json(&path)?;
    let f = Fields::new(&path, &json)?;
    let modes = [
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_lasttoken", Some(Pooling::Last)),
        ("pooling_mode_max_tokens", None),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
    ];
    let mut chosen = Vec::new();
    for (key, pooling) in modes {
        if f.opt_bool(key)?.unwrap_or(false) {
            chosen.push((key, pooling));
        }
    }
    match chosen[..] {
        [] => Ok(None),
        [(_, Some(pooling))] => Ok(Some(pooling)),
        [(key, None)] => {
            Err(f.unsupported(format!("unsupported {key} (cls, mean and last-token pooling are implemented)")))
        }
        _ => Err(f.unsupported("more than one pooling mode (their vectors would be concatenated); one is implemented")),
    }
}

/// `modules.json`'s `Pooling` module's config, else `1_Pooling/config.json` if it exists.
fn pooling_config(dir: &Path) -> Result<Option<PathBuf>, ModelError> {
    let modules = dir.join("modules.json");
    if modules.is_file() {
        let json = read_json(&modules)?;
        let pooling =
            json.as_array().into_iter().flatten().find(|m| {
                m.get("type").and_then(Value::as_str).is_some_and(|t| t.ends_with(".Pooling") || t == "Pooling")
            });
        if let Some(module) = pooling {
            let sub = module.get("path").and_then(Value::as_str).unwrap_or("1_Pooling");
            let path = dir.join(sub).join("config.json");
            return Ok(path.is_file().then_some(path));
        }
        return Ok(None);
    }
    let path = dir.join("1_Pooling").join("config.json");
    Ok(path.is_file().then_some(path))
}

/// `sentence_bert_config.json`'s `max_seq_length`, if the folder has one.
pub(super) fn max_seq_length(dir: &Path) -> Result<Option<usize>, ModelError> {
    let path = dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json = read_json(&path)?;
    Fields::new(&path, &json)?.opt_usize("max_seq_length")
}
