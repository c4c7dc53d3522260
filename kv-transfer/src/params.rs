//! `kv_transfer_params` with vLLM's field names and types.
//!
//! ```json
//! {"do_remote_decode": true}                       // router -> prefill
//! {"do_remote_prefill": true, "remote_engine_id": "...", "remote_block_ids": [0, 1],
//!  "remote_host": "127.0.0.1", "remote_port": 7100, "tp_size": 1,
//!  "remote_request_id": "...", "num_tokens": 20,
//!  "lease_ms": 5000, "remote_ports": [7100]}       // prefill -> decode
//! ```
//!
//! `remote_host` / `remote_port` are rank 0's KV server; `remote_ports` lists
//! every prefill rank's, in rank order, when `tp_size` > 1. `lease_ms` is how
//! long the blocks stay pinned without a pull or a renewal.

use proto::worker as pb;
use serde::{Deserialize, Serialize};

/// Where the prompt's KV blocks wait for a decode worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePrefill {
    pub remote_engine_id: String,
    pub remote_block_ids: Vec<u32>,
    pub remote_host: String,
    pub remote_port: u16,
    pub tp_size: u32,
    pub remote_request_id: String,
    /// Prompt tokens the blocks cover.
    pub num_tokens: u32,
    /// Milliseconds the pin lives without a pull or renewal.
    #[serde(default)]
    pub lease_ms: u64,
    /// Every prefill rank's KV server port, in rank order (empty: only `remote_port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ports: Vec<u16>,
}

impl RemotePrefill {
    /// `host:port` of the prefill worker's (rank 0's) KV server.
    pub fn addr(&self) -> String {
        self.rank_addr(0)
    }

    /// `host:port` of prefill rank `rank`'s KV server.
    pub fn rank_addr(&self, rank: u32) -> String {
        let port = self.remote_ports.get(rank as usize).copied().unwrap_or(self.remote_port);
        if self.remote_host.contains(':') {
            format!("[{}]:{}", self.remote_host, port)
        } else {
            format!("{}:{}", self.remote_host, port)
        }
    }
}

/// The two forms `kv_transfer_params` takes in a disaggregated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvTransferParams {
    /// Ask the prefill worker to keep the KV for a remote decode.
    RemoteDecode,
    /// Tell the decode worker where to pull the KV from.
    RemotePrefill(RemotePrefill),
}

/// A `kv_transfer_params` that is neither form, or a malformed one.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("kv_transfer_params: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    do_remote_decode: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    do_remote_prefill: bool,
    #[serde(flatten)]
    remote: Option<RemotePrefill>,
}

impl KvTransferParams {
    /// vLLM's JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        let wire = match self {
            Self::RemoteDecode => Wire { do_remote_decode: true, do_remote_prefill: false, remote: None },
            Self::RemotePrefill(r) => {
                Wire { do_remote_decode: false, do_remote_prefill: true, remote: Some(r.clone()) }
            }
        };
        serde_json::to_value(wire).expect("plain struct serializes")
    }

    /// Parses vLLM's JSON form.
    pub fn from_json(value: serde_json::Value) -> Result<Self, ParamsError> {
        let wire: Wire = serde_json::from_value(value).map_err(|e| ParamsError::Invalid(e.to_string()))?;
        match (wire.do_remote_decode, wire.do_remote_prefill, wire.remote) {
            (true, false, _) => Ok(Self::RemoteDecode),
            (false, true, Some(r)) => Ok(Self::RemotePrefill(r)),
            (false, true, None) => Err(ParamsError::Invalid(
                "do_remote_prefill needs remote_engine_id, remote_block_ids, remote_host, remote_port, tp_size".into(),
            )),
            (true, true, _) => Err(ParamsError::Invalid("do_remote_decode and do_remote_prefill are exclusive".into())),
            (false, false, _) => {
                Err(ParamsError::Invalid("neither do_remote_decode nor do_remote_prefill is set".into()))
            }
        }
    }
}

/// The proto message carries the JSON object as text: the router forwards it
/// verbatim, so this crate is the one reader of its fields.
impl From<KvTransferParams> for pb::KvTransferParams {
    fn from(p: KvTransferParams) -> Self {
        pb::KvTransferParams { json: p.to_json().to_string() }
    }
}

impl TryFrom<pb::KvTransferParams> for KvTransferParams {
    type Error = ParamsError;

    fn try_from(p: pb::KvTransferParams) -> Result<Self, Self::Error> {
        if p.json.trim().is_empty() {
            return Err(ParamsError::Invalid("empty kv_transfer_params".into()));
        }
        let value: serde_json::Value =
            serde_json::from_str(&p.json).map_err(|e| ParamsError::Invalid(format!("invalid JSON text: {e}")))?;
        Self::from_json(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn remote() -> RemotePrefill {
        RemotePrefill {
            remote_engine_id: "prefill-0".into(),
            remote_block_ids: vec![3, 7],
            remote_host: "127.0.0.1".into(),
            remote_port: 7100,
            tp_size: 1,
            remote_request_id: "req-1".into(),
            num_tokens: 20,
            lease_ms: 5000,
            remote_ports: vec![],
        }
    }

    #[test]
    fn json_uses_vllm_names() {
        assert_eq!(KvTransferParams::RemoteDecode.to_json(), json!({"do_remote_decode": true}));
        let v = KvTransferParams::RemotePrefill(remote()).to_json();
        assert_eq!(v["do_remote_prefill"], json!(true));
        assert_eq!(v["remote_block_ids"], json!([3, 7]));
        assert_eq!(v["remote_port"], json!(7100));
        assert_eq!(v["tp_size"], json!(1));
        assert_eq!(KvTransferParams::from_json(v).unwrap(), KvTransferParams::RemotePrefill(remote()));
    }

    #[test]
    fn malformed_json_is_refused() {
        assert!(KvTransferParams::from_json(json!({})).is_err());
        assert!(KvTransferParams::from_json(json!({"do_remote_prefill": true})).is_err());
        assert!(KvTransferParams::from_json(json!({"do_remote_decode": true, "do_remote_prefill": true})).is_err());
    }

    #[test]
    fn proto_round_trip() {
        for p in [KvTransferParams::RemoteDecode, KvTransferParams::RemotePrefill(remote())] {
            let wire: pb::KvTransferParams = p.clone().into();
            assert_eq!(serde_json::from_str::<serde_json::Value>(&wire.json).unwrap(), p.to_json());
            assert_eq!(KvTransferParams::try_from(wire).unwrap(), p);
        }
        let wire: pb::KvTransferParams = KvTransferParams::RemoteDecode.into();
        assert_eq!(wire.json, r#"{"do_remote_decode":true}"#);
        let mut value = KvTransferParams::RemotePrefill(remote()).to_json();
        value["remote_port"] = json!(70000);
        assert!(KvTransferParams::try_from(pb::KvTransferParams { json: value.to_string() }).is_err());
    }

    #[test]
    fn invalid_proto_json_is_a_params_error() {
        for text in ["", "  ", "{not json", "[1, 2]", "5"] {
            let err = KvTransferParams::try_from(pb::KvTransferParams { json: text.into() }).unwrap_err();
            assert!(matches!(&err, ParamsError::Invalid(msg) if !msg.is_empty()), "{text:?}: {err}");
            assert!(err.to_string().starts_with("kv_transfer_params: "), "{text:?}: {err}");
        }
        let err = KvTransferParams::try_from(pb::KvTransferParams { json: "{not json".into() }).unwrap_err();
        assert!(err.to_string().contains("invalid JSON text"), "{err}");
    }
}
