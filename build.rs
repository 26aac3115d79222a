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

    /// H100/H200; a build machine without a GPU has no nvidia-smi to ask.
    const DEFAULT_COMPUTE_CAP: usize = 90;

    pub fn build_ptx() {
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        // cudaforge only re-runs nvcc for a .cu whose own bytes changed, unless the headers it
        // includes are watched too.
        let headers: Vec<PathBuf> = std::fs::read_dir("kernels")
            .expect("kernels/ exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
            .collect();
        let mut builder = cudaforge::KernelBuilder::new()
            .source_glob("kernels/*.cu")
            .watch(headers)
            .arg("-O3")
            .arg("-std=c++17");
        if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
            builder = builder.compute_cap(DEFAULT_COMPUTE_CAP);
        }
        let ptx = builder
            .build_ptx()
            .unwrap_or_else(|e| panic!("nvcc failed on kernels/*.cu: {e}"));
        ptx.write(out_dir.join("ptx.rs"))
            .unwrap_or_else(|e| panic!("writing ptx.rs: {e}"));
    }
}
