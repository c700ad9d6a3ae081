//! What `list` and `detach` know about running daemons: one JSON file per device in
//! `/run/loop-immutable/` (written by the daemon once the device is live, removed at detach),
//! and a `.detached` verdict file the daemon leaves for the `detach` command.

use crate::cli::Backend;
use std::io;
use std::path::{Path, PathBuf};

pub fn dir() -> PathBuf {
    std::env::var_os("LOOP_IMMUTABLE_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/loop-immutable"))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct State {
    pub device: String,
    pub pid: u32,
    pub backend: Backend,
    pub image: String,
    pub image_sha256: String,
    /// "none", "memory" or the overlay file.
    pub overlay: String,
    pub audit: Option<String>,
    pub read_only: bool,
    pub logical_block_size: u32,
    pub started: String,
    /// ublk device id.
    pub ublk_id: Option<u32>,
}

/// The daemon's verdict at detach.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Verdict {
    pub device: String,
    pub image: String,
    pub attach_sha256: String,
    pub detach_sha256: String,
    pub changes: Vec<String>,
}

impl Verdict {
    pub fn unchanged(&self) -> bool {
        self.changes.is_empty() && self.attach_sha256 == self.detach_sha256
    }
}

fn name_of(device: &str) -> String {
    Path::new(device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| device.replace('/', "_"))
}

pub fn state_path(device: &str) -> PathBuf {
    dir().join(format!("{}.json", name_of(device)))
}

pub fn verdict_path(device: &str) -> PathBuf {
    dir().join(format!("{}.detached", name_of(device)))
}

fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    std::fs::create_dir_all(dir())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub fn save(s: &State) -> io::Result<()> {
    let _ = std::fs::remove_file(verdict_path(&s.device));
    write_atomic(
        &state_path(&s.device),
        &serde_json::to_string_pretty(s).map_err(io::Error::other)?,
    )
}

pub fn remove(device: &str) {
    let _ = std::fs::remove_file(state_path(device));
}

pub fn save_verdict(v: &Verdict) -> io::Result<()> {
    write_atomic(
        &verdict_path(&v.device),
        &serde_json::to_string_pretty(v).map_err(io::Error::other)?,
    )
}

pub fn take_verdict(device: &str) -> Option<Verdict> {
    let p = verdict_path(device);
    let v = serde_json::from_slice(&std::fs::read(&p).ok()?).ok();
    let _ = std::fs::remove_file(p);
    v
}

/// Every recorded device (live or with a dead daemon).
pub fn all() -> Vec<State> {
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut v: Vec<State> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    v.sort_by(|a, b| a.device.cmp(&b.device));
    v
}

/// Whether `pid` is a running (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}
