//! Wire types of the Tailscale control protocol (register, map, DERP map, DNS, packet filter).
//!
//! Mirrors tailscale `tailcfg/tailcfg.go` and `tailcfg/derpmap.go`, reduced to the fields tinyscale
//! reads or writes. Field names are Go's exact JSON names. Two compatibility rules shape this file
//! (spec §0.2, §11.2, §12):
//! - Go decodes JSON keys case-insensitively and tailscale-rs sends non-Go spellings (`HostInfo`,
//!   `PreferredDerp`), so incoming requests pass through [`fold_keys`] before serde sees them.
//! - tailscale-rs parses strictly: never emit `null` for arrays/objects (omit instead), always emit
//!   the RegisterResponse fields, and the `Addresses` of a node are exactly `[v4/32, v6/128]`.
//!
//! `Hostinfo` is carried as raw JSON: the coordinator stores and relays it, and reads only the few
//! routing fields through the accessors on [`HostinfoView`].
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::wire::keys::{DiscoPublic, MachinePublic, NodePublic};

/// Capability version we speak (Go v1.90.x, spec §0.3).
pub const CURRENT_CAPABILITY_VERSION: u32 = 130;
/// Oldest client capver the coordinator accepts (headscale `MinSupportedCapabilityVersion`).
pub const MIN_SUPPORTED_CAPABILITY_VERSION: u32 = 113;
/// Go's zero `time.Time`, which means "unset" on the wire.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// Legacy `DERP` field value prefix (Go `DerpMagicIP`).
pub const DERP_MAGIC_IP: &str = "127.3.3.40";

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

/// Go marshals a nil slice or struct pointer as `null`; read that as the empty value (serde's
/// `default` covers only a missing key).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `RegisterRequest.Auth`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegisterAuth {
    /// Pre-auth key text.
    #[serde(rename = "AuthKey", skip_serializing_if = "String::is_empty")]
    pub auth_key: String,
}

/// `POST /machine/register` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegisterRequest {
    #[serde(rename = "Version")]
    pub version: u32,
    #[serde(rename = "NodeKey")]
    pub node_key: NodePublic,
    #[serde(rename = "OldNodeKey")]
    pub old_node_key: NodePublic,
    #[serde(rename = "Auth", skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegisterAuth>,
    /// RFC 3339; zero = no preference, in the past = logout.
    #[serde(rename = "Expiry")]
    pub expiry: String,
    #[serde(rename = "Followup")]
    pub followup: String,
    #[serde(rename = "Hostinfo", skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Value>,
    #[serde(rename = "Ephemeral", skip_serializing_if = "is_false")]
    pub ephemeral: bool,
}

/// `tailcfg.User` as sent in RegisterResponse.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UserJson {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
}

/// `tailcfg.Login`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Login {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "Provider")]
    pub provider: String,
    #[serde(rename = "LoginName")]
    pub login_name: String,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
}

/// `POST /machine/register` reply. Every field is always emitted (tailscale-rs requires them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RegisterResponse {
    #[serde(rename = "User")]
    pub user: UserJson,
    #[serde(rename = "Login")]
    pub login: Login,
    #[serde(rename = "NodeKeyExpired")]
    pub node_key_expired: bool,
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    #[serde(rename = "Error")]
    pub error: String,
}

/// `POST /machine/map` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MapRequest {
    #[serde(rename = "Version")]
    pub version: u32,
    #[serde(rename = "Compress", skip_serializing_if = "String::is_empty")]
    pub compress: String,
    #[serde(rename = "KeepAlive")]
    pub keep_alive: bool,
    #[serde(rename = "NodeKey")]
    pub node_key: NodePublic,
    #[serde(rename = "DiscoKey")]
    pub disco_key: DiscoPublic,
    #[serde(rename = "Endpoints", skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(rename = "EndpointTypes", skip_serializing_if = "Vec::is_empty")]
    pub endpoint_types: Vec<i32>,
    #[serde(rename = "Hostinfo", skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Value>,
    #[serde(rename = "Stream")]
    pub stream: bool,
    #[serde(rename = "OmitPeers", skip_serializing_if = "is_false")]
    pub omit_peers: bool,
    #[serde(rename = "DebugFlags", skip_serializing_if = "Vec::is_empty")]
    pub debug_flags: Vec<String>,
}

