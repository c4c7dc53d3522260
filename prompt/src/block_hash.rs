//! The salted, chained hash of full KV blocks: one pure function that the
//! engine (to find cached prefixes and to name blocks in KV events) and the
//! router (to place requests on workers that hold their prefix) both run.
//!
//! # Definition
//!
//! A prompt's tokens are cut into blocks of `B` tokens (the workers' KV block
//! size); only **full** blocks are hashed, a trailing partial block never is.
//! Block `i` covers `tokens[i*B .. (i+1)*B]` and its hash is XXH3-64 (seed 0)
//! of a byte string:
//!
//! ```text
//! block 0: "pdserve.kvblock1"            16 ASCII bytes, the domain tag
//!          len(salt) as u64 little endian  8 bytes
//!          salt                            len(salt) bytes
//!          each token as u32 little endian 4*B bytes
//! block i: h(i-1) as u64 little endian     8 bytes
//!          each token as u32 little endian 4*B bytes
//! ```
//!
//! The salt is the request's `cache_salt` as UTF-8 bytes, empty when it has
//! none. Because it enters block 0 and every later hash chains on its parent,
//! two requests with different salts share no block hash (barring a 64-bit
//! collision), and a block's hash names its whole prefix, not only its tokens.
//! The salt length prefix keeps `salt ‖ tokens` unambiguous, and the two forms
//! have different lengths for the same `B` (24 + salt + 4B versus 8 + 4B
//! bytes), so a block 0 can never encode like a later block.
//!
//! Changing any byte of this encoding invalidates every router index and must
//! bump the domain tag.

use xxhash_rust::xxh3::xxh3_64;

/// Domain tag that starts the encoding of block 0 (see the module doc).
pub const DOMAIN_TAG: &[u8; 16] = b"pdserve.kvblock1";

/// The hash of one full KV block and, through its parent, of its whole prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Hash of block 0: the salt and the block's tokens.
pub fn first_block_hash(salt: &[u8], block: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(DOMAIN_TAG.len() + 8 + salt.len() + 4 * block.len());
    bytes.extend_from_slice(DOMAIN_TAG);
    bytes.extend_from_slice(&(salt.len() as u64).to_le_bytes());
    bytes.extend_from_slice(salt);
    push_tokens(&mut bytes, block);
    BlockHash(xxh3_64(&bytes))
}

/// Hash of a block after block 0: its parent's hash and its tokens.
pub fn chained_block_hash(parent: BlockHash, block: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(8 + 4 * block.len());
    bytes.extend_from_slice(&parent.0.to_le_bytes());
    push_tokens(&mut bytes, block);
    BlockHash(xxh3_64(&bytes))
}

/// Hashes of the full blocks of `tokens`, in order (`tokens.len() / block_size`
/// of them).
///
/// # Panics
/// If `block_size` is 0.
pub fn block_hashes(salt: &[u8], tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut hashes = Vec::new();
    extend_block_hashes(salt, tokens, block_size, &mut hashes);
    hashes
}

/// Appends to `hashes` the hashes of the full blocks of `tokens` it lacks, so
/// that a growing sequence hashes each block once. `hashes` must be the
/// hashes of the first `hashes.len()` blocks of `tokens` with this salt.
///
/// # Panics
/// If `block_size` is 0.
pub fn extend_block_hashes(salt: &[u8], tokens: &[u32], block_size: usize, hashes: &mut Vec<BlockHash>) {
    assert!(block_size > 0, "block_size must be at least 1");
    for block in tokens.chunks_exact(block_size).skip(hashes.len()) {
        let hash = match hashes.last() {
            None => first_block_hash(salt, block),
            Some(&parent) => chained_block_hash(parent, block),
        };
        hashes.push(hash);
    }
}

fn push_tokens(bytes: &mut Vec<u8>, tokens: &[u32]) {
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_pinned() {
        // Literal values: a change here breaks every router's index.
        let h = block_hashes(b"", &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(h, vec![BlockHash(7009935335594146777), BlockHash(724214180556945192)]);
        let salted = block_hashes(b"tenant-a", &[1, 2, 3, 4], 4);
        assert_eq!(salted, vec![BlockHash(10605880742868098173)]);
    }

    #[test]
    fn only_full_blocks_are_hashed() {
        assert!(block_hashes(b"", &[1, 2, 3], 4).is_empty());
        assert_eq!(block_hashes(b"", &[1, 2, 3, 4, 5, 6, 7], 4).len(), 1);
        assert_eq!(block_hashes(b"", &[1, 2, 3, 4, 5, 6, 7, 8], 4).len(), 2);
    }

    #[test]
    fn the_salt_changes_every_hash() {
        let tokens: Vec<u32> = (0..12).collect();
        let plain = block_hashes(b"", &tokens, 4);
        let salted = block_hashes(b"x", &tokens, 4);
        for (a, b) in plain.iter().zip(&salted) {
            assert_ne!(a, b);
        }
        assert_eq!(block_hashes(b"x", &tokens, 4), salted, "the hash is deterministic");
    }

    #[test]
    fn each_hash_chains_on_its_parent() {
        let a = block_hashes(b"", &[1, 2, 3, 4, 9, 9, 9, 9], 4);
        let b = block_hashes(b"", &[5, 6, 7, 8, 9, 9, 9, 9], 4);
        // Same second block, different prefix: different hash.
        assert_ne!(a[1], b[1]);
        assert_eq!(a[1], chained_block_hash(a[0], &[9, 9, 9, 9]));
        assert_eq!(a[0], first_block_hash(b"", &[1, 2, 3, 4]));
    }

    #[test]
    fn the_encoding_is_as_documented() {
        let mut bytes = b"pdserve.kvblock1".to_vec();
        bytes.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
        bytes.extend_from_slice(&[7, 0, 0, 0, 0, 1, 0, 0]);
        let h0 = BlockHash(xxh3_64(&bytes));
        assert_eq!(first_block_hash(b"ab", &[7, 256]), h0);
        let mut bytes = h0.0.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(block_hashes(b"ab", &[7, 256, 1, 2], 2)[1], BlockHash(xxh3_64(&bytes)));
    }

    #[test]
    fn extending_hashes_matches_hashing_at_once() {
        let tokens: Vec<u32> = (0..10).collect();
        let mut hashes = block_hashes(b"s", &tokens[..5], 2);
        assert_eq!(hashes.len(), 2);
        extend_block_hashes(b"s", &tokens, 2, &mut hashes);
        assert_eq!(hashes, block_hashes(b"s", &tokens, 2));
    }
}
