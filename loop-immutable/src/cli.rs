//! Command-line interface of `loop-immutable` (also used to generate its man page).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "loop-immutable",
    version,
    about = "Serve an image file or block device as a block device that never modifies it \
             (forensics): read-only, or with writes diverted to a copy-on-write overlay, and \
             every attach, write and detach recorded in a hash-chained audit log.",
    after_help = "The image is only ever opened O_RDONLY (plus O_NOATIME when permitted). Without \
                  --cow the device is read-only to the kernel; a filesystem with a dirty journal \
                  then refuses to mount, and --cow FILE or --cow-mem lets the journal replay into \
                  the overlay instead. The image's size, inode and mtime are checked again at \
                  detach and its SHA-256 recomputed; a change is reported loudly and makes \
                  detach fail.\n\n\
                  Backends: ublk (default; needs CONFIG_BLK_DEV_UBLK) gives /dev/ublkbN; fuse \
                  serves the same engine as a file on a private FUSE mount attached to a loop \
                  device (/dev/loopN), for kernels without ublk.\n\n\
                  Exit status: 0 success, 1 failure (also: the image changed), 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a block device over IMAGE and print its path; serves it as a daemon (or in the
    /// foreground with -f) until `detach`.
    Attach {
        /// Image file or block device (never written).
        image: PathBuf,
        #[command(flatten)]
        opts: AttachOpts,
        /// Stay in the foreground (logs on stderr; SIGTERM or SIGINT detaches).
        #[arg(short, long)]
        foreground: bool,
    },
    /// Stop serving a device: DEV is its path (/dev/ublkb0, /dev/loop3) or a directory it is
    /// mounted on (unmounted first). Prints whether the image stayed unchanged.
    Detach {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        target: Option<PathBuf>,
        /// Detach every device of loop-immutable.
        #[arg(long)]
        all: bool,
    },
    /// List attached devices.
    List {
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Attach IMAGE and mount the device on DIR (default options ro,nosuid,nodev,noexec).
    /// `loop-immutable detach DIR` unmounts and detaches.
    Mount {
        image: PathBuf,
        dir: PathBuf,
        #[command(flatten)]
        opts: AttachOpts,
        /// Extra mount options, appended to the defaults (e.g. -o rw with --cow).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Filesystem type (default: detected by mount(8)).
        #[arg(short = 't', value_name = "TYPE")]
        fstype: Option<String>,
    },
    /// List the ranges written to a file overlay.
    Diff {
        /// The overlay data file given to --cow (its map is OVERLAY.map).
        overlay: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the merged view (IMAGE with OVERLAY applied) to OUT, a new file.
    Export {
        image: PathBuf,
        overlay: PathBuf,
        out: PathBuf,
    },
    /// Check an audit log's hash chain and that every session's image hash matched at detach.
    VerifyAudit { log: PathBuf },
}

#[derive(Args, Debug, Clone)]
pub struct AttachOpts {
    /// Copy-on-write overlay file (created sparse, or resumed if it is an overlay of this
    /// image); its extent map is FILE.map.
    #[arg(long, value_name = "FILE", conflicts_with = "cow_mem")]
    pub cow: Option<PathBuf>,
    /// Copy-on-write overlay in memory (lost at detach).
    #[arg(long)]
    pub cow_mem: bool,
    /// Refuse to attach unless the whole image hashes to HEX.
    #[arg(long, value_name = "HEX", value_parser = parse_sha256)]
    pub expect_sha256: Option<String>,
    /// Append audit entries (JSON lines, hash-chained) to FILE.
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// Logical block size of the device.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,
    /// How the device is provided.
    #[arg(long, value_enum, default_value_t = Backend::Ublk)]
    pub backend: Backend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A ublk device (/dev/ublkbN).
    Ublk,
    /// A loop device over a file on a private FUSE mount (/dev/loopN).
    Fuse,
}

fn parse_sha256(s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err("expected 64 hexadecimal digits".into())
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("must be 512 or 4096".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn attach_defaults_and_conflicts() {
        let c = Cli::try_parse_from(["loop-immutable", "attach", "img"]).unwrap();
        let Command::Attach { opts, .. } = c.command else {
            panic!("not attach")
        };
        assert_eq!(opts.logical_block_size, 512);
        assert_eq!(opts.backend, Backend::Ublk);
        assert!(opts.cow.is_none() && !opts.cow_mem);
        for bad in [
            &["loop-immutable", "attach", "--cow", "x", "--cow-mem", "img"][..],
            &["loop-immutable", "attach", "--expect-sha256", "abc", "img"],
            &[
                "loop-immutable",
                "attach",
                "--logical-block-size",
                "2048",
                "img",
            ],
            &["loop-immutable", "detach", "/dev/ublkb0", "--all"],
            &["loop-immutable", "detach"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let c = Cli::try_parse_from([
            "loop-immutable",
            "attach",
            "--expect-sha256",
            &"AB".repeat(32),
            "i",
        ])
        .unwrap();
        let Command::Attach { opts, .. } = c.command else {
            panic!("not attach")
        };
        assert_eq!(opts.expect_sha256, Some("ab".repeat(32)));
    }
}
