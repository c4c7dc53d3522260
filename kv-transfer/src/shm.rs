//! Same-host transfer: a puller maps the server's KV memfd read-only and
//! copies blocks out of it itself, one copy in all.
//!
//! The server advertises `/proc/<pid>/fd/<fd>` with the host's boot id and
//! the file's inode. A puller on another host (different boot id), in another
//! PID namespace, or without the rights to open it gets an error here and
//! falls back to TCP.

use memmap2::Mmap;
use proto::kv as pb;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;

/// This host's boot id: equal on two processes only when they share a kernel.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// How a same-host peer can reach the memory behind `memfd`, when it can.
pub fn advertise(memfd: Option<i32>, len: usize) -> Option<pb::SharedMemory> {
    let fd = memfd?;
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).ok()?;
    Some(pb::SharedMemory { boot_id: boot_id()?, pid: std::process::id(), fd, inode: meta.ino(), len: len as u64 })
}

/// A server's KV memory mapped into this process.
#[derive(Debug)]
pub struct PeerMapping {
    map: Mmap,
}

impl PeerMapping {
    /// Maps what `shared` advertises, or says why it cannot.
    pub fn open(shared: &pb::SharedMemory) -> Result<Self, String> {
        if boot_id().as_deref() != Some(shared.boot_id.as_str()) {
            return Err("the KV server runs on another host".into());
        }
        let path = format!("/proc/{}/fd/{}", shared.pid, shared.fd);
        let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("cannot stat {path}: {e}"))?;
        if meta.ino() != shared.inode || meta.len() != shared.len {
            return Err(format!("{path} is not the advertised KV memory (another PID namespace?)"));
        }
        // SAFETY: a read-only shared mapping; the server writes only blocks
        // that are not pinned, and the checksum catches a torn read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map {path}: {e}"))?;
        Ok(Self { map })
    }

    /// The server's bytes at `range`, or an error when it is outside the mapping.
    pub fn bytes(&self, range: Range<usize>) -> Result<&[u8], String> {
        self.map.get(range.clone()).ok_or_else(|| format!("range {range:?} outside the peer's KV memory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_file_of_this_process_maps_and_a_wrong_inode_is_refused() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"kv blocks here").unwrap();
        let shared = advertise(Some(file.as_raw_fd()), 14).unwrap();
        let peer = PeerMapping::open(&shared).unwrap();
        assert_eq!(peer.bytes(3..9).unwrap(), b"blocks");
        assert!(peer.bytes(10..20).is_err());
        let wrong = pb::SharedMemory { inode: shared.inode + 1, ..shared.clone() };
        assert!(PeerMapping::open(&wrong).unwrap_err().contains("not the advertised"));
        let elsewhere = pb::SharedMemory { boot_id: "another host".into(), ..shared };
        assert!(PeerMapping::open(&elsewhere).unwrap_err().contains("another host"));
    }
}
