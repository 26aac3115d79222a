//! `config.json` of BitNet b1.58 checkpoints.
//!
//! Two families are accepted (spec: `shared/bitnet-format.md` §1, §4):
//! - `model_type: "bitnet"` (microsoft/bitnet-b1.58-2B-4T and its `-bf16` twin): relu² MLP,
//!   `attn_sub_norm` / `ffn_sub_norm`, tied head;
//! - `model_type: "llama"` with `quantization_config.quant_method == "bitnet"`
//!   (HF1BitLLM/Llama3-8B-1.58, tiiuae/Falcon3-*-1.58bit): SiLU MLP, no sub-norms, usually an
//!   untied `lm_head`, sometimes an explicit `head_dim`.
//!
//! Field names are the `config.json` keys. The closed sets (`model_type`, `hidden_act`,
//! `linear_class`, `quantization_mode`, `quant_method`, `rope_type`) are enums, so an unknown
//! value is refused while parsing, with the field's path and the value; sizes and everything
//! else we cannot run are refused in [`Config::validate`], which bounds every size and every
//! product of sizes that becomes an allocation, so a hostile file cannot exhaust memory or
//! overflow before the weights are checked.

use crate::error::{Error, Result};
use crate::json;
use candle_nn::Activation;
use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// The architecture family (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// microsoft/bitnet-b1.58-2B-4T: relu², sub-norms, tied head.
    Bitnet,
    /// Llama with a bitnet `quantization_config` (or 1bitLLM's latent checkpoints).
    Llama,
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bitnet => "bitnet",
            Self::Llama => "llama",
        })
    }
}

/// `hidden_act`: the MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    Relu2,
    Silu,
    /// transformers' other name for SiLU.
    Swish,
}

/// `quantization_config.quant_method`: only BitNet's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    #[default]
    Bitnet,
}

/// `rope_parameters.rope_type`: only the unscaled rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    Default,
}

/// How `weight_scale` enters the output (`transformers` `BitNetQuantConfig.linear_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearClass {
    /// `y = x_q·W / (weight_scale · s_x)`: the scale stored is the inverse magnitude.
    #[default]
    BitLinear,
    /// `y = x_q·W · weight_scale / s_x`: the scale stored is the magnitude.
    AutoBitLinear,
}

/// Whether the checkpoint stores packed ternary codes or latent float weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizationMode {
    /// Packed U8 codes + `weight_scale` (the 2B-4T layout).
    #[default]
    Offline,
    /// Latent float weights, ternarized once at load with per-tensor absmean.
    Online,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct QuantizationConfig {
    pub quant_method: QuantMethod,
    pub linear_class: Option<LinearClass>,
    pub quantization_mode: Option<QuantizationMode>,
    #[serde(default)]
    pub use_rms_norm: bool,
    /// eps of the extra RMSNorm on every BitLinear input when `use_rms_norm` (transformers' default).
    pub rms_norm_eps: Option<f64>,
    pub modules_to_not_convert: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<RopeType>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    Single(u32),
    Multiple(Vec<u32>),
}

