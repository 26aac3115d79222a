//! The launch constants of `kernels/*.cu`, defined once. `build.rs` compiles this file too and
//! writes every constant as a `constexpr int` to `OUT_DIR/launch_constants.cuh`, which the
//! kernels include (nvcc, and the kernel emulation test); [`super`] computes the grids from the
//! same values, so a block size or tile cannot differ between a kernel and its launch.
// Some are read by the kernels only, through build.rs.
#![allow(dead_code)]

macro_rules! kernel_constants {
    ($($(#[doc = $doc:literal])+ $name:ident = $value:expr;)+) => {
        $($(#[doc = $doc])+ pub const $name: usize = $value;)+
        /// Every constant above by name, for `build.rs`.
        pub const ALL: &[(&str, usize)] = &[$((stringify!($name), $name)),+];
    };
}

kernel_constants! {
    /// Int8 activation rows are zero-padded to a multiple of this many bytes (16-byte loads).
    ACT_ALIGN = 16;
    /// Token rows up to which the mat-vec kernel runs (4 outputs each, one per lane of a warp).
    GEMV_MAX_ROWS = 8;
    /// Threads of a mat-vec block, which computes one packed row (several warps split `k`).
    GEMV_THREADS = 128;
    /// 16-byte weight chunks each mat-vec lane loads before it uses the first.
    GEMV_UNROLL = 4;
    /// Token rows of one mat-mat block tile.
    GEMM_TM = 64;
    /// Packed rows of one mat-mat block tile.
    GEMM_TJ = 32;
    /// Threads of a mat-mat block (16 × 16).
    GEMM_THREADS = 256;
    /// Threads of a quantize block (one token row).
    QUANTIZE_THREADS = 256;
    /// Threads of an RMSNorm-quantize block (one token row). Also the number of strided
    /// partial sums of squares, which fixes the summation order (see `rms_norm_quantize`).
    RMS_NORM_THREADS = 256;
    /// Row values each RMSNorm-quantize thread keeps in registers: rows up to
    /// `RMS_NORM_CACHED · RMS_NORM_THREADS` (8192) padded columns are read from memory once.
    RMS_NORM_CACHED = 32;
    /// Threads of a dequantize block (grid-stride).
    DEQUANT_THREADS = 256;
    /// Threads of a RoPE + KV-append block (one head of one token).
    ROPE_THREADS = 64;
    /// Threads of a decode-attention block (one KV head, one split of the cache).
    ATTN_THREADS = 128;
    /// Query heads per KV head the attention kernel takes at most.
    ATTN_MAX_GROUP = 8;
    /// Head dimension the attention kernel takes at most.
    ATTN_MAX_HEAD_DIM = 256;
    /// Cache positions per split below which the attention is not split further. Short
    /// splits keep the blocks many and each warp's walk short (decode at 129 positions of
    /// 2B-4T on an H200: 18.5 µs a layer with 64).
    ATTN_MIN_SPLIT_LEN = 16;
    /// Splits of the cache at most (flash-decoding), so the combine step stays one block.
    ATTN_MAX_SPLITS = 32;
    /// Threads of an argmax block (one row of logits).
    ARGMAX_THREADS = 1024;
}