/// A node as control describes it (self in `Node`, others in `Peers`/`PeersChanged`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "StableID")]
    pub stable_id: String,
    /// FQDN with trailing dot.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "User")]
    pub user: u64,
    #[serde(rename = "Key")]
    pub key: NodePublic,
    /// RFC 3339; [`ZERO_TIME`] = never.
    #[serde(rename = "KeyExpiry")]
    pub key_expiry: String,
    #[serde(rename = "Machine")]
    pub machine: MachinePublic,
    #[serde(rename = "DiscoKey")]
    pub disco_key: DiscoPublic,
    #[serde(rename = "Addresses")]
    pub addresses: Vec<String>,
    #[serde(rename = "AllowedIPs")]
    pub allowed_ips: Vec<String>,
    #[serde(rename = "Endpoints", skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(rename = "HomeDERP", skip_serializing_if = "is_zero_i32")]
    pub home_derp: i32,
    /// Legacy `127.3.3.40:<region>` form, still parsed by clients.
    #[serde(rename = "DERP", skip_serializing_if = "String::is_empty")]
    pub derp: String,
    #[serde(rename = "Hostinfo", skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Value>,
    #[serde(rename = "Created", skip_serializing_if = "String::is_empty")]
    pub created: String,
    #[serde(rename = "Cap", skip_serializing_if = "is_zero_u32")]
    pub cap: u32,
    #[serde(rename = "Tags", skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(rename = "PrimaryRoutes", skip_serializing_if = "Vec::is_empty")]
    pub primary_routes: Vec<String>,
    #[serde(rename = "Online", skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(rename = "LastSeen", skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(rename = "MachineAuthorized")]
    pub machine_authorized: bool,
    #[serde(rename = "CapMap", skip_serializing_if = "BTreeMap::is_empty")]
    pub cap_map: BTreeMap<String, Vec<Value>>,
    #[serde(rename = "Expired", skip_serializing_if = "is_false")]
    pub expired: bool,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// `tailcfg.PeerChange`: a patch of one peer; only present fields apply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PeerChange {
    #[serde(rename = "NodeID")]
    pub node_id: u64,
    #[serde(rename = "DERPRegion", skip_serializing_if = "Option::is_none")]
    pub derp_region: Option<i32>,
    #[serde(rename = "Endpoints", skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(rename = "Key", skip_serializing_if = "Option::is_none")]
    pub key: Option<NodePublic>,
    #[serde(rename = "DiscoKey", skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<DiscoPublic>,
    #[serde(rename = "Online", skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(rename = "LastSeen", skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(rename = "KeyExpiry", skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
}

/// `tailcfg.UserProfile`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UserProfile {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "LoginName")]
    pub login_name: String,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
}

/// `tailcfg.PortRange` (inclusive).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PortRange {
    #[serde(rename = "First")]
    pub first: u16,
    #[serde(rename = "Last")]
    pub last: u16,
}

/// `tailcfg.NetPortRange`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NetPortRange {
    /// An IP, a CIDR, an inclusive range `a-b`, or `*` (spec §9.1).
    #[serde(rename = "IP")]
    pub ip: String,
    #[serde(rename = "Ports", deserialize_with = "null_as_default")]
    pub ports: PortRange,
}

