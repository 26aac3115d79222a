//! Writing the files a caller names (`--output-json`, `--dump-logits`) without damaging what is
//! there: a regular file is replaced atomically (a temporary file in the same directory, then
//! a rename), while a device, FIFO or symlink is written in place and stays what it was
//! (`--output-json /dev/stdout` works, and `/dev/null` is never replaced by a regular file).

use crate::error::{Error, ErrorKind, Result};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` as described in the module documentation.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| {
        Error::new(
            ErrorKind::Io,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => replace(path, bytes).map_err(io),
        Ok(meta) if meta.is_dir() => Err(Error::input(format!(
            "cannot write {}: it is a directory",
            path.display()
        ))),
        // A symlink (followed: its target is written, the link stays), a device, a FIFO.
        Ok(_) => write_in_place(path, bytes).map_err(io),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => replace(path, bytes).map_err(io),
        Err(e) => Err(io(e)),
    }
}

fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(std::io::Error::other("it is a link to a directory"));
    }
    // O_TRUNC empties a regular file behind a link and is ignored by devices and FIFOs.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.flush()
}

/// A temporary file next to `path`, renamed over it once complete: readers never see a
/// half-written file, and a failed write leaves the old one.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn regular_files_are_replaced_and_links_kept() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("out.json");
        std::fs::write(&file, "old, and longer than the new text")?;
        write_output(&file, b"new")?;
        assert_eq!(std::fs::read(&file)?, b"new");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&file, &link)?;
        write_output(&link, b"via link")?;
        assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(std::fs::read(&file)?, b"via link");
        let leftovers = std::fs::read_dir(dir.path())?.count();
        assert_eq!(leftovers, 2, "no temporary file left");
        Ok(())
    }

    #[test]
    fn fifos_stay_fifos() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let fifo = dir.path().join("out.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo))
        };
        write_output(&fifo, b"through the pipe")?;
        assert_eq!(reader.join().expect("reader")?, b"through the pipe");
        assert!(std::fs::symlink_metadata(&fifo)?.file_type().is_fifo());
        let e = write_output(dir.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        Ok(())
    }
}
