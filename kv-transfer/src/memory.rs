//! The KV memory a server reads blocks from, and the segment walk that both
//! transports share.

use crate::layout::KvLayout;
use std::any::Any;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;

/// One rank's KV memory in the paged layout (see [`crate::layout`]), read by
/// the KV server without the engine's lock.
///
/// That is sound only for pinned blocks: the engine never writes a block
/// while it is pinned for a hand-off, and the connector reads nothing else.
#[derive(Clone)]
pub struct KvMemory {
    base: *const u8,
    len: usize,
    num_blocks: usize,
    memfd: Option<RawFd>,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the region is plain memory kept alive by `_owner`; reads follow the
// pin invariant above.
unsafe impl Send for KvMemory {}
unsafe impl Sync for KvMemory {}

impl KvMemory {
    /// Wraps `len` bytes at `base`, holding `num_blocks` blocks of `layout`.
    ///
    /// # Safety
    /// The bytes must stay mapped while `owner` lives, and `memfd`, when
    /// given, must be the file they are mapped from.
    pub unsafe fn new(
        base: *const u8,
        len: usize,
        layout: &KvLayout,
        memfd: Option<RawFd>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        let num_blocks = len.checked_div(layout.block_bytes()).unwrap_or(0);
        Self { base, len, num_blocks, memfd, _owner: owner }
    }

    /// `num_blocks` zeroed blocks in a shared mapping of `file` (a memfd, or an
    /// unlinked file in /dev/shm), which same-host pullers can map too.
    pub fn shared(layout: &KvLayout, num_blocks: usize, file: std::fs::File) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        file.set_len((num_blocks * layout.block_bytes()) as u64)?;
        // SAFETY: the file is ours alone until it is advertised.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        let fd = file.as_raw_fd();
        // Derived from the mutable mapping, so `fill` may write through it.
        let base = map.as_mut_ptr() as *const u8;
        let len = map.len();
        // SAFETY: the mapping is kept alive by the owner, with the file.
        Ok(unsafe { Self::new(base, len, layout, Some(fd), Arc::new((map, file))) })
    }

    /// Writes `bytes` at `offset`, for tests and benchmarks that fill a
    /// region nothing else is reading yet.
    ///
    /// # Safety
    /// No pull of the written range may be in flight.
    pub unsafe fn fill(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "fill past the KV region");
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset) as *mut u8, bytes.len()) };
    }

    /// Blocks in the region.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd behind the region, for same-host peers.
    pub fn memfd(&self) -> Option<RawFd> {
        self.memfd
    }

    /// The bytes at `range`, which [`walk`] keeps inside the region.
    fn bytes(&self, range: Range<usize>) -> &[u8] {
        assert!(range.end <= self.len, "segment past the KV region");
        // SAFETY: in bounds; pinned blocks are not written (see the type's doc).
        unsafe { std::slice::from_raw_parts(self.base.add(range.start), range.len()) }
    }
}

/// A validated description of one pull from one server rank: the pinned
/// blocks and the global heads wanted from it.
#[derive(Debug, Clone)]
pub struct PieceShape {
    /// The server rank's layout.
    pub server: KvLayout,
    /// Blocks in the server's region.
    pub server_blocks: usize,
    pub block_ids: Vec<u32>,
    pub heads: Range<u32>,
}

impl PieceShape {
    /// Checks the ids and heads against the server's layout.
    pub fn check(&self) -> Result<(), String> {
        if let Some(id) = self.block_ids.iter().find(|&&id| id as usize >= self.server_blocks) {
            return Err(format!("block id {id} outside the server's {} blocks", self.server_blocks));
        }
        let own = self.server.head_range();
        if self.heads.start >= self.heads.end || self.heads.start < own.start || self.heads.end > own.end {
            return Err(format!("heads {:?} are not inside the server's {:?}", self.heads, own));
        }
        Ok(())
    }

    /// Bytes of the payload.
    pub fn payload_bytes(&self) -> usize {
        2 * self.server.num_layers as usize
            * self.block_ids.len()
            * self.server.block_size as usize
            * self.heads.len()
            * self.server.head_bytes()
    }

    /// Whether the pull takes every head of the server: then each segment
    /// goes out whole.
    pub fn whole_segments(&self) -> bool {
        self.heads == self.server.head_range()
    }

    /// The payload as byte ranges of the server's region, in payload order
    /// (layer, K/V, block, slot): whole segments when all heads are wanted
    /// and `per_slot` is false, one run of heads per slot otherwise.
    pub fn ranges(&self, per_slot: bool) -> impl Iterator<Item = Range<usize>> + '_ {
        let blocks = self.block_ids.iter().map(|&id| id as usize);
        runs(&self.server, self.server_blocks, blocks, &self.heads, per_slot || !self.whole_segments())
    }
}

/// Byte ranges of `heads` of `blocks` in a region of `layout` holding
/// `region_blocks`, in payload order; per slot, or per whole segment when
/// `heads` are all the layout's (the caller decides).
fn runs<'a>(
    layout: &'a KvLayout,
    region_blocks: usize,
    blocks: impl Iterator<Item = usize> + Clone + 'a,
    heads: &Range<u32>,
    per_slot: bool,
) -> impl Iterator<Item = Range<usize>> + 'a {
    let seg = layout.segment_bytes();
    let row = layout.num_kv_heads as usize * layout.head_bytes();
    // Per slot: the wanted heads' run in each slot's row. Whole: the segment.
    let (slots, step, skip, piece) = if per_slot {
        let skip = (heads.start - layout.head_range().start) as usize * layout.head_bytes();
        (layout.block_size as usize, row, skip, heads.len() * layout.head_bytes())
    } else {
        (1, seg, 0, seg)
    };
    (0..layout.num_layers as usize).flat_map(move |layer| {
        let blocks = blocks.clone();
        (0..2).flat_map(move |kv| {
            blocks.clone().flat_map(move |block| {
                let start = layout.segment_offset(region_blocks, layer, kv, block);
                (0..slots).map(move |slot| {
                    let at = start + slot * step + skip;
                    at..at + piece
                })
            })
        })
    })
}

