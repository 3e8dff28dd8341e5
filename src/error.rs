//! Process exit codes (STYLE §5): 1 runtime failure, 2 usage error, 3 invalid config.

/// A runtime failure (network, daemon, coordinator refused).
pub const EXIT_RUNTIME: u8 = 1;
/// Bad command-line usage.
pub const EXIT_USAGE: u8 = 2;
/// The config file is invalid.
pub const EXIT_CONFIG: u8 = 3;

/// A top-level failure with its exit code and a message for the user.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}

impl Failure {
    /// Runtime failure.
    pub fn runtime(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }
    /// Usage failure.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    /// Config failure.
    pub fn config(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::runtime(s)
    }
}
