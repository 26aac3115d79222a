//! The README's library example: `cargo run --release --example generate [MODEL_ID|DIR]`.
use candle_bitnet::{device, Generator};
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let model = std::env::args().nth(1);
    let model = model.as_deref().unwrap_or("microsoft/bitnet-b1.58-2B-4T");
    let mut generator = Generator::from_pretrained(model, "main", &device::device(false, None)?)?;
    let mut params = generator.default_params(); // from generation_config.json
    params.max_tokens = 32;
    let out = generator.generate_stream("The capital of France is", &params, |piece| {
        print!("{piece}");
        Ok(std::io::stdout().flush()?)
    })?;
    println!("\n{:.1} tokens/s", out.decode_tokens_per_s());
    Ok(())
}
