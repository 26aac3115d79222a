//! The CPU layout of ternary weights: row tiles that give each SIMD lane its own output row.
//!
//! The canonical `[out/4, in]` layout ([`crate::quant`]) yields four outputs per packed row, so
//! a dot product ends in a horizontal reduction per output. Here, instead, 64 output rows form
//! a tile, stored as `steps = ⌈in/4⌉` blocks of 64 bytes, one per 4 input columns: byte `4i + b`
//! of block `s` holds, in bit field `2p`, the code of `W[64·tile + 16p + i, 4s + b]`. Read as
//! sixteen i32 lanes, lane `i` of a block meets the 4 activations `x[4s..4s + 4]` broadcast to
//! every lane, and the bit field `p` selected in place by a mask (not shifted down: the products
//! are then `4^p` times the code, undone once at the end) feeds the accumulator of rows
//! `16p..16p + 16`: `vpdpbusd` sums straight into sixteen separate outputs, and a tile's 64 dot
//! products need no reduction at all. Rows past `out` and columns past `in` hold the zero code.
//!
//! Codes stay 2 bits per weight (plus padding to 64 rows and 4 columns, none at the 2B-4T
//! shapes), and on the CPU the tiles are a layer's only copy of them.
//! [`TernaryTiles::from_packed`] is the one conversion from the canonical layout,
//! [`TernaryTiles::packed`] the one back.

use candle_core::{bail, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Output rows per tile: 16 i32 lanes × 4 bit fields.
pub const TILE_ROWS: usize = 64;
/// Bytes per block: one 512-bit vector, 4 input columns of a tile.
pub const BLOCK_BYTES: usize = 64;

/// One block, aligned so that a vector load never splits a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; BLOCK_BYTES]);

/// Ternary weights `[out, in]` as row tiles (layout in the module docs). Several projections
/// of the same input may share one ([`TernaryTiles::from_segments`]): each segment starts on
/// a tile of its own, and their outputs sit side by side, `[.., Σ out]`. One segment can be
/// viewed on its own ([`TernaryTiles::segment`]) without a copy.
pub struct TernaryTiles {
    /// Shared by a set of tiles and the views of its segments.
    blocks: Arc<Vec<Block>>,
    /// This set's tile 0 in `blocks`.
    first_tile: usize,
    in_features: usize,
    /// Output rows of each segment, in order.
    segments: Vec<usize>,
    /// Per tile: its segment, the output column of its row 0, and its rows in use.
    tile_outputs: Vec<(usize, usize, usize)>,
    /// Blocks per tile: `⌈in / 4⌉`.
    steps: usize,
}

impl std::fmt::Debug for TernaryTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (out, inp) = (&self.segments, self.in_features);
        write!(f, "TernaryTiles({out:?} × {inp}, {} tiles)", self.tiles())
    }
}

/// The zero weight's code (value + 1) in all four bit fields.
const ZERO_CODES: u8 = 0b01_01_01_01;

impl TernaryTiles {
    /// Converts canonical packed codes (`[out/4, in]`, [`crate::quant`]). Refuses the code 3,
    /// which no packer writes: the kernels rely on codes ≤ 2 to keep 16-bit sums in range.
    pub fn from_packed(packed: &[u8], in_features: usize, out_features: usize) -> Result<Self> {
        Self::from_segments(&[(packed, out_features)], in_features)
    }

    /// Converts several projections of the same input, `(packed [out/4, in], out)` each, into
    /// one set of tiles (q, k and v, say): one pass over the activations serves them all.
    pub fn from_segments(parts: &[(&[u8], usize)], in_features: usize) -> Result<Self> {
        if parts.is_empty() {
            bail!("ternary tiles: no projections")
        }
        let mut blocks = Vec::new();
        let mut tile_outputs = Vec::new();
        let mut col = 0;
        for (segment, &(packed, out)) in parts.iter().enumerate() {
            blocks.extend(convert(packed, in_features, out)?);
            for t in 0..out.div_ceil(TILE_ROWS) {
                let rows = TILE_ROWS.min(out - t * TILE_ROWS);
                tile_outputs.push((segment, col + t * TILE_ROWS, rows));
            }
            col += out;
        }
        Ok(Self {
            blocks: Arc::new(blocks),
            first_tile: 0,
            in_features,
            segments: parts.iter().map(|p| p.1).collect(),
            tile_outputs,
            steps: in_features.div_ceil(4),
        })
    }