/// `tailcfg.FilterRule` (network form only; never `SrcBits`/`Bits`, spec §9.1). A `CapGrant`
/// (application capability) rule parses with empty `DstPorts`, so it grants no packets, as in Go.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FilterRule {
    #[serde(rename = "SrcIPs", deserialize_with = "null_as_default")]
    pub src_ips: Vec<String>,
    #[serde(rename = "DstPorts", deserialize_with = "null_as_default")]
    pub dst_ports: Vec<NetPortRange>,
    /// IANA protocol numbers; empty = TCP, UDP, ICMPv4, ICMPv6. Go's `int`: values outside
    /// 0-255 are ignored, not a parse error.
    #[serde(
        rename = "IPProto",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub ip_proto: Vec<i64>,
    /// Application capabilities the sources get (policy grants with `app`): `tailcfg.CapGrant`
    /// objects, `{"Dsts": [prefix…], "CapMap": {name: [value…]}}`, kept as sent JSON (no typed
    /// decoder on the router; a malformed grant then grants nothing instead of failing the
    /// MapResponse).
    #[serde(
        rename = "CapGrant",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub cap_grant: Vec<Value>,
}

impl FilterRule {
    /// `tailcfg.FilterAllowAll`: every source to every destination port.
    pub fn allow_all() -> Vec<FilterRule> {
        vec![FilterRule {
            src_ips: vec!["*".into()],
            dst_ports: vec![NetPortRange {
                ip: "*".into(),
                ports: PortRange { first: 0, last: 65535 },
            }],
            ..Default::default()
        }]
    }
}

/// `dnstype.Resolver`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Resolver {
    #[serde(rename = "Addr")]
    pub addr: String,
}

/// `tailcfg.DNSConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DnsConfig {
    #[serde(rename = "Resolvers", skip_serializing_if = "Vec::is_empty")]
    pub resolvers: Vec<Resolver>,
    /// Split DNS; an empty list means "MagicDNS only" (send `[]`, never `null`).
    #[serde(rename = "Routes", skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Vec<Resolver>>,
    #[serde(rename = "Domains", skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// True enables MagicDNS.
    #[serde(rename = "Proxied", skip_serializing_if = "is_false")]
    pub proxied: bool,
    /// Static A/AAAA records MagicDNS serves besides the nodes' names.
    #[serde(
        rename = "ExtraRecords",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "dns_records"
    )]
    pub extra_records: Vec<DnsRecord>,
    /// Resolvers for the control server's own name when nothing else answers (Go's
    /// `FallbackResolvers`; shown by `dns status --all`).
    #[serde(
        rename = "FallbackResolvers",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub fallback_resolvers: Vec<Resolver>,
    /// Legacy resolver addresses (`Nameservers`).
    #[serde(
        rename = "Nameservers",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub nameservers: Vec<String>,
    /// Names control helps provision TLS certificates for (`CertDomains`).
    #[serde(
        rename = "CertDomains",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub cert_domains: Vec<String>,
    /// Suffixes an exit node's DNS proxy does not answer (`ExitNodeFilteredSet`).
    #[serde(
        rename = "ExitNodeFilteredSet",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub exit_node_filtered_set: Vec<String>,
}

/// `ExtraRecords` read through [`Value`], whose parser every build has anyway: a derived
/// `Vec<DnsRecord>` parser costs about 3 KB on the router. Entries that are not objects and
/// fields that are not strings read as empty (and are then skipped by the resolver).
fn dns_records<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DnsRecord>, D::Error> {
    let v = Value::deserialize(d)?;
    let field = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|r| DnsRecord {
            name: field(r, "Name"),
            r#type: field(r, "Type"),
            value: field(r, "Value"),
        })
        .collect())
}

/// `tailcfg.DNSRecord`: one extra MagicDNS record. An empty `Type` means A or AAAA, as the
/// value's family says; other types are ignored (Go does the same). Parsed by [`dns_records`].
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DnsRecord {
    /// FQDN, the trailing dot optional.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type", skip_serializing_if = "String::is_empty")]
    pub r#type: String,
    /// The IP address as text.
    #[serde(rename = "Value")]
    pub value: String,
}

