//! Control plane client: the sans-io netmap and the TS2021 connection shell.
pub mod client;
pub mod netmap;
