//! The mini-coordinator: a headscale-compatible control server (feature `coordinator`).
pub mod model;
pub mod store;
