//! The overlay engine: reads merge the image with what was written to the copy-on-write
//! overlay; writes only ever reach the overlay (or fail with EROFS when there is none).
//!
//! A file overlay is two files: `FILE`, sparse and as large as the image, holding written
//! bytes at their own offsets, and `FILE.map`, a text extent log: a JSON header line, then one
//! `w START END` line per write, appended after the data is written. The map, not
//! SEEK_DATA, says which bytes are valid: writes may be smaller than a filesystem block. A
//! clean close rewrites the map with the merged ranges.

use crate::audit::AuditLog;
use crate::extents::ExtentMap;
use crate::image::{Image, with_context};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

const MAP_FORMAT: &str = "loop-immutable-overlay";
const MEM_CHUNK: u64 = 64 * 1024;

/// The header line of `FILE.map`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MapHeader {
    pub format: String,
    pub version: u32,
    pub image_size: u64,
    /// SHA-256 of the image the overlay belongs to: an overlay is refused for any other image.
    pub image_sha256: String,
}

/// The map file that belongs to overlay data file `data`.
pub fn map_path(data: &Path) -> PathBuf {
    let mut s = data.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

/// A file overlay read back (for `diff`, `export` and resuming).
#[derive(Debug)]
pub struct OverlayMap {
    pub header: MapHeader,
    pub extents: ExtentMap,
    /// A torn last line (the daemon was killed while appending): ignored.
    pub torn_tail: bool,
}

/// Read and check `FILE.map`.
pub fn read_map(data: &Path) -> io::Result<OverlayMap> {
    let mp = map_path(data);
    let f =
        File::open(&mp).map_err(|e| with_context(e, &format!("overlay map {}", mp.display())))?;
    let bad = |line: usize, what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("overlay map {} line {line}: {what}", mp.display()),
        )
    };
    let mut lines = BufReader::new(f).split(b'\n');
    let first = lines.next().ok_or_else(|| bad(1, "empty file"))??;
    let header: MapHeader =
        serde_json::from_slice(&first).map_err(|e| bad(1, &format!("bad header: {e}")))?;
    if header.format != MAP_FORMAT || header.version != 1 {
        return Err(bad(1, "not a loop-immutable overlay map (version 1)"));
    }
    let mut extents = ExtentMap::new();
    let mut torn_tail = false;
    let all: Vec<Vec<u8>> = lines.collect::<io::Result<_>>()?;
    let n = all.len();
    for (i, l) in all.iter().enumerate() {
        let parsed = std::str::from_utf8(l).ok().and_then(|t| {
            let mut it = t.split(' ');
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some("w"), Some(a), Some(b), None) => {
                    Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                }
                _ => None,
            }
        });
        match parsed {
            Some((a, b)) if a < b && b <= header.image_size => extents.insert(a, b),
            // Only the very last line can be incomplete (a kill in the middle of an append).
            _ if i + 1 == n => torn_tail = true,
            _ => return Err(bad(i + 2, "bad record")),
        }
    }
    Ok(OverlayMap {
        header,
        extents,
        torn_tail,
    })
}

/// Where written data is kept.
#[derive(Debug)]
enum Store {
    Memory(RwLock<HashMap<u64, Box<[u8]>>>),
    File {
        data: File,
        map: Mutex<File>,
        path: PathBuf,
    },
}

impl Store {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Store::Memory(chunks) => {
                let chunks = chunks.read().unwrap_or_else(|e| e.into_inner());
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = offset + done as u64;
                    let (idx, within) = (pos / MEM_CHUNK, (pos % MEM_CHUNK) as usize);
                    let n = (MEM_CHUNK as usize - within).min(buf.len() - done);
                    match chunks.get(&idx) {
                        Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                        None => buf[done..done + n].fill(0),
                    }
                    done += n;
                }
                Ok(())
            }
            Store::File { data, .. } => data.read_exact_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Store::Memory(chunks) => {
                let mut chunks = chunks.write().unwrap_or_else(|e| e.into_inner());
                let mut done = 0usize;
                while done < buf.len() {
                    let pos = offset + done as u64;
                    let (idx, within) = (pos / MEM_CHUNK, (pos % MEM_CHUNK) as usize);
                    let n = (MEM_CHUNK as usize - within).min(buf.len() - done);
                    let c = chunks
                        .entry(idx)
                        .or_insert_with(|| vec![0u8; MEM_CHUNK as usize].into_boxed_slice());
                    c[within..within + n].copy_from_slice(&buf[done..done + n]);
                    done += n;
                }
                Ok(())
            }
            Store::File { data, map, .. } => {
                data.write_all_at(buf, offset)?;
                // One write(2) per record on an O_APPEND file: a kill leaves at most a torn
                // last line, which read_map ignores.
                let rec = format!("w {} {}\n", offset, offset + buf.len() as u64);
                map.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(rec.as_bytes())
            }
        }
    }

    fn sync(&self) -> io::Result<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::File { data, map, .. } => {
                data.sync_data()?;
                map.lock().unwrap_or_else(|e| e.into_inner()).sync_data()
            }
        }
    }
}

