//! Who is in a pool now: a fixed number of worker slots, each empty or held
//! by one worker.
//!
//! Everything per worker in the router (admission counts, prefix index
//! views, placement identities, in-flight decode counts) is indexed by slot,
//! so a worker joining or leaving changes one slot and nothing else moves.
//! A static `--prefill` / `--decode` list fills every slot for good; with
//! etcd discovery the pool has `--max-workers-per-pool` slots, filled and
//! emptied as registrations come and go. A returning worker (same URL) gets
//! its old slot back when it is still free.

use std::sync::{PoisonError, RwLock};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::fleet::breaker::Breaker;

/// A worker in a slot.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its gRPC URL.
    pub url: String,
    /// What it is known by: its etcd key, or its URL in a static list.
    pub key: String,
    /// Its rendezvous-hashing identity, from the URL: the same on every
    /// router replica.
    pub id: u64,
}

impl Member {
    /// A member at `url` known as `key`.
    pub fn new(url: &str, key: &str) -> Self {
        Self { url: url.to_owned(), key: key.to_owned(), id: xxh3_64_with_seed(url.as_bytes(), 0) }
    }
}

/// The slots of one pool.
#[derive(Debug)]
pub struct Roster {
    slots: Vec<RwLock<Slot>>,
    /// Each slot's circuit breaker, closed again when a worker joins it.
    breakers: Vec<Breaker>,
}

#[derive(Debug, Default)]
struct Slot {
    member: Option<Member>,
    /// The URL of the last member, kept after it left so that it finds its
    /// slot again.
    last_url: Option<String>,
}

impl Roster {
    /// A pool of `capacity` empty slots.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::from_slots((0..capacity).map(|_| RwLock::default()).collect())
    }

    /// A pool whose slots hold the workers at `urls`, in order, for good.
    pub fn fixed(urls: &[String]) -> Self {
        let slot =
            |url: &String| RwLock::new(Slot { last_url: Some(url.clone()), member: Some(Member::new(url, url)) });
        Self::from_slots(urls.iter().map(slot).collect())
    }

    fn from_slots(slots: Vec<RwLock<Slot>>) -> Self {
        let breakers = slots.iter().map(|_| Breaker::default()).collect();
        Self { slots, breakers }
    }

    /// Slot `index`'s circuit breaker.
    pub fn breaker(&self, index: usize) -> &Breaker {
        &self.breakers[index]
    }

    /// Whether slot `index` holds a worker whose breaker lets a request through.
    pub fn available(&self, index: usize) -> bool {
        self.is_active(index) && self.breakers[index].available()
    }

    /// How many slots there are (filled or not): worker indices are below it.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, index: usize) -> std::sync::RwLockReadGuard<'_, Slot> {
        // Slots change whole under the write lock: a poisoned one is still consistent.
        self.slots[index].read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The worker in slot `index`, if any (and `None` past the capacity).
    pub fn member(&self, index: usize) -> Option<Member> {
        (index < self.slots.len()).then(|| self.slot(index).member.clone()).flatten()
    }

    /// Whether slot `index` holds a worker.
    pub fn is_active(&self, index: usize) -> bool {
        index < self.slots.len() && self.slot(index).member.is_some()
    }

    /// The filled slots, in order.
    pub fn active(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.is_active(i)).collect()
    }

    /// The rendezvous identity of slot `index`'s worker (0 when empty).
    pub fn id(&self, index: usize) -> u64 {
        self.slot(index).member.as_ref().map_or(0, |m| m.id)
    }

    /// Puts `member` in a slot: the one it had (by URL) if free, else the
    /// first that never held anyone, else any free one. `None` when the pool
    /// is full or the key is in already.
    pub fn join(&self, member: Member) -> Option<usize> {
        let taken = |slot: &Slot| slot.member.is_some();
        if (0..self.slots.len()).any(|i| self.slot(i).member.as_ref().is_some_and(|m| m.key == member.key)) {
            return None;
        }
        let choose = |wanted: &dyn Fn(&Slot) -> bool| (0..self.slots.len()).find(|&i| wanted(&self.slot(i)));
        let index = choose(&|s| !taken(s) && s.last_url.as_deref() == Some(member.url.as_str()))
            .or_else(|| choose(&|s| !taken(s) && s.last_url.is_none()))
            .or_else(|| choose(&|s| !taken(s)))?;
        let mut slot = self.slots[index].write().unwrap_or_else(PoisonError::into_inner);
        if slot.member.is_some() {
            return None; // Filled between the look and the lock: the caller is the one writer.
        }
        slot.last_url = Some(member.url.clone());
        slot.member = Some(member);
        self.breakers[index].reset();
        Some(index)
    }

    /// Empties the slot of the worker known as `key`; returns it.
    pub fn leave(&self, key: &str) -> Option<usize> {
        let index = (0..self.slots.len()).find(|&i| self.slot(i).member.as_ref().is_some_and(|m| m.key == key))?;
        self.slots[index].write().unwrap_or_else(PoisonError::into_inner).member = None;
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(url: &str, key: &str) -> Member {
        Member::new(url, key)
    }

    #[test]
    fn workers_take_free_slots_and_find_their_own_again() {
        let roster = Roster::with_capacity(3);
        assert_eq!(roster.active(), Vec::<usize>::new());
        assert_eq!(roster.join(member("http://a:1", "ka")), Some(0));
        assert_eq!(roster.join(member("http://b:1", "kb")), Some(1));
        assert_eq!(roster.join(member("http://b:1", "kb")), None, "a key joins once");
        assert_eq!(roster.active(), [0, 1]);
        assert_eq!(roster.leave("ka"), Some(0));
        assert_eq!(roster.leave("ka"), None);
        assert!(!roster.is_active(0) && roster.member(0).is_none());
        // A new worker prefers a never-used slot, leaving slot 0 to `a`.
        assert_eq!(roster.join(member("http://c:1", "kc")), Some(2));
        assert_eq!(roster.join(member("http://a:1", "ka2")), Some(0));
        assert_eq!(roster.member(0).unwrap().key, "ka2");
        assert_eq!(roster.join(member("http://d:1", "kd")), None, "full");
        assert_eq!(roster.id(1), xxh3_64_with_seed(b"http://b:1", 0));
    }

    #[test]
    fn a_fixed_roster_is_full_from_the_start() {
        let roster = Roster::fixed(&["http://a:1".to_owned(), "http://b:1".to_owned()]);
        assert_eq!((roster.capacity(), roster.active()), (2, vec![0, 1]));
        assert!(!roster.is_active(2));
    }
}
