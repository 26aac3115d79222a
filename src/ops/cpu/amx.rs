//! BitLinear on Intel AMX tiles, for several tokens at once: `tdpbsud` multiplies up to 16
//! token rows × 64 int8 activations by 64 × 16 unsigned codes in one instruction (16·16·64
//! products, where `vpdpbusd` does 64).
//!
//! The row-tile layout ([`super::tiles`]) is already AMX's second operand: byte `4i + b` of
//! block `s` is row `i`, column `4s + b`, sixteen 4-byte column groups per 64-byte tile row.
//! Only the 2-bit fields must become bytes: each weight tile is decoded, 64 columns at a time,
//! into four 1 KiB code tiles (one per bit field, codes 0..=2) in a per-thread buffer, and
//! every token group of the task multiplies against it. Activations are the first operand,
//! loaded straight from [`super::QuantizedRows`] (rows 64-byte aligned, so no tile row splits
//! a cache line). Sums are exact in i32 below [`MAX_COLS`] columns (at most 2·128 per column):
//! the same `Σ code·x` as the other kernels.
//!
//! Rust's AMX intrinsics are unstable, so the tile instructions are `asm!` on fixed registers,
//! which the compiler never allocates: tmm0–3 accumulate bit fields 0–3 (16 output rows each),
//! tmm4 holds activations, tmm5–7 the codes.

use super::tiles::{TernaryTiles, BLOCK_BYTES, TILE_ROWS};
use super::AmxSupport;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

/// Token rows of one tile multiply (the hardware's maximum).
pub(super) const GROUP_TOKENS: usize = 16;
/// Input columns of one tile multiply: 64 bytes per tile row.
const CHUNK_COLS: usize = 64;
/// Steps (blocks of 4 columns) per chunk: the code tile's 16 rows.
const CHUNK_STEPS: usize = CHUNK_COLS / 4;
/// Bytes of one decoded chunk: four code tiles of 16 × 64 bytes.
const CHUNK_BYTES: usize = 4 * CHUNK_STEPS * BLOCK_BYTES;
/// Chunks decoded at a time, before the token groups walk them. Short segments keep the codes
/// in L1 and let decode and multiply overlap; several groups save and reload their sums once
/// per segment, which costs less than longer segments (measured: 1, 2, 4, 8 and whole tiles
/// of 2560 columns, 16 to 64 tokens; 2 was fastest throughout).
const SEGMENT_CHUNKS: usize = 2;
/// Token groups one task may hold, so their partial sums fit the scratch buffer.
pub(super) const MAX_GROUPS: usize = 4;
/// Rows longer than this could overflow the i32 sums (2·128 per column), which the tiles never
/// flush: they stay on the SIMD kernels.
pub(super) const MAX_COLS: usize = 1 << 23;
/// How far ahead of the decode software prefetch runs in the packed tile.
const PREFETCH_BYTES: usize = 1024;

/// Linux's `arch_prctl` request for permission to use an extended state component, and the
/// component of AMX tile data (`XFEATURE_XTILEDATA`): Documentation/arch/x86/xstate.rst.
#[cfg(target_os = "linux")]
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
#[cfg(target_os = "linux")]
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25): the standard
/// library's detection of these is unstable.
fn cpu_has_amx_int8() -> bool {
    // Leaf 7 is read only if the CPU has it.
    __get_cpuid_max(0).0 >= 7 && {
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    }
}

/// Detects AMX and asks Linux for the tile state (once per process: the permission covers
/// every thread). Linux refuses a process that never asked, so elsewhere AMX stays off.
pub(super) fn detect(enabled_by_env: bool, avx512: bool) -> AmxSupport {
    if !cpu_has_amx_int8() || !avx512 {
        return AmxSupport::NotInCpu;
    }
    if !enabled_by_env {
        return AmxSupport::TurnedOff;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call with integer arguments; it only changes which state the
        // kernel lets this process use.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if r == 0 {
            AmxSupport::Ready
        } else {
            AmxSupport::RefusedByOs
        }
    }
    #[cfg(not(target_os = "linux"))]
    AmxSupport::RefusedByOs
}

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile register.
    colsb: [u16; 16],
    /// Rows of each tile register.
    rows: [u8; 16],
}

impl TileConfig {
    /// Accumulators (tmm0–3) and activations (tmm4) of `m` token rows, codes (tmm5–7) of 16
    /// steps; every row 64 bytes.
    fn new(m: usize) -> Self {
        let mut config = Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for tmm in 0..8 {
            config.colsb[tmm] = CHUNK_COLS as u16;
            config.rows[tmm] = if tmm < 5 { m as u8 } else { CHUNK_STEPS as u8 };
        }
        config
    }
}

/// One 64-byte line on a cache line of its own: tile loads never split one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// One token group's 64 dot products per token, as `tilestored` writes them: `[token][row]`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct GroupDots([[i32; TILE_ROWS]; GROUP_TOKENS]);