/// Which overlay to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayKind {
    None,
    Memory,
    File(PathBuf),
}

/// The image plus its overlay: what every backend serves.
#[derive(Debug)]
pub struct Engine {
    image: Image,
    size: u64,
    store: Option<Store>,
    extents: RwLock<ExtentMap>,
    audit: Option<Mutex<AuditLog>>,
}

/// Refuse a file we are about to write (overlay, map, audit log) if it is the image itself or
/// lives on the image's block device.
pub fn check_not_image(image: &Image, f: &File, what: &str) -> io::Result<()> {
    let m = f.metadata()?;
    let id = image.identity();
    let same_file = m.dev() == id.dev && m.ino() == id.ino;
    let on_image_device = image.kind() == crate::image::Kind::BlockDevice && m.dev() == id.rdev;
    if same_file || on_image_device {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {} {} the image: refusing to write there",
                if same_file { "is" } else { "lives on" },
                if same_file {
                    "the same file as"
                } else {
                    "the block device of"
                }
            ),
        ));
    }
    Ok(())
}

impl Engine {
    /// Build the engine. `image_sha256` (the attach hash) ties a file overlay to its image.
    pub fn new(
        image: Image,
        overlay: &OverlayKind,
        image_sha256: &str,
        audit: Option<AuditLog>,
    ) -> io::Result<Engine> {
        let size = image.size();
        let mut extents = ExtentMap::new();
        let store = match overlay {
            OverlayKind::None => None,
            OverlayKind::Memory => Some(Store::Memory(RwLock::new(HashMap::new()))),
            OverlayKind::File(path) => {
                let (store, ext) = open_file_overlay(&image, path, image_sha256)?;
                extents = ext;
                Some(store)
            }
        };
        Ok(Engine {
            image,
            size,
            store,
            extents: RwLock::new(extents),
            audit: audit.map(Mutex::new),
        })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn writable(&self) -> bool {
        self.store.is_some()
    }

    /// A copy of the written ranges.
    pub fn extents(&self) -> ExtentMap {
        self.extents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Read `buf.len()` bytes at `offset`: overlay where written, image elsewhere, zeros past
    /// the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.image.read_at(buf, offset)?;
        if let Some(store) = &self.store {
            // The image never changes, so only the overlay part needs the lock.
            let ext = self.extents.read().unwrap_or_else(|e| e.into_inner());
            for (s, e) in ext.overlapping(offset, end) {
                let lo = (s - offset) as usize;
                let hi = (e - offset) as usize;
                store.read_at(&mut buf[lo..hi], s)?;
            }
        }
        Ok(())
    }

    /// Write to the overlay. EROFS without one, ENOSPC past the end of the image. The audit
    /// entry is written first: no overlay change exists that the log does not show.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some(store) = &self.store else {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        };
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let mut ext = self.extents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = &self.audit {
            a.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_range(offset, buf.len() as u64)?;
        }
        store.write_at(buf, offset)?;
        ext.insert(offset, end);
        Ok(())
    }

    /// Make written data and the audit log durable (a FLUSH from the kernel, or fsync).
    pub fn flush(&self) -> io::Result<()> {
        if let Some(store) = &self.store {
            let _ext = self.extents.read().unwrap_or_else(|e| e.into_inner());
            store.sync()?;
        }
        if let Some(a) = &self.audit {
            a.lock().unwrap_or_else(|e| e.into_inner()).sync()?;
        }
        Ok(())
    }

