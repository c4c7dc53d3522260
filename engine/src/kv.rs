//! The KV cache: paged storage addressed by block id ([`cache`]), and the KV of a hand-off landing
//! in it layer by layer while the first step runs ([`landing`]).

pub mod cache;
pub mod landing;
