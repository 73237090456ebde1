//! The connection limit (`limits.maxConnections`): open connections counted against a
//! maximum that a config reload may change at any time.
//!
//! Not a semaphore: permits held by open connections cannot be taken back, so lowering the
//! limit forgot fewer permits than it should and raising it again added the full difference
//! (the limit grew with every lower-then-raise). Here the maximum is a plain value; lowering
//! it below the open count refuses new connections until enough have closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Open-connection slots.
#[derive(Debug)]
pub struct Slots {
    open: AtomicUsize,
    max: AtomicUsize,
}

/// One taken slot, given back when dropped (with the connection task that holds it).
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    /// `max` slots, none taken.
    pub fn new(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Takes a slot if fewer than the maximum are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Slot {
                slots: self.clone(),
            })
    }

    /// Changes the maximum; slots already taken stay taken.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_then_raising_keeps_the_limit() {
        let slots = Arc::new(Slots::new(3));
        let held: Vec<Slot> = (0..3).filter_map(|_| slots.try_acquire()).collect();
        assert_eq!(held.len(), 3);
        assert!(slots.try_acquire().is_none());
        slots.set_max(1);
        slots.set_max(3);
        assert!(slots.try_acquire().is_none(), "the limit grew");
        drop(held);
        assert_eq!(slots.taken(), 0);
        let again: Vec<Slot> = (0..5).filter_map(|_| slots.try_acquire()).collect();
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn lowering_below_the_open_count_refuses_until_enough_close() {
        let slots = Arc::new(Slots::new(4));
        let mut held: Vec<Slot> = (0..4).filter_map(|_| slots.try_acquire()).collect();
        slots.set_max(2);
        held.pop();
        assert!(slots.try_acquire().is_none(), "3 open, limit 2");
        held.pop();
        held.pop();
        assert!(slots.try_acquire().is_some(), "1 open, limit 2");
    }
}
