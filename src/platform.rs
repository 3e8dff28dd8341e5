//! Glue to the system around tinyscale: the uci configuration (`uci`: the syntax, one schema per
//! component, and what we write into dnsmasq's), the `tinyscale` ubus object the daemon serves
//! (`ubus_object`), the local API socket between the CLI and the daemon (`ipc`), TLS for every
//! TCP connection (`tls`), admission on the exposed listeners (`connlimit`), the Prometheus text
//! and `GET /metrics` listener (`metrics`), the stderr `logger` procd forwards, and the login
//! URL as a terminal QR code (`qr`).
#[cfg(feature = "relay")]
pub mod connlimit;
pub mod ipc;
pub mod logger;
pub mod metrics;
pub mod qr;
pub mod tls;
pub mod ubus_object;
pub mod uci;
