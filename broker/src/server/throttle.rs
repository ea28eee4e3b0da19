//! Publish back-pressure, as in Pulsar: a connection stops reading while too many of its sends
//! wait for their appends (`max_pending_publish_requests_per_connection`), or while the sends
//! waiting across the whole broker hold too many bytes (`max_message_publish_buffer_size_in_mb`),
//! and reads again once that has fallen to half. A producer faster than the bookies then waits
//! in its client and in the socket, not in the broker's memory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A count with a limit, with hysteresis: full once the count reaches `max`, open again once
/// it has fallen to half.
struct Gate {
    /// `usize::MAX`: no limit.
    max: usize,
    count: AtomicUsize,
    /// Set at `max`, cleared at half of it.
    full: AtomicBool,
    /// Woken when `full` clears.
    open: Notify,
}

impl Gate {
    fn new(max: usize) -> Self {
        Gate { max, count: AtomicUsize::new(0), full: AtomicBool::new(false), open: Notify::new() }
    }

    fn add(&self, n: usize) {
        if self.count.fetch_add(n, Ordering::AcqRel).saturating_add(n) >= self.max {
            self.full.store(true, Ordering::Release);
        }
    }

    fn sub(&self, n: usize) {
        if self.count.fetch_sub(n, Ordering::AcqRel) - n <= self.max / 2 && self.full.swap(false, Ordering::AcqRel) {
            self.refill_or_open();
        }
    }

    fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Whether it is full and not yet back to half.
    fn blocked(&self) -> bool {
        if !self.is_full() {
            return false;
        }
        if self.count.load(Ordering::Acquire) > self.max / 2 {
            return true;
        }
        // The release that got it there may have run before `full` was set.
        self.full.store(false, Ordering::Release);
        self.refill_or_open()
    }

    /// After clearing `full`: sets it again if the count reached `max` meanwhile (a mark the
    /// clearing overwrote), else wakes the waiters. Returns whether it is full.
    fn refill_or_open(&self) -> bool {
        if self.count.load(Ordering::Acquire) >= self.max {
            self.full.store(true, Ordering::Release);
            return true;
        }
        self.open.notify_waiters();
        false
    }
}

/// The broker-wide budget of bytes in sends not yet answered, and the gauges `/metrics` shows.
pub(crate) struct PublishBuffer {
    /// Bytes at which every connection stops reading.
    bytes: Gate,
    /// Sends not yet answered, over all connections.
    pending: AtomicUsize,
    /// Connections not reading now, for either limit.
    throttled: AtomicUsize,
    /// Connections not reading now because of the broker-wide limit.
    throttled_global: AtomicUsize,
}

/// What `/metrics` reports about publish back-pressure.
pub(crate) struct ThrottleGauges {
    pub(crate) pending: usize,
    pub(crate) buffer_bytes: usize,
    pub(crate) throttled: usize,
    pub(crate) throttled_global: usize,
}

impl PublishBuffer {
    /// A budget of `max_mb` MiB (negative: no limit).
    pub(crate) fn new(max_mb: i64) -> Self {
        let max = if max_mb < 0 { usize::MAX } else { (max_mb as usize).saturating_mul(1 << 20).max(1) };
        PublishBuffer {
            bytes: Gate::new(max),
            pending: AtomicUsize::new(0),
            throttled: AtomicUsize::new(0),
            throttled_global: AtomicUsize::new(0),
        }
    }

    pub(crate) fn gauges(&self) -> ThrottleGauges {
        ThrottleGauges {
            pending: self.pending.load(Ordering::Relaxed),
            buffer_bytes: self.bytes.count.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            throttled_global: self.throttled_global.load(Ordering::Relaxed),
        }
    }
}

/// One connection's count of sends not yet answered.
pub(crate) struct ConnThrottle {
    /// Sends at which this connection stops reading.
    sends: Gate,
    buffer: Arc<PublishBuffer>,
}

impl ConnThrottle {
    pub(crate) fn new(max: usize, buffer: Arc<PublishBuffer>) -> Arc<Self> {
        Arc::new(ConnThrottle { sends: Gate::new(max.max(1)), buffer })
    }

    /// Counts a send of `bytes` read from the connection until the returned guard is dropped
    /// (when the send is answered, or given up).
    pub(crate) fn start(self: &Arc<Self>, bytes: usize) -> InFlight {
        self.sends.add(1);
        self.buffer.pending.fetch_add(1, Ordering::Relaxed);
        self.buffer.bytes.add(bytes);
        InFlight { conn: self.clone(), bytes }
    }

