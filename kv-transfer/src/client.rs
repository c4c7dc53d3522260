//! The decode side of the hand-off: pull the pinned blocks, then release them.

use crate::frame::{read_frame, write_frame};
use crate::layout::KvLayout;
use crate::params::RemotePrefill;
use crate::KvTransferError;
use proto::kv::{frame::Kind, pull_response, Frame, PullRequest, ReleaseRequest};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Pulls the blocks named by `remote` in the hand-off format, then tells the
/// prefill worker to release them. `layout` is the puller's; the server
/// refuses it unless it equals its own. The whole exchange is bounded by
/// `timeout`, so a stalled peer fails the pull instead of hanging it.
pub async fn pull_blocks(
    remote: &RemotePrefill,
    layout: &KvLayout,
    timeout: Duration,
) -> Result<Vec<u8>, KvTransferError> {
    let addr = remote.addr();
    match tokio::time::timeout(timeout, pull_inner(remote, layout, &addr)).await {
        Ok(result) => result,
        Err(_) => Err(KvTransferError::Timeout { addr, secs: timeout.as_secs() }),
    }
}

async fn pull_inner(remote: &RemotePrefill, layout: &KvLayout, addr: &str) -> Result<Vec<u8>, KvTransferError> {
    let io = |source| KvTransferError::Io { addr: addr.to_string(), source };
    let protocol = |message: &str| KvTransferError::Protocol { addr: addr.to_string(), message: message.to_string() };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let _ = stream.set_nodelay(true);
    let pull = PullRequest {
        engine_id: remote.remote_engine_id.clone(),
        request_id: remote.remote_request_id.clone(),
        block_ids: remote.remote_block_ids.clone(),
        layout: Some((*layout).into()),
    };
    write_frame(&mut stream, &Frame { kind: Some(Kind::Pull(pull)) }).await.map_err(io)?;
    let num_bytes = match read_frame(&mut stream).await.map_err(io)?.and_then(|f| f.kind) {
        Some(Kind::PullResponse(r)) => match r.result {
            Some(pull_response::Result::NumBytes(n)) => n as usize,
            Some(pull_response::Result::Error(message)) => {
                return Err(KvTransferError::Refused { addr: addr.to_string(), message })
            }
            None => return Err(protocol("empty pull response")),
        },
        _ => return Err(protocol("expected a pull response")),
    };
    let expected = remote.remote_block_ids.len() * layout.block_bytes();
    if num_bytes != expected {
        return Err(protocol(&format!(
            "peer announced {num_bytes} bytes, {expected} expected for {} blocks",
            remote.remote_block_ids.len()
        )));
    }
    let mut data = vec![0u8; num_bytes];
    stream.read_exact(&mut data).await.map_err(io)?;
    let release =
        ReleaseRequest { engine_id: remote.remote_engine_id.clone(), request_id: remote.remote_request_id.clone() };
    write_frame(&mut stream, &Frame { kind: Some(Kind::Release(release)) }).await.map_err(io)?;
    match read_frame(&mut stream).await.map_err(io)?.and_then(|f| f.kind) {
        Some(Kind::ReleaseResponse(_)) => Ok(data),
        _ => Err(protocol("expected a release response")),
    }
}
