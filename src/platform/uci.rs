//! OpenWrt uci configuration (`/etc/config/tinyscale`): the file syntax ([`syntax`], pure and
//! shared), one schema per component (the client daemon's `config client` in [`client`], the
//! coordinator's `config server 'main'` in `server`, the relay's part of it in `derp`), and
//! what tinyscale writes into other packages' files (the uci [`batch`] format, the [`dnsmasq`]
//! forwarding entries).
#![forbid(unsafe_code)]

/// The uci package (file name under `/etc/config`) that holds tinyscale's settings.
pub const PACKAGE: &str = "tinyscale";

/// Default path of the config file; `--config` overrides it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/config/tinyscale";

pub mod batch;
pub mod client;
#[cfg(feature = "relay")]
pub mod derp;
pub mod dnsmasq;
#[cfg(feature = "coordinator")]
pub mod server;
pub mod syntax;

#[cfg(test)]
pub(crate) use syntax::uci_shaped_text;
pub use syntax::{
    format_duration, parse, parse_bool, parse_duration, quote, ConfigError, DurationError, UciFile, UciOption,
    UciSection,
};