impl EosTokenId {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::Single(id) => vec![*id],
            Self::Multiple(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: ModelType,
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    pub hidden_act: HiddenAct,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<EosTokenId>,
    pub quantization_config: Option<QuantizationConfig>,
}

/// Upper bounds on the sizes of `config.json`, far above any released model (Llama 3.1 405B:
/// hidden 16384, intermediate 53248, 126 layers, 128 heads, vocab 128256) and low enough that
/// nothing sized from them can exhaust memory or overflow before the weights are checked.
const LIMITS: [(&str, usize); 8] = [
    ("hidden_size", 1 << 16),
    ("intermediate_size", 1 << 18),
    ("num_hidden_layers", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("head_dim", 1 << 12),
    ("vocab_size", 1 << 22),
    // Rotary tables are built for every position up front.
    ("max_position_embeddings", 1 << 20),
];

/// Products of sizes that become allocations: q/kv projection widths and the rotary tables.
const MAX_PROJECTION_WIDTH: usize = 1 << 18;
const MAX_ROTARY_ELEMENTS: usize = 1 << 27;
const MAX_VOCAB_ELEMENTS: usize = 1 << 33;

impl Config {
    /// Parses and validates a `config.json` string.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Config = json::parse("config.json", json.as_bytes())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads (at most [`json::SMALL_FILE_LIMIT`] bytes), parses and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = json::read_limited(path, json::SMALL_FILE_LIMIT)?;
        let cfg: Config = json::parse(&path.display().to_string(), &bytes)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses everything this engine cannot run, naming the field and value.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::model(format!("config.json: {msg}")));
        match (self.model_type, &self.quantization_config) {
            (ModelType::Bitnet, _) | (ModelType::Llama, Some(_)) => {}
            // 1bitLLM/bitnet_b1_58-*: latent float weights, no quantization_config.
            (ModelType::Llama, None) if self.is_1bitllm() => {}
            (ModelType::Llama, None) => return fail(
                "model_type \"llama\" without quantization_config.quant_method = \"bitnet\" is not a BitNet checkpoint".into(),
            ),
        }
        if let Some(m) = self
            .quantization_config
            .as_ref()
            .and_then(|q| q.modules_to_not_convert.as_ref())
        {
            if m.iter().any(|m| !m.contains("lm_head")) {
                return fail(format!("unsupported quantization_config.modules_to_not_convert {m:?} (only lm_head may stay unconverted)"));
            }
        }
        self.validate_sizes()?;
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return fail(format!("invalid rope_theta {theta}"));
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return fail(format!("unsupported rope_scaling {s}"));
        }
        if self.attention_bias {
            return fail(
                "unsupported attention_bias true (BitNet projections have no bias)".into(),
            );
        }
        if self.mlp_bias {
            return fail("unsupported mlp_bias true (BitNet projections have no bias)".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail(format!("invalid rms_norm_eps {}", self.rms_norm_eps));
        }
        if let Some(eps) = self.bitlinear_input_norm_eps() {
            if !(eps.is_finite() && eps > 0.0) {
                return fail(format!("invalid quantization_config.rms_norm_eps {eps}"));
            }
        }
        Ok(())
    }