/// `tailcfg.DERPNode`. Name, RegionID and HostName are always emitted (rs requires them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DerpNode {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    #[serde(rename = "HostName")]
    pub host_name: String,
    #[serde(rename = "CertName", skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    #[serde(rename = "IPv4", skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(rename = "IPv6", skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// 0 = 3478, -1 = none.
    #[serde(rename = "STUNPort", skip_serializing_if = "is_zero_i32")]
    pub stun_port: i32,
    #[serde(rename = "STUNOnly", skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// 0 = 443.
    #[serde(rename = "DERPPort", skip_serializing_if = "is_zero_i32")]
    pub derp_port: i32,
    #[serde(rename = "InsecureForTests", skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    #[serde(rename = "CanPort80", skip_serializing_if = "is_false")]
    pub can_port80: bool,
}

/// `tailcfg.DERPRegion`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DerpRegion {
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    #[serde(rename = "RegionName")]
    pub region_name: String,
    #[serde(rename = "NoMeasureNoHome", skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPMap`; region keys are decimal region IDs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DerpMap {
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<String, DerpRegion>,
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    pub omit_default_regions: bool,
}

/// One message of the map stream. Omitted fields mean "unchanged".
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MapResponse {
    #[serde(rename = "KeepAlive", skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    #[serde(rename = "Node", skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    #[serde(rename = "DERPMap", skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<DerpMap>,
    /// Full replacement when non-empty.
    #[serde(rename = "Peers", skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Node>>,
    #[serde(rename = "PeersChanged", skip_serializing_if = "Option::is_none")]
    pub peers_changed: Option<Vec<Node>>,
    #[serde(rename = "PeersRemoved", skip_serializing_if = "Option::is_none")]
    pub peers_removed: Option<Vec<u64>>,
    #[serde(rename = "PeersChangedPatch", skip_serializing_if = "Option::is_none")]
    pub peers_changed_patch: Option<Vec<PeerChange>>,
    #[serde(rename = "OnlineChange", skip_serializing_if = "Option::is_none")]
    pub online_change: Option<BTreeMap<String, bool>>,
    #[serde(rename = "DNSConfig", skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DnsConfig>,
    #[serde(rename = "Domain", skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The legacy single filter (independent control servers still send it): replaces the
    /// chunk named `"base"`. `null` or omitted = unchanged; `[]` = deny all.
    #[serde(rename = "PacketFilter", skip_serializing_if = "Option::is_none")]
    pub packet_filter: Option<Vec<FilterRule>>,
    /// Named filter chunks (capver 81): a value replaces its chunk, `null` deletes it, and
    /// `"*": null` clears every chunk first. The filter is the chunks concatenated by name.
    #[serde(rename = "PacketFilters", skip_serializing_if = "Option::is_none")]
    pub packet_filters: Option<BTreeMap<String, Option<Vec<FilterRule>>>>,
    #[serde(rename = "UserProfiles", skip_serializing_if = "Option::is_none")]
    pub user_profiles: Option<Vec<UserProfile>>,
    #[serde(rename = "CollectServices", skip_serializing_if = "Option::is_none")]
    pub collect_services: Option<bool>,
    #[serde(rename = "ControlTime", skip_serializing_if = "Option::is_none")]
    pub control_time: Option<String>,
}

/// `GET /key` reply (`tailcfg.OverTLSPublicKeyResponse`); both fields always present.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OverTlsPublicKeyResponse {
    #[serde(rename = "legacyPublicKey")]
    pub legacy_public_key: MachinePublic,
    #[serde(rename = "publicKey")]
    pub public_key: MachinePublic,
}

