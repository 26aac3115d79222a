//! `cargo bench --bench decode_step [-- --device N]`: the batch-1 decode step of a 2B-4T-shaped
//! model built from the fused ops alone (30 layers × the 10 ops of docs/cuda-decode.md, then the
//! bf16 head through candle's matmul), every layer with its own random weights so that nothing
//! stays in cache. Prints the host time to issue a step, its wall time (issue + wait), and, on
//! CUDA, the same step captured once as a CUDA graph and replayed: the device time alone. The
//! eager/graph ratio is what launch overhead costs a decoded token; the graph line's bandwidth
//! (weight bytes read per step ÷ its time) against the device's copy bandwidth, measured in the
//! same run, is how close the kernels come to the memory limit. Per-op lines repeat one op of
//! one layer (its weights then stay in L2: an upper bound on the kernel, not a DRAM figure).

use candle_bitnet::ops::{
    bitlinear_quantized, decode_attention, relu2_rms_norm_quantize, rms_norm_quantize,
    rope_kv_append, QuantizedActivations, Segment,
};
use candle_bitnet::synthetic::ternary_codes;
use candle_core::{DType, Device, Result, Tensor};
use std::time::Instant;

const LAYERS: usize = 30;
const HIDDEN: usize = 2560;
const HEADS: usize = 20;
const KV_HEADS: usize = 5;
const HEAD_DIM: usize = 128;
const MLP: usize = 6912;
const VOCAB: usize = 128256;
/// Cached positions before the decoded token, and the cache's capacity.
const POS: usize = 128;
const CAPACITY: usize = 256;
const EPS: f32 = 1e-5;
const STEPS: usize = 20;

struct Layer {
    norms: [Tensor; 4], // input, attention sub-norm, post-attention, ffn sub-norm
    qkv: Tensor,
    o: Tensor,
    gate_up: Tensor,
    down: Tensor,
    cache: Tensor,
}

/// Packed ternary codes `[out/4, in]`, generated on the host.
fn packed(out: usize, k: usize, seed: u64, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(ternary_codes(out / 4 * k, seed), (out / 4, k), dev)
}

fn floats(dims: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, dims, dev)?.to_dtype(DType::BF16)
}

fn layer(i: usize, dev: &Device) -> Result<Layer> {
    let seed = 1 + 8 * i as u64;
    let norm = |k: usize| (Tensor::rand(0.5f32, 1.5, k, dev)?).to_dtype(DType::BF16);
    Ok(Layer {
        norms: [norm(HIDDEN)?, norm(HIDDEN)?, norm(HIDDEN)?, norm(MLP)?],
        qkv: packed(HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN, seed, dev)?,
        o: packed(HIDDEN, HIDDEN, seed + 1, dev)?,
        gate_up: packed(2 * MLP, HIDDEN, seed + 2, dev)?,
        down: packed(HIDDEN, MLP, seed + 3, dev)?,
        cache: floats(&[2, KV_HEADS, CAPACITY, HEAD_DIM], dev)?,
    })
}

fn seg(out_features: usize) -> Segment {
    Segment {
        out_features,
        w_div: 0.8,
    }
}

/// Each op as the model's fused decode step calls it on CUDA (`DecoderLayer::forward_fused`;
/// on the CPU a model's layers hold tiles and run `bitlinear_quantized_tiles` instead).
impl Layer {
    fn qkv(&self, acts: &QuantizedActivations) -> Result<Tensor> {
        let kv = KV_HEADS * HEAD_DIM;
        let segments = [seg(HIDDEN), seg(kv), seg(kv)];
        bitlinear_quantized(acts, &self.qkv, &segments, None, DType::BF16)
    }

    fn attend(&self, qkv: &Tensor, rope: &Tensor) -> Result<Tensor> {
        rope_kv_append(&self.cache, qkv, rope, HEADS, POS)?;
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        decode_attention(qkv, &self.cache, rope, HEADS, POS + 1, scale)
    }

    fn o(&self, acts: &QuantizedActivations, residual: &Tensor) -> Result<Tensor> {
        bitlinear_quantized(acts, &self.o, &[seg(HIDDEN)], Some(residual), DType::BF16)
    }