    /// Several projections' tiles of the same input side by side, as [`Self::from_segments`]
    /// lays them out (each segment starts on a tile of its own, so the blocks just follow).
    pub fn concat(parts: &[&TernaryTiles]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("ternary tiles: no projections")
        };
        let in_features = first.in_features;
        if let Some(p) = parts.iter().find(|p| p.in_features != in_features) {
            bail!(
                "ternary tiles: inputs of {} and {in_features} features cannot share tiles",
                p.in_features
            )
        }
        let mut blocks = Vec::with_capacity(parts.iter().map(|p| p.tiles() * p.steps).sum());
        let (mut segments, mut tile_outputs) = (vec![], vec![]);
        let mut col = 0;
        for part in parts {
            let segment0 = segments.len();
            blocks.extend_from_slice(part.own_blocks());
            tile_outputs.extend(
                (part.tile_outputs.iter()).map(|&(seg, c, rows)| (segment0 + seg, col + c, rows)),
            );
            segments.extend_from_slice(&part.segments);
            col += part.out_features();
        }
        Ok(Self {
            blocks: Arc::new(blocks),
            first_tile: 0,
            in_features,
            segments,
            tile_outputs,
            steps: first.steps,
        })
    }

    /// Segment `segment` alone, sharing the blocks (no copy).
    pub fn segment(&self, segment: usize) -> Result<Self> {
        let Some(&out) = self.segments.get(segment) else {
            bail!(
                "ternary tiles: no segment {segment} of {}",
                self.segments.len()
            )
        };
        let before = &self.segments[..segment];
        let first: usize = before.iter().map(|o| o.div_ceil(TILE_ROWS)).sum();
        let col0: usize = before.iter().sum();
        let tile_outputs = self.tile_outputs[first..first + out.div_ceil(TILE_ROWS)]
            .iter()
            .map(|&(_, col, rows)| (0, col - col0, rows))
            .collect();
        Ok(Self {
            blocks: self.blocks.clone(),
            first_tile: self.first_tile + first,
            in_features: self.in_features,
            segments: vec![out],
            tile_outputs,
            steps: self.steps,
        })
    }

    /// The canonical packed codes (`[out/4, in]`, [`crate::quant`]) of every segment, stacked
    /// in order, `[Σ out/4, in]`: what [`Self::from_segments`] was given.
    pub fn packed(&self) -> Vec<u8> {
        let k = self.in_features;
        let mut packed = vec![0u8; self.out_features() / 4 * k];
        let (mut tile0, mut start) = (0, 0);
        for &out in &self.segments {
            let r = out / 4;
            // Packed row j holds rows j, r + j, 2r + j and 3r + j in its four bit fields; each
            // row's codes come out of its lane 4 columns at a time.
            (packed[start..start + r * k].par_chunks_mut(k).enumerate()).for_each(|(j, dst)| {
                for f in 0..4 {
                    let row = f * r + j;
                    let tile = tile0 + row / TILE_ROWS;
                    let bytes = self.tile_bytes(tile..tile + 1);
                    let (p, i) = (row % TILE_ROWS / 16, row % 16);
                    for (block, dst) in bytes.chunks_exact(BLOCK_BYTES).zip(dst.chunks_mut(4)) {
                        let lane = &block[4 * i..4 * i + 4];
                        let lane = u32::from_le_bytes([lane[0], lane[1], lane[2], lane[3]]);
                        let codes = ((lane >> (2 * p)) & 0x0303_0303) << (2 * f);
                        for (d, c) in dst.iter_mut().zip(codes.to_le_bytes()) {
                            *d |= c;
                        }
                    }
                }
            });
            tile0 += out.div_ceil(TILE_ROWS);
            start += r * k;
        }
        packed
    }

    /// Backs the blocks with 2 MiB pages ([`super::back_with_huge_pages`]): worth it for the
    /// tiles a model keeps, not for those an op converts for one call.
    pub fn back_with_huge_pages(&self) {
        super::back_with_huge_pages(self.own_blocks())
    }

    /// This set's blocks, `[tiles · steps]`.
    fn own_blocks(&self) -> &[Block] {
        let start = self.first_tile * self.steps;
        &self.blocks[start..start + self.tiles() * self.steps]
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output rows of all segments together.
    pub fn out_features(&self) -> usize {
        self.segments.iter().sum()
    }

    /// Output rows of each segment.
    pub fn segments(&self) -> &[usize] {
        &self.segments
    }

    /// Tile `tile`'s segment, the output column of its row 0, and how many of its rows exist.
    pub(super) fn tile_output(&self, tile: usize) -> (usize, usize, usize) {
        self.tile_outputs[tile]
    }

    pub fn tiles(&self) -> usize {
        self.tile_outputs.len()
    }

    /// Blocks per tile.
    pub(super) fn steps(&self) -> usize {
        self.steps
    }

    /// Bytes of codes one forward reads.
    pub fn bytes(&self) -> usize {
        self.tiles() * self.steps * BLOCK_BYTES
    }

    /// Tiles `tiles`, `[n, steps · 64]` bytes, 64-byte aligned.
    pub(super) fn tile_bytes(&self, tiles: std::ops::Range<usize>) -> &[u8] {
        let blocks = &self.own_blocks()[tiles.start * self.steps..tiles.end * self.steps];
        // SAFETY: `Block` is `repr(C)` over `[u8; 64]` with no padding, so a slice of blocks
        // is the same memory as `64 · len` bytes, and it lives as long as `self`.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len() * BLOCK_BYTES) }
    }
}

