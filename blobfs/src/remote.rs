//! Blob data kept outside the image: an HTTP(S) server, an S3-compatible store or a local
//! directory, holding one object per blob named by its digest in the composefs object layout
//! (`xx/yyyy...`, the first two hex digits as a directory).
//!
//! The remote is untrusted like the medium of a local image: it only supplies bytes, which
//! [`crate::verify`] checks block by block against the Merkle trees kept in the (thin) image
//! before anything is returned. A remote that is down, slow or lying gives an I/O error for
//! that read, never wrong data; every request has a timeout, so no read hangs.
//!
//! The object-store client is the `object_store` crate (HTTP range requests, S3 signing and
//! credentials from the usual `AWS_*` environment). It is asynchronous; this module owns a
//! small tokio runtime and offers blocking calls to the FUSE worker threads.

use crate::image::BlobSource;
use crate::merkle::Hash;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes per request when pushing large blobs in parts.
const PART_SIZE: usize = 8 << 20;
/// Read-ahead of a sequential reader: the first request fetches what was asked; each further
/// one in sequence twice as much as the previous, up to this (a 128 KiB FUSE read stream thus
/// costs a request per 4 MiB, not per 128 KiB). Random reads fetch only their range.
const MAX_READAHEAD: u64 = 4 << 20;
/// Blobs whose last fetched chunk is kept (at most MAX_READAHEAD each).
const STREAMS: usize = 16;

/// The read position of one blob's reader, and the last chunk fetched for it (unverified
/// bytes: the caller verifies whatever it is given).
struct Stream {
    next: u64,
    window: u64,
    start: u64,
    chunk: Arc<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "remote {0}: unsupported URL (use http://, https://, s3://BUCKET/PREFIX, file:///DIR or a directory path)"
    )]
    Unsupported(String),
    #[error("remote {url}: {source}")]
    Client {
        url: String,
        source: object_store::Error,
    },
    #[error("cannot start the remote I/O runtime: {0}")]
    Runtime(io::Error),
}

/// How patient to be with a remote.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// Per request (connect included).
    pub timeout: Duration,
    /// Attempts after the first one, with exponential backoff.
    pub retries: usize,
    /// For a directory remote: create it if missing (pushing), rather than refuse (reading).
    pub create_local_dir: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            timeout: Duration::from_secs(30),
            retries: 3,
            create_local_dir: false,
        }
    }
}

/// An object store holding blobs by digest.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    streams: Mutex<HashMap<Hash, Stream>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Connect (lazily: nothing is sent yet) to `url`.
    pub fn open(url: &str, opts: RemoteOptions) -> Result<Remote, RemoteError> {
        let client_err = |source| RemoteError::Client {
            url: url.to_owned(),
            source,
        };
        let client = ClientOptions::new()
            .with_timeout(opts.timeout)
            .with_connect_timeout(opts.timeout)
            .with_allow_http(true);
        let retry = RetryConfig {
            max_retries: opts.retries,
            retry_timeout: opts.timeout * (opts.retries as u32 + 1),
            ..RetryConfig::default()
        };
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(RemoteError::Unsupported(url.to_owned()));
                }
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map_err(client_err)?;
                (Arc::new(s3), ObjectPath::from(prefix))
            } else if url.starts_with("http://") || url.starts_with("https://") {
                let http = object_store::http::HttpBuilder::new()
                    .with_url(url)
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map_err(client_err)?;
                (Arc::new(http), ObjectPath::default())
            } else if url.contains("://") && !url.starts_with("file://") {
                return Err(RemoteError::Unsupported(url.to_owned()));
            } else {
                let dir = url.strip_prefix("file://").unwrap_or(url);
                if dir.is_empty() {
                    return Err(RemoteError::Unsupported(url.to_owned()));
                }
                if opts.create_local_dir {
                    std::fs::create_dir_all(dir).map_err(|e| RemoteError::Client {
                        url: url.to_owned(),
                        source: object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        },
                    })?;
                }
                let local = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(client_err)?;
                (Arc::new(local), ObjectPath::default())
            };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-io")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        Ok(Remote {
            url: url.to_owned(),
            store,
            prefix,
            runtime,
            streams: Mutex::new(HashMap::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object name of a blob: `PREFIX/xx/yyyy...`.
    pub fn object_path(&self, digest: &Hash) -> ObjectPath {
        let hex = hex::encode(digest);
        let mut parts: Vec<_> = self.prefix.parts().collect();
        parts.push(hex[..2].into());
        parts.push(hex[2..].into());
        ObjectPath::from_iter(parts)
    }

    /// Whether the remote holds an object for `digest` of exactly `size` bytes (an object of
    /// another size is a failed or foreign upload: pushed again).
    pub fn has(&self, digest: &Hash, size: u64) -> io::Result<bool> {
        let path = self.object_path(digest);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(meta.size == size),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.io_error(&path, e)),
        }
    }

    /// Upload a blob whose bytes come from `read(offset, len)` (already verified by the
    /// caller): one request for small blobs, parts of 8 MiB for large ones.
    pub fn put(
        &self,
        digest: &Hash,
        size: u64,
        mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        let path = self.object_path(digest);
        let whole = |read: &mut dyn FnMut(u64, usize) -> io::Result<Vec<u8>>| {
            let data = read(0, size as usize)?;
            self.runtime
                .block_on(self.store.put(&path, PutPayload::from(data)))
                .map(drop)
                .map_err(|e| self.io_error(&path, e))
        };
        if size <= PART_SIZE as u64 {
            return whole(&mut read);
        }
        let upload = match self.runtime.block_on(self.store.put_multipart(&path)) {
            Ok(u) => u,
            // Plain HTTP servers take one PUT per object: the blob is sent from memory.
            Err(object_store::Error::NotImplemented) => return whole(&mut read),
            Err(e) => return Err(self.io_error(&path, e)),
        };
        self.runtime.block_on(async {
            let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut offset = 0;
            while offset < size {
                let n = PART_SIZE.min((size - offset) as usize);
                let chunk = match read(offset, n) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = writer.abort().await;
                        return Err(e);
                    }
                };
                writer.write(&chunk);
                offset += n as u64;
            }
            writer
                .finish()
                .await
                .map(drop)
                .map_err(|e| self.io_error(&path, e))
        })
    }

    fn io_error(&self, path: &ObjectPath, e: object_store::Error) -> io::Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{}: object {path}: {e}", self.url))
    }
}

