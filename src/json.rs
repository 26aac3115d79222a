//! The small JSON files of a checkpoint (`config.json`, `generation_config.json`,
//! `tokenizer_config.json`, the safetensors index, `tokenizer.json`), read with a size limit so a
//! huge or endless file is refused before it is in memory, and parsed with the path of the
//! failing field in the error.

use crate::error::{Error, Result};
use crate::escape::escape_controls;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::path::Path;

/// `config.json`, `generation_config.json`, `tokenizer_config.json` and the safetensors index:
/// a few KiB in released models (Llama 3's `tokenizer_config.json`, the largest, is 50 KiB).
pub const SMALL_FILE_LIMIT: u64 = 16 << 20;
/// `tokenizer.json`: 9 MiB for Llama 3, 33 MiB for Gemma 3.
pub const TOKENIZER_LIMIT: u64 = 128 << 20;

/// The bytes of `path`, refused with an error naming the file and the limit when there are
/// more than `limit` (checked before reading, and again while reading: a device or a file that
/// grows has no trustworthy size).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let name = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| Error::model(format!("cannot read {name}: {e}")))?;
    let too_large = |size: String| {
        Error::model(format!(
            "{name} is {size}, more than the {} MiB this file may have",
            limit >> 20
        ))
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::model(format!("cannot read {name}: {e}")))?;
    if meta.is_dir() {
        return Err(Error::model(format!("{name} is a directory")));
    }
    if meta.len() > limit {
        return Err(too_large(format!("{} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::model(format!("cannot read {name}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(too_large("larger".into()));
    }
    Ok(bytes)
}

/// Parses `bytes` as a `T`; an error names `file`, the path of the field at fault
/// (`quantization_config.linear_class`) and serde's description of the value.
pub fn parse<T: DeserializeOwned>(file: &str, bytes: &[u8]) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => de.end().map(|()| value).map_err(|e| e.to_string()),
        Err(e) => match e.path().to_string().as_str() {
            // `?`: a key that could not be read.
            "." | "?" => Err(e.inner().to_string()),
            path => Err(format!("{path}: {}", e.inner())),
        },
    };
    value.map_err(|msg| Error::model(escape_controls(&format!("invalid {file}: {msg}"))))
}

/// [`read_limited`] then [`parse`].
pub fn read<T: DeserializeOwned>(path: &Path, limit: u64) -> Result<T> {
    parse(&path.display().to_string(), &read_limited(path, limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_sparse_file_above_the_limit_without_reading_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        std::fs::File::create(&path)?.set_len(5 << 30)?;
        let e = read_limited(&path, SMALL_FILE_LIMIT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains("16 MiB"), "{e}");
        Ok(())
    }

    #[test]
    fn an_endless_device_stops_at_the_limit() {
        let e = read_limited(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero") && e.contains("1 MiB"), "{e}");
    }

    #[test]
    fn errors_name_the_field_path_and_escape_the_value() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            mode: std::collections::BTreeMap<String, u8>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            inner: Inner,
        }
        let e = parse::<Outer>("x.json", br#"{"inner": {"mode": {"a\r\u001b": -1}}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid x.json: inner.mode.a\\r\\u{1b}: "),
            "{e}"
        );
        assert!(!e.contains('\r') && !e.contains('\u{1b}'), "{e}");
        let e = parse::<Outer>("x.json", br#"{"inner": {"mode": {}}} trailing"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("trailing characters"), "{e}");
    }
}