    fn gate_up(&self, acts: &QuantizedActivations) -> Result<Tensor> {
        bitlinear_quantized(
            acts,
            &self.gate_up,
            &[seg(MLP), seg(MLP)],
            None,
            DType::BF16,
        )
    }

    fn down(&self, acts: &QuantizedActivations, residual: &Tensor) -> Result<Tensor> {
        bitlinear_quantized(
            acts,
            &self.down,
            &[seg(HIDDEN)],
            Some(residual),
            DType::BF16,
        )
    }
}

struct Step {
    layers: Vec<Layer>,
    head: Tensor,
    final_norm: Tensor,
    rope: Tensor,
    x: Tensor,
}

impl Step {
    fn layer(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let qkv = l.qkv(&rms_norm_quantize(x, &l.norms[0], EPS)?)?;
        let y = l.attend(&qkv, &self.rope)?;
        let x = l.o(&rms_norm_quantize(&y, &l.norms[1], EPS)?, x)?;
        let gate_up = l.gate_up(&rms_norm_quantize(&x, &l.norms[2], EPS)?)?;
        l.down(&relu2_rms_norm_quantize(&gate_up, &l.norms[3], EPS)?, &x)
    }

    /// One decoded token's layers and head; the logits are dropped (no read-back).
    fn run(&self) -> Result<()> {
        let mut x = self.x.clone();
        for l in &self.layers {
            x = self.layer(l, &x)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.final_norm, EPS)?;
        let logits = x.matmul(&self.head.t()?)?.to_dtype(DType::F32)?;
        drop(logits);
        Ok(())
    }

    fn weight_bytes(&self) -> usize {
        let packed: usize = (self.layers.iter())
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .map(|t| t.elem_count())
            .sum();
        packed + self.head.elem_count() * 2
    }
}

/// Seconds per call of `f`: (issue time on the host, wall time with the wait for the device).
fn eager(dev: &Device, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..n {
        f()?;
    }
    let issued = start.elapsed().as_secs_f64();
    dev.synchronize()?;
    Ok((issued / n as f64, start.elapsed().as_secs_f64() / n as f64))
}

/// Seconds per call of `f` captured `n` times into one CUDA graph and replayed.
#[cfg(feature = "cuda")]
fn graph(dev: &Device, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let Device::Cuda(cuda) = dev else {
        candle_core::bail!("graphs need a CUDA device")
    };
    f()?; // kernels loaded, the pool warm: nothing but launches and pool allocations below
    let graph = candle_bitnet::ops::cuda::capture_graph(cuda, || (0..n).try_for_each(|_| f()))?;
    graph.launch().map_err(candle_core::Error::wrap)?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        graph.launch().map_err(candle_core::Error::wrap)?;
        dev.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best / n as f64)
}

