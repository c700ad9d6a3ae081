//! Developer tasks. `cargo run -p xtask -- man OUTDIR` writes the man pages of every tool,
//! generated from the same clap definitions the tools parse with.

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir] if cmd == "man" => man(Path::new(dir)),
        _ => bail!("usage: xtask man OUTDIR"),
    }
}

fn man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let pages = [
        (blobfs::cli::Cli::command(), "blobfs.1"),
        (blobfs_mkfs::cli::Cli::command(), "mkfs.blobfs.8"),
        (subdir_mount::cli::Cli::command(), "subdir-mount.8"),
        (idmap_overlay::cli::Cli::command(), "idmap-overlay.8"),
        (loop_immutable::cli::Cli::command(), "loop-immutable.8"),
    ];
    for (cmd, file) in pages {
        write_page(cmd.clone(), &dir.join(file))?;
        // One page per subcommand too, as git and cargo do (blobfs-mount.1, ...).
        for sub in cmd.get_subcommands() {
            let name = format!("{}-{}", cmd.get_name(), sub.get_name());
            let sub = sub.clone().name(name.clone());
            write_page(sub, &dir.join(format!("{name}.1")))?;
        }
    }
    Ok(())
}

fn write_page(cmd: clap::Command, path: &PathBuf) -> Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    std::fs::write(path, out).with_context(|| path.display().to_string())?;
    println!("{}", path.display());
    Ok(())
}