/// A thread's buffers, kept between tasks so that a decode step allocates nothing.
struct Scratch {
    /// Two segments of decoded chunks, `[half][chunk][field][step][64]`.
    codes: Vec<Line>,
    /// Each group's dot products.
    dots: Vec<GroupDots>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        codes: vec![Line([0; 64]); 2 * SEGMENT_CHUNKS * CHUNK_BYTES / 64],
        dots: vec![GroupDots([[0; TILE_ROWS]; GROUP_TOKENS]); MAX_GROUPS],
    });
}

/// Token groups of a task of `n` tokens and the rows of each: near-equal groups of at most 16,
/// all of the same height so one tile configuration serves the task. Group `g` starts at
/// `min(g · rows, n − rows)`: the last one may overlap the one before (recomputing a few rows)
/// rather than read past the task.
fn groups(n: usize) -> (usize, usize) {
    let groups = n.div_ceil(GROUP_TOKENS);
    (groups, n.div_ceil(groups))
}

/// Raw `Σ code·x` of the tiles `tiles` of `w` against the `n` token rows `x` (`[n, kp]`,
/// zero-padded, 64-byte aligned), passed to `store(token, tile, dots)` for each token and tile.
///
/// # Safety
/// AMX must be [`AmxSupport::Ready`] (which implies AVX-512F/BW); `kp ≥ 4 · w.steps()` is a
/// multiple of 64 and at most [`MAX_COLS`], `1 ≤ n ≤ MAX_GROUPS · 16`, and `tiles` lies
/// within `w`.
pub(super) unsafe fn run_task(
    w: &TernaryTiles,
    tiles: Range<usize>,
    x: &[i8],
    kp: usize,
    n: usize,
    mut store: impl FnMut(usize, usize, &[i32; TILE_ROWS]),
) {
    let (n_groups, rows) = groups(n);
    debug_assert!(n >= 1 && n_groups <= MAX_GROUPS && x.len() == n * kp);
    debug_assert!(kp.is_multiple_of(CHUNK_COLS) && kp >= 4 * w.steps() && kp <= MAX_COLS);
    debug_assert!(x.as_ptr().align_offset(64) == 0);
    let steps = w.steps();
    let chunks = steps.div_ceil(CHUNK_STEPS);
    let segs = chunks.div_ceil(SEGMENT_CHUNKS);
    // Segment `i` of the task: its tile and first chunk.
    let segment = |i: usize| (tiles.start + i / segs, i % segs * SEGMENT_CHUNKS);
    let config = TileConfig::new(rows);
    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch { codes, dots } = scratch;
        let codes = codes.as_mut_ptr().cast::<u8>();
        // SAFETY: `codes` holds two halves of `SEGMENT_CHUNKS` chunks.
        let half = |i: usize| unsafe { codes.add(i % 2 * SEGMENT_CHUNKS * CHUNK_BYTES) };
        let decode_segment = |i: usize| {
            let (tile, c0) = segment(i);
            let seg = SEGMENT_CHUNKS.min(chunks - c0);
            // SAFETY: AVX-512F/BW come with AMX; `tile` is one of the task's tiles of `w`,
            // chunks `c0..c0 + seg` are inside it, and a half holds `seg` decoded chunks.
            unsafe { decode(w.tile_bytes(tile..tile + 1), steps, c0, seg, half(i)) };
        };
        // SAFETY: AMX is ready (the caller's contract); the configuration is a valid palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
        // A software pipeline: the tile unit multiplies segment `i` while the vector unit
        // decodes segment `i + 1` into the other half of the buffer.
        decode_segment(0);
        for i in 0..tiles.len() * segs {
            let (tile, c0) = segment(i);
            let seg = SEGMENT_CHUNKS.min(chunks - c0);
            for (g, dots) in dots[..n_groups].iter_mut().enumerate() {
                let t0 = (g * rows).min(n - rows);
                let start = match (c0, n_groups) {
                    (0, _) => Start::Zero,
                    (_, 1) => Start::Kept,
                    _ => Start::Load,
                };
                let save = n_groups > 1 || c0 + seg == chunks;
                // SAFETY: rows `t0..t0 + rows` are inside `x`, columns `64·c0 .. 64·(c0 +
                // seg)` inside `kp` (chunks ≤ kp / 64); half `i` holds the segment's decoded
                // chunks, and `dots` is one group's buffer, as configured above.
                unsafe {
                    let x = x.as_ptr().add(t0 * kp + c0 * CHUNK_COLS);
                    group_segment(x, kp, half(i), seg, dots, start, save);
                }
            }
            if i + 1 < tiles.len() * segs {
                decode_segment(i + 1);
            }
            if c0 + seg == chunks {
                let mut done = 0;
                for (g, dots) in dots[..n_groups].iter().enumerate() {
                    let t0 = (g * rows).min(n - rows);
                    // Rows another group already stored are skipped: the same values.
                    for r in done.max(t0)..t0 + rows {
                        store(r, tile, &dots.0[r - t0]);
                    }
                    done = t0 + rows;
                }
            }
        }
        // SAFETY: AMX is ready; releasing the tiles lets the OS skip saving them.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// Spreads the bit fields of chunks `c0..c0 + seg` of one packed tile into `codes`,
/// `[chunk][field][step][64]` bytes of codes 0..=2; steps past the tile are zero (their
/// activations are the zero padding, but the bytes must be defined).
///
/// # Safety
/// AVX-512F/BW; `packed` is one tile (`[steps · 64]`, 64-byte aligned), `codes` is 64-byte
/// aligned and holds `seg` chunks.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode(packed: &[u8], steps: usize, c0: usize, seg: usize, codes: *mut u8) {
    let mask = _mm512_set1_epi8(3);
    for c in 0..seg {
        for r in 0..CHUNK_STEPS {
            let s = (c0 + c) * CHUNK_STEPS + r;
            let fields = if s < steps {
                // SAFETY: block `s < steps` of the tile, 64-byte aligned.
                let block = unsafe { packed.as_ptr().add(s * BLOCK_BYTES) };
                super::prefetch(block.wrapping_add(PREFETCH_BYTES), false);
                // SAFETY: as above.
                let v = unsafe { _mm512_load_si512(block.cast()) };
                [
                    _mm512_and_si512(v, mask),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(v), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<6>(v), mask),
                ]
            } else {
                [_mm512_setzero_si512(); 4]
            };
            for (p, f) in fields.into_iter().enumerate() {
                // SAFETY: line `(4c + p)·16 + r` of `seg` chunks, 64-byte aligned.
                unsafe {
                    let dst = codes.add(c * CHUNK_BYTES + (p * CHUNK_STEPS + r) * 64);
                    _mm512_store_si512(dst.cast(), f);
                }
            }
        }
    }
}

