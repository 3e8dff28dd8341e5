//! A small stderr writer for the `log` facade. No timestamps: procd forwards stderr to logd,
//! which adds its own; `level name: message` keeps lines short on a router console.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            use std::io::Write;
            let lvl = match r.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warn",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            // One write per line so concurrent lines do not interleave.
            let line = format!("tinyscale[{lvl}]: {}\n", r.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level`; `TINYSCALE_LOG` (error|warn|info|debug|trace) overrides it.
pub fn init(level: LevelFilter) {
    let level = std::env::var("TINYSCALE_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(level);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
