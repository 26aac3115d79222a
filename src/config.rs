//! `config.json` of BitNet b1.58 checkpoints.
//!
//! Two families are accepted (spec: `shared/bitnet-format.md` §1, §4):
//! - `model_type: "bitnet"` (microsoft/bitnet-b1.58-2B-4T and its `-bf16` twin): relu² MLP,
//!   `attn_sub_norm` / `ffn_sub_norm`, tied head;
//! - `model_type: "llama"` with `quantization_config.quant_method == "bitnet"`
//!   (HF1BitLLM/Llama3-8B-1.58, tiiuae/Falcon3-*-1.58bit): SiLU MLP, no sub-norms, usually an
//!   untied `lm_head`, sometimes an explicit `head_dim`.
//!
//! Field names are the `config.json` keys. Anything we cannot run is refused in
//! [`Config::validate`] with an error naming the field and its value.

use candle_core::{bail, Result};
use candle_nn::Activation;
use serde::Deserialize;

/// How `weight_scale` enters the output (`transformers` `BitNetQuantConfig.linear_class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearClass {
    /// `y = x_q·W / (weight_scale · s_x)`: the scale stored is the inverse magnitude.
    #[default]
    BitLinear,
    /// `y = x_q·W · weight_scale / s_x`: the scale stored is the magnitude.
    AutoBitLinear,
}

