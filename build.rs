//! With the `cuda` feature, compiles `kernels/*.cu` to PTX (one `OUT_DIR/<stem>.ptx` each, listed
//! as `pub const <STEM>: &str` in `OUT_DIR/ptx.rs`). Without it nothing here needs nvcc.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "cuda")]
    cuda::build_ptx();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    /// Ampere: the newest target that cudaforge leaves without the `a` suffix. Arch-specific
    /// (`a`) PTX loads on that exact GPU only; plain PTX is JIT-compiled by the driver for it and
    /// every newer GPU (H100, H200, Blackwell), and our kernels need nothing beyond `__dp4a`.
    const PTX_COMPUTE_CAP: usize = 80;

    /// `CUDA_COMPUTE_CAP` (what candle's own kernels are built for) when older than Ampere.
    fn ptx_arch() -> String {
        let requested = std::env::var("CUDA_COMPUTE_CAP").ok().and_then(|cap| {
            let cap = cap.trim().trim_start_matches("sm_");
            cap.trim_end_matches(['a', 'f']).parse::<usize>().ok()
        });
        requested
            .unwrap_or(PTX_COMPUTE_CAP)
            .min(PTX_COMPUTE_CAP)
            .to_string()
    }

    pub fn build_ptx() {
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        // cudaforge only re-runs nvcc for a .cu whose own bytes changed, unless the headers it
        // includes are watched too.
        let headers: Vec<PathBuf> = std::fs::read_dir("kernels")
            .expect("kernels/ exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
            .collect();
        println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
        let ptx = cudaforge::KernelBuilder::new()
            .source_glob("kernels/*.cu")
            .watch(headers)
            .arg("-O3")
            .arg("-std=c++17")
            .compute_cap_arch(&ptx_arch())
            .build_ptx()
            .unwrap_or_else(|e| panic!("nvcc failed on kernels/*.cu: {e}"));
        ptx.write(out_dir.join("ptx.rs"))
            .unwrap_or_else(|e| panic!("writing ptx.rs: {e}"));
    }
}
