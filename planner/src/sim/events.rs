//! The simulator's clock: a queue of future events, earliest first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Something that happens at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Request `req` reaches the router.
    Arrival { req: usize },
    /// Worker `worker` finished its step in flight.
    StepDone { worker: usize },
    /// Request `req`'s prompt KV landed on decode worker `worker`.
    HandoffDone { req: usize, worker: usize },
}

struct Entry {
    at: f64,
    /// Insertion order: equal times pop first in, first out, so runs repeat exactly.
    order: u64,
    event: Event,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: `BinaryHeap` is a max-heap and we want the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.total_cmp(&self.at).then(other.order.cmp(&self.order))
    }
}

/// Pending events in time order (ties in the order they were pushed).
#[derive(Default)]
pub(crate) struct Events {
    heap: BinaryHeap<Entry>,
    pushed: u64,
}

impl Events {
    pub(crate) fn push(&mut self, at: f64, event: Event) {
        self.heap.push(Entry { at, order: self.pushed, event });
        self.pushed += 1;
    }

    pub(crate) fn pop(&mut self) -> Option<(f64, Event)> {
        self.heap.pop().map(|e| (e.at, e.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_earliest_first_and_ties_in_push_order() {
        let mut q = Events::default();
        q.push(2.0, Event::Arrival { req: 0 });
        q.push(1.0, Event::StepDone { worker: 1 });
        q.push(2.0, Event::Arrival { req: 1 });
        q.push(0.5, Event::HandoffDone { req: 3, worker: 0 });
        let order: Vec<Event> = std::iter::from_fn(|| q.pop().map(|(_, e)| e)).collect();
        assert_eq!(
            order,
            [
                Event::HandoffDone { req: 3, worker: 0 },
                Event::StepDone { worker: 1 },
                Event::Arrival { req: 0 },
                Event::Arrival { req: 1 }
            ]
        );
    }
}
