//! Logging setup. Lines are plain (`LEVEL target: message`) so that journald, syslog and a
//! terminal all read them well. A daemon that detaches from its terminal switches its log output
//! to syslog (`/dev/log`, which journald serves) so nothing is written to a closed terminal.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

static DETACHED: AtomicBool = AtomicBool::new(false);
static SYSLOG: OnceLock<Mutex<Option<UnixDatagram>>> = OnceLock::new();
static IDENT: OnceLock<String> = OnceLock::new();

/// Install the global subscriber. `verbosity`: 0 = warnings and errors only, 1 = info (the
/// default of daemons), 2 = debug, 3+ = trace. `RUST_LOG` overrides it.
pub fn init(ident: &str, verbosity: u8) {
    let _ = IDENT.set(ident.to_owned());
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// From now on, send log lines to syslog instead of stderr (or drop them if there is no
/// syslog socket).
pub fn detach_to_syslog() {
    let sock = UnixDatagram::unbound()
        .ok()
        .filter(|s| s.connect("/dev/log").is_ok());
    let _ = SYSLOG.set(Mutex::new(sock));
    DETACHED.store(true, Ordering::SeqCst);
}

#[derive(Clone, Copy)]
struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineSink;
    fn make_writer(&'a self) -> LineSink {
        LineSink(Vec::new())
    }
}

/// Buffers one event and emits it whole, so concurrent threads never interleave lines.
struct LineSink(Vec<u8>);

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineSink {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        if !DETACHED.load(Ordering::SeqCst) {
            let _ = io::stderr().write_all(&self.0);
            return;
        }
        let Some(lock) = SYSLOG.get() else { return };
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sock) = guard.as_ref() {
            let text = String::from_utf8_lossy(&self.0);
            // Priority from the level word the formatter put first; facility daemon (3).
            let sev = match text.split_whitespace().next() {
                Some("ERROR") => 3,
                Some("WARN") => 4,
                Some("INFO") => 6,
                _ => 7,
            };
            let ident = IDENT.get().map(String::as_str).unwrap_or("uapi-wishes");
            let msg = format!(
                "<{}>{}[{}]: {}",
                3 * 8 + sev,
                ident,
                std::process::id(),
                text.trim_end()
            );
            let _ = sock.send(msg.as_bytes());
        }
    }
}
