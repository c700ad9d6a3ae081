//! Command-line interface of the `blobfs` tool (also used to generate its man page).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "blobfs",
    version,
    about = "Mount and inspect blobfs images: write-once blobs named by their fs-verity digest, \
             verified block by block on every read",
    after_help = "Exit status: 0 success, 1 failure (bad image, bad signature, I/O error), \
                  2 usage error."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount an image read-only; every block read is verified.
    Mount(MountArgs),
    /// Check header, signatures, index and every block of every blob.
    Verify(VerifyArgs),
    /// List blobs (digest and size).
    Ls(ImageArgs),
    /// Write one blob to standard output, verified.
    Cat(CatArgs),
    /// Show the header, signatures and counts.
    Inspect(ImageArgs),
    /// Generate an ed25519 key pair (PKCS#8 / SPKI PEM).
    Keygen(KeygenArgs),
    /// Write the thin form of an image: header, signatures, index and Merkle trees, no blob
    /// data (that is read from a remote: `blobfs push`, then `blobfs mount --remote`).
    Thin(ThinArgs),
    /// Upload the blobs a remote lacks, one object per blob named by digest (`xx/yyyy...`);
    /// idempotent, so an interrupted push is resumed by running it again.
    Push(PushArgs),
    /// Writable stores: each blob written exactly once, verified, indexed in RocksDB.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Create an empty store in DIR.
    Init { dir: PathBuf },
    /// Mount a store: create blobs by digest (write-once), read them verified.
    Mount(StoreMountArgs),
    /// Add files (each becomes a blob named by its digest); prints the digests.
    Put {
        dir: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List blobs (digest and size).
    Ls { dir: PathBuf },
    /// Check every blob completely and report files the index does not name.
    Verify { dir: PathBuf },
    /// Reclaim files of interrupted writes and removed blobs.
    Gc { dir: PathBuf },
    /// Fetch every blob of a thin image from its remote into the store (verified), so that a
    /// mount with `--cache STORE` can serve them offline.
    Prefetch {
        dir: PathBuf,
        /// The remote holding the blobs (as for `blobfs mount --remote`).
        #[arg(long, value_name = "URL")]
        remote: String,
        /// The thin (or full) image naming the blobs.
        thin: PathBuf,
    },
    /// Write an image of all blobs (identical to mkfs.blobfs over the same contents).
    Export {
        dir: PathBuf,
        image: PathBuf,
        /// Sign with this ed25519 private key (PKCS#8 PEM); repeatable.
        #[arg(long = "sign", value_name = "KEY.pem")]
        sign: Vec<PathBuf>,
        /// Image epoch (rollback protection).
        #[arg(long, default_value_t = 0)]
        epoch: u64,
    },
}

#[derive(Args, Debug)]
pub struct StoreMountArgs {
    /// Store directory (made by `blobfs store init`).
    pub dir: PathBuf,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Mount options: nodelete, uid=N, gid=N, allow_other, allow_root, auto_unmount,
    /// threads=N, and the usual nosuid, nodev, noexec.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay in the foreground instead of detaching once the mount is live.
    #[arg(short, long)]
    pub foreground: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image file or block device.
    pub image: PathBuf,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Require a valid signature by this public key (repeatable: any one suffices).
    #[arg(long = "key", value_name = "PUB.pem")]
    pub keys: Vec<PathBuf>,
    /// Mount options: key=PATH, layout=flat|objects, uid=N, gid=N, allow_other, allow_root,
    /// auto_unmount, min_epoch=N, threads=N, and the usual nosuid, nodev, noexec.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay in the foreground instead of detaching once the mount is live.
    #[arg(short, long)]
    pub foreground: bool,
    /// Read blob data from this remote (http(s)://, s3://BUCKET/PREFIX, file:///DIR); for
    /// thin images (same as -o remote=URL).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Keep fetched blobs in this store (made by `blobfs store init`), so later reads are
    /// local (same as -o cache=DIR).
    #[arg(long, value_name = "STORE")]
    pub cache: Option<PathBuf>,
    /// Serve only blobs the cache holds; others fail with EIO (same as -o offline).
    #[arg(long)]
    pub offline: bool,
}

#[derive(Args, Debug)]
pub struct ThinArgs {
    /// The full image.
    pub image: PathBuf,
    /// Where to write the thin image (replaced atomically).
    pub thin: PathBuf,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// A full image (its data is verified before it is uploaded).
    pub image: PathBuf,
    /// http(s)://HOST/PATH (a server accepting PUT), s3://BUCKET/PREFIX (credentials from the
    /// usual AWS_* environment), file:///DIR or a directory path.
    pub url: String,
    /// Seconds per request before it counts as failed (retried 3 times with backoff).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    pub image: PathBuf,
    /// Require a valid signature by this public key (repeatable: any one suffices).
    #[arg(long = "key", value_name = "PUB.pem")]
    pub keys: Vec<PathBuf>,
    /// Read blob data from this remote (a thin image: checks every object the remote holds).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    pub image: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    pub image: PathBuf,
    /// Blob digest (64 lowercase hex digits).
    pub digest: String,
    /// Read blob data from this remote (for thin images).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the private key (created with mode 0600, never overwritten).
    pub private: PathBuf,
    /// Where to write the public key (default: PRIVATE with `.pub` before the extension).
    #[arg(long = "public")]
    pub public: Option<PathBuf>,
}