/// The tiles of one projection, from canonical packed codes `[out/4, in]`: the one place the
/// layout changes.
fn convert(packed: &[u8], in_features: usize, out_features: usize) -> Result<Vec<Block>> {
    crate::quant::check_packable(out_features)?;
    let r = out_features / 4;
    if in_features == 0 || packed.len() != r * in_features {
        bail!("ternary tiles: {} packed bytes for a [{out_features}, {in_features}] weight, expected {}",
            packed.len(), r * in_features)
    }
    if let Some(i) = packed.iter().position(|&b| b & (b >> 1) & 0x55 != 0) {
        bail!(
            "ternary tiles: packed byte {i} holds the invalid ternary code 3 (0x{:02x})",
            packed[i]
        )
    }
    let steps = in_features.div_ceil(4);
    let tiles = out_features.div_ceil(TILE_ROWS);
    let mut blocks = vec![Block([ZERO_CODES; BLOCK_BYTES]); tiles * steps];
    // Steps of 4 whole columns, then the columns of a partial last step (padded with the zero
    // weight's code).
    let (full_steps, tail) = (in_features / 4, in_features % 4);
    blocks
        .par_chunks_mut(steps)
        .enumerate()
        .for_each(|(tile, tile_blocks)| {
            // Row by row, each packed row read once, front to back: row 16p + i of the tile
            // is lane i, bit field p, of every block. Rows past `out` keep the zero code.
            for o in 0..TILE_ROWS.min(out_features - tile * TILE_ROWS) {
                let row = tile * TILE_ROWS + o;
                let (j, field) = (row % r, 2 * (row / r));
                let packed_row = &packed[j * in_features..(j + 1) * in_features];
                let (p, i) = (o / 16, o % 16);
                // The lane's bits of field p, cleared of the zero code they were filled with.
                let keep = !(0x0303_0303u32 << (2 * p));
                let put = |block: &mut Block, word: [u8; 4]| {
                    // The shift carries bits of byte b + 1 into bits ≥ 2 of byte b (field ≤ 6):
                    // the mask drops them.
                    let codes = (u32::from_le_bytes(word) >> field) & 0x0303_0303;
                    let lane = &mut block.0[4 * i..4 * i + 4];
                    let old = u32::from_le_bytes([lane[0], lane[1], lane[2], lane[3]]);
                    lane.copy_from_slice(&((old & keep) | (codes << (2 * p))).to_le_bytes());
                };
                for (block, word) in tile_blocks.iter_mut().zip(packed_row.chunks_exact(4)) {
                    put(block, [word[0], word[1], word[2], word[3]]);
                }
                if tail > 0 {
                    let mut word = [ZERO_CODES; 4];
                    word[..tail].copy_from_slice(&packed_row[4 * full_steps..]);
                    put(&mut tile_blocks[full_steps], word);
                }
            }
        });
    Ok(blocks)
}