    /// Whether the connection is not being read now (or will not be at its next frame).
    pub(crate) fn paused(&self) -> bool {
        self.sends.is_full() || self.buffer.bytes.is_full()
    }

    /// Returns once the connection may read its next frame: at once unless a limit was
    /// reached, else when what is pending has fallen to half of it.
    pub(crate) async fn readable(&self) {
        if !self.paused() {
            return;
        }
        let mut counted: Option<Counted<'_>> = None;
        loop {
            let (mine, everyone) = (self.sends.open.notified(), self.buffer.bytes.open.notified());
            tokio::pin!(mine, everyone);
            // Registered before looking, so a release in between still wakes this wait.
            mine.as_mut().enable();
            everyone.as_mut().enable();
            let (local, global) = (self.sends.blocked(), self.buffer.bytes.blocked());
            if !local && !global {
                return;
            }
            match &mut counted {
                None => counted = Some(Counted::new(&self.buffer, global)),
                Some(c) => c.set_global(global),
            }
            tokio::select! {
                _ = mine => {}
                _ = everyone => {}
            }
        }
    }
}

/// A connection counted in the throttled gauges while it exists.
struct Counted<'a> {
    buffer: &'a PublishBuffer,
    global: bool,
}

impl<'a> Counted<'a> {
    fn new(buffer: &'a PublishBuffer, global: bool) -> Self {
        buffer.throttled.fetch_add(1, Ordering::Relaxed);
        if global {
            buffer.throttled_global.fetch_add(1, Ordering::Relaxed);
        }
        Counted { buffer, global }
    }

    fn set_global(&mut self, global: bool) {
        if global != self.global {
            if global {
                self.buffer.throttled_global.fetch_add(1, Ordering::Relaxed);
            } else {
                self.buffer.throttled_global.fetch_sub(1, Ordering::Relaxed);
            }
            self.global = global;
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.set_global(false);
        self.buffer.throttled.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A send read from a connection and not yet answered.
pub(crate) struct InFlight {
    conn: Arc<ConnThrottle>,
    bytes: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.sends.sub(1);
        self.conn.buffer.pending.fetch_sub(1, Ordering::Relaxed);
        self.conn.buffer.bytes.sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn reads_within(t: &ConnThrottle, ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(ms), t.readable()).await.is_ok()
    }

    #[tokio::test]
    async fn a_connection_stops_reading_at_its_limit_and_reads_again_at_half() {
        let buffer = Arc::new(PublishBuffer::new(-1));
        let t = ConnThrottle::new(4, buffer.clone());
        let mut sends: Vec<InFlight> = (0..3).map(|_| t.start(10)).collect();
        assert!(reads_within(&t, 50).await, "3 of 4 pending: still reading");
        sends.push(t.start(10));
        assert!(!reads_within(&t, 50).await, "4 of 4 pending: paused");
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.readable().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(buffer.gauges().throttled, 1);
        sends.pop();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "3 pending is over half: still paused");
        sends.pop();
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("reads again at half").expect("join");
        assert_eq!(buffer.gauges().throttled, 0);
        assert_eq!(buffer.gauges().pending, 2);
        drop(sends);
        assert_eq!((buffer.gauges().pending, buffer.gauges().buffer_bytes), (0, 0));
    }

    #[tokio::test]
    async fn the_broker_wide_budget_stops_every_connection() {
        let buffer = Arc::new(PublishBuffer::new(1));
        let (a, b) = (ConnThrottle::new(1000, buffer.clone()), ConnThrottle::new(1000, buffer.clone()));
        let big = a.start(700 << 10);
        assert!(reads_within(&b, 50).await, "under the budget");
        let more = b.start(400 << 10);
        assert!(!reads_within(&a, 50).await && !reads_within(&b, 50).await, "over it: nobody reads");
        let waiters: Vec<_> =
            [a.clone(), b.clone()].into_iter().map(|t| tokio::spawn(async move { t.readable().await })).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((buffer.gauges().throttled, buffer.gauges().throttled_global), (2, 2));
        drop(big);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w).await.expect("reads again under half").expect("join");
        }
        assert_eq!((buffer.gauges().throttled, buffer.gauges().throttled_global), (0, 0));
        assert_eq!(buffer.gauges().buffer_bytes, 400 << 10);
        drop(more);
    }
}
