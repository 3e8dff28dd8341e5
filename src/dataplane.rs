//! The data plane: the `engine` task that owns the TUN device, the UDP sockets (`magicsock`,
//! `udp`), the WireGuard tunnels (`wg`), the packet filter, MagicDNS (`dns`), the OS routes,
//! rules and nftables (planned pure in `routes`, run in `apply`), network change monitoring
//! (`netmon`), sockets kept out of the tunnel (`netns`) and the path probes (`netcheck`).
pub mod apply;
pub mod dns;
pub mod engine;
pub mod filter;
pub mod magicsock;
pub mod netcheck;
pub mod netmon;
pub mod netns;
pub mod routes;
pub mod tun;
pub mod udp;
pub mod wg;
