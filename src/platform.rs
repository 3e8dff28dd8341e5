//! OpenWrt glue: the uci configuration (the syntax, the client section and the dnsmasq batch;
//! the coordinator and relay schemas live with them), the ubus wire codec and client (`ubus`),
//! and the `tinyscale` ubus object the daemon serves (`ubus_object`).
pub mod ubus;
pub mod ubus_object;
pub mod uci;
