//! A candle app embedding the model, built from the app's own `VarBuilder`, decoding greedily:
//! `cargo run --example embed [DIR]` (a checkpoint directory; default: the test fixture).
use candle_bitnet::{weights::safetensors_files, BitnetForCausalLM, Config};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-bitnet");
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or(fixture.into()));
    let (device, cfg) = (Device::Cpu, Config::from_file(&dir.join("config.json"))?);
    // SAFETY: the checkpoint files are not modified while they are mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&safetensors_files(&dir)?, DType::F32, &device)?
    };
    let mut model = BitnetForCausalLM::new(&cfg, vb)?;
    let mut ids = vec![cfg.bos_token_id.unwrap_or(1), 42, 7];
    let mut offset = 0;
    for _ in 0..16 {
        let input = Tensor::new(&ids[offset..], &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, offset)?; // (1, vocab), f32
        offset = ids.len();
        ids.push(logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?);
    }
    println!("{ids:?}");
    Ok(())
}