/// Go field names that clients may spell differently (tailscale-rs: `HostInfo`, `Os`,
/// `PreferredDerp`, `RoutableIps` ...). Keys matching one of these case-insensitively are renamed
/// to the Go spelling; any other key is left alone (map keys such as `"1-v4"` or user data).
const GO_KEYS: &[&str] = &[
    "Version",
    "NodeKey",
    "OldNodeKey",
    "NLKey",
    "Auth",
    "AuthKey",
    "Expiry",
    "Followup",
    "Hostinfo",
    "Ephemeral",
    "Compress",
    "KeepAlive",
    "DiscoKey",
    "Endpoints",
    "EndpointTypes",
    "Stream",
    "OmitPeers",
    "DebugFlags",
    "ReadOnly",
    "IPNVersion",
    "BackendLogID",
    "OS",
    "OSVersion",
    "Hostname",
    // DERPNode (DERP map files); only exact spellings are kept, see `fold_keys`.
    "HostName",
    "RoutableIPs",
    "RequestTags",
    "NetInfo",
    "PreferredDERP",
    "DERPLatency",
    "ShieldsUp",
    "Services",
    "App",
    "Package",
    "GoArch",
    "ExitNodeID",
    "Userspace",
    "MapSessionHandle",
    "MapSessionSeq",
    "TKAHead",
];

/// Renames object keys to Go's spelling, recursively, so serde (which is case-sensitive) sees
/// what Go's `encoding/json` would accept.
pub fn fold_keys(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                // A spelling Go uses somewhere stays as it is: `Hostname` (Hostinfo) and
                // `HostName` (DERPNode) are both right, each in its own struct.
                if GO_KEYS.contains(&k.as_str()) {
                    continue;
                }
                if let Some(canon) = GO_KEYS.iter().find(|c| c.eq_ignore_ascii_case(&k)) {
                    if *canon != k && !map.contains_key(*canon) {
                        if let Some(val) = map.remove(&k) {
                            map.insert((*canon).to_string(), val);
                        }
                    }
                }
            }
            for val in map.values_mut() {
                fold_keys(val);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(fold_keys),
        _ => {}
    }
}

/// Parses a request body the way a Go server would: keys case-insensitive, unknown keys ignored.
pub fn from_slice_folded<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let mut v: Value = serde_json::from_slice(body)?;
    fold_keys(&mut v);
    serde_json::from_value(v)
}

/// Read-only accessors for the routing-relevant parts of a (folded) Hostinfo.
pub struct HostinfoView<'a>(pub &'a Value);

impl HostinfoView<'_> {
    fn str_list(&self, key: &str) -> Vec<String> {
        self.0
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
    /// `Hostname`.
    pub fn hostname(&self) -> &str {
        self.0.get("Hostname").and_then(Value::as_str).unwrap_or("")
    }
    /// `OS`.
    pub fn os(&self) -> &str {
        self.0.get("OS").and_then(Value::as_str).unwrap_or("")
    }
    /// `RoutableIPs`: advertised subnet and exit routes.
    pub fn routable_ips(&self) -> Vec<String> {
        self.str_list("RoutableIPs")
    }
    /// `RequestTags`.
    pub fn request_tags(&self) -> Vec<String> {
        self.str_list("RequestTags")
    }
    /// `NetInfo.PreferredDERP` (home region), 0 if unknown.
    pub fn preferred_derp(&self) -> i32 {
        self.0
            .get("NetInfo")
            .and_then(|n| n.get("PreferredDERP"))
            .and_then(Value::as_i64)
            .and_then(|x| i32::try_from(x).ok())
            .unwrap_or(0)
    }
}

/// True for `a.b.c.d/n` (n ≤ 32) or `v6/n` (n ≤ 128): the prefix syntax of routes on the wire
/// (host bits allowed, as in [`crate::wire::prefix::Prefix`]'s `FromStr`).
pub fn is_valid_cidr(s: &str) -> bool {
    s.contains('/') && s.parse::<crate::wire::prefix::Prefix>().is_ok()
}

