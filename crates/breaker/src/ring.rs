//! A ring of time buckets: totals over a sliding window in constant memory.

use std::time::Duration;

use crate::clock::nanos;

/// `buckets` slots, each covering `span / buckets` of time. A slot is reused (reset) when
/// time reaches it again, so the live slots always cover the last `span` (give or take one
/// slot's width: the oldest live slot may be partly older than `span`).
#[derive(Debug)]
pub(crate) struct Ring<T> {
    width_nanos: u64,
    slots: Box<[Slot<T>]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot<T> {
    /// Which bucket-width period of the clock this slot currently holds.
    epoch: u64,
    value: T,
}

// === impl Ring ===

impl<T: Default + Copy> Ring<T> {
    /// A ring of `buckets` (at least one) slots over `span` (at least one nanosecond each).
    pub(crate) fn new(span: Duration, buckets: u32) -> Self {
        let buckets = buckets.max(1);
        Self {
            width_nanos: (nanos(span) / u64::from(buckets)).max(1),
            slots: vec![Slot::default(); buckets as usize].into_boxed_slice(),
        }
    }

    fn epoch(&self, now: Duration) -> u64 {
        nanos(now) / self.width_nanos
    }

    fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The slot for `now`, reset first if it still holds an older period.
    pub(crate) fn current(&mut self, now: Duration) -> &mut T {
        let epoch = self.epoch(now);
        // The remainder is below `slots.len()`, which is a `usize`.
        let index = (epoch % self.len()) as usize;
        let slot = &mut self.slots[index];
        if slot.epoch != epoch {
            *slot = Slot {
                epoch,
                value: T::default(),
            };
        }
        &mut slot.value
    }

    /// The values of the slots still inside the window at `now`.
    pub(crate) fn live(&self, now: Duration) -> impl Iterator<Item = &T> {
        let epoch = self.epoch(now);
        let len = self.len();
        self.slots
            .iter()
            .filter(move |slot| slot.epoch <= epoch && epoch - slot.epoch < len)
            .map(|slot| &slot.value)
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.slots.fill(Slot::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(ring: &Ring<u32>, now: Duration) -> u32 {
        ring.live(now).sum()
    }

    #[test]
    fn values_leave_the_window_after_the_span() {
        let secs = Duration::from_secs;
        let mut ring = Ring::<u32>::new(secs(10), 10);
        *ring.current(secs(0)) += 1;
        *ring.current(secs(5)) += 2;
        assert_eq!(total(&ring, secs(5)), 3);
        assert_eq!(total(&ring, Duration::from_millis(9_999)), 3);
        assert_eq!(total(&ring, secs(10)), 2, "the first second has slid out");
        assert_eq!(total(&ring, secs(15)), 0);
        // Reusing a slot resets it.
        *ring.current(secs(20)) += 7;
        assert_eq!(total(&ring, secs(20)), 7);
        ring.clear();
        assert_eq!(total(&ring, secs(20)), 0);
    }

    #[test]
    fn degenerate_sizes_do_not_divide_by_zero() {
        let mut ring = Ring::<u32>::new(Duration::ZERO, 0);
        *ring.current(Duration::from_nanos(5)) += 1;
        assert_eq!(total(&ring, Duration::from_nanos(5)), 1);
        assert_eq!(total(&ring, Duration::from_nanos(6)), 0);
    }
}
