//! The CUDA kernels of `kernels/` on the CPU, through the emulation in `tests/cuda_emulated/`
//! (every CUDA thread a host thread, see `include/cuda_shim.h`), against the reference in
//! [`candle_bitnet::quant`], bit for bit. This checks the kernels' logic (indexing, tails,
//! guarded loads, reductions, rounding) on machines without a GPU; `tests/cuda.rs` checks the
//! real thing where there is one.
//!
//! The test compiles `tests/cuda_emulated/driver.cpp` with the system C++ compiler and runs it
//! once per kernel launch, with the launch geometry and arguments of `src/ops/cuda.rs`. Every
//! output buffer starts as 0xAB bytes and ends against an inaccessible page. Without a C++
//! compiler every test prints "SKIPPED: <test>: no C++ compiler" and passes. `CUDA_EMULATED_KERNELS=dir`
//! tests the kernels in `dir` instead of `kernels/` (a copy with a deliberate bug, say).
#![cfg(unix)] // the driver maps guard pages with mmap

mod common;

use candle_bitnet::ops::dequantize;
use candle_bitnet::ops::launch::{self, Launch, ACT_ALIGN, GEMV_MAX_ROWS};
use candle_bitnet::ops::reference::{self, AttentionShape, Float};
use candle_bitnet::quant::{dequantize_accumulator, ternary_accumulate};
use candle_core::{DType, Device, Tensor};
use common::kernels::{
    activations, check_bitlinear, Backend, Case, Coverage, Output, Quantized, Shape, SHAPES,
};
use common::{random_activations, random_packed, skipped};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A deadlock (a barrier or shuffle that not every thread reaches) leaves the driver's
/// threads asleep: no CPU time for this long. A launch that is only slow, on a busy machine,
/// keeps using CPU (one took over 60 s of wall time with two builds beside it).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Where `/proc` cannot tell CPU time, a launch that runs this long counts as a deadlock.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(600);

/// User plus system CPU time (clock ticks) of process `pid`, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces: the
    // state is field 3, utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

// ---- the driver ----