impl Remote {
    /// Bytes `range` of a blob's object, checked to be exactly that long.
    fn fetch(&self, digest: &Hash, range: std::ops::Range<u64>) -> io::Result<Vec<u8>> {
        let path = self.object_path(digest);
        let want = (range.end - range.start) as usize;
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&path, range.clone()))
            .map_err(|e| self.io_error(&path, e))?;
        // A server that ignores the range, or an object of another size, must not be taken
        // for data (the Merkle check would catch it, but this names the fault).
        if bytes.len() != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: object {path}: asked for {want} bytes at {}, got {}",
                    self.url,
                    range.start,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes.to_vec())
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, Stream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlobSource for Remote {
    fn read(&self, digest: &Hash, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = size.min(offset + buf.len() as u64);
        if offset >= end {
            return Ok(());
        }
        let fill = |buf: &mut [u8], start: u64, chunk: &[u8]| {
            let from = (offset - start) as usize;
            let n = (end - offset) as usize;
            buf[..n].copy_from_slice(&chunk[from..from + n]);
        };
        // Served from the chunk fetched ahead, or how far to fetch ahead now.
        let fetch_end = {
            let mut streams = self.streams();
            match streams.get_mut(digest) {
                Some(st) if offset >= st.start && end <= st.start + st.chunk.len() as u64 => {
                    fill(buf, st.start, &st.chunk);
                    st.next = end;
                    return Ok(());
                }
                // In sequence (FUSE may deliver a stream's reads slightly out of order).
                Some(st) if offset.abs_diff(st.next) <= MAX_READAHEAD => {
                    st.window = (st.window * 2).min(MAX_READAHEAD);
                    size.min((offset + st.window).max(end))
                }
                _ => end,
            }
        };
        let chunk = Arc::new(self.fetch(digest, offset..fetch_end)?);
        fill(buf, offset, &chunk);
        let mut streams = self.streams();
        if streams.len() >= STREAMS && !streams.contains_key(digest) {
            // Forget an arbitrary stream; its reader merely starts its read-ahead over.
            if let Some(k) = streams.keys().next().copied() {
                streams.remove(&k);
            }
        }
        let st = streams.entry(*digest).or_insert(Stream {
            next: 0,
            window: 0,
            start: 0,
            chunk: Arc::new(Vec::new()),
        });
        st.window = st.window.max(fetch_end - offset);
        st.next = end;
        st.start = offset;
        st.chunk = chunk;
        Ok(())
    }
}
