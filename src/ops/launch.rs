//! Launch geometry of the CUDA kernels in `kernels/`: their block sizes and tiles (the constants
//! of the same names in the `.cu` files) and the grid each op launches. Compiled without the
//! `cuda` feature too, so the kernel emulation test (`tests/cuda_emulated.rs`) launches exactly
//! what [`super::cuda`] does.

use candle_core::{bail, Result};

/// Int8 activation rows are zero-padded to a multiple of this many bytes.
pub const ACT_ALIGN: usize = 16;
/// Rows up to which the mat-vec kernel runs (one output per lane of a warp).
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per mat-vec block, one packed row each.
const GEMV_WARPS: usize = 4;
/// Token rows and packed rows of one mat-mat block tile.
const GEMM_TM: usize = 64;
const GEMM_TJ: usize = 32;
const GEMM_THREADS: u32 = 256;
const QUANTIZE_THREADS: u32 = 256;
const DEQUANT_THREADS: u32 = 256;
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
        block: QUANTIZE_THREADS,
    }
}

/// `bitlinear_gemv_*` over `r` packed rows: one warp per packed row.
pub fn gemv(r: usize) -> Launch {
    Launch {
        grid: (r.div_ceil(GEMV_WARPS), 1),
        block: (GEMV_WARPS * 32) as u32,
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
        block: GEMM_THREADS,
    })
}

/// `dequant_*` over `r·k` packed bytes, grid-stride.
pub fn dequant(r: usize, k: usize) -> Launch {
    Launch {
        grid: (
            (r * k)
                .div_ceil(DEQUANT_THREADS as usize)
                .clamp(1, MAX_GRID_STRIDE_BLOCKS),
            1,
        ),
        block: DEQUANT_THREADS,
    }
}