/// The driver binary, compiled on first use; `None` (after saying that `test` is skipped)
/// without a compiler.
fn driver(test: &str) -> Option<&'static Path> {
    static DRIVER: OnceLock<Option<PathBuf>> = OnceLock::new();
    let exe = DRIVER.get_or_init(|| {
        let cxx = ["c++", "g++"].into_iter().find(|cxx| {
            Command::new(cxx)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("tests/cuda_emulated");
        // A modified copy of kernels/ instead, to see that the test catches a deliberate bug.
        let custom = std::env::var_os("CUDA_EMULATED_KERNELS").map(PathBuf::from);
        let kernels = custom.clone().unwrap_or(root.join("kernels"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulated");
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(if custom.is_some() {
            "driver-custom"
        } else {
            "driver"
        });
        // Built under a name of its own, then renamed: another test run may be using `exe`.
        let tmp = exe.with_extension(std::process::id().to_string());
        let started = Instant::now();
        let out = Command::new(cxx)
            .args(["-std=c++20", "-O2", "-pthread", "-ffp-contract=off"])
            .arg("-Wno-unknown-pragmas") // #pragma unroll
            // The shim's cuda_*.h first, so that kernels/*.cu compile unmodified.
            .arg("-I")
            .arg(src.join("include"))
            .arg("-I")
            .arg(&kernels)
            // launch_constants.cuh, written by build.rs
            .arg("-I")
            .arg(env!("OUT_DIR"))
            .arg(src.join("driver.cpp"))
            .arg(src.join("shim.cpp"))
            .arg("-o")
            .arg(&tmp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cxx} failed on the emulated kernels:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &exe).unwrap();
        println!(
            "compiled {} with {cxx} in {:.1?}",
            kernels.display(),
            started.elapsed()
        );
        Some(exe)
    });
    if exe.is_none() {
        skipped(
            test,
            "no C++ compiler (c++ or g++) to build the kernel emulation",
        );
    }
    exe.as_deref()
}

/// One kernel argument, in the kernel's order.
enum Arg {
    /// An input buffer; `Some(off)` places it `off` bytes past a 16-byte boundary, `None` right
    /// against the guard page that follows it (16-byte aligned when its size is a multiple of 16).
    In(Vec<u8>, Option<usize>),
    /// An output buffer of this many bytes.
    Out(usize),
    /// A buffer the kernel updates in place, returned with the outputs.
    InOut(Vec<u8>),
    /// A null pointer (an optional buffer left out).
    Null,
    Int(usize),
    Float(f32),
}

/// Runs `kernel` on a grid of blocks as `src/ops/cuda.rs` launches it; returns the output
/// buffers in order.
fn run(exe: &Path, kernel: &str, Launch { grid, block }: Launch, args: Vec<Arg>) -> Vec<Vec<u8>> {
    // One launch at a time: the emulation already keeps every core busy with a block's threads.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cmd = Command::new(exe);
    cmd.arg(dir.path()).arg(kernel).args([
        grid.0.to_string(),
        grid.1.to_string(),
        block.to_string(),
    ]);
    let mut outputs = vec![];
    for (i, arg) in args.into_iter().enumerate() {
        cmd.arg(match arg {
            Arg::In(data, offset) => {
                std::fs::write(dir.path().join(format!("a{i}")), data).unwrap();
                match offset {
                    Some(off) => format!("in:a{i}+{off}"),
                    None => format!("in:a{i}"),
                }
            }
            Arg::Out(bytes) => {
                outputs.push(format!("a{i}"));
                format!("out:a{i}:{bytes}")
            }
            Arg::InOut(data) => {
                std::fs::write(dir.path().join(format!("a{i}")), data).unwrap();
                outputs.push(format!("a{i}"));
                format!("inout:a{i}")
            }
            Arg::Null => "null".into(),
            Arg::Int(v) => format!("i:{}", i32::try_from(v).unwrap()),
            Arg::Float(v) => format!("f:{:08x}", v.to_bits()),
        });
    }
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    let (mut ticks, mut progressed) = (cpu_ticks(child.id()), started);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let now_ticks = cpu_ticks(child.id());
        if now_ticks != ticks {
            (ticks, progressed) = (now_ticks, Instant::now());
        }
        let stalled = ticks.is_some() && progressed.elapsed() > STALL_TIMEOUT;
        if stalled || started.elapsed() > LAUNCH_TIMEOUT {
            child.kill().unwrap();
            panic!(
                "{kernel} {grid:?}x{block}: no end after {:?}, no CPU time used for {:?} (a deadlock?)",
                started.elapsed(),
                progressed.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if !status.success() {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        let why = match status.signal() {
            Some(11) => ": an access past the end of a buffer?",
            _ => "",
        };
        panic!("{kernel} {grid:?}x{block}: the driver failed, {status}{why}: {err}");
    }
    outputs
        .iter()
        .map(|f| std::fs::read(dir.path().join(f)).unwrap())
        .collect()
}

// ---- data ----

/// An element of a device buffer, and its bits for comparisons.
trait Elem: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
    fn bits(self) -> u32;
}

macro_rules! elem {
    ($t:ty, $bits:expr) => {
        impl Elem for $t {
            const SIZE: usize = size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes())
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().unwrap())
            }
            fn bits(self) -> u32 {
                $bits(self)
            }
        }
    };
}
elem!(u8, |v: u8| v as u32);
elem!(u32, |v: u32| v);
elem!(i8, |v: i8| v as u8 as u32);
elem!(i32, |v: i32| v as u32);
elem!(f32, f32::to_bits);
elem!(bf16, |v: bf16| v.to_bits() as u32);
elem!(f16, |v: f16| v.to_bits() as u32);

fn to_bytes<T: Elem>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    v.iter().for_each(|x| x.put(&mut out));
    out
}

fn from_bytes<T: Elem>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(T::SIZE).map(T::get).collect()
}

/// Every element of `got` (a device buffer) equal, bit for bit, to `want`.
fn assert_same<T: Elem>(got: &[u8], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len() * T::SIZE, "{what}: buffer size");
    let got = from_bytes::<T>(got);
    let bad: Vec<usize> = (0..want.len())
        .filter(|&i| got[i].bits() != want[i].bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} elements differ, first at {i}: got {:#x}, want {:#x}",
            bad.len(),
            want.len(),
            got[i].bits(),
            want[i].bits()
        );
    }
}

/// The reference quantization in the kernels' layout, rows padded to [`ACT_ALIGN`].
fn reference_quantize(x: &[f32], n: usize, k: usize) -> Quantized {
    Quantized::of(x, n, k, k.next_multiple_of(ACT_ALIGN))
}