    /// The audit log, for the attach/detach entries.
    pub fn audit(&self) -> Option<std::sync::MutexGuard<'_, AuditLog>> {
        self.audit
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Clean shutdown: sync, and rewrite a file overlay's map with its merged ranges.
    pub fn close(&self) -> io::Result<()> {
        self.flush()?;
        if let Some(Store::File { path, .. }) = &self.store {
            let ext = self.extents.read().unwrap_or_else(|e| e.into_inner());
            let header = read_map(path)?.header;
            write_map(path, &header, &ext)?;
        }
        Ok(())
    }
}

fn write_map(data: &Path, header: &MapHeader, ext: &ExtentMap) -> io::Result<()> {
    let mp = map_path(data);
    let tmp = {
        let mut s = mp.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let mut text = serde_json::to_string(header).map_err(io::Error::other)?;
    text.push('\n');
    for (a, b) in ext.iter() {
        text.push_str(&format!("w {a} {b}\n"));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &mp)
}

fn open_file_overlay(image: &Image, path: &Path, sha: &str) -> io::Result<(Store, ExtentMap)> {
    let size = image.size();
    let mp = map_path(path);
    let ctx = |e: io::Error| with_context(e, &format!("overlay {}", path.display()));
    let existing = std::fs::symlink_metadata(path).ok();
    let resume = existing.is_some() && mp.exists();
    let extents = if resume {
        let m = read_map(path)?;
        if m.header.image_size != size || m.header.image_sha256 != sha {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "overlay {} belongs to another image (size {}, sha256 {})",
                    path.display(),
                    m.header.image_size,
                    m.header.image_sha256
                ),
            ));
        }
        if m.torn_tail {
            tracing::warn!("overlay map {}: ignoring a torn last record", mp.display());
        }
        tracing::info!(
            "resuming overlay {} ({} ranges, {} bytes written)",
            path.display(),
            m.extents.len(),
            m.extents.bytes()
        );
        m.extents
    } else {
        // A new overlay may replace an empty file (mktemp) but never anything with content.
        if let Some(m) = &existing
            && !(m.is_file() && m.len() == 0)
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "overlay {} exists and is not an empty file or an overlay (no {})",
                    path.display(),
                    mp.display()
                ),
            ));
        }
        ExtentMap::new()
    };
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(ctx)?;
    check_not_image(image, &data, "overlay")?;
    if !data.metadata()?.is_file() {
        return Err(ctx(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if !resume {
        data.set_len(size).map_err(ctx)?;
        let header = MapHeader {
            format: MAP_FORMAT.into(),
            version: 1,
            image_size: size,
            image_sha256: sha.into(),
        };
        write_map(path, &header, &ExtentMap::new())?;
    }
    let map = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&mp)
        .map_err(|e| with_context(e, &format!("overlay map {}", mp.display())))?;
    check_not_image(image, &map, "overlay map")?;
    Ok((
        Store::File {
            data,
            map: Mutex::new(map),
            path: path.to_owned(),
        },
        extents,
    ))
}

/// Write the merged view (image + overlay) of `image` to `out`, a new file. The image is
/// hashed on the way and must match the hash the overlay was made for.
pub fn export(image: &Image, overlay: &Path, out: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let m = read_map(overlay)?;
    if m.header.image_size != image.size() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "overlay {} is for an image of {} bytes, this one has {}",
                overlay.display(),
                m.header.image_size,
                image.size()
            ),
        ));
    }
    let data = File::open(overlay)?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(out)
        .map_err(|e| with_context(e, &format!("output {}", out.display())))?;
    let result = (|| {
        check_not_image(image, &dst, "output")?;
        let mut img_hash = Sha256::new();
        let mut out_hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < image.size() {
            let n = (image.size() - off).min(buf.len() as u64) as usize;
            let b = &mut buf[..n];
            image.read_at(b, off)?;
            img_hash.update(&*b);
            for (s, e) in m.extents.overlapping(off, off + n as u64) {
                data.read_exact_at(&mut b[(s - off) as usize..(e - off) as usize], s)?;
            }
            out_hash.update(&*b);
            dst.write_all(b)?;
            off += n as u64;
        }
        let got = hex::encode(img_hash.finalize());
        if got != m.header.image_sha256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "image sha256 {got} differs from the one the overlay was made for ({})",
                    m.header.image_sha256
                ),
            ));
        }
        dst.sync_all()?;
        Ok(hex::encode(out_hash.finalize()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}
