//! Frames on a kv-transfer connection: a 4-byte big-endian length, then a
//! protobuf `Frame`. Block payloads are not framed: they follow a
//! `PullResponse` as raw bytes, so they are never copied into a message.

use prost::Message;
use proto::kv::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames carry only small control messages; anything larger is corruption.
const MAX_FRAME: u32 = 1 << 20;

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let body = frame.encode_to_vec();
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` when the peer closed the connection cleanly.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Frame::decode(body.as_slice()).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::kv::{frame::Kind, ReleaseRequest};

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_none() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let f = Frame { kind: Some(Kind::Release(ReleaseRequest { request_id: "r".into() })) };
        write_frame(&mut a, &f).await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(f));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}