/// Seconds since the Unix epoch → RFC 3339 UTC (`2026-11-25T16:00:00Z`).
pub fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `None` → [`ZERO_TIME`], else [`format_time`].
pub fn format_opt_time(t: Option<i64>) -> String {
    t.map_or_else(|| ZERO_TIME.to_string(), format_time)
}

/// Parses RFC 3339 (`Z` or `±hh:mm`, optional fraction, truncated to seconds).
/// Go's zero time (year 1) and an empty string yield `Ok(None)`.
pub fn parse_time(s: &str) -> Result<Option<i64>, TimeError> {
    if s.is_empty() {
        return Ok(None);
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(TimeError);
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, TimeError> {
        s.get(r).and_then(|x| x.parse::<i64>().ok()).ok_or(TimeError)
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(TimeError);
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(TimeError);
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return Err(TimeError),
    };
    if y == 1 && mo == 1 && d == 1 && h == 0 && mi == 0 && se == 0 {
        return Ok(None);
    }
    Ok(Some(
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset,
    ))
}

/// An RFC 3339 timestamp failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 time")]
pub struct TimeError;

// Howard Hinnant's civil-date algorithms (public domain), proleptic Gregorian.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dns_config_extra_records() {
        let d: DnsConfig = serde_json::from_str(
            r#"{"Proxied":true,"ExtraRecords":[{"Name":"a.ts.example.","Type":"A","Value":"100.64.0.9"},
                {"Name":"b.ts.example","Value":"fd7a:115c:a1e0::9"},{"Name":7},"junk"]}"#,
        )
        .unwrap();
        let r = |n: &str, t: &str, v: &str| DnsRecord {
            name: n.into(),
            r#type: t.into(),
            value: v.into(),
        };
        assert_eq!(
            d.extra_records,
            vec![
                r("a.ts.example.", "A", "100.64.0.9"),
                r("b.ts.example", "", "fd7a:115c:a1e0::9"),
                r("", "", ""),
                r("", "", "")
            ]
        );
        let d: DnsConfig = serde_json::from_str(r#"{"ExtraRecords":null}"#).unwrap();
        assert!(d.extra_records.is_empty());
        let d: DnsConfig = serde_json::from_str(r#"{"Proxied":true}"#).unwrap();
        assert!(d.proxied && d.extra_records.is_empty());
    }

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn go_sample_register_request_parses() {
        let body = br#"{"Version":130,"NodeKey":"nodekey:ec14b42c12eb829162d2d577e12ef6139fcd3da50a53369dd0dacf533ab1397e",
          "OldNodeKey":"nodekey:0000000000000000000000000000000000000000000000000000000000000000",
          "NLKey":"nlpub:f7e0","Auth":{"AuthKey":"tskey-auth-x"},"Expiry":"0001-01-01T00:00:00Z",
          "Followup":"","Hostinfo":{"Hostname":"caddytest-server","OS":"linux"},"Ephemeral":true,"NodeKeySignature":null}"#;
        let r: RegisterRequest = from_slice_folded(body).unwrap();
        assert_eq!(r.version, 130);
        assert!(r.old_node_key.is_zero());
        assert_eq!(r.auth.unwrap().auth_key, "tskey-auth-x");
        assert!(r.ephemeral);
        assert_eq!(parse_time(&r.expiry), Ok(None));
        assert_eq!(
            HostinfoView(r.hostinfo.as_ref().unwrap()).hostname(),
            "caddytest-server"
        );
    }

    #[test]
    fn rs_spellings_fold_to_go_names() {
        let body = br#"{"version":130,"HostInfo":{"Hostname":"rs","Os":"linux","RoutableIps":["10.0.0.0/24"],
          "NetInfo":{"PreferredDerp":999,"DerpLatency":{"999-v4":0.01}}},"stream":true}"#;
        let r: MapRequest = from_slice_folded(body).unwrap();
        assert!(r.stream);
        let hi = r.hostinfo.unwrap();
        let v = HostinfoView(&hi);
        assert_eq!(v.os(), "linux");
        assert_eq!(v.preferred_derp(), 999);
        assert_eq!(v.routable_ips(), vec!["10.0.0.0/24".to_string()]);
        // Map keys that are data stay as they were.
        assert!(hi["NetInfo"]["DERPLatency"].get("999-v4").is_some());
    }

    #[test]
    fn both_go_spellings_of_host_name_survive_folding() {
        // DERPNode.HostName and Hostinfo.Hostname differ only in case; each keeps its own.
        let body = br#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"Name":"1a","HostName":"derp1.example.com"}]}}}"#;
        let m: DerpMap = from_slice_folded(body).unwrap();
        assert_eq!(m.regions["1"].nodes[0].host_name, "derp1.example.com");
        let mut v: Value = serde_json::from_str(r#"{"Hostinfo":{"Hostname":"a","hostname":"b"}}"#).unwrap();
        fold_keys(&mut v);
        assert_eq!(v["Hostinfo"]["Hostname"], "a");
    }

    #[test]
    fn register_response_always_has_all_fields() {
        let s = serde_json::to_string(&RegisterResponse::default()).unwrap();
        for f in [
            "\"User\":{\"ID\":0",
            "\"Login\":",
            "\"Provider\":\"\"",
            "\"LoginName\":\"\"",
            "\"NodeKeyExpired\":false",
            "\"MachineAuthorized\":false",
            "\"AuthURL\":\"\"",
            "\"Error\":\"\"",
        ] {
            assert!(s.contains(f), "{f} missing in {s}");
        }
    }

    #[test]
    fn derp_node_host_name_survives_key_folding() {
        // A DERP map file as headscale and our coordinator read it: `HostName` must not be
        // folded into Hostinfo's `Hostname`, or nodes without IPv4/IPv6 have nothing to dial.
        let m: DerpMap = from_slice_folded(
            br#"{"Regions":{"999":{"RegionID":999,"Nodes":[{"Name":"999a","RegionID":999,
                "HostName":"derp.example","DERPPort":3340}]}}}"#,
        )
        .unwrap();
        assert_eq!(m.regions["999"].nodes[0].host_name, "derp.example");
        // Other spellings of Hostinfo's field still fold to Go's.
        let mut v = serde_json::json!({"Hostinfo": {"hostname": "rs"}});
        fold_keys(&mut v);
        assert_eq!(HostinfoView(&v["Hostinfo"]).hostname(), "rs");
    }

    #[test]
    fn map_response_omits_nulls() {
        let s = serde_json::to_string(&MapResponse {
            keep_alive: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s, r#"{"KeepAlive":true}"#);
        let n = serde_json::to_string(&Node::default()).unwrap();
        assert!(!n.contains("null"), "{n}");
    }

    #[test]
    fn time_vectors() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_795_564_800), "2026-11-25T00:00:00Z");
        assert_eq!(parse_time("2026-11-25T00:00:00Z"), Ok(Some(1_795_564_800)));
        assert_eq!(parse_time("2026-11-25T01:30:00.123456+01:30"), Ok(Some(1_795_564_800)));
        assert_eq!(parse_time("1970-01-01T00:02:03Z"), Ok(Some(123)));
        assert_eq!(parse_time(ZERO_TIME), Ok(None));
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert!(parse_time("yesterday").is_err());
    }

    proptest! {
        #[test]
        fn time_roundtrip(t in -62_135_596_799i64..253_402_300_799i64) {
            prop_assert_eq!(parse_time(&format_time(t)), Ok(Some(t)));
        }

        #[test]
        fn arbitrary_json_never_panics(s in ".{0,200}") {
            let _ = from_slice_folded::<MapRequest>(s.as_bytes());
            let _ = from_slice_folded::<RegisterRequest>(s.as_bytes());
            let _ = parse_time(&s);
        }
    }
}