    /// Every size within [`LIMITS`], consistent with the others, and every product that sizes
    /// an allocation computed without overflow and within its bound.
    fn validate_sizes(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::model(format!("config.json: {msg}")));
        for (name, limit) in LIMITS {
            let value = match name {
                "hidden_size" => Some(self.hidden_size),
                "intermediate_size" => Some(self.intermediate_size),
                "num_hidden_layers" => Some(self.num_hidden_layers),
                "num_attention_heads" => Some(self.num_attention_heads),
                "num_key_value_heads" => self.num_key_value_heads,
                "head_dim" => self.head_dim,
                "vocab_size" => Some(self.vocab_size),
                _ => Some(self.max_position_embeddings),
            };
            match value {
                Some(0) => return fail(format!("{name} must be positive, found 0")),
                Some(v) if v > limit => {
                    return fail(format!(
                        "{name} {v} is larger than the supported maximum {limit}"
                    ))
                }
                _ => {}
            }
        }
        let n_kv = self.num_key_value_heads();
        if !self.num_attention_heads.is_multiple_of(n_kv) {
            return fail(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {n_kv}",
                self.num_attention_heads
            ));
        }
        let head_dim = self.head_dim();
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return fail(format!(
                "head_dim {head_dim} must be even and positive for rotary embeddings"
            ));
        }
        let product = |what: &str, a: usize, b: usize, limit: usize| match a.checked_mul(b) {
            Some(p) if p <= limit => Ok(p),
            _ => Err(Error::model(format!(
                "config.json: {what} = {a} × {b} is larger than the supported maximum {limit}"
            ))),
        };
        let q = product(
            "num_attention_heads * head_dim",
            self.num_attention_heads,
            head_dim,
            MAX_PROJECTION_WIDTH,
        )?;
        let kv = product(
            "num_key_value_heads * head_dim",
            n_kv,
            head_dim,
            MAX_PROJECTION_WIDTH,
        )?;
        product(
            "max_position_embeddings * head_dim",
            self.max_position_embeddings,
            head_dim,
            MAX_ROTARY_ELEMENTS,
        )?;
        product(
            "vocab_size * hidden_size",
            self.vocab_size,
            self.hidden_size,
            MAX_VOCAB_ELEMENTS,
        )?;
        for (name, out) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads * head_dim", q),
            ("num_key_value_heads * head_dim", kv),
        ] {
            if !out.is_multiple_of(4) {
                return fail(format!(
                    "{name} = {out} is not a positive multiple of 4, which packed ternary weights need"
                ));
            }
        }
        Ok(())
    }

    fn is_1bitllm(&self) -> bool {
        let archs = self.architectures.as_deref().unwrap_or_default();
        archs.iter().any(|a| a == "BitnetForCausalLM")
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_theta`, or `rope_parameters.rope_theta` (transformers ≥ 5), default 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }

    pub fn activation(&self) -> Activation {
        match self.hidden_act {
            HiddenAct::Relu2 => Activation::Relu2,
            HiddenAct::Silu | HiddenAct::Swish => Activation::Silu,
        }
    }

    /// Sub-norms before `o_proj` and `down_proj` are part of the `bitnet` architecture; other
    /// architectures use them only when the checkpoint has the tensors.
    pub fn has_sub_norms(&self) -> bool {
        self.model_type == ModelType::Bitnet
    }

    pub fn linear_class(&self) -> LinearClass {
        self.quantization_config
            .as_ref()
            .and_then(|q| q.linear_class)
            .unwrap_or_default()
    }

    /// Checkpoints without a `quantization_config` (1bitLLM) hold latent float weights.
    pub fn quantization_mode(&self) -> QuantizationMode {
        match &self.quantization_config {
            Some(q) => q.quantization_mode.unwrap_or_default(),
            None => QuantizationMode::Online,
        }
    }

    /// eps of the extra RMSNorm applied to every BitLinear input, when the config asks for one.
    pub fn bitlinear_input_norm_eps(&self) -> Option<f64> {
        let q = self.quantization_config.as_ref()?;
        q.use_rms_norm.then(|| q.rms_norm_eps.unwrap_or(1e-6))
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(EosTokenId::ids)
            .unwrap_or_default()
    }

    /// The `microsoft/bitnet-b1.58-2B-4T` shapes.
    pub fn bitnet_b158_2b_4t() -> Self {
        Self {
            model_type: ModelType::Bitnet,
            architectures: Some(vec!["BitNetForCausalLM".into()]),
            hidden_size: 2560,
            intermediate_size: 6912,
            num_hidden_layers: 30,
            num_attention_heads: 20,
            num_key_value_heads: Some(5),
            head_dim: None,
            vocab_size: 128256,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: Some(500_000.0),
            rope_parameters: None,
            rope_scaling: None,
            hidden_act: HiddenAct::Relu2,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(128000),
            eos_token_id: Some(EosTokenId::Multiple(vec![128001, 128009])),
            quantization_config: Some(QuantizationConfig::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "bitnet", "hidden_size": 128, "intermediate_size": 344,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "hidden_act": "relu2", "tie_word_embeddings": true,
            "quantization_config": {"quant_method": "bitnet", "offline_quantization": true}
        })
    }

    fn parse(v: serde_json::Value) -> Result<Config> {
        Config::from_json(&v.to_string())
    }

    #[test]
    fn parses_bitnet_defaults() -> Result<()> {
        let cfg = parse(base())?;
        assert_eq!(cfg.head_dim(), 32);
        assert_eq!(cfg.linear_class(), LinearClass::BitLinear);
        assert_eq!(cfg.quantization_mode(), QuantizationMode::Offline);
        assert_eq!(cfg.activation(), Activation::Relu2);
        assert!(cfg.has_sub_norms());
        assert_eq!(cfg.rope_theta(), 500000.0);
        Ok(())
    }

    #[test]
    fn accepts_rope_parameters_and_llama_bitnet() -> Result<()> {
        let mut v = base();
        v["model_type"] = "llama".into();
        v["hidden_act"] = "silu".into();
        v["head_dim"] = 64.into();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = serde_json::json!({"rope_theta": 1234.0, "rope_type": "default"});
        v["quantization_config"] = serde_json::json!({
            "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"
        });
        let cfg = parse(v)?;
        assert_eq!(cfg.rope_theta(), 1234.0);
        assert_eq!(cfg.head_dim(), 64);
        assert!(!cfg.has_sub_norms());
        assert_eq!(cfg.activation(), Activation::Silu);
        assert_eq!(cfg.linear_class(), LinearClass::AutoBitLinear);
        assert_eq!(cfg.quantization_mode(), QuantizationMode::Online);
        Ok(())
    }

    /// The message names the field (its JSON path) and the value.
    #[track_caller]
    fn assert_refused(v: serde_json::Value, field: &str, value: &str) {
        let e = parse(v).expect_err("refused");
        assert_eq!(e.kind(), crate::ErrorKind::Model);
        let msg = e.to_string();
        assert!(
            msg.contains(field) && msg.contains(value) && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn refuses_unsupported_fields_by_name() {
        let cases: [(&str, serde_json::Value, &str, &str); 10] = [
            ("model_type", "mamba".into(), "model_type", "mamba"),
            ("hidden_act", "gelu".into(), "hidden_act", "gelu"),
            (
                "quantization_config/linear_class",
                "fancy".into(),
                "quantization_config.linear_class",
                "fancy",
            ),
            (
                "quantization_config/quantization_mode",
                "lazy".into(),
                "quantization_config.quantization_mode",
                "lazy",
            ),
            (
                "quantization_config/quant_method",
                "gptq".into(),
                "quantization_config.quant_method",
                "gptq",
            ),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "yarn"}),
                "rope_parameters.rope_type",
                "yarn",
            ),
            ("intermediate_size", 346.into(), "intermediate_size", "346"),
            ("num_key_value_heads", 3.into(), "num_key_value_heads", "3"),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 2.0}),
                "rope_scaling",
                "linear",
            ),
            ("hidden_size", (-1).into(), "hidden_size", "-1"),
        ];
        for (key, value, field, shown) in cases {
            let mut v = base();
            // `a/b`: serde_json's IndexMut inserts missing keys.
            let (outer, inner) = key.split_once('/').unwrap_or((key, ""));
            match inner {
                "" => v[outer] = value,
                _ => v[outer][inner] = value,
            }
            assert_refused(v, field, shown);
        }

        let mut v = base();
        v["model_type"] = "llama".into();
        v.as_object_mut().unwrap().remove("quantization_config");
        assert_refused(v, "quant_method", "llama");

        let e = Config::from_json("{not json").unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }

    #[test]
    fn refuses_sizes_that_would_exhaust_memory_or_overflow() {
        for (field, value) in [
            ("head_dim", 1usize << 20),
            ("head_dim", (1 << 62) + 2),
            ("vocab_size", 1 << 40),
            ("num_hidden_layers", 1 << 30),
            ("max_position_embeddings", 1 << 21),
            ("hidden_size", 1 << 20),
            ("intermediate_size", usize::MAX),
        ] {
            let mut v = base();
            v[field] = value.into();
            assert_refused(v, field, &value.to_string());
        }
        // Each size within its bound, their products not.
        let mut v = base();
        v["head_dim"] = 4096.into();
        v["num_attention_heads"] = 128.into();
        v["num_key_value_heads"] = 128.into();
        assert_refused(v, "num_attention_heads * head_dim", "128 × 4096");
        let mut v = base();
        v["head_dim"] = 4096.into();
        v["max_position_embeddings"] = (1 << 20).into();
        assert_refused(v, "max_position_embeddings * head_dim", "4096");
        let mut v = base();
        v["hidden_size"] = 65536.into();
        v["vocab_size"] = (1 << 22).into();
        assert_refused(v, "vocab_size * hidden_size", "65536");
    }

    #[test]
    fn accepts_1bitllm_latent_checkpoints() -> Result<()> {
        let mut v = base();
        v["model_type"] = "llama".into();
        v["hidden_act"] = "silu".into();
        v["architectures"] = serde_json::json!(["BitnetForCausalLM"]);
        v.as_object_mut().unwrap().remove("quantization_config");
        let cfg = parse(v)?;
        assert_eq!(cfg.quantization_mode(), QuantizationMode::Online);
        assert!(!cfg.has_sub_norms());
        Ok(())
    }

    #[test]
    fn preset_2b_4t_is_valid() -> Result<()> {
        let cfg = Config::bitnet_b158_2b_4t();
        cfg.validate()?;
        assert_eq!(cfg.head_dim(), 128);
        assert_eq!(cfg.eos_token_ids(), vec![128001, 128009]);
        Ok(())
    }
}