/// The payload of `shape` from `memory`, one slice per range, in order.
pub fn walk<'a>(memory: &'a KvMemory, shape: &'a PieceShape, per_slot: bool) -> impl Iterator<Item = &'a [u8]> + 'a {
    shape.ranges(per_slot).map(move |r| memory.bytes(r))
}

/// Where a pull lands: a KV region in the puller's layout and, in the
/// order of the remote blocks, the blocks of it that receive them. Either a
/// buffer in the hand-off format ([`PullTarget::buffer`]) or blocks reserved
/// in the decode engine's own cache ([`PullTarget::blocks`]), which then
/// needs no copy on admission.
pub struct PullTarget<'a> {
    base: *mut u8,
    len: usize,
    region_blocks: usize,
    block_ids: Vec<u32>,
    progress: Option<Progress<'a>>,
    _region: PhantomData<&'a mut [u8]>,
}

/// Told how many layers (from layer 0) are in place.
type Progress<'a> = Box<dyn Fn(u32) + Send + Sync + 'a>;

// SAFETY: the target only writes its own blocks' bytes (see `blocks`), from
// whichever thread runs the pull.
unsafe impl Send for PullTarget<'_> {}

impl<'a> PullTarget<'a> {
    /// `data` as a region of exactly its blocks, in order: the hand-off
    /// format (layer, K/V, block).
    pub fn buffer(data: &'a mut [u8], layout: &KvLayout) -> Self {
        let region_blocks = data.len().checked_div(layout.block_bytes()).unwrap_or(0);
        let block_ids = (0..region_blocks as u32).collect();
        Self {
            base: data.as_mut_ptr(),
            len: data.len(),
            region_blocks,
            block_ids,
            progress: None,
            _region: PhantomData,
        }
    }

    /// `block_ids` of a KV region of `layout` at `base`, `len` bytes long.
    ///
    /// # Safety
    /// The region must stay mapped and writable for `'a`, and nothing else
    /// may read or write the segments of `block_ids` meanwhile (they are
    /// reserved for this pull), except the layers that [`Self::with_progress`]
    /// reported in place, which the pull no longer writes. Ids outside the
    /// region are refused.
    pub unsafe fn blocks(base: *mut u8, len: usize, layout: &KvLayout, block_ids: Vec<u32>) -> Result<Self, String> {
        let region_blocks = len.checked_div(layout.block_bytes()).unwrap_or(0);
        if let Some(id) = block_ids.iter().find(|&&id| id as usize >= region_blocks) {
            return Err(format!("block id {id} outside the region's {region_blocks} blocks"));
        }
        Ok(Self { base, len, region_blocks, block_ids, progress: None, _region: PhantomData })
    }

    /// Reports each layer as it lands (per-layer streaming): `progress(n)`
    /// means layers `0..n` are in place and will not be written again. The
    /// last layer is reported only once the checksum (when asked for) has
    /// matched, so a consumer that waits for every layer never reads a
    /// corrupt payload. With several server ranks, layers are reported
    /// during the last rank's piece, once the earlier pieces are whole.
    pub fn with_progress(self, progress: impl Fn(u32) + Send + Sync + 'a) -> Self {
        Self { progress: Some(Box::new(progress)), ..self }
    }

    pub(crate) fn report(&self, layers: u32) {
        if let Some(progress) = &self.progress {
            progress(layers);
        }
    }

    /// Blocks that receive the pull, in the order of the remote blocks.
    pub fn block_ids(&self) -> &[u32] {
        &self.block_ids
    }

    /// Where a piece's payload lands, in payload order (layer, K/V, block,
    /// the puller's own heads). With `per_slot` false the runs are whole
    /// segments when that is possible on both sides; the caller pairs them
    /// with [`PieceShape::ranges`] of the same `per_slot` from
    /// [`Landing::per_slot`].
    pub(crate) fn landing<'b>(&'b self, puller: &'b KvLayout, shape: &'b PieceShape) -> Landing<'b> {
        let per_slot = !(shape.whole_segments() && shape.heads == puller.head_range());
        Landing { puller, shape, region_blocks: self.region_blocks, block_ids: &self.block_ids, per_slot }
    }

    /// The bytes at `range`, which [`Landing::ranges`] keeps inside the region.
    pub(crate) fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.end <= self.len, "landing past the KV region");
        // SAFETY: in bounds; the segments written belong to this target's
        // blocks, which nothing else touches (see `blocks`).
        unsafe { std::slice::from_raw_parts_mut(self.base.add(range.start), range.len()) }
    }
}

/// See [`PullTarget::landing`].
pub struct Landing<'a> {
    puller: &'a KvLayout,
    shape: &'a PieceShape,
    region_blocks: usize,
    block_ids: &'a [u32],
    /// Whether runs are per slot (a head slice) rather than whole segments.
    pub per_slot: bool,
}

impl<'a> Landing<'a> {
    /// Destination ranges in payload order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + 'a {
        let blocks = self.block_ids.iter().map(|&id| id as usize);
        runs(self.puller, self.region_blocks, blocks, &self.shape.heads, self.per_slot)
    }
}
