//! A rank whose peer died waits in its next collective forever (NCCL has no timeout of its
//! own, and Slurm leaves the other tasks running). The training loop beats a
//! [`ProgressWatchdog`] after every unit of work; when no beat comes for the timeout, the
//! watchdog's action runs (in training: say why and exit the process).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default of `ARCHSCALE_COLLECTIVE_TIMEOUT` (seconds): longer than any legitimate pause
/// (first-step kernel compilation, evaluation, checkpoint writing).
pub const DEFAULT_TIMEOUT_S: u64 = 1800;

/// The timeout from `ARCHSCALE_COLLECTIVE_TIMEOUT` (seconds; `0` turns the watchdog off).
pub fn timeout_from_env() -> Result<Option<Duration>, String> {
    parse_timeout(
        std::env::var("ARCHSCALE_COLLECTIVE_TIMEOUT")
            .ok()
            .as_deref(),
    )
}

fn parse_timeout(value: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(v) = value else {
        return Ok(Some(Duration::from_secs(DEFAULT_TIMEOUT_S)));
    };
    match v.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(s) => Ok(Some(Duration::from_secs(s))),
        Err(_) => Err(format!(
            "ARCHSCALE_COLLECTIVE_TIMEOUT={v} is not a whole number of seconds (0 turns the watchdog off)"
        )),
    }
}

pub struct ProgressWatchdog {
    start: Instant,
    /// Milliseconds since `start` at the last beat.
    last_beat_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressWatchdog {
    /// Starts watching; `on_timeout` gets the time since the last beat, once.
    pub fn start(timeout: Duration, on_timeout: impl FnOnce(Duration) + Send + 'static) -> Self {
        let start = Instant::now();
        let last_beat_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (last, halt) = (last_beat_ms.clone(), stop.clone());
        let poll = (timeout / 20).clamp(Duration::from_millis(5), Duration::from_secs(5));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                std::thread::sleep(poll);
                let now_ms = start.elapsed().as_millis() as u64;
                let idle =
                    Duration::from_millis(now_ms.saturating_sub(last.load(Ordering::SeqCst)));
                if idle >= timeout && !halt.load(Ordering::SeqCst) {
                    on_timeout(idle);
                    return;
                }
            }
        });
        ProgressWatchdog {
            start,
            last_beat_ms,
            stop,
            thread: Some(thread),
        }
    }

    /// Work went on.
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for ProgressWatchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_is_seconds_and_zero_turns_it_off() {
        assert_eq!(
            parse_timeout(None),
            Ok(Some(Duration::from_secs(DEFAULT_TIMEOUT_S)))
        );
        assert_eq!(
            parse_timeout(Some(" 90 ")),
            Ok(Some(Duration::from_secs(90)))
        );
        assert_eq!(parse_timeout(Some("0")), Ok(None));
        let e = parse_timeout(Some("10m")).unwrap_err();
        assert!(e.contains("ARCHSCALE_COLLECTIVE_TIMEOUT=10m"), "{e}");
    }

    #[test]
    fn beats_keep_it_quiet_and_silence_fires_it_once() {
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        let limit = Duration::from_millis(300);
        let dog = ProgressWatchdog::start(limit, move |idle| {
            assert!(idle >= limit);
            f.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(20));
            dog.beat();
        }
        assert_eq!(fired.load(Ordering::SeqCst), 0, "fired while beating");
        // silence: it fires (allow a loaded machine a few seconds), and only once
        let t = Instant::now();
        while fired.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            fired.load(Ordering::SeqCst),
            1,
            "silence did not fire it once"
        );
        drop(dog);
    }

    #[test]
    fn dropping_it_stops_the_watch() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let dog = ProgressWatchdog::start(Duration::from_secs(1), move |_| {
            f.store(true, Ordering::SeqCst);
        });
        drop(dog);
        std::thread::sleep(Duration::from_millis(1200));
        assert!(!fired.load(Ordering::SeqCst));
    }
}