/// Raw `Σ_c code(W[64·tile + o, c]) · x[c]` for the 64 rows `o` of one tile (`[steps · 64]`
/// bytes) against one zero-padded activation row (`x.len() ≥ 4 · steps`). Written lane-wise
/// like the SIMD kernels, so that the loop over the 16 lanes vectorizes.
pub(super) fn tile_dots_portable(tile: &[u8], x: &[i8], dots: &mut [i32; TILE_ROWS]) {
    *dots = [0; TILE_ROWS];
    for (block, x) in tile.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(4)) {
        let x = [x[0] as i32, x[1] as i32, x[2] as i32, x[3] as i32];
        let mut lanes = [0u32; 16];
        for (l, b) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *l = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        for (p, dots) in dots.chunks_exact_mut(16).enumerate() {
            for (d, &l) in dots.iter_mut().zip(&lanes) {
                let f = l >> (2 * p);
                *d += (f & 3) as i32 * x[0]
                    + ((f >> 8) & 3) as i32 * x[1]
                    + ((f >> 16) & 3) as i32 * x[2]
                    + ((f >> 24) & 3) as i32 * x[3];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{pack_ternary, unpack_ternary};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The code of `W[row, c]` read back from the tiles, as the module docs lay it out.
    fn code_at(t: &TernaryTiles, row: usize, c: usize) -> u8 {
        let bytes = t.tile_bytes(row / TILE_ROWS..row / TILE_ROWS + 1);
        let (p, i) = (row % TILE_ROWS / 16, row % 16);
        (bytes[c / 4 * BLOCK_BYTES + 4 * i + c % 4] >> (2 * p)) & 3
    }

    #[test]
    fn tiles_hold_every_code_where_the_docs_say() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(11);
        for &(out, inp) in &[(4, 1), (64, 4), (132, 70), (200, 9)] {
            let values: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1..=1)).collect();
            let packed = pack_ternary(&values, out, inp)?;
            let tiles = TernaryTiles::from_packed(&packed, inp, out)?;
            assert_eq!(tiles.tiles(), out.div_ceil(TILE_ROWS));
            assert_eq!(unpack_ternary(&packed, out, inp), values);
            for row in 0..tiles.tiles() * TILE_ROWS {
                for c in 0..4 * tiles.steps() {
                    let want = if row < out && c < inp {
                        (values[row * inp + c] + 1) as u8
                    } else {
                        1
                    };
                    assert_eq!(code_at(&tiles, row, c), want, "[{row}, {c}] of {out}×{inp}");
                }
            }
        }
        Ok(())
    }

    /// Packed codes of three random projections of `inp` inputs (132, 4 and 64 outputs).
    fn random_parts(seed: u64, inp: usize) -> Result<Vec<(Vec<u8>, usize)>> {
        let mut rng = StdRng::seed_from_u64(seed);
        [132, 4, 64]
            .iter()
            .map(|&out| {
                let values: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1..=1)).collect();
                Ok((pack_ternary(&values, out, inp)?, out))
            })
            .collect()
    }

    #[test]
    fn concatenated_tiles_are_the_segments_tiles() -> Result<()> {
        let inp = 70;
        let parts = random_parts(12, inp)?;
        let segments: Vec<(&[u8], usize)> = parts.iter().map(|(p, o)| (&p[..], *o)).collect();
        let want = TernaryTiles::from_segments(&segments, inp)?;
        let singles = (segments
            .iter()
            .map(|&(p, o)| TernaryTiles::from_packed(p, inp, o)))
        .collect::<Result<Vec<_>>>()?;
        let got = TernaryTiles::concat(&singles.iter().collect::<Vec<_>>())?;
        assert_eq!(got.segments(), want.segments());
        assert_eq!(got.tile_outputs, want.tile_outputs);
        assert_eq!(
            got.tile_bytes(0..got.tiles()),
            want.tile_bytes(0..want.tiles())
        );
        let other = TernaryTiles::from_packed(&parts[1].0[..4], 4, 4)?;
        let err = TernaryTiles::concat(&[&singles[0], &other])
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("cannot share tiles"));
        Ok(())
    }

    #[test]
    fn segments_view_the_joint_tiles_and_pack_back_to_the_codes() -> Result<()> {
        let inp = 70;
        let parts = random_parts(13, inp)?;
        let segments: Vec<(&[u8], usize)> = parts.iter().map(|(p, o)| (&p[..], *o)).collect();
        let joint = TernaryTiles::from_segments(&segments, inp)?;
        let stacked: Vec<u8> = parts.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        assert_eq!(joint.packed(), stacked);
        for (i, &(packed, out)) in segments.iter().enumerate() {
            let view = joint.segment(i)?;
            let alone = TernaryTiles::from_packed(packed, inp, out)?;
            assert_eq!(view.segments(), &[out]);
            assert_eq!(view.tile_outputs, alone.tile_outputs);
            assert_eq!(view.bytes(), alone.bytes());
            assert_eq!(
                view.tile_bytes(0..view.tiles()),
                alone.tile_bytes(0..alone.tiles())
            );
            assert_eq!(view.packed(), packed);
        }
        let err = joint.segment(3).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("no segment 3"));
        Ok(())
    }

    #[test]
    fn from_packed_refuses_bad_input() {
        let err = |r: Result<TernaryTiles>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(TernaryTiles::from_packed(&[0b11 << 4], 1, 4)).contains("code 3"));
        assert!(err(TernaryTiles::from_packed(&[0; 3], 2, 4)).contains("3 packed bytes"));
        assert!(err(TernaryTiles::from_packed(&[0; 3], 3, 6)).contains("multiple of 4"));
        assert!(err(TernaryTiles::from_packed(&[], 0, 4)).contains("packed bytes"));
    }
}
