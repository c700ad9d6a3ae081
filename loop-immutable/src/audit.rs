//! The audit log: JSON lines, each carrying `prev`, the SHA-256 of the previous line's bytes
//! (64 zeros for the first), and `seq`, its position. Editing, removing or reordering any
//! line breaks the chain at that point; `verify` finds it.
//!
//! Entries: `attach` (image path, size, identity, full SHA-256, overlay), one `write` per
//! overlay write (offset, length), `flush`-free, and `detach` (SHA-256 again, whether anything
//! changed). Each line is one write(2) on an O_APPEND descriptor, so a killed daemon leaves
//! complete lines only. The file is flock()ed: one daemon appends to a log at a time.

use crate::image::with_context;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug)]
pub struct AuditLog {
    file: File,
    /// Held (on a duplicate of `file`) while the log is open.
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
    prev: String,
    seq: u64,
}

fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl AuditLog {
    /// Open (or create) the log for appending. An existing log must verify: appending to a
    /// broken chain would hide where it broke.
    pub fn open(path: &Path) -> io::Result<AuditLog> {
        let ctx = |e: io::Error| with_context(e, &format!("audit log {}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(ctx)?;
        if !file.metadata().map_err(ctx)?.is_file() {
            return Err(ctx(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let lock = nix::fcntl::Flock::lock(
            file.try_clone().map_err(ctx)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| {
            ctx(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("in use by another loop-immutable daemon ({e})"),
            ))
        })?;
        let text = std::fs::read(path).map_err(ctx)?;
        let report = verify_bytes(&text).map_err(|e| {
            ctx(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("existing log does not verify, refusing to append: {e}"),
            ))
        })?;
        Ok(AuditLog {
            file,
            _lock: lock,
            path: path.to_owned(),
            prev: report.last_hash,
            seq: report.entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one entry; `fields` are added after `seq`, `prev`, `time` and `event`.
    pub fn append(&mut self, event: &str, fields: Value) -> io::Result<()> {
        let mut m = Map::new();
        m.insert("seq".into(), json!(self.seq));
        m.insert("prev".into(), json!(self.prev));
        m.insert("time".into(), json!(now_rfc3339()));
        m.insert("event".into(), json!(event));
        if let Value::Object(f) = fields {
            for (k, v) in f {
                m.insert(k, v);
            }
        }
        let line = serde_json::to_string(&Value::Object(m)).map_err(io::Error::other)?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        // One write(2): O_APPEND makes it land whole at the end.
        let n = (&self.file).write(&bytes)?;
        if n != bytes.len() {
            return Err(io::Error::other("short write to the audit log"));
        }
        self.prev = line_hash(line.as_bytes());
        self.seq += 1;
        Ok(())
    }

    pub fn write_range(&mut self, offset: u64, length: u64) -> io::Result<()> {
        self.append("write", json!({"offset": offset, "length": length}))
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// One attach..detach span of a verified log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub image: String,
    pub attach_sha256: String,
    pub detach_sha256: Option<String>,
    pub writes: u64,
    pub bytes_written: u64,
    /// What the detach entry reported as changed (empty if nothing).
    pub changes: Vec<String>,
}

/// A verified log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    pub last_hash: String,
    pub sessions: Vec<Session>,
}

impl Report {
    /// Sessions whose image changed between attach and detach (hash or identity).
    pub fn changed_sessions(&self) -> Vec<&Session> {
        self.sessions
            .iter()
            .filter(|s| {
                s.detach_sha256
                    .as_ref()
                    .is_some_and(|d| *d != s.attach_sha256)
                    || !s.changes.is_empty()
            })
            .collect()
    }
}

/// Verify a whole log file.
pub fn verify(path: &Path) -> io::Result<Report> {
    let text = std::fs::read(path)
        .map_err(|e| with_context(e, &format!("audit log {}", path.display())))?;
    verify_bytes(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("audit log {}: {e}", path.display()),
        )
    })
}

/// Check the chain and collect the sessions. An error names the first bad line.
pub fn verify_bytes(text: &[u8]) -> Result<Report, String> {
    let mut prev = ZERO.to_string();
    let mut sessions: Vec<Session> = Vec::new();
    let mut n = 0u64;
    if text.is_empty() {
        return Ok(Report {
            entries: 0,
            last_hash: prev,
            sessions,
        });
    }
    if text.last() != Some(&b'\n') {
        return Err(format!(
            "line {}: incomplete (no final newline)",
            text.split(|&b| b == b'\n').count()
        ));
    }
    for (i, line) in text[..text.len() - 1].split(|&b| b == b'\n').enumerate() {
        let no = i + 1;
        let v: Value =
            serde_json::from_slice(line).map_err(|e| format!("line {no}: not JSON: {e}"))?;
        let seq = v.get("seq").and_then(Value::as_u64);
        if seq != Some(n) {
            return Err(format!("line {no}: seq is {seq:?}, expected {n}"));
        }
        let p = v.get("prev").and_then(Value::as_str).unwrap_or("");
        if p != prev {
            return Err(format!(
                "line {no}: chain broken (prev {p}, but the previous line hashes to {prev})"
            ));
        }
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match v.get("event").and_then(Value::as_str) {
            Some("attach") => sessions.push(Session {
                image: s("image"),
                attach_sha256: s("sha256"),
                ..Session::default()
            }),
            Some("write") => {
                let cur = sessions
                    .last_mut()
                    .ok_or_else(|| format!("line {no}: write before any attach"))?;
                cur.writes += 1;
                cur.bytes_written += v.get("length").and_then(Value::as_u64).unwrap_or(0);
            }
            Some("detach") => {
                let cur = sessions
                    .last_mut()
                    .ok_or_else(|| format!("line {no}: detach before any attach"))?;
                cur.detach_sha256 = v.get("sha256").and_then(Value::as_str).map(str::to_string);
                cur.changes = v
                    .get("changes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            Some(_) => {}
            None => return Err(format!("line {no}: no event")),
        }
        prev = line_hash(line);
        n += 1;
    }
    Ok(Report {
        entries: n,
        last_hash: prev,
        sessions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let p = dir.join("audit.jsonl");
        let mut a = AuditLog::open(&p).unwrap();
        a.append("attach", json!({"image": "/x", "sha256": "aa"}))
            .unwrap();
        a.write_range(0, 512).unwrap();
        a.write_range(4096, 4096).unwrap();
        a.append("detach", json!({"sha256": "aa", "changes": []}))
            .unwrap();
        p
    }

    #[test]
    fn chain_verifies_and_continues_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let p = sample(dir.path());
        let r = verify(&p).unwrap();
        assert_eq!(r.entries, 4);
        assert_eq!(r.sessions.len(), 1);
        assert_eq!(r.sessions[0].writes, 2);
        assert_eq!(r.sessions[0].bytes_written, 4608);
        assert!(r.changed_sessions().is_empty());
        {
            let mut a = AuditLog::open(&p).unwrap();
            // The lock is held while open: a second daemon is refused.
            let e = AuditLog::open(&p).unwrap_err();
            assert!(e.to_string().contains("in use"), "{e}");
            a.append("attach", json!({"image": "/x", "sha256": "bb"}))
                .unwrap();
            a.append("detach", json!({"sha256": "cc"})).unwrap();
        }
        let r = verify(&p).unwrap();
        assert_eq!(r.entries, 6);
        assert_eq!(r.changed_sessions().len(), 1);
    }

    #[test]
    fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = sample(dir.path());
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Edit a value.
        let edited = text.replace("\"length\":512", "\"length\":511");
        let e = verify_bytes(edited.as_bytes()).unwrap_err();
        assert!(e.contains("line 3: chain broken"), "{e}");
        // Drop a line.
        let dropped = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        assert!(
            verify_bytes(dropped.as_bytes())
                .unwrap_err()
                .contains("line 2")
        );
        // Swap two lines.
        let swapped = format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[1], lines[3]);
        assert!(verify_bytes(swapped.as_bytes()).is_err());
        // Truncate the tail: still a valid prefix (nothing to detect without an anchor)...
        let prefix = format!("{}\n{}\n", lines[0], lines[1]);
        assert_eq!(verify_bytes(prefix.as_bytes()).unwrap().entries, 2);
        // ...but a torn line is an error, and so is garbage.
        assert!(verify_bytes(&text.as_bytes()[..text.len() - 3]).is_err());
        assert!(verify_bytes(b"hello\n").is_err());
        // Appending to a broken log is refused.
        std::fs::write(&p, edited).unwrap();
        let e = AuditLog::open(&p).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
    }

    #[test]
    fn time_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
