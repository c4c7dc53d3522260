//! `kv_transfer_params` with vLLM's field names and types.
//!
//! ```json
//! {"do_remote_decode": true}                       // router -> prefill
//! {"do_remote_prefill": true, "remote_engine_id": "...", "remote_block_ids": [0, 1],
//!  "remote_host": "127.0.0.1", "remote_port": 7100, "tp_size": 1,
//!  "remote_request_id": "...", "num_tokens": 20}   // prefill -> decode
//! ```

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
}

impl RemotePrefill {
    /// `host:port` of the prefill worker's KV server.
    pub fn addr(&self) -> String {
        if self.remote_host.contains(':') {
            format!("[{}]:{}", self.remote_host, self.remote_port)
        } else {
            format!("{}:{}", self.remote_host, self.remote_port)
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

impl From<KvTransferParams> for pb::KvTransferParams {
    fn from(p: KvTransferParams) -> Self {
        let params = match p {
            KvTransferParams::RemoteDecode => pb::kv_transfer_params::Params::RemoteDecode(pb::RemoteDecode {}),
            KvTransferParams::RemotePrefill(r) => pb::kv_transfer_params::Params::RemotePrefill(pb::RemotePrefill {
                remote_engine_id: r.remote_engine_id,
                remote_block_ids: r.remote_block_ids,
                remote_host: r.remote_host,
                remote_port: u32::from(r.remote_port),
                tp_size: r.tp_size,
                remote_request_id: r.remote_request_id,
                num_tokens: r.num_tokens,
            }),
        };
        pb::KvTransferParams { params: Some(params) }
    }
}

impl TryFrom<pb::KvTransferParams> for KvTransferParams {
    type Error = ParamsError;

    fn try_from(p: pb::KvTransferParams) -> Result<Self, Self::Error> {
        match p.params {
            Some(pb::kv_transfer_params::Params::RemoteDecode(_)) => Ok(Self::RemoteDecode),
            Some(pb::kv_transfer_params::Params::RemotePrefill(r)) => {
                let remote_port = u16::try_from(r.remote_port)
                    .map_err(|_| ParamsError::Invalid(format!("remote_port {} is not a TCP port", r.remote_port)))?;
                Ok(Self::RemotePrefill(RemotePrefill {
                    remote_engine_id: r.remote_engine_id,
                    remote_block_ids: r.remote_block_ids,
                    remote_host: r.remote_host,
                    remote_port,
                    tp_size: r.tp_size,
                    remote_request_id: r.remote_request_id,
                    num_tokens: r.num_tokens,
                }))
            }
            None => Err(ParamsError::Invalid("empty kv_transfer_params".into())),
        }
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
            assert_eq!(KvTransferParams::try_from(wire).unwrap(), p);
        }
        let mut bad: pb::KvTransferParams = KvTransferParams::RemotePrefill(remote()).into();
        if let Some(pb::kv_transfer_params::Params::RemotePrefill(r)) = &mut bad.params {
            r.remote_port = 70000;
        }
        assert!(KvTransferParams::try_from(bad).is_err());
    }
}
