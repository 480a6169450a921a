//! Log setup shared by the binaries: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`); [`RateLimit`] for messages that bad input could repeat endlessly.

/// Install the global subscriber (idempotent).
pub fn init() {
    init_with_default("info");
}

/// Install the global subscriber with `default` as the filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keeps a repeated log message from flooding the log: at most `burst` events per
/// `window` are let through, and the next one let through after others were held back
/// says how many (a lying origin fails every read, and a walk reads thousands of files).
pub struct RateLimit {
    burst: u32,
    window: Duration,
    /// Start of the current window, events let through in it, events held back since the
    /// last one let through.
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl RateLimit {
    /// At most `burst` events per `window`.
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit {
            burst,
            window,
            state: Mutex::new((None, 0, 0)),
        }
    }

    /// `Some(held back before this one)` if this event is to be logged, else `None`.
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.0
            .is_none_or(|start| now.duration_since(start) >= self.window)
        {
            s.0 = Some(now);
            s.1 = 0;
        }
        if s.1 >= self.burst {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_let_through_then_held_back_until_the_next_window() {
        let limit = RateLimit::new(3, Duration::from_millis(200));
        let first: Vec<_> = (0..10).map(|_| limit.check()).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            limit.check(),
            Some(7),
            "the next window says how many were held back"
        );
        assert_eq!(limit.check(), Some(0));
    }
}
