//! Launch geometry of the CUDA kernels in `kernels/`: the grid and block each op launches, from
//! the constants the kernels are compiled with (`ops/launch_constants.rs`). Compiled without
//! the `cuda` feature too, so the kernel emulation test (`tests/cuda_emulated.rs`) launches
//! exactly what `ops::cuda` does.

use super::launch_constants::*;
use candle_core::{bail, Result};

pub use super::launch_constants::{ACT_ALIGN, GEMV_MAX_ROWS};

/// Grid-stride kernels need no more blocks than this to fill an H100/H200.
const MAX_GRID_STRIDE_BLOCKS: usize = 65_535;
/// CUDA's limit on `gridDim.y`.
const MAX_GRID_Y: usize = 65_535;

/// A 2-D grid of 1-D blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (usize, usize),
    pub block: u32,
}

/// `quantize_*`: one block per token row.
pub fn quantize(n_rows: usize) -> Launch {
    Launch {
        grid: (n_rows, 1),
        block: QUANTIZE_THREADS as u32,
    }
}

/// `rms_norm_quantize_*` and `relu2_rms_norm_quantize_*`: one block per token row.
pub fn rms_norm_quantize(n_rows: usize) -> Launch {
    Launch {
        grid: (n_rows, 1),
        block: RMS_NORM_THREADS as u32,
    }
}

/// The mat-vec kernel family for `n_rows` token rows: `bitlinear_gemv1` for one row (batch-1
/// decode: a quarter of the registers, twice the blocks per SM), `bitlinear_gemv` up to
/// [`GEMV_MAX_ROWS`].
pub fn gemv_kernel(n_rows: usize) -> &'static str {
    if n_rows == 1 {
        "bitlinear_gemv1"
    } else {
        "bitlinear_gemv"
    }
}

/// `bitlinear_gemv_*` and `bitlinear_gemv1_*` over `r` packed rows: one block per packed row.
pub fn gemv(r: usize) -> Launch {
    Launch {
        grid: (r, 1),
        block: GEMV_THREADS as u32,
    }
}

/// `bitlinear_gemm_*` over `r` packed rows and `n_rows` token rows.
pub fn gemm(r: usize, n_rows: usize) -> Result<Launch> {
    let grid = (r.div_ceil(GEMM_TJ), n_rows.div_ceil(GEMM_TM));
    if grid.1 > MAX_GRID_Y {
        bail!("bitlinear (cuda): {n_rows} rows exceed the gemm grid")
    }
    Ok(Launch {
        grid,
        block: GEMM_THREADS as u32,
    })
}

/// `dequant_*` over `r·k` packed bytes, grid-stride.
pub fn dequant(r: usize, k: usize) -> Launch {
    Launch {
        grid: (
            (r * k)
                .div_ceil(DEQUANT_THREADS)
                .clamp(1, MAX_GRID_STRIDE_BLOCKS),
            1,
        ),
        block: DEQUANT_THREADS as u32,
    }
}

/// `rope_kv_append_*` for `n_kv` KV heads and `n_tok` tokens: one block per key or value head
/// of each token.
pub fn rope_kv_append(n_kv: usize, n_tok: usize) -> Result<Launch> {
    if n_tok > MAX_GRID_Y {
        bail!("rope_kv_append (cuda): {n_tok} tokens exceed the grid")
    }
    Ok(Launch {
        grid: (2 * n_kv, n_tok),
        block: ROPE_THREADS as u32,
    })
}

/// How `attention_decode_*` splits a cache of `len` positions: `(splits, positions per
/// split)`, every split non-empty. Short caches run in one split (one launch); longer ones in
/// up to `ATTN_MAX_SPLITS` (then `attention_combine_*` merges them).
pub fn attention_splits(len: usize) -> (usize, usize) {
    let splits = len.div_ceil(ATTN_MIN_SPLIT_LEN).clamp(1, ATTN_MAX_SPLITS);
    let split_len = len.div_ceil(splits).max(1);
    (len.div_ceil(split_len).max(1), split_len)
}

/// `attention_decode_*` for `n_kv` KV heads and `splits` splits of the cache.
pub fn attention_decode(n_kv: usize, splits: usize) -> Launch {
    Launch {
        grid: (n_kv, splits),
        block: ATTN_THREADS as u32,
    }
}

/// `attention_combine_*`: one block per query head.
pub fn attention_combine(n_heads: usize) -> Launch {
    Launch {
        grid: (n_heads, 1),
        block: ATTN_THREADS as u32,
    }
}

/// `argmax_*`: one block per row.
pub fn argmax(n_rows: usize) -> Launch {
    Launch {
        grid: (n_rows, 1),
        block: ARGMAX_THREADS as u32,
    }
}