#[cfg(not(feature = "cuda"))]
fn graph(_: &Device, _: usize, _: impl FnMut() -> Result<()>) -> Result<f64> {
    candle_core::bail!("graphs need a build with --features cuda")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let ordinal = (args.iter().position(|a| a == "--device"))
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>())
        .transpose()
        .map_err(candle_core::Error::wrap)?;
    let dev = candle_bitnet::device::device(
        ordinal.is_none() && args.iter().any(|a| a == "--cpu"),
        ordinal,
    )?;
    let step = Step {
        layers: (0..LAYERS).map(|i| layer(i, &dev)).collect::<Result<_>>()?,
        head: floats(&[VOCAB, HIDDEN], &dev)?,
        final_norm: (Tensor::rand(0.5f32, 1.5, HIDDEN, &dev)?).to_dtype(DType::BF16)?,
        rope: floats(&[CAPACITY, HEAD_DIM], &dev)?,
        x: floats(&[1, HIDDEN], &dev)?,
    };
    let bandwidth = if dev.is_cuda() {
        Some(candle_bitnet::bench::copy_bandwidth(&dev, 1 << 30)?)
    } else {
        None
    };
    let bytes = step.weight_bytes() as f64;
    println!(
        "device {}, {LAYERS} layers + head: {:.3} GB of weights read per step{}",
        candle_bitnet::device::describe(&dev),
        bytes / 1e9,
        bandwidth.map_or(String::new(), |b| format!(
            ", copy bandwidth {:.0} GB/s (read + write)",
            b / 1e9
        ))
    );
    let line = |what: &str, secs: f64| {
        let gbs = bytes / secs / 1e9;
        let share = bandwidth.map_or(String::new(), |b| {
            format!(" = {:.1}% of copy", 100.0 * gbs * 1e9 / b)
        });
        println!(
            "| {what} | {:.3} ms | {:.1} tok/s | {gbs:.1} GB/s{share} |",
            secs * 1e3,
            1.0 / secs
        );
    };
    println!("| decode step (batch 1) | time | tokens/s | weight bytes/s |\n|---|---:|---:|---:|");
    let (issued, wall) = eager(&dev, STEPS, || step.run())?;
    line("issued by the host", issued);
    line("eager (issue + wait)", wall);
    match graph(&dev, 1, || step.run()) {
        Ok(secs) => line("one CUDA graph, replayed", secs),
        Err(e) => println!(
            "| CUDA graph | – | – | {} |",
            e.to_string().lines().next().unwrap_or("")
        ),
    }

    // One op of layer 0, repeated (weights hot in L2 on a GPU).
    let l = &step.layers[0];
    let acts = rms_norm_quantize(&step.x, &l.norms[0], EPS)?;
    let gu = l.gate_up(&acts)?;
    let acts_mlp = relu2_rms_norm_quantize(&gu, &l.norms[3], EPS)?;
    let qkv = l.qkv(&acts)?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    type Op<'a> = Box<dyn Fn() -> Result<()> + 'a>;
    let ops: Vec<(&str, usize, Op)> = vec![
        (
            "rms_norm_quantize",
            0,
            Box::new(|| rms_norm_quantize(&step.x, &l.norms[0], EPS).map(drop)),
        ),
        (
            "bitlinear qkv",
            l.qkv.elem_count(),
            Box::new(|| l.qkv(&acts).map(drop)),
        ),
        (
            "bitlinear o + residual",
            l.o.elem_count(),
            Box::new(|| l.o(&acts, &step.x).map(drop)),
        ),
        (
            "bitlinear gate/up",
            l.gate_up.elem_count(),
            Box::new(|| l.gate_up(&acts).map(drop)),
        ),
        (
            "relu2_rms_norm_quantize",
            0,
            Box::new(|| relu2_rms_norm_quantize(&gu, &l.norms[3], EPS).map(drop)),
        ),
        (
            "bitlinear down + residual",
            l.down.elem_count(),
            Box::new(|| l.down(&acts_mlp, &step.x).map(drop)),
        ),
        (
            "rope_kv_append",
            0,
            Box::new(|| rope_kv_append(&l.cache, &qkv, &step.rope, HEADS, POS)),
        ),
        (
            "decode_attention",
            0,
            Box::new(|| {
                decode_attention(&qkv, &l.cache, &step.rope, HEADS, POS + 1, scale).map(drop)
            }),
        ),
        (
            "candle affine (1 kernel)",
            0,
            Box::new(|| step.x.affine(2.0, 1.0).map(drop)),
        ),
    ];
    println!("\n| op (layer 0, repeated) | issued (µs) | eager (µs) | graph (µs) | weight GB/s in graph |\n|---|---:|---:|---:|---:|");
    for (name, weight_bytes, op) in &ops {
        let (issued, wall) = eager(&dev, 200, op)?;
        let g = graph(&dev, 200, op).ok();
        println!(
            "| {name} | {:.1} | {:.1} | {} | {} |",
            issued * 1e6,
            wall * 1e6,
            g.map_or("–".into(), |g| format!("{:.2}", g * 1e6)),
            match (g, weight_bytes) {
                (Some(g), b) if *b > 0 => format!("{:.0}", *b as f64 / g / 1e9),
                _ => "–".into(),
            }
        );
    }
    Ok(())
}
