//! Memory-mapped safetensors checkpoints (single file or sharded), with the checks that turn a
//! wrong file into an error naming the tensor.
//!
//! [`CheckedSafetensors`] is a `VarBuilder` backend: it refuses a tensor whose stored dtype class
//! does not match the request (packed codes must be stored as U8, everything else as floats)
//! or whose shape differs, before any data is converted.

use crate::error::{Error, Result};
use crate::escape::escape_controls;
use crate::json;
use crate::model::BitnetModel;
use crate::LoadOptions;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_files(&index);
    }
    Err(Error::model(format!(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Shard paths named in a `model.safetensors.index.json` (its `weight_map` values), in order.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let names = shard_names(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Distinct file names of an index's `weight_map`, sorted. Names must stay in the index's
/// directory: plain file names, no separators, no `..`.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index_name = index.display();
    let parsed: Index = json::read(index, json::SMALL_FILE_LIMIT)?;
    let mut names: Vec<String> = parsed.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    if let Some(bad) = names.iter().find(|n| {
        n.is_empty() || n.contains(['/', '\\']) || *n == "." || *n == ".." || n.contains('\0')
    }) {
        return Err(Error::model(format!(
            "{index_name}: invalid shard name {}",
            escape_controls(&format!("{bad:?}"))
        )));
    }
    if names.is_empty() {
        return Err(Error::model(format!(
            "{index_name}: the weight_map is empty"
        )));
    }
    Ok(names)
}

/// A `VarBuilder` backend over memory-mapped safetensors that validates dtype class and shape.
pub struct CheckedSafetensors {
    inner: MmapedSafetensors,
}

impl CheckedSafetensors {
    /// Memory-maps `paths` and parses their headers; a missing, truncated or corrupt file is an
    /// error naming it.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::model("no safetensors files given"));
        }
        for p in paths {
            if !p.is_file() {
                return Err(Error::model(format!(
                    "weights file {} does not exist",
                    p.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // nobody truncating them while the model is loading.
        let inner = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| {
            // The safetensors crate quotes tensor names from the header as they are.
            Error::model(escape_controls(&format!(
                "cannot read safetensors weights: {}",
                crate::error::candle_message(&e)
            )))
        })?;
        Ok(Self { inner })
    }

    fn view(&self, name: &str) -> candle_core::Result<safetensors::tensor::TensorView<'_>> {
        self.inner.get(name).map_err(|_| {
            candle_core::Error::Msg(format!("tensor {name} is missing from the checkpoint"))
        })
    }

    fn check_dtype(name: &str, stored: Dtype, requested: DType) -> candle_core::Result<()> {
        let stored_is_float = matches!(stored, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
        match (requested, stored) {
            (DType::U8, Dtype::U8) => Ok(()),
            (DType::U8, _) => {
                bail!("tensor {name}: expected dtype U8 (packed ternary codes), found {stored:?}")
            }
            (r, _) if r.is_float() && stored_is_float => Ok(()),
            (r, _) => {
                bail!("tensor {name}: expected a float dtype (to load as {r:?}), found {stored:?}")
            }
        }
    }

    /// The dtype `name` is stored in, if present and of a dtype candle knows.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let view = self.inner.get(name).ok()?;
        match view.dtype() {
            Dtype::U8 => Some(DType::U8),
            Dtype::F16 => Some(DType::F16),
            Dtype::BF16 => Some(DType::BF16),
            Dtype::F32 => Some(DType::F32),
            Dtype::F64 => Some(DType::F64),
            _ => None,
        }
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for CheckedSafetensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = self.view(name)?;
        Self::check_dtype(name, view.dtype(), dtype)?;
        if view.shape() != shape.dims() {
            bail!(
                "tensor {name}: expected shape {:?}, found {:?}",
                shape.dims(),
                view.shape()
            )
        }
        let tensor = self.inner.load(name, dev)?;
        release_mapped(view.data());
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let view = self.view(name)?;
        Self::check_dtype(name, view.dtype(), dtype)?;
        let tensor = self.inner.load(name, dev)?;
        release_mapped(view.data());
        tensor.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}

/// Drops the pages of `bytes`, part of the read-only file mapping, from the resident set. A
/// tensor is copied out of the mapping once, and the pages it was read from would otherwise
/// stay resident until the whole model is loaded: at 2B-4T, the file's 1.2 GB on top of the
/// weights built from it. Best effort; a later read of the range faults the file back in.
fn release_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => return,
        };
        if let Some((start, end)) = crate::ops::cpu::whole_pages(bytes, page) {
            // SAFETY: the range lies inside a read-only shared file mapping that nothing
            // writes: MADV_DONTNEED unmaps its pages, and a later read maps the file's same
            // bytes again, so no reference into it sees a change.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Opens the checkpoint files as a validating, memory-mapped `VarBuilder`.
pub fn var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    Ok(CheckedSafetensors::open(paths)?.into_var_builder(dtype, device))
}

/// Builds the model from checkpoint files as `opts` says; the head dtype is chosen here, from
/// what the files store ([`crate::LoadOptions::head_dtype`]). A head the device cannot run
/// ([`crate::HeadDtype::check_device`]) fails before any file is opened.
pub fn load_model(
    cfg: &crate::Config,
    paths: &[PathBuf],
    opts: &LoadOptions,
) -> Result<BitnetModel> {
    opts.head.check_device(&opts.device.location())?;
    opts.kv.check_device(&opts.device.location())?;
    let weights = CheckedSafetensors::open(paths)?;
    let mut vocab_matrices = vec!["model.embed_tokens.weight"];
    if !cfg.tie_word_embeddings {
        vocab_matrices.push("lm_head.weight");
    }
    let dtype = opts.compute_dtype();
    let all_bf16 = vocab_matrices
        .iter()
        .all(|n| weights.stored_dtype(n) == Some(DType::BF16));
    let stored = if all_bf16 { DType::BF16 } else { dtype };
    let vb = weights.into_var_builder(dtype, &opts.device);
    let model_fault = |e: candle_core::Error| Error::model(crate::error::candle_message(&e));
    let model =
        BitnetModel::new_with_head_dtype(cfg, vb, opts.head_dtype(stored)).map_err(model_fault)?;
    let model = match opts.head {
        // The device was checked above: what fails here is the weights (a non-finite value).
        crate::HeadDtype::Int8 => model.with_int8_head().map_err(model_fault)?,
        crate::HeadDtype::Auto | crate::HeadDtype::Compute => model,
    };
    let model = model.with_kv_dtype(opts.kv).map_err(model_fault)?;
    crate::ops::cpu::release_free_memory();
    crate::ops::cpu::wait_for_huge_pages();
    Ok(model)
}

/// Loads `config.json` and the weights of a checkpoint directory in the hub layout as a
/// candle-style model computing in `dtype` on `device` (the head as [`LoadOptions`] picks it).
pub fn load_model_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(crate::Config, crate::BitnetForCausalLM)> {
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "model directory {} does not exist",
            dir.display()
        )));
    }
    let cfg = crate::Config::from_file(&dir.join("config.json"))?;
    let opts = LoadOptions {
        dtype: Some(dtype),
        ..LoadOptions::new(device)
    };
    let model = load_model(&cfg, &safetensors_files(dir)?, &opts)?;
    Ok((cfg, crate::BitnetForCausalLM::from_model(model.into())))
}
