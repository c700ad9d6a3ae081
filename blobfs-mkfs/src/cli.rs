//! Command-line interface of `mkfs.blobfs` (also used to generate its man page).

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.blobfs",
    version,
    about = "Build a blobfs image: every regular file under PATH becomes a blob named by its \
             fs-verity digest; identical contents are stored once",
    after_help = "Exit status: 0 success, 1 failure (unreadable input, full disk, interrupted: \
                  no partial image is left), 2 usage error."
)]
pub struct Cli {
    /// Image file to create (replaced atomically when complete).
    pub image: PathBuf,
    /// Files and directories to take blobs from.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Sign the image with this ed25519 private key (PKCS#8 PEM); repeatable.
    #[arg(long = "sign", value_name = "KEY.pem")]
    pub sign: Vec<PathBuf>,
    /// Write `DIGEST SIZE PATH` for every source file to FILE.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print a JSON summary (with the manifest) on standard output.
    #[arg(long)]
    pub json: bool,
    /// Image epoch, for rollback protection (mount with -o min_epoch=N).
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Hashing threads (default: one per CPU). Does not change the output.
    #[arg(long)]
    pub threads: Option<usize>,
    /// fsync the image before renaming it into place (durable against power loss).
    #[arg(long)]
    pub fsync: bool,
    /// Follow symbolic links (default: skip them).
    #[arg(long)]
    pub follow_symlinks: bool,
    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// More log output.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}