/// Every quantize kernel: int8 (and the tests' int32) values, scales and row sums, for f32,
/// bf16 and f16 inputs.
#[test]
fn quantize_kernels_match_the_reference() {
    let Some(exe) = driver("quantize_kernels_match_the_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(21);
    // 7 rows: the 5 edge rows and 2 random ones; 65 rows: blocks well past the first few.
    let cases = SHAPES.iter().map(|&(k, _)| (7, k)).chain([(65, 130)]);
    for (n, k) in cases {
        let x = activations(&mut rng, n, k);
        let k_pad = k.next_multiple_of(ACT_ALIGN);
        for input in ["f32", "bf16", "f16"] {
            // The input's bytes, and the f32 values that the CPU op quantizes.
            let (bytes, x32): (Vec<u8>, Vec<f32>) = match input {
                "f32" => (to_bytes(&x), x.clone()),
                "bf16" => {
                    let v: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    (to_bytes(&v), v.iter().map(|v| v.to_f32()).collect())
                }
                _ => {
                    let v: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                    (to_bytes(&v), v.iter().map(|v| v.to_f32()).collect())
                }
            };
            let want = reference_quantize(&x32, n, k);
            let variants: &[(&str, usize)] = match n {
                7 => &[("i8", 1), ("i32", 4)],
                _ => &[("i8", 1)],
            };
            for &(q, q_size) in variants {
                let name = format!("quantize_{q}_{input}");
                let args = vec![
                    Arg::In(bytes.clone(), None),
                    Arg::Out(n * k_pad * q_size),
                    Arg::Out(n * 4),
                    Arg::Out(n * 4),
                    Arg::Int(k),
                    Arg::Int(k_pad),
                ];
                // As `quantize` in src/ops/cuda.rs: one block per row.
                let got = run(exe, &name, launch::quantize(n), args);
                let what = format!("{name} [{n}, {k}]");
                if q == "i8" {
                    assert_same(&got[0], &want.xq, &format!("{what} values"));
                } else {
                    let xq: Vec<i32> = want.xq.iter().map(|&v| v as i32).collect();
                    assert_same(&got[0], &xq, &format!("{what} values"));
                }
                assert_same(&got[1], &want.scale, &format!("{what} scales"));
                assert_same(&got[2], &want.sum, &format!("{what} sums"));
            }
        }
    }
}

/// The emulated kernels as a [`Backend`]: `bitlinear_gemm_*`, `bitlinear_gemv_*` (up to 8
/// rows) and `bitlinear_gemv1_*` (one row); raw i32 accumulators and scaled outputs in f32,
/// bf16 and f16. Their inputs are the reference's int8 activations, scales and sums, which
/// `quantize_kernels_match_the_reference` holds `quantize_i8_*` to (cheaper than running it for
/// every case here). Weights: right before a guard page, which is 16-byte aligned when
/// `in % 16 == 0`, and, for those shapes, 3 bytes off too (the guarded loads).
struct Emulated(&'static Path);

#[derive(Debug, Clone, Copy)]
struct EmulatedKernel {
    name: &'static str,
    weights_offset: Option<usize>,
}

impl Backend for Emulated {
    type Kernel = EmulatedKernel;

    fn runs(&self, case: &Case) -> Vec<(EmulatedKernel, Output)> {
        let Shape { rows, k, .. } = case.shape;
        let mut names = vec!["gemm"];
        if rows <= GEMV_MAX_ROWS {
            names.push("gemv");
        }
        if rows == 1 {
            names.push("gemv1");
        }
        let mut runs = vec![];
        for name in names {
            let kernel = |weights_offset| EmulatedKernel {
                name,
                weights_offset,
            };
            runs.push((kernel(None), Output::Accumulators));
            runs.extend(common::kernels::DTYPES.map(|dtype| (kernel(None), Output::Scaled(dtype))));
            // Otherwise the loads are byte-wise anyway: `in` alone rules out 16-byte loads.
            if k.is_multiple_of(16) {
                runs.push((kernel(Some(3)), Output::Accumulators));
            }
        }
        runs
    }

    fn run(
        &self,
        kernel: &EmulatedKernel,
        case: &Case,
        output: Output,
    ) -> candle_core::Result<Vec<u32>> {
        let Shape { rows: n, k, out } = case.shape;
        let (r, k_pad) = (out / 4, k.next_multiple_of(ACT_ALIGN));
        let (suffix, size, dtype) = match output {
            Output::Accumulators => ("i32", 4, DType::F32),
            Output::Scaled(dtype) => (dtype.as_str(), dtype.size_in_bytes(), dtype),
        };
        let q = reference_quantize(&case.x_in(dtype), n, k);
        let gemm = kernel.name == "gemm";
        let mut args = vec![
            Arg::In(case.packed.clone(), kernel.weights_offset),
            Arg::In(to_bytes(&q.xq), None),
            Arg::In(to_bytes(&q.scale), None),
            Arg::In(to_bytes(&q.sum), None),
            Arg::Out(n * out * size),
        ];
        if !gemm {
            args.push(Arg::Null); // no residual
        }
        args.extend([Arg::Int(n), Arg::Int(r), Arg::Int(k), Arg::Int(k_pad)]);
        if !gemm {
            // One segment: both ends at r, every w_div the same.
            args.extend([
                Arg::Int(r),
                Arg::Int(r),
                Arg::Float(case.w_div),
                Arg::Float(case.w_div),
            ]);
        }
        args.push(Arg::Float(case.w_div));
        let geometry = if gemm {
            launch::gemm(r, n)?
        } else {
            launch::gemv(r)
        };
        let name = format!("bitlinear_{}_{suffix}", kernel.name);
        let got = run(self.0, &name, geometry, args).remove(0);
        Ok(match output {
            Output::Accumulators => from_bytes::<i32>(&got)
                .into_iter()
                .map(Elem::bits)
                .collect(),
            Output::Scaled(DType::BF16) => widened(&from_bytes::<bf16>(&got)),
            Output::Scaled(DType::F16) => widened(&from_bytes::<f16>(&got)),
            Output::Scaled(_) => from_bytes::<f32>(&got)
                .into_iter()
                .map(Elem::bits)
                .collect(),
        })
    }
}

/// The bits of 16-bit floats widened to f32, as the harness compares them.
fn widened<T: Float>(v: &[T]) -> Vec<u32> {
    v.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The shared table (its emulated part) through every BitLinear kernel, bit for bit.
#[test]
fn bitlinear_kernels_match_the_reference() -> candle_core::Result<()> {
    let Some(exe) = driver("bitlinear_kernels_match_the_reference") else {
        return Ok(());
    };
    check_bitlinear(&Emulated(exe), Coverage::Emulated, 22)
}

/// `dequant_*`: packed weights to dense `W / w_div` in each dtype, against the CPU op.
#[test]
fn dequant_kernels_match_the_reference() {
    let Some(exe) = driver("dequant_kernels_match_the_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(23);
    for &(k, out) in &SHAPES {
        let (r, w) = (out / 4, random_packed(&mut rng, out, k).unwrap());
        let w_div: f32 = rng.random_range(0.5..4.0);
        let cpu = Tensor::from_vec(w.clone(), (r, k), &Device::Cpu).unwrap();
        for (dtype, size) in [(DType::F32, 4), (DType::BF16, 2), (DType::F16, 2)] {
            let name = format!("dequant_{}", dtype.as_str());
            let args = vec![
                Arg::In(w.clone(), None),
                Arg::Out(out * k * size),
                Arg::Int(r),
                Arg::Int(k),
                Arg::Float(w_div),
            ];
            let got = &run(exe, &name, launch::dequant(r, k), args)[0];
            let want = dequantize(&cpu, w_div, dtype)
                .unwrap()
                .flatten_all()
                .unwrap();
            let what = format!("{name} [{out}, {k}]");
            match dtype {
                DType::F32 => assert_same(got, &want.to_vec1::<f32>().unwrap(), &what),
                DType::BF16 => assert_same(got, &want.to_vec1::<bf16>().unwrap(), &what),
                _ => assert_same(got, &want.to_vec1::<f16>().unwrap(), &what),
            }
        }
    }
}

// ---- the decode kernels ----

/// Float dtypes of the decode kernels: the kernel suffix and the type.
trait Act: Float + Elem + std::fmt::Debug {
    const NAME: &'static str;
    /// Relative size of one ulp at 1.0 (the attention tolerance).
    const ULP: f64;
}
impl Act for f32 {
    const NAME: &'static str = "f32";
    const ULP: f64 = f32::EPSILON as f64;
}
impl Act for bf16 {
    const NAME: &'static str = "bf16";
    const ULP: f64 = 1.0 / 128.0;
}
impl Act for f16 {
    const NAME: &'static str = "f16";
    const ULP: f64 = 1.0 / 1024.0;
}

fn round_all<T: Float>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::round(v)).collect()
}

/// Norm sizes: one element, below a warp, around the block's 256 lanes, the 2B model's hidden
/// and MLP sizes (several elements per lane, odd counts per lane), and one past the rows the
/// kernel keeps in registers (`RMS_NORM_CACHED`: read three times instead).
const NORM_SIZES: [usize; 8] = [1, 17, 255, 256, 257, 2560, 6912, 8200];

/// `rms_norm_quantize_*` and `relu2_rms_norm_quantize_*` against
/// [`reference::rms_norm_quantize`] (and [`reference::relu2_mul`]), codes, scales and sums bit
/// for bit: random rows, a zero row, a row of huge values and one of tiny values.
fn check_rms_norm_quantize<T: Act>(exe: &Path, rng: &mut StdRng, relu2: bool) {
    for &k in &NORM_SIZES {
        let n = if k > 1000 { 2 } else { 4 };
        let width = if relu2 { 2 * k } else { k };
        let mut x = random_activations(rng, n, width);
        x[..width].fill(0.0);
        if n > 2 {
            x[width..2 * width].iter_mut().for_each(|v| *v *= 1e4);
            x[2 * width..3 * width].iter_mut().for_each(|v| *v *= 1e-6);
        }
        let x: Vec<T> = round_all(&x);
        let weight: Vec<T> = (0..k)
            .map(|c| T::round(rng.random_range(0.5..1.5f32) * if c % 7 == 3 { -1.0 } else { 1.0 }))
            .collect();
        let eps: f32 = [1e-5, 1e-6][k % 2];
        let k_pad = k.next_multiple_of(ACT_ALIGN);
        let mut want = Quantized {
            xq: vec![0; n * k_pad],
            scale: vec![],
            sum: vec![],
        };
        for (t, row) in x.chunks_exact(width).enumerate() {
            let values: Vec<f32> = if relu2 {
                row[..k]
                    .iter()
                    .zip(&row[k..])
                    .map(|(&g, &u)| reference::relu2_mul(g, u))
                    .collect()
            } else {
                row.iter().map(|v| v.to_f32()).collect()
            };
            let q = &mut want.xq[t * k_pad..t * k_pad + k];
            want.scale
                .push(reference::rms_norm_quantize(&values, &weight, eps, q));
            want.sum.push(q.iter().map(|&v| v as i32).sum());
        }
        let name = format!(
            "{}rms_norm_quantize_{}",
            if relu2 { "relu2_" } else { "" },
            T::NAME
        );
        let args = vec![
            Arg::In(to_bytes(&x), None),
            Arg::In(to_bytes(&weight), None),
            Arg::Out(n * k_pad),
            Arg::Out(n * 4),
            Arg::Out(n * 4),
            Arg::Int(k),
            Arg::Int(k_pad),
            Arg::Float(eps),
        ];
        let got = run(exe, &name, launch::rms_norm_quantize(n), args);
        let what = format!("{name} [{n}, {k}]");
        assert_same(&got[0], &want.xq, &format!("{what} codes"));
        assert_same(&got[1], &want.scale, &format!("{what} scales"));
        assert_same(&got[2], &want.sum, &format!("{what} sums"));
    }
}

#[test]
fn rms_norm_quantize_kernels_match_the_reference() {
    let Some(exe) = driver("rms_norm_quantize_kernels_match_the_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(24);
    for relu2 in [false, true] {
        check_rms_norm_quantize::<f32>(exe, &mut rng, relu2);
        check_rms_norm_quantize::<bf16>(exe, &mut rng, relu2);
        check_rms_norm_quantize::<f16>(exe, &mut rng, relu2);
    }
}

/// `bitlinear_gemv_*` with up to three stacked matrices (q/k/v-like, each its own w_div and
/// column block) and a residual, in every dtype, against the reference per matrix.
fn check_stacked_gemv<T: Act>(exe: &Path, rng: &mut StdRng) {
    // (in, outputs of each segment)
    // The last two: every one of a thread's GEMV_UNROLL loads (down_proj's 6912), and a
    // second round of them with a tail (8210 > 128 threads · 4 loads · 16 bytes).
    let cases: [(usize, &[usize]); 6] = [
        (130, &[48, 16, 16]),
        (256, &[20, 8]),
        (64, &[4, 4, 4]),
        (2568, &[16]),
        (6912, &[8]),
        (8210, &[4, 4]),
    ];
    for (k, outs) in cases {
        let total: usize = outs.iter().sum();
        let (r, k_pad) = (total / 4, k.next_multiple_of(ACT_ALIGN));
        let mut packed = vec![];
        for &o in outs {
            packed.push(random_packed(rng, o, k).unwrap());
        }
        let w: Vec<u8> = packed.concat();
        let w_divs: Vec<f32> = outs.iter().map(|_| rng.random_range(0.5..4.0)).collect();
        for n in [1, 3, GEMV_MAX_ROWS] {
            let x = activations(rng, n, k);
            let q = reference_quantize(&x, n, k);
            let residual: Vec<T> = round_all(&random_activations(rng, n, total));
            let mut raw = vec![];
            let mut y = vec![];
            for t in 0..n {
                for (s, &o) in outs.iter().enumerate() {
                    let acc = ternary_accumulate(&q.xq[t * k_pad..t * k_pad + k], &packed[s], o);
                    for a in acc {
                        raw.push(a);
                        y.push(dequantize_accumulator(a, q.scale[t], w_divs[s]));
                    }
                }
            }
            let with_residual: Vec<T> = y
                .iter()
                .zip(&residual)
                .map(|(&y, r)| T::round(r.to_f32() + T::round(y).to_f32()))
                .collect();
            let ends: Vec<usize> = outs
                .iter()
                .scan(0, |e, &o| {
                    *e += o / 4;
                    Some(*e)
                })
                .collect();
            let end = |i: usize| *ends.get(i).unwrap_or(&r);
            let wd = |i: usize| w_divs[i.min(w_divs.len() - 1)];
            let args = |out: &str, res: bool| {
                let size = if out == "i32" { 4 } else { T::SIZE };
                vec![
                    Arg::In(w.clone(), None),
                    Arg::In(to_bytes(&q.xq), None),
                    Arg::In(to_bytes(&q.scale), None),
                    Arg::In(to_bytes(&q.sum), None),
                    Arg::Out(n * total * size),
                    if res {
                        Arg::In(to_bytes(&residual), None)
                    } else {
                        Arg::Null
                    },
                    Arg::Int(n),
                    Arg::Int(r),
                    Arg::Int(k),
                    Arg::Int(k_pad),
                    Arg::Int(end(0)),
                    Arg::Int(end(1)),
                    Arg::Float(wd(0)),
                    Arg::Float(wd(1)),
                    Arg::Float(wd(2)),
                ]
            };
            let what = format!("stacked gemv rows {n}, {k} → {outs:?}");
            // What ops::cuda launches, and for one row the general kernel too.
            let mut kernels = vec![launch::gemv_kernel(n)];
            if n == 1 {
                kernels.push(launch::gemv_kernel(2));
            }
            for kernel in kernels {
                let name = format!("{kernel}_{}", T::NAME);
                let got = &run(exe, &name, launch::gemv(r), args(T::NAME, true))[0];
                assert_same(got, &with_residual, &format!("{name} {what} + residual"));
                let got = &run(exe, &name, launch::gemv(r), args(T::NAME, false))[0];
                assert_same(got, &round_all::<T>(&y), &format!("{name} {what}"));
                let name = format!("{kernel}_i32");
                let got = &run(exe, &name, launch::gemv(r), args("i32", false))[0];
                assert_same(got, &raw, &format!("{name} {what}"));
            }
        }
    }
}

#[test]
fn stacked_gemv_with_a_residual_matches_the_reference() {
    let Some(exe) = driver("stacked_gemv_with_a_residual_matches_the_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(25);
    check_stacked_gemv::<f32>(exe, &mut rng);
    check_stacked_gemv::<bf16>(exe, &mut rng);
    check_stacked_gemv::<f16>(exe, &mut rng);
}

/// A `[max_pos, hd]` table of `cos | sin` rows for positions `0..max_pos`, as the model builds
/// it (`inv_freq = 1 / 10000^(2i/hd)`), rounded to T.
fn rope_table<T: Float>(max_pos: usize, hd: usize) -> Vec<T> {
    let half = hd / 2;
    let mut table = Vec::with_capacity(max_pos * hd);
    for p in 0..max_pos {
        let freqs: Vec<f32> = (0..half)
            .map(|i| p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        table.extend(freqs.iter().map(|f| T::round(f.cos())));
        table.extend(freqs.iter().map(|f| T::round(f.sin())));
    }
    table
}

/// (query heads, KV heads, head_dim, capacity, first position, tokens)
const ROPE_CASES: [(usize, usize, usize, usize, usize, usize); 4] = [
    (4, 2, 8, 7, 3, 2),
    (2, 2, 6, 3, 0, 3),
    (20, 5, 128, 40, 33, 1),
    (8, 1, 256, 5, 4, 1),
];

/// `rope_kv_append_*` against candle's CPU `rope` (the model's RoPE) for the keys, the values
/// copied; every other cache element left as it was.
fn check_rope_kv<T: Act + candle_core::WithDType>(exe: &Path, rng: &mut StdRng) {
    for (n_h, n_kv, hd, cap, pos0, n_tok) in ROPE_CASES {
        let width = (n_h + 2 * n_kv) * hd;
        let qkv: Vec<T> = round_all(&random_activations(rng, n_tok, width));
        let cache: Vec<T> = round_all(&random_activations(rng, 2 * n_kv, cap * hd));
        let table = rope_table::<T>(pos0 + n_tok + 2, hd);
        let mut want = cache.clone();
        let half = hd / 2;
        for t in 0..n_tok {
            let pos = pos0 + t;
            let cs = &table[pos * hd..(pos + 1) * hd];
            let cos = Tensor::from_slice(&cs[..half], (1, half), &Device::Cpu).unwrap();
            let sin = Tensor::from_slice(&cs[half..], (1, half), &Device::Cpu).unwrap();
            for h in 0..n_kv {
                let k_at = t * width + (n_h + h) * hd;
                let v_at = k_at + n_kv * hd;
                let k =
                    Tensor::from_slice(&qkv[k_at..k_at + hd], (1, 1, 1, hd), &Device::Cpu).unwrap();
                let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                let k_dst = (h * cap + pos) * hd;
                want[k_dst..k_dst + hd].copy_from_slice(&k.to_vec1::<T>().unwrap());
                let v_dst = ((n_kv + h) * cap + pos) * hd;
                want[v_dst..v_dst + hd].copy_from_slice(&qkv[v_at..v_at + hd]);
            }
        }
        let name = format!("rope_kv_append_{}", T::NAME);
        // The position as an argument, then from device memory (a CUDA graph's replays).
        let at_pos0 = (pos0 as i32).to_ne_bytes().to_vec();
        for (pos0_arg, pos0_at) in [(pos0, Arg::Null), (0, Arg::In(at_pos0, None))] {
            let args = vec![
                Arg::In(to_bytes(&qkv), None),
                Arg::In(to_bytes(&table), None),
                Arg::InOut(to_bytes(&cache)),
                Arg::Int(n_h),
                Arg::Int(n_kv),
                Arg::Int(hd),
                Arg::Int(cap),
                Arg::Int(pos0_arg),
                pos0_at,
            ];
            let got = run(
                exe,
                &name,
                launch::rope_kv_append(n_kv, n_tok).unwrap(),
                args,
            );
            let what = format!(
                "{name} heads {n_h}/{n_kv}, hd {hd}, positions {pos0}..{} (argument {pos0_arg})",
                pos0 + n_tok
            );
            assert_same(&got[0], &want, &what);
        }
    }
}

#[test]
fn rope_kv_append_kernels_match_candle_rope() {
    let Some(exe) = driver("rope_kv_append_kernels_match_candle_rope") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(26);
    check_rope_kv::<f32>(exe, &mut rng);
    check_rope_kv::<bf16>(exe, &mut rng);
    check_rope_kv::<f16>(exe, &mut rng);
}

/// (query heads, KV heads, head_dim, capacity, positions): no GQA, head sizes below and above
/// a warp, one split, two, and the 2B model's heads over several splits.
const ATTENTION_CASES: [(usize, usize, usize, usize, usize); 6] = [
    (4, 2, 8, 9, 1),
    (8, 8, 6, 5, 5),
    (4, 1, 64, 80, 70),
    (2, 1, 256, 40, 33),
    (20, 5, 128, 300, 257),
    (16, 2, 32, 2200, 2100),
];

/// `attention_decode_*` (+ `attention_combine_*` when split) against the f64 reference,
/// within 1e-5·max|V| + one ulp of T at the reference value.
fn check_attention<T: Act>(exe: &Path, rng: &mut StdRng) {
    for (n_h, n_kv, hd, cap, len) in ATTENTION_CASES {
        let shape = AttentionShape {
            n_heads: n_h,
            n_kv_heads: n_kv,
            head_dim: hd,
            capacity: cap,
            len,
        };
        // Queries and keys large enough that the softmax is far from uniform.
        let qkv: Vec<T> = round_all(
            &random_activations(rng, 1, (n_h + 2 * n_kv) * hd)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>(),
        );
        let cache: Vec<T> = round_all(
            &random_activations(rng, 2 * n_kv, cap * hd)
                .iter()
                .map(|v| v * 0.3)
                .collect::<Vec<_>>(),
        );
        let table = rope_table::<T>(cap, hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let want = reference::decode_attention(&qkv, &cache, &table, shape, scale);
        let name = format!("attention_decode_{}", T::NAME);
        let inputs = || {
            vec![
                Arg::In(to_bytes(&qkv), None),
                Arg::In(to_bytes(&cache), None),
                Arg::In(to_bytes(&table), None),
            ]
        };
        // len as an argument (splits by len), then from device memory with the splits of the
        // whole capacity (a CUDA graph's replays: the later splits are empty).
        let at_len = (len as i32).to_ne_bytes().to_vec();
        for (split_over, len_arg, len_at) in
            [(len, len, Arg::Null), (cap, 0, Arg::In(at_len, None))]
        {
            let (splits, split_len) = launch::attention_splits(split_over);
            let tail = [n_h, n_kv, hd, cap, len_arg, split_len].map(Arg::Int);
            let part_len = n_h * splits * (hd + 2) * 4;
            let y = if splits == 1 {
                let mut args = inputs();
                args.extend([Arg::Out(n_h * hd * T::SIZE), Arg::Null]);
                args.extend(tail);
                args.extend([Arg::Float(scale), len_at]);
                run(exe, &name, launch::attention_decode(n_kv, splits), args).remove(0)
            } else {
                let mut args = inputs();
                args.extend([Arg::Null, Arg::Out(part_len)]);
                args.extend(tail);
                args.extend([Arg::Float(scale), len_at]);
                let part = run(exe, &name, launch::attention_decode(n_kv, splits), args).remove(0);
                let args = vec![
                    Arg::In(part, None),
                    Arg::Out(n_h * hd * T::SIZE),
                    Arg::Int(hd),
                    Arg::Int(splits),
                ];
                let combine = format!("attention_combine_{}", T::NAME);
                run(exe, &combine, launch::attention_combine(n_h), args).remove(0)
            };
            let got: Vec<T> = from_bytes(&y);
            let v_max = cache[n_kv * cap * hd..]
                .iter()
                .map(|v| v.to_f32().abs())
                .fold(0f32, f32::max) as f64;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * v_max + T::ULP * w.abs();
                let err = (g.to_f32() as f64 - w).abs();
                assert!(
                    err <= tol,
                    "{name} heads {n_h}/{n_kv}, hd {hd}, len {len} ({splits} splits): element {i} is {g:?}, reference {w}, error {err:e} > {tol:e}"
                );
            }
        }
    }
}

#[test]
fn attention_kernels_are_within_tolerance_of_the_reference() {
    let Some(exe) = driver("attention_kernels_are_within_tolerance_of_the_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(27);
    check_attention::<f32>(exe, &mut rng);
    check_attention::<bf16>(exe, &mut rng);
}

/// `argmax_*`: the first of tied maxima (in one thread's stride, across warps, across the
/// grid-stride loop), NaN ignored, -inf rows, all-NaN rows.
fn check_argmax<T: Act>(exe: &Path, rng: &mut StdRng) {
    for n in [1, 5, 1000, 1025, 4099] {
        let rows = 6;
        let mut x = random_activations(rng, rows, n);
        let mut put = |t: usize, c: usize, v: f32| {
            if c < n {
                x[t * n + c] = v;
            }
        };
        // Ties: in different warps; in one thread's stride (c and c + 1024); NaN before the max.
        for (t, idx) in [(0, [n / 2, n - 1]), (1, [3, 1027]), (2, [1, 40])] {
            for c in idx {
                put(t, c, 1e3);
            }
        }
        put(2, 0, f32::NAN);
        for c in 0..n {
            put(3, c, f32::NEG_INFINITY);
            put(4, c, f32::NAN);
        }
        put(4, n / 3, 7.0);
        for c in 0..n {
            put(5, c, f32::NAN);
        }
        let x: Vec<T> = round_all(&x);
        let want: Vec<u32> = x
            .chunks_exact(n)
            .map(|row| reference::argmax_first(&row.iter().map(|v| v.to_f32()).collect::<Vec<_>>()))
            .collect();
        let name = format!("argmax_{}", T::NAME);
        let args = vec![Arg::In(to_bytes(&x), None), Arg::Out(rows * 4), Arg::Int(n)];
        let got = run(exe, &name, launch::argmax(rows), args);
        assert_same(&got[0], &want, &format!("{name} rows of {n}"));
    }
}

#[test]
fn argmax_kernels_return_the_first_maximum() {
    let Some(exe) = driver("argmax_kernels_return_the_first_maximum") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(28);
    check_argmax::<f32>(exe, &mut rng);
    check_argmax::<bf16>(exe, &mut rng);
    check_argmax::<f16>(exe, &mut rng);
}
