//! # candle-bitnet
//!
//! BitNet b1.58 language models (ternary weights in {-1, 0, +1}, 8-bit activations) on
//! [candle](https://github.com/huggingface/candle): checkpoints from the Hugging Face hub run with
//! their weights kept packed at 2 bits, through hand-written kernels on the CPU and, with the
//! `cuda` feature, on NVIDIA GPUs.
//!
//! - [`config`]: `config.json` parsing and validation.
//! - [`quant`]: the pure-Rust reference arithmetic and the packed layout (documented there).
//! - [`ops`]: the BitLinear custom op (CPU kernels, CUDA kernels).
//! - [`bitlinear`]: the `BitLinear` layer; [`norm`]: RMSNorm in transformers' order;
//!   [`model`]: the causal LM.
//! - [`weights`]: memory-mapped, validating safetensors loading.
//! - [`hub`]: model files from a directory or the Hugging Face hub cache; [`device`]: device
//!   and compute dtype; [`generate`]: tokenizer, chat template, sampling, streaming ([`Generator`]).
//! - [`synthetic`]: seeded random models at real shapes; [`bench`]: the end-to-end benchmark.

pub mod bench;
pub mod bitlinear;
pub mod config;
pub mod device;
pub mod generate;
pub mod hub;
pub mod model;
pub mod norm;
pub mod ops;
pub mod quant;
pub mod synthetic;
pub mod weights;

pub use bitlinear::BitLinear;
pub use config::Config;
pub use generate::{GenerationParams, Generator, Message};
pub use hub::ModelFiles;
pub use model::BitnetForCausalLM;