/// Where a group's accumulators start a segment.
#[derive(Clone, Copy)]
enum Start {
    /// The first segment.
    Zero,
    /// Still in the registers: the task's only group.
    Kept,
    /// Saved in the group's `dots`: other groups used the registers since.
    Load,
}

/// The instruction moving accumulator `tmm$k` between its tile and a group's dots: per token
/// (a `{s}`-byte line from `{o}`), the 16 i32 at byte `$offset`.
macro_rules! accumulator_move {
    (load, $k:literal, $offset:literal) => {
        concat!("tileloadd tmm", $k, ", [{o} + {s}*1 + ", $offset, "]")
    };
    (store, $k:literal, $offset:literal) => {
        concat!("tilestored [{o} + {s}*1 + ", $offset, "], tmm", $k)
    };
}

/// `asm!` loading (`load`) or storing (`store`) the accumulators tmm0–3 from or to the
/// [`GroupDots`] at `$out`: accumulator k holds output rows 16k.. of each token's line.
macro_rules! accumulators {
    ($direction:ident, $out:expr, $($options:tt)*) => {
        asm!(
            accumulator_move!($direction, 0, 0),
            accumulator_move!($direction, 1, 64),
            accumulator_move!($direction, 2, 128),
            accumulator_move!($direction, 3, 192),
            o = in(reg) $out,
            s = in(reg) TILE_ROWS * 4,
            $($options)*
        )
    };
}

/// One token group against `seg` decoded chunks; the accumulators go back to `dots` if `save`.
///
/// # Safety
/// Tiles configured by [`run_task`]; `x` points at the group's first row at the segment's
/// first column, rows `kp` apart, 64-byte aligned, `seg · 64` columns readable in each of the
/// configured rows; `codes` holds `seg` decoded chunks.
#[inline(always)]
unsafe fn group_segment(
    x: *const i8,
    kp: usize,
    codes: *const u8,
    seg: usize,
    dots: &mut GroupDots,
    start: Start,
    save: bool,
) {
    let out = dots.0.as_mut_ptr().cast::<u8>();
    // SAFETY (every block): the tile instructions touch only the tile registers and the
    // memory the caller vouches for: `x` rows, `codes` chunks, `dots` (16 rows of 256 bytes).
    unsafe {
        match start {
            Start::Zero => asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
            Start::Load => accumulators!(load, out, options(nostack, readonly)),
            Start::Kept => {}
        }
        for c in 0..seg {
            asm!(
                "tileloadd tmm4, [{x} + {kp}*1]",
                "tileloadd tmm5, [{b} + {s}*1]",
                "tdpbsud tmm0, tmm4, tmm5",
                "tileloadd tmm6, [{b} + {s}*1 + 1024]",
                "tdpbsud tmm1, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {s}*1 + 2048]",
                "tdpbsud tmm2, tmm4, tmm7",
                "tileloadd tmm5, [{b} + {s}*1 + 3072]",
                "tdpbsud tmm3, tmm4, tmm5",
                x = in(reg) x.add(c * CHUNK_COLS),
                kp = in(reg) kp,
                b = in(reg) codes.add(c * CHUNK_BYTES),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        if save {
            accumulators!(store, out, options(nostack));
        }
    }
}
