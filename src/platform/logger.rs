//! A small stderr writer for the `log` facade. No timestamps: procd forwards stderr to logd,
//! which adds its own; `level name: message` keeps lines short on a router console.
//! [`LogLevel`] is the `log_level` option of the uci sections.

use std::{fmt, str::FromStr};

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

/// Log verbosity (`option log_level`), headscale's `log.level` minus `fatal`/`panic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and degradations.
    Warn,
    /// State transitions (the default).
    #[default]
    Info,
    /// Per-peer decisions (compiled out of release builds without feature `verbose`).
    Debug,
    /// Per packet (compiled out of release builds).
    Trace,
}

impl LogLevel {
    /// The uci spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The matching `log` crate filter.
    pub fn to_level_filter(&self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl FromStr for LogLevel {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