/// Whether the checkpoint stores packed ternary codes or latent float weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantizationMode {
    /// Packed U8 codes + `weight_scale` (the 2B-4T layout).
    #[default]
    Offline,
    /// Latent float weights, ternarized once at load with per-tensor absmean.
    Online,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub linear_class: Option<String>,
    pub quantization_mode: Option<String>,
    #[serde(default)]
    pub use_rms_norm: bool,
    /// eps of the extra RMSNorm on every BitLinear input when `use_rms_norm` (transformers' default).
    pub rms_norm_eps: Option<f64>,
    pub modules_to_not_convert: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    Single(u32),
    Multiple(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
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
    pub hidden_act: serde_json::Value,
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

impl Config {
    /// Parses and validates a `config.json` string.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Config = serde_json::from_str(json)
            .map_err(|e| candle_core::Error::Msg(format!("invalid config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a `config.json` file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| {
            candle_core::Error::Msg(format!("cannot read config {}: {e}", path.display()))
        })?;
        Self::from_json(&json)
    }

    /// Refuses everything this engine cannot run, naming the field and value.
    pub fn validate(&self) -> Result<()> {
        match self.model_type.as_str() {
            "bitnet" => {}
            "llama" => match &self.quantization_config {
                Some(q) if q.quant_method == "bitnet" => {}
                Some(q) => bail!(
                    "unsupported quantization_config.quant_method {:?} for model_type \"llama\" (only \"bitnet\" is supported)",
                    q.quant_method
                ),
                // 1bitLLM/bitnet_b1_58-*: latent float weights, no quantization_config.
                None if self.is_1bitllm() => {}
                None => bail!(
                    "model_type \"llama\" without quantization_config.quant_method = \"bitnet\" is not a BitNet checkpoint"
                ),
            },
            other => bail!("unsupported model_type {other:?} (expected \"bitnet\", or \"llama\" with a bitnet quantization_config)"),
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "bitnet" {
                bail!(
                    "unsupported quantization_config.quant_method {:?} (expected \"bitnet\")",
                    q.quant_method
                )
            }
            if let Some(m) = &q.modules_to_not_convert {
                if m.iter().any(|m| !m.contains("lm_head")) {
                    bail!("unsupported quantization_config.modules_to_not_convert {m:?} (only lm_head may stay unconverted)")
                }
            }
        }
        self.linear_class()?;
        self.quantization_mode()?;
        self.activation()?;
        self.rope_theta()?;
        if let Some(s) = &self.rope_scaling {
            if !s.is_null() {
                bail!("unsupported rope_scaling {s}")
            }
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
        {
            if t != "default" {
                bail!("unsupported rope_parameters.rope_type {t:?} (only \"default\" is supported)")
            }
        }
        if self.attention_bias {
            bail!("unsupported attention_bias true (BitNet projections have no bias)")
        }
        if self.mlp_bias {
            bail!("unsupported mlp_bias true (BitNet projections have no bias)")
        }
        for (name, value) in [
            ("num_attention_heads", self.num_attention_heads),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim.unwrap_or(1)),
        ] {
            if value == 0 {
                bail!("{name} must be positive, found 0")
            }
        }
        // Rotary tables are built for every position up front.
        if self.max_position_embeddings == 0 || self.max_position_embeddings > 1 << 20 {
            bail!(
                "unsupported max_position_embeddings {}",
                self.max_position_embeddings
            )
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!("invalid rms_norm_eps {}", self.rms_norm_eps)
        }
        let n_kv = self.num_key_value_heads();
        if n_kv == 0 || !self.num_attention_heads.is_multiple_of(n_kv) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {n_kv}",
                self.num_attention_heads
            )
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            )
        }
        for (name, out) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            (
                "num_attention_heads * head_dim",
                self.num_attention_heads * self.head_dim(),
            ),
            ("num_key_value_heads * head_dim", n_kv * self.head_dim()),
        ] {
            if out == 0 || !out.is_multiple_of(4) {
                bail!("{name} = {out} is not a positive multiple of 4, which packed ternary weights need")
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
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// `rope_theta`, or `rope_parameters.rope_theta` (transformers ≥ 5), default 10000.
    pub fn rope_theta(&self) -> Result<f64> {
        let theta = self
            .rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 0.0) {
            bail!("invalid rope_theta {theta}")
        }
        Ok(theta)
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            Some("relu2") => Ok(Activation::Relu2),
            Some("silu") | Some("swish") => Ok(Activation::Silu),
            _ => bail!(
                "unsupported hidden_act {} (expected \"relu2\" or \"silu\")",
                self.hidden_act
            ),
        }
    }

    /// Sub-norms before `o_proj` and `down_proj` are part of the `bitnet` architecture; other
    /// architectures use them only when the checkpoint has the tensors.
    pub fn has_sub_norms(&self) -> bool {
        self.model_type == "bitnet"
    }

    pub fn linear_class(&self) -> Result<LinearClass> {
        match self.quantization_config.as_ref().and_then(|q| q.linear_class.as_deref()) {
            None | Some("bitlinear") => Ok(LinearClass::BitLinear),
            Some("autobitlinear") => Ok(LinearClass::AutoBitLinear),
            Some(other) => bail!(
                "unsupported quantization_config.linear_class {other:?} (expected \"bitlinear\" or \"autobitlinear\")"
            ),
        }
    }

    /// Checkpoints without a `quantization_config` (1bitLLM) hold latent float weights.
    pub fn quantization_mode(&self) -> Result<QuantizationMode> {
        let Some(q) = &self.quantization_config else {
            return Ok(QuantizationMode::Online);
        };
        match q.quantization_mode.as_deref() {
            None | Some("offline") => Ok(QuantizationMode::Offline),
            Some("online") => Ok(QuantizationMode::Online),
            Some(other) => bail!(
                "unsupported quantization_config.quantization_mode {other:?} (expected \"offline\" or \"online\")"
            ),
        }
    }

    /// eps of the extra RMSNorm applied to every BitLinear input, when the config asks for one.
    pub fn bitlinear_input_norm_eps(&self) -> Option<f64> {
        let q = self.quantization_config.as_ref()?;
        q.use_rms_norm.then(|| q.rms_norm_eps.unwrap_or(1e-6))
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(EosTokenId::Single(id)) => vec![*id],
            Some(EosTokenId::Multiple(ids)) => ids.clone(),
            None => vec![],
        }
    }

    /// The `microsoft/bitnet-b1.58-2B-4T` shapes.
    pub fn bitnet_b158_2b_4t() -> Self {
        Self {
            model_type: "bitnet".into(),
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
            hidden_act: serde_json::Value::from("relu2"),
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(128000),
            eos_token_id: Some(EosTokenId::Multiple(vec![128001, 128009])),
            quantization_config: Some(QuantizationConfig {
                quant_method: "bitnet".into(),
                ..Default::default()
            }),
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

    fn err(v: serde_json::Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn parses_bitnet_defaults() -> Result<()> {
        let cfg = parse(base())?;
        assert_eq!(cfg.head_dim(), 32);
        assert_eq!(cfg.linear_class()?, LinearClass::BitLinear);
        assert_eq!(cfg.quantization_mode()?, QuantizationMode::Offline);
        assert_eq!(cfg.activation()?, Activation::Relu2);
        assert!(cfg.has_sub_norms());
        assert_eq!(cfg.rope_theta()?, 500000.0);
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
        assert_eq!(cfg.rope_theta()?, 1234.0);
        assert_eq!(cfg.head_dim(), 64);
        assert!(!cfg.has_sub_norms());
        assert_eq!(cfg.activation()?, Activation::Silu);
        assert_eq!(cfg.linear_class()?, LinearClass::AutoBitLinear);
        assert_eq!(cfg.quantization_mode()?, QuantizationMode::Online);
        Ok(())
    }

    #[test]
    fn refuses_unsupported_fields_by_name() {
        let mut v = base();
        v["model_type"] = "mamba".into();
        assert!(err(v).contains("model_type \"mamba\""));

        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(err(v).contains("hidden_act \"gelu\""));

        let mut v = base();
        v["quantization_config"]["linear_class"] = "fancy".into();
        assert!(err(v).contains("linear_class \"fancy\""));

        let mut v = base();
        v["quantization_config"]["quantization_mode"] = "lazy".into();
        assert!(err(v).contains("quantization_mode \"lazy\""));

        let mut v = base();
        v["quantization_config"]["quant_method"] = "gptq".into();
        assert!(err(v).contains("quant_method \"gptq\""));

        let mut v = base();
        v["model_type"] = "llama".into();
        v.as_object_mut().unwrap().remove("quantization_config");
        assert!(err(v).contains("quant_method"));

        let mut v = base();
        v["intermediate_size"] = 346.into();
        assert!(err(v).contains("intermediate_size = 346"));

        let mut v = base();
        v["num_key_value_heads"] = 3.into();
        assert!(err(v).contains("num_key_value_heads 3"));

        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert!(err(v).contains("rope_scaling"));

        assert!(Config::from_json("{not json")
            .unwrap_err()
            .to_string()
            .contains("invalid config.json"));
    }

    #[test]
    fn accepts_1bitllm_latent_checkpoints() -> Result<()> {
        let mut v = base();
        v["model_type"] = "llama".into();
        v["hidden_act"] = "silu".into();
        v["architectures"] = serde_json::json!(["BitnetForCausalLM"]);
        v.as_object_mut().unwrap().remove("quantization_config");
        let cfg = parse(v)?;
        assert_eq!(cfg.quantization_mode()?, QuantizationMode::Online);
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
