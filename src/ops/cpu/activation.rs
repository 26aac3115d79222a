//! `relu²(gate) · up` in one pass (BitNet's MLP), over gate and up as they come out of the
//! joint gate/up projection: two halves of one `[.., 2·inter]` tensor, read in place.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;
use std::ops::Mul;

/// Below this many elements the op stays on the calling thread.
const PAR_ELEMS: usize = 1 << 16;

/// `relu(gate)² · up` elementwise, for `gate`, `up` of one shape `[.., n]` (each row
/// contiguous): the same arithmetic, rounding included, as candle's relu, sqr and mul in turn.
#[derive(Debug, Clone, Copy)]
pub struct Relu2Product;

impl CustomOp2 for Relu2Product {
    fn name(&self) -> &'static str {
        "relu2-product"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = gate_layout.shape();
        if shape != up_layout.shape() {
            bail!(
                "relu2-product: gate {:?} and up {:?} differ in shape",
                shape.dims(),
                up_layout.shape().dims()
            )
        }
        let (g, u) = (rows(gate_layout)?, rows(up_layout)?);
        let y = match (gate, up) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(product(a, &g, b, &u)),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(product(a, &g, b, &u)),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => CpuStorage::F16(product(a, &g, b, &u)),
            (a, b) => bail!(
                "relu2-product: unsupported dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((y, shape.clone()))
    }
}

/// Rows of a layout: (start offset of each, row length). The last dimension must be dense.
fn rows(layout: &Layout) -> Result<(Vec<usize>, usize)> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let Some((&n, lead)) = dims.split_last() else {
        return Ok((vec![layout.start_offset()], 1));
    };
    if n > 1 && strides[dims.len() - 1] != 1 {
        bail!("relu2-product: the last dimension must be contiguous, strides {strides:?}")
    }
    let mut starts = vec![layout.start_offset()];
    for (&d, &s) in lead.iter().zip(strides) {
        starts = starts
            .iter()
            .flat_map(|&o| (0..d).map(move |i| o + i * s))
            .collect();
    }
    Ok((starts, n))
}

fn product<T>(
    gate: &[T],
    (g_rows, n): &(Vec<usize>, usize),
    up: &[T],
    (u_rows, _): &(Vec<usize>, usize),
) -> Vec<T>
where
    T: Copy + Default + PartialOrd + Mul<Output = T> + Send + Sync,
{
    let n = *n;
    if n == 0 {
        return vec![];
    }
    let mut y = vec![T::default(); g_rows.len() * n];
    let row = |(y, (&g, &u)): (&mut [T], (&usize, &usize))| {
        for ((y, &g), &u) in y.iter_mut().zip(&gate[g..g + n]).zip(&up[u..u + n]) {
            let r = if g > T::default() { g } else { T::default() };
            *y = r * r * u;
        }
    };
    if y.len() >= PAR_ELEMS {
        y.par_chunks_mut(n)
            .zip(g_rows.par_iter().zip(u_rows))
            .for_each(row);
    } else {
        y.chunks_mut(n).zip(g_rows.iter().zip(u_rows)).for_each(row);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::f32_bits;
    use candle_core::{DType, Device, Tensor, D};

    #[test]
    fn matches_candle_relu_sqr_mul_on_the_halves_of_a_joint_output() -> Result<()> {
        let joint = (Tensor::randn(0f32, 1.0, (1, 5, 2 * 37), &Device::Cpu)? * 3.0)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let joint = joint.to_dtype(dtype)?;
            let (gate, up) = (
                joint.narrow(D::Minus1, 0, 37)?,
                joint.narrow(D::Minus1, 37, 37)?,
            );
            let want = (gate.relu()?.sqr()? * &up)?;
            let got = gate.apply_op2_no_bwd(&up, &Relu2Product)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(f32_bits(&got)?, f32_bits(&want)?, "{dtype:?}");
            assert!(
                got.to_dtype(DType::F32)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    > 0.0
            );
        }
        let err = joint
            .narrow(D::Minus1, 0, 3)?
            .apply_op2_no_bwd(&joint.narrow(D::Minus1, 0, 4)?, &Relu2Product);
        assert!(err.is_err_and(|e| e.to_string().contains("differ in shape")));
        Ok(())
    }
}
