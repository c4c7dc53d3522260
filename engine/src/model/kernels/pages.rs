//! Weight storage on huge pages where the system allows them.
//!
//! A decode step streams every weight once. On 4 KiB pages SmolLM2's 100 MB
//! of weights are 25,000 pages, far more than the TLBs hold, so the step pays
//! a page walk every few cache lines: measured here, single-stream decode ran
//! 20-35% faster with the weights on 2 MiB pages. Linux backs anonymous
//! memory with them when asked (`MADV_HUGEPAGE`, which transparent huge pages
//! need in their default `madvise` mode) before the pages are first touched,
//! and only for whole, aligned 2 MiB ranges, which a model's many small
//! matrices each alone never span: so they are carved from shared chunks.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

use memmap2::MmapMut;

/// Bytes per shared chunk; larger requests get a mapping of their own.
const CHUNK: usize = 64 << 20;

/// Alignment of every slice (a cache line, as [`super::blocks::GroupBlock`] wants).
const ALIGN: usize = 64;

/// A fixed-length slice of `T` in a huge-page-advised anonymous mapping,
/// shared with other slices (disjoint ranges) and unmapped with the last one.
pub struct HugeVec<T> {
    map: Arc<Mapping>,
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

/// A mapping that slices point into; their ranges never overlap.
struct Mapping {
    /// Keeps the pages mapped; only ever reached through `base`.
    _map: MmapMut,
    base: *mut u8,
}

// SAFETY: each HugeVec reads and writes only its own range through `base`, and the mapping
// itself (its address and length) never changes while it lives.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Self> {
        let mut map = MmapMut::map_anon(len)?;
        #[cfg(target_os = "linux")]
        {
            // An advice, not a need: without transparent huge pages the pages stay small.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Self { base: map.as_mut_ptr(), _map: map })
    }

    fn base(&self) -> *mut u8 {
        self.base
    }
}

/// The chunk small slices are carved from, and how much of it is used; weak, so a chunk is
/// unmapped once every slice in it is gone.
static CURRENT: Mutex<Option<(Weak<Mapping>, usize)>> = Mutex::new(None);

impl<T: Copy> HugeVec<T> {
    /// `n` copies of `value`.
    ///
    /// # Panics
    /// When the system has no memory for the mapping.
    pub fn filled(n: usize, value: T) -> Self {
        assert!(std::mem::align_of::<T>() <= ALIGN, "alignment above a cache line");
        let bytes = (n * std::mem::size_of::<T>()).max(1);
        let (map, offset) = Self::place(bytes).expect("memory for the weights");
        let mut v = Self { map, offset, len: n, _t: PhantomData };
        v.fill(value);
        v
    }

    /// A range of `bytes` bytes: in the current chunk, a new one, or a mapping of its own.
    fn place(bytes: usize) -> std::io::Result<(Arc<Mapping>, usize)> {
        if bytes > CHUNK / 4 {
            return Ok((Arc::new(Mapping::new(bytes)?), 0));
        }
        let mut current = CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((map, used)) = current.as_mut() {
            let offset = used.next_multiple_of(ALIGN);
            if let Some(map) = map.upgrade().filter(|_| offset + bytes <= CHUNK) {
                *used = offset + bytes;
                return Ok((map, offset));
            }
        }
        let map = Arc::new(Mapping::new(CHUNK)?);
        *current = Some((Arc::downgrade(&map), bytes));
        Ok((map, 0))
    }
}

impl<T> Deref for HugeVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `offset..offset + len * size_of::<T>()` lies in the mapping, is aligned for
        // `T` and was filled with `T`s in `filled`; no other slice covers it.
        unsafe { std::slice::from_raw_parts(self.map.base().add(self.offset).cast(), self.len) }
    }
}

impl<T> DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is the range's only access.
        unsafe { std::slice::from_raw_parts_mut(self.map.base().add(self.offset).cast(), self.len) }
    }
}

impl<T: Copy> HugeVec<T> {
    fn fill(&mut self, value: T) {
        let ptr: *mut T = {
            // SAFETY: the range is ours, aligned and inside the mapping; written before any read.
            unsafe { self.map.base().add(self.offset).cast() }
        };
        for i in 0..self.len {
            // SAFETY: i < len, within the range.
            unsafe { ptr.add(i).write(value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_chunks_without_overlapping_and_keep_their_values() {
        let mut slices: Vec<HugeVec<u64>> = (0..50).map(|i| HugeVec::filled(1000 + 7 * i, i as u64)).collect();
        let big = HugeVec::filled(CHUNK / 2, 3u8);
        for (i, s) in slices.iter_mut().enumerate() {
            assert_eq!(s.as_ptr() as usize % ALIGN, 0);
            assert!(s.iter().all(|&v| v == i as u64), "slice {i} was overwritten");
            s[0] = 1000 + i as u64;
        }
        for (i, s) in slices.iter().enumerate() {
            assert_eq!((s[0], s[s.len() - 1]), (1000 + i as u64, i as u64));
        }
        assert!(big.iter().all(|&b| b == 3));
        assert_eq!(HugeVec::filled(0, 0u8).len(), 0);
    }
}
