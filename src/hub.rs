//! Where a model's files come from: a local directory in the hub layout, or a Hugging Face hub
//! repository through `hf-hub`'s cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`).
//!
//! Files are looked up in the cache first, so a cached model runs without a network. With
//! `HF_HUB_OFFLINE=1` (as in Python's `huggingface_hub`) the network is never used, and without
//! the `download` feature there is no network client at all: the cache is all there is. A file
//! that is neither cached nor downloadable is one error line naming the repo, the file and
//! `--model DIR`.

use crate::error::Result;
#[cfg(feature = "download")]
use crate::error::{Error, ErrorKind};
use crate::fail;
use crate::weights;
#[cfg(feature = "download")]
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The model `bitnet` runs when `--model` is not given.
pub const DEFAULT_MODEL: &str = "microsoft/bitnet-b1.58-2B-4T";

/// How to reach the hub; [`HubOptions::from_env`] reads the same variables as `huggingface_hub`.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The `hub/` cache directory (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` wrote.
    pub token: Option<String>,
    /// Show download progress bars (hf-hub's own).
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> Self {
        // The token file sits in HF_HOME; the cache there too unless HF_HUB_CACHE moves it.
        let home = Cache::from_env();
        let cache_dir = std::env::var_os("HF_HUB_CACHE")
            .filter(|dir| !dir.is_empty())
            .map_or_else(|| home.path().clone(), PathBuf::from);
        let flag = std::env::var("HF_HUB_OFFLINE").unwrap_or_default();
        Self {
            offline: matches!(
                flag.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            ),
            endpoint: std::env::var("HF_ENDPOINT").ok(),
            token: std::env::var("HF_TOKEN").ok().or_else(|| home.token()),
            cache_dir,
            progress: true,
        }
    }
}

/// The files of one checkpoint, all local paths.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The hub id or directory the files came from, as given.
    pub name: String,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    /// `model.safetensors`, or every shard of `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// `model` is a directory when one exists at that path, otherwise a hub id fetched at
    /// `revision` with [`HubOptions::from_env`].
    pub fn resolve(model: &str, revision: &str) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if !is_repo_id(model) {
            fail!(
                Input,
                "--model {model}: no such directory, and not a hub id (expected org/name)"
            )
        }
        Self::fetch_with(model, revision, &HubOptions::from_env())
    }

    /// A local directory in the hub layout: `config.json`, `tokenizer.json`, the safetensors,
    /// optionally `tokenizer_config.json` and `generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            fail!(Input, "model directory {} does not exist", dir.display())
        }
        let required = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                fail!(
                    Model,
                    "model directory {} has no {name} (or it is not a regular file)",
                    dir.display()
                )
            }
        };
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            name: dir.display().to_string(),
            config: required("config.json")?,
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            generation_config: optional("generation_config.json"),
            weights: weights::safetensors_files(dir)?,
        })
    }

    /// Fetches `repo_id` at `revision` (branch, tag or commit hash) through the hf-hub cache.
    pub fn fetch_with(repo_id: &str, revision: &str, opts: &HubOptions) -> Result<Self> {
        let hub = Hub::new(repo_id, revision, opts)?;
        let config = hub.get("config.json")?;
        let tokenizer = hub.get("tokenizer.json")?;
        let weights = match hub.get("model.safetensors") {
            Ok(p) => vec![p],
            Err(single) => match hub.get("model.safetensors.index.json") {
                Ok(index) => weights::shard_names(&index)?
                    .iter()
                    .map(|name| hub.get(name))
                    .collect::<Result<_>>()?,
                Err(_) => return Err(single),
            },
        };
        Ok(Self {
            name: repo_id.to_string(),
            config,
            tokenizer,
            tokenizer_config: hub.get("tokenizer_config.json").ok(),
            generation_config: hub.get("generation_config.json").ok(),
            weights,
        })
    }
}

/// `name` or `org/name`, with the characters the hub allows.
fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

struct Hub {
    repo_id: String,
    revision: String,
    cache_dir: PathBuf,
    cache: CacheRepo,
    offline: bool,
    /// `None` when offline.
    #[cfg(feature = "download")]
    api: Option<ApiRepo>,
}

impl Hub {
    fn new(repo_id: &str, revision: &str, opts: &HubOptions) -> Result<Self> {
        let repo = Repo::with_revision(repo_id.into(), RepoType::Model, revision.into());
        let cache = Cache::new(opts.cache_dir.clone());
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cache_dir: opts.cache_dir.clone(),
            offline: opts.offline,
            #[cfg(feature = "download")]
            api: Self::api(&cache, &repo, opts)?,
            cache: cache.repo(repo),
        })
    }

    #[cfg(feature = "download")]
    fn api(cache: &Cache, repo: &Repo, opts: &HubOptions) -> Result<Option<ApiRepo>> {
        if opts.offline {
            return Ok(None);
        }
        let mut builder = ApiBuilder::from_cache(cache.clone())
            .with_progress(opts.progress)
            .with_token(opts.token.clone());
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder
            .build()
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot set up the hub client: {e}")))?;
        Ok(Some(api.repo(repo.clone())))
    }

    /// The cached snapshot file for the revision: through `refs/<revision>`, or directly when
    /// the revision is a commit hash (hf-hub writes refs only for names it resolved).
    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.get(file).or_else(|| {
            let is_commit =
                self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
            let p = self.cache.pointer_path(&self.revision).join(file);
            (is_commit && p.is_file()).then_some(p)
        })
    }

    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        let (repo, cache) = (&self.repo_id, self.cache_dir.display());
        let at = if self.revision == "main" {
            String::new()
        } else {
            format!(" at revision {}", self.revision)
        };
        let fix = "or pass --model DIR with a local directory holding config.json, tokenizer.json and the safetensors";
        if self.offline {
            fail!(
                Io,
                "{repo}{at}: {file} is not in the hf-hub cache {cache} and HF_HUB_OFFLINE is set; download it while online, {fix}"
            )
        }
        #[cfg(feature = "download")]
        if let Some(api) = &self.api {
            return api.download(file).map_err(|e| {
                Error::new(ErrorKind::Io, format!(
                    "{repo}{at}: {file} is not in the hf-hub cache {cache} and downloading it failed ({e}); check the id and the network, {fix}"
                ))
            });
        }
        fail!(
            Io,
            "{repo}{at}: {file} is not in the hf-hub cache {cache} and this build cannot download (candle-bitnet without its `download` feature); fetch it with `huggingface-cli download {repo}`, {fix}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::is_repo_id;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("microsoft/bitnet-b1.58-2B-4T"));
        assert!(is_repo_id("gpt2"));
        assert!(!is_repo_id("tests/fixtures/tiny-bitnet"));
        assert!(!is_repo_id("./model"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("org//name"));
    }
}
