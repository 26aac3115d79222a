//! # candle-bitnet
//!
//! BitNet b1.58 language models (ternary weights in {-1, 0, +1}, 8-bit activations) on
//! [candle](https://github.com/huggingface/candle): checkpoints from the Hugging Face hub run with
//! their weights kept packed at 2 bits, through hand-written kernels on the CPU and, with the
//! `cuda` feature, on NVIDIA GPUs.
//!
//! - [`config`]: `config.json` parsing and validation; [`error`]: the library's [`Error`], with
//!   its [`ErrorKind`] (bad model files, bad input, device, I/O).
//! - [`quant`]: the pure-Rust reference arithmetic and the packed layout (documented there).
//! - [`ops`]: the BitLinear custom op (CPU kernels, CUDA kernels).
//! - [`bitlinear`]: the `BitLinear` layer; [`norm`]: RMSNorm in transformers' order;
//!   [`model`]: the causal LM ([`BitnetModel`]: shared weights; [`KvCache`]: one sequence's
//!   state; [`BitnetForCausalLM`]: the candle-transformers-style wrapper).
//! - [`engine`]: many sequences at once, continuous batching ([`Engine`]).
//! - [`weights`]: memory-mapped, validating safetensors loading; [`json`]: the checkpoint's
//!   small JSON files, read with a size limit; [`tokenizer`]: `tokenizer.json` loaded and run
//!   with guards; [`template`]: chat templates rendered within limits;
//!   [`generation_config`]: the model's sampling defaults.
//! - [`profile`]: wall time per stage of the forward pass (`bitnet bench`'s profile).
//! - [`output`]: writing files a caller names without replacing devices or links;
//!   [`escape`]: strings from files made safe for one error line.
//! - [`hub`]: model files from a directory or the Hugging Face hub cache (downloads with the
//!   `download` feature, on by default through `cli`); [`device`]: device
//!   and compute dtype; [`generate`]: tokenizer, chat template, sampling, streaming ([`Generator`]).
//! - With the `bench` feature (on by default through `cli`): `synthetic`, seeded random models
//!   at real shapes, and `bench`, the end-to-end benchmark behind `bitnet bench`.

#[cfg(feature = "bench")]
pub mod bench;
pub mod bitlinear;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod escape;
pub mod generate;
pub mod generation_config;
pub mod hub;
pub mod json;
pub mod model;
pub mod norm;
pub mod ops;
pub mod output;
pub mod profile;
pub mod quant;
#[cfg(feature = "bench")]
pub mod synthetic;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use bitlinear::BitLinear;
pub use config::Config;
pub use device::{HeadDtype, KvDtype, LoadOptions};
pub use engine::{
    Engine, EngineHandle, EngineOptions, Event, FinishReason, Request, SamplingParams,
};
pub use error::{Context, Error, ErrorKind, Result};
pub use generate::{GenerationParams, Generator, Message};
pub use hub::ModelFiles;
pub use model::{BitnetForCausalLM, BitnetModel, KvCache, Logits};
