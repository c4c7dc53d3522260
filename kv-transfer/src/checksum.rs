//! The per-transfer checksum: xxh3-64 over the payload in payload order.
//! It runs at memory speed, so it stays on by default; a block that arrives
//! corrupted or misaligned fails the pull instead of being decoded.

use xxhash_rust::xxh3::Xxh3;

/// A running xxh3-64 of a payload.
pub struct Checksum(Box<Xxh3>);

impl Checksum {
    /// An empty sum.
    pub fn new() -> Self {
        Self(Box::new(Xxh3::new()))
    }

    /// Adds the next bytes of the payload.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The sum; never 0, which on the wire means "not computed".
    pub fn finish(self) -> u64 {
        self.0.digest().max(1)
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_sum_like_the_whole_and_a_flipped_byte_changes_it() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let whole = {
            let mut c = Checksum::new();
            c.update(&data);
            c.finish()
        };
        let mut c = Checksum::new();
        data.chunks(333).for_each(|p| c.update(p));
        assert_eq!(c.finish(), whole);
        let mut flipped = data.clone();
        flipped[4321] ^= 1;
        let mut c = Checksum::new();
        c.update(&flipped);
        assert_ne!(c.finish(), whole);
    }
}
