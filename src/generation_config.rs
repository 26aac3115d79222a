//! `generation_config.json`: the model's default sampling settings and EOS ids. Every value is
//! checked where it is read, so an error names the file and the key (not the command-line
//! option it would have become).

use crate::config::EosTokenId;
use crate::error::{Error, Result};
use crate::generate::GenerationParams;
use crate::json;
use serde::Deserialize;
use std::path::Path;

/// The `generation_config.json` keys we use.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub eos_token_id: Option<EosTokenId>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads (at most [`json::SMALL_FILE_LIMIT`] bytes), parses and checks the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = json::read(path, json::SMALL_FILE_LIMIT)?;
        cfg.validate()
            .map_err(|msg| Error::model(format!("{}: {msg}", path.display())))?;
        Ok(cfg)
    }

    /// Ranges as in `transformers`' `GenerationConfig.validate`; the repeat penalty must also
    /// be a normal f32 (the sampler's type), so 1e39 or 1e-45 are refused here.
    fn validate(&self) -> std::result::Result<(), String> {
        let in_range = |key: &str, v: Option<f64>, ok: fn(f64) -> bool, want: &str| match v {
            Some(x) if !ok(x) => Err(format!(
                "{key} {} is out of range: it must be {want}",
                show(x)
            )),
            _ => Ok(()),
        };
        in_range(
            "temperature",
            self.temperature,
            |t| t.is_finite() && t >= 0.0,
            "≥ 0",
        )?;
        in_range("top_p", self.top_p, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?;
        in_range(
            "min_p",
            self.min_p,
            |p| (0.0..=1.0).contains(&p),
            "in [0, 1]",
        )?;
        in_range(
            "repetition_penalty",
            self.repetition_penalty,
            |r| (f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&r),
            "a positive normal f32",
        )
    }

    /// Like `transformers`: sampling settings apply only when `do_sample` is true.
    pub fn params(&self) -> GenerationParams {
        let mut p = GenerationParams::default();
        if self.do_sample == Some(true) {
            p.temperature = self.temperature.unwrap_or(1.0);
            // transformers' GenerationConfig defaults top_k to 50; 0 turns it off.
            p.top_k = Some(self.top_k.unwrap_or(50)).filter(|k| *k > 0);
            p.top_p = self.top_p.filter(|p| *p < 1.0);
            p.min_p = self.min_p;
        }
        p.repeat_penalty = self.repetition_penalty.map_or(1.0, |r| r as f32);
        p.max_tokens = self.max_new_tokens.unwrap_or(p.max_tokens);
        p
    }

    pub fn eos_token_ids(&self) -> Option<Vec<u32>> {
        self.eos_token_id.as_ref().map(EosTokenId::ids)
    }
}

/// `x` as JSON would write it: 1e39, not forty digits.
fn show(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation_config.json");
        std::fs::write(&path, json).unwrap();
        GenerationConfig::from_file(&path).unwrap_err().to_string()
    }

    #[test]
    fn out_of_range_values_name_the_file_and_key() {
        for (json, key) in [
            (r#"{"repetition_penalty": 1e39}"#, "repetition_penalty 1e39"),
            (r#"{"repetition_penalty": 1e-45}"#, "repetition_penalty 1"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty 0"),
            (r#"{"temperature": -1}"#, "temperature -1"),
            (r#"{"top_p": 2.5}"#, "top_p 2.5"),
            (r#"{"min_p": -0.5}"#, "min_p -0.5"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"eos_token_id": "x"}"#, "eos_token_id"),
        ] {
            let e = err(json);
            assert!(
                e.contains("generation_config.json") && e.contains(key),
                "{json}: {e}"
            );
        }
    }
}
