//! Where a forward's wall time goes, by stage, for `bitnet bench`'s profile rows. Off unless
//! [`enable`]d: a disabled probe costs one relaxed atomic load. Stages are timed where they run
//! on the calling thread, so nested parallel work is counted once, as wall time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A part of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The ternary projections (activation quantization included).
    Projections,
    /// RoPE, the KV-cache append and attention proper.
    Attention,
    /// The RMSNorms outside the projections.
    Norms,
    /// The final projection to the vocabulary.
    Head,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Projections,
        Stage::Attention,
        Stage::Norms,
        Stage::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Projections => "projections",
            Stage::Attention => "attention",
            Stage::Norms => "norms",
            Stage::Head => "head",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Starts (or stops) accounting, process-wide.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Time spent in each stage since the last call, in [`Stage::ALL`] order; resets the counters.
pub fn take() -> [Duration; 4] {
    NANOS
        .each_ref()
        .map(|n| Duration::from_nanos(n.swap(0, Ordering::Relaxed)))
}

/// Runs `f`, adding its wall time to `stage` when accounting is on.
#[inline]
pub(crate) fn timed<T>(stage: Stage, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    NANOS[stage as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}
