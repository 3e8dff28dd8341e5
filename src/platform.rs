//! OpenWrt glue: the uci configuration (syntax and schemas), the ubus wire codec and client
//! (`ubus`), and the `tinyscale` ubus object the daemon serves (`ubus_object`).
pub mod ubus;
pub mod ubus_object;
pub mod uci;
