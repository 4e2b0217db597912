//! What the device benchmarks share: a clock that reads wall-clock and thread CPU time, and
//! min/median/max of a sample. Each benchmark uses a part of it.

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Wall-clock and this thread's CPU time.
#[derive(Clone, Copy)]
pub struct Clock {
    wall: Instant,
    cpu: Duration,
}

/// Elapsed wall-clock and CPU time of one side's run.
#[derive(Clone, Copy)]
pub struct Took {
    pub wall: Duration,
    pub cpu: Duration,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which lives for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Self {
            wall: Instant::now(),
            // The clock counts up from 0: both fields are non-negative.
            cpu: Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            ),
        }
    }

    pub fn elapsed(&self) -> Took {
        let now = Self::now();
        Took {
            wall: now.wall - self.wall,
            cpu: now.cpu.saturating_sub(self.cpu),
        }
    }
}

impl std::ops::AddAssign for Took {
    fn add_assign(&mut self, other: Self) {
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
}

impl Took {
    pub const ZERO: Took = Took {
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
    };
}

/// Min, median and max of a sample.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}
