//! Go-style command lines for argh: the flag forms people copy from tailscale and headscale
//! guides, rewritten into the one form argh parses before argh sees them.
//!
//! Go's `flag` package (tailscale) and cobra/pflag (headscale) accept, for every flag:
//!
//! ```text
//!   --name=value   --name value   -name=value   -name value     ("--name=" gives an empty value)
//!   --name   --name=true|false     (also 1 0 t f T F TRUE FALSE True False)   boolean flags
//!   -n value   -n=value   -nvalue                                one-letter names (pflag)
//! ```
//!
//! argh takes `--name value` and bare switches only, and has no way to say "false". [`normalize`]
//! walks the verb tree ([`TREE`]: flag kinds, headscale's command and flag aliases) and emits:
//! `--name value` for value flags, `--name true|false` for tri-state booleans (argh
//! `Option<bool>`, so that `--accept-dns=false` reaches the prefs), and a bare `--name` for
//! switches only when true. As in Go, a flag given twice keeps its last value. A flag of an
//! enclosing verb (headscale's global `-c/--config`) may appear after its subcommands and moves
//! back to that verb. `--` ends flag parsing; positional arguments pass through untouched.
//!
//! The caller supplies argv without the program name; [`multi_call`] gives the verbs that the
//! program name (`headscale`, `tailscale`, `tailscaled`) stands for.
//!
//! [`TREE`] must describe the argh structs in `cli.rs`: a test compares the two through argh's
//! metadata and parser, so neither can change alone.
#![forbid(unsafe_code)]

/// How a flag takes its value (and so how argh wants it written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// argh `switch` (a plain `bool`): true emits `--name`, false emits nothing.
    Switch,
    /// argh `Option<bool>` option: emits `--name true|false`, so "false" reaches the caller.
    Bool,
    /// argh option with one value; the last one given wins (Go).
    Value,
    /// argh `Vec` option: every value is kept (pflag's string slices).
    Repeat,
}

/// One flag of a verb.
#[derive(Debug)]
pub struct Flag {
    /// argh's long name, without dashes.
    pub long: &'static str,
    /// argh's one-letter short name.
    pub short: Option<char>,
    /// How it takes its value.
    pub kind: Kind,
    /// Other names for it (tailscale's and headscale's other spellings); one letter = short.
    pub aliases: &'static [&'static str],
}

impl Flag {
    const fn new(long: &'static str, kind: Kind) -> Flag {
        Flag {
            long,
            short: None,
            kind,
            aliases: &[],
        }
    }

    const fn short(mut self, c: char) -> Flag {
        self.short = Some(c);
        self
    }

    const fn aliases(mut self, a: &'static [&'static str]) -> Flag {
        self.aliases = a;
        self
    }

    /// Whether `name` (without dashes) names this flag. Go does not tell `-x` from `--x`, so a
    /// one-letter name matches the short form either way.
    fn is_named(&self, name: &str) -> bool {
        let mut buf = [0u8; 4];
        self.long == name || self.aliases.contains(&name) || self.short.is_some_and(|c| c.encode_utf8(&mut buf) == name)
    }

    fn takes_value(&self) -> bool {
        matches!(self.kind, Kind::Value | Kind::Repeat)
    }
}

/// A verb (command) with its flags and subcommands.
#[derive(Debug)]
pub struct Verb {
    /// argh's subcommand name ("" for the top level).
    pub name: &'static str,
    /// Other names for it (headscale's cobra aliases).
    pub aliases: &'static [&'static str],
    /// Its own flags.
    pub flags: &'static [Flag],
    /// Its subcommands.
    pub subs: &'static [Verb],
}

impl Verb {
    const fn new(name: &'static str, flags: &'static [Flag]) -> Verb {
        Verb {
            name,
            aliases: &[],
            flags,
            subs: &[],
        }
    }

    const fn aliases(mut self, a: &'static [&'static str]) -> Verb {
        self.aliases = a;
        self
    }

    const fn subs(mut self, s: &'static [Verb]) -> Verb {
        self.subs = s;
        self
    }

    fn sub(&'static self, name: &str) -> Option<&'static Verb> {
        self.subs.iter().find(|v| v.name == name || v.aliases.contains(&name))
    }
}

// ---- the verb tree (mirrors the argh structs in cli.rs) ----

use Kind::{Bool, Repeat, Switch, Value};

const SOCKET: Flag = Flag::new("socket", Value);
const OUTPUT: Flag = Flag::new("output", Value).short('o');
/// headscale called users "namespaces" until 0.19 (`-n/--namespace`).
const USER: Flag = Flag::new("user", Value).short('u').aliases(&["namespace", "n"]);
const ID: Flag = Flag::new("identifier", Value).short('i');
/// headscale's `list` aliases.
const LS: &[&str] = &["ls", "show"];

/// The prefs `up` and `set` both take (as in tailscale), then the verb's own flags.
macro_rules! pref_flags {
    ($($own:expr),* $(,)?) => {
        &[
            Flag::new("hostname", Value),
            Flag::new("advertise-routes", Value),
            Flag::new("advertise-lan", Value),
            Flag::new("accept-routes", Bool),
            Flag::new("accept-dns", Bool),
            Flag::new("advertise-exit-node", Bool),
            Flag::new("exit-node", Value),
            Flag::new("exit-node-allow-lan-access", Bool),
            Flag::new("advertise-tags", Value),
            Flag::new("shields-up", Bool),
            Flag::new("snat-subnet-routes", Bool),
            $($own),*
        ]
    };
}

/// The whole command line: `tinyscale <verb> …`.
pub static TREE: Verb = Verb::new("", &[]).subs(&[
    Verb::new(
        "up",
        pref_flags![
            Flag::new("login-server", Value),
            // tailscale renamed --authkey to --auth-key; both are in guides.
            Flag::new("auth-key", Value).aliases(&["authkey"]),
            Flag::new("force-reauth", Switch),
            Flag::new("reset", Switch),
            Flag::new("timeout", Value),
            Flag::new("qr", Switch),
            SOCKET,
            Flag::new("config", Value),
        ],
    ),
    Verb::new("set", pref_flags![SOCKET]),
    Verb::new("down", &[SOCKET]),
    Verb::new("logout", &[SOCKET]),
    Verb::new("status", &[Flag::new("json", Switch), SOCKET]),
    Verb::new(
        "ip",
        &[
            Flag::new("v4", Switch).short('4'),
            Flag::new("v6", Switch).short('6'),
            SOCKET,
        ],
    ),
    Verb::new(
        "ping",
        &[
            Flag::new("count", Value).short('c'),
            Flag::new("until-count", Switch),
            Flag::new("until-direct", Bool),
            SOCKET,
        ],
    ),
    Verb::new("netcheck", &[Flag::new("json", Switch), SOCKET]),
    Verb::new("whois", &[Flag::new("json", Switch), SOCKET]),
    Verb::new("dns", &[]).subs(&[
        Verb::new("status", &[Flag::new("json", Switch), SOCKET]),
        Verb::new("query", &[Flag::new("json", Switch), SOCKET]),
    ]),
    Verb::new("metrics", &[SOCKET]).subs(&[Verb::new("print", &[])]),
    Verb::new("debug", &[]).subs(&[
        Verb::new("filter", &[SOCKET]),
        Verb::new(
            "dns-uci",
            &[SOCKET, Flag::new("remove", Switch), Flag::new("dhcp", Value)],
        ),
    ]),
    Verb::new("exit-node", &[]).subs(&[Verb::new("list", &[SOCKET]).aliases(&["ls"])]),
    Verb::new("version", &[]),
    Verb::new(
        "daemon",
        &[
            // tailscaled spells it --statedir.
            Flag::new("state-dir", Value).aliases(&["statedir"]),
            SOCKET,
            Flag::new("tun", Value),
            Flag::new("port", Value),
            Flag::new("config", Value),
            Flag::new("ubus-socket", Value),
        ],
    ),
    Verb::new(
        "server",
        &[
            Flag::new("config", Value).short('c'),
            #[cfg(feature = "coordinator")]
            Flag::new("remote", Value),
            #[cfg(feature = "coordinator")]
            Flag::new("api-key", Value),
        ],
    )
    .subs(&[
        Verb::new(
            "serve",
            &[
                Flag::new("ubus-socket", Value),
                Flag::new("magic-dns", Bool),
                Flag::new("base-domain", Value),
                Flag::new("nameserver", Repeat),
                Flag::new("split-dns", Repeat),
                Flag::new("extra-records", Repeat),
            ],
        ),
        Verb::new("users", &[])
            .aliases(&["user", "namespace", "namespaces", "ns"])
            .subs(&[
                Verb::new("create", &[OUTPUT]).aliases(&["c", "new"]),
                Verb::new("list", &[OUTPUT]).aliases(LS),
                Verb::new(
                    "rename",
                    &[Flag::new("name", Value), Flag::new("new-name", Value), OUTPUT],
                )
                .aliases(&["mv"]),
                Verb::new("destroy", &[Flag::new("name", Value), Flag::new("force", Switch)]).aliases(&["delete"]),
            ]),
        Verb::new("preauthkeys", &[])
            .aliases(&["preauthkey", "authkey", "pre"])
            .subs(&[
                Verb::new(
                    "create",
                    &[
                        USER,
                        Flag::new("reusable", Switch),
                        Flag::new("ephemeral", Switch),
                        Flag::new("expiration", Value).short('e'),
                        Flag::new("tags", Value),
                        OUTPUT,
                    ],
                )
                .aliases(&["c", "new"]),
                Verb::new("list", &[USER, OUTPUT]).aliases(LS),
                Verb::new("expire", &[USER]).aliases(&["revoke", "exp", "e"]),
            ]),
        Verb::new("nodes", &[])
            .aliases(&["node", "machine", "machines"])
            .subs(&[
                Verb::new("register", &[USER, Flag::new("key", Value).short('k'), OUTPUT]),
                Verb::new("list", &[USER, OUTPUT]).aliases(LS),
                Verb::new("delete", &[ID, Flag::new("force", Switch)]).aliases(&["del"]),
                Verb::new("expire", &[ID]).aliases(&["logout", "exp", "e"]),
                Verb::new("rename", &[ID]),
                Verb::new("move", &[ID, USER]).aliases(&["mv"]),
                Verb::new("approve-routes", &[ID, Flag::new("routes", Value).short('r')]),
            ]),
        Verb::new("routes", &[]).aliases(&["route", "r"]).subs(&[
            Verb::new("list", &[ID, OUTPUT]).aliases(LS),
            Verb::new(
                "enable",
                &[
                    ID,
                    Flag::new("route", Repeat).short('r'),
                    Flag::new("all", Switch).short('a'),
                ],
            ),
        ]),
        Verb::new("policy", &[]).subs(&[
            Verb::new("get", &[]),
            Verb::new("set", &[Flag::new("file", Value).short('f')]),
            Verb::new("check", &[Flag::new("file", Value).short('f')]),
            Verb::new("clear", &[]),
        ]),
        #[cfg(feature = "coordinator")]
        Verb::new("apikeys", &[]).aliases(&["apikey", "api"]).subs(&[
            Verb::new("create", &[Flag::new("expiration", Value).short('e'), OUTPUT]).aliases(&["c", "new"]),
            Verb::new("list", &[OUTPUT]).aliases(LS),
            Verb::new("expire", &[Flag::new("prefix", Value).short('p')]).aliases(&["revoke", "exp", "e"]),
            Verb::new("delete", &[Flag::new("prefix", Value).short('p')]).aliases(&["del"]),
        ]),
    ]),
    Verb::new("stun", &[Flag::new("listen", Value)]),
    Verb::new(
        "derp",
        &[
            Flag::new("listen", Value),
            Flag::new("stun", Value),
            Flag::new("tls-cert", Value),
            Flag::new("tls-key", Value),
            Flag::new("max-connections", Value),
            Flag::new("max-connections-per-ip", Value),
        ],
    ),
]);

// ---- the rewrite ----

/// The verbs a program name stands for (argv[0]'s base name, for symlinks): `headscale` is
/// `tinyscale server`, `tailscaled` is `tinyscale daemon`, `tailscale` (and anything else) the
/// client command line itself.
pub fn multi_call(argv0: &str) -> &'static [&'static str] {
    match argv0.rsplit('/').next().unwrap_or("") {
        "headscale" => &["server"],
        "tailscaled" => &["daemon"],
        _ => &[],
    }
}

/// A command line argh can parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The arguments for argh (no program name).
    pub args: Vec<String>,
    /// The verbs named, e.g. `["server", "nodes", "list"]`, for "see --help" hints.
    pub path: Vec<&'static str>,
}

/// What is wrong with a command line; each names the flag as the user wrote it or as
/// `--help` shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// No flag of that name on this verb (nor on the verbs around it).
    #[error("unknown flag {0}")]
    UnknownFlag(String),
    /// A value flag at the end of the command line.
    #[error("flag --{0} needs a value: --{0}=VALUE or --{0} VALUE")]
    MissingValue(&'static str),
    /// A boolean flag with something other than Go's true/false spellings.
    #[error("invalid boolean value {value:?} for --{flag}: write --{flag}, --{flag}=true or --{flag}=false")]
    BadBool {
        /// The flag's long name.
        flag: &'static str,
        /// What was given.
        value: String,
    },
    /// `---x`, `-=x` and the like (Go's "bad flag syntax").
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
}

/// A rejected command line: the error and the verbs named before it (for the usage hint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The verbs named before the error.
    pub path: Vec<&'static str>,
    /// What is wrong.
    pub error: ArgvError,
}

/// Go's `strconv.ParseBool`, which `flag` uses for boolean flags.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A flag's value as argh will get it.
#[derive(Debug)]
enum Val {
    /// A switch, on or off.
    On(bool),
    /// A value (for [`Kind::Bool`], "true" or "false").
    Text(String),
}

/// One thing given to a verb, in command-line order.
#[derive(Debug)]
enum Item {
    Flag(&'static Flag, Val),
    Arg(String),
}

/// One verb on the command line and what was given to it.
struct Level {
    verb: &'static Verb,
    items: Vec<Item>,
}

/// Rewrites `args` (argv without the program name) for argh, following [`TREE`].
pub fn normalize(args: &[String]) -> Result<Normalized, Rejected> {
    // `tailscale --version` and `tailscaled --version` (and OpenWrt's package CI, which runs
    // `<binary> --version`) mean the `version` verb.
    if let [rest @ .., last] = args {
        let only_verbs = rest.is_empty() || rest == ["daemon"] || rest == ["server"];
        if only_verbs && (last == "--version" || last == "-version") {
            return Ok(Normalized {
                args: vec!["version".into()],
                path: vec!["version"],
            });
        }
    }
    let mut levels = vec![Level {
        verb: &TREE,
        items: Vec::new(),
    }];
    let mut it = args.iter().peekable();
    let mut ended = false;
    let path = |levels: &[Level]| levels.iter().skip(1).map(|l| l.verb.name).collect::<Vec<_>>();
    while let Some(arg) = it.next() {
        let deepest = levels.len() - 1;
        if ended || arg == "-" || !arg.starts_with('-') {
            // A positional argument, or the next verb.
            let sub = if ended { None } else { levels[deepest].verb.sub(arg) };
            match sub {
                Some(verb) => levels.push(Level {
                    verb,
                    items: Vec::new(),
                }),
                None => levels[deepest].items.push(Item::Arg(arg.clone())),
            }
            continue;
        }
        if arg == "--" {
            ended = true;
            levels[deepest].items.push(Item::Arg(arg.clone()));
            continue;
        }
        if matches!(arg.as_str(), "-h" | "-help" | "--help") {
            levels[deepest].items.push(Item::Arg("--help".into()));
            continue;
        }
        let single = !arg.starts_with("--");
        let body = if single { &arg[1..] } else { &arg[2..] };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        if name.is_empty() || name.starts_with('-') {
            return Err(Rejected {
                path: path(&levels),
                error: ArgvError::BadSyntax(arg.clone()),
            });
        }
        // The innermost verb that has the flag: its own, else an enclosing verb's.
        let find = |pred: &dyn Fn(&Flag) -> bool| {
            levels
                .iter()
                .enumerate()
                .rev()
                .find_map(|(k, l)| l.verb.flags.iter().find(|f| pred(f)).map(|f| (k, f)))
        };
        let (k, flag, inline) = match find(&|f| f.is_named(name)) {
            Some((k, f)) => (k, f, inline.map(str::to_string)),
            None => {
                // pflag's `-ivalue`: a one-letter value flag with its value attached.
                let mut chars = name.chars();
                let first = chars.next().map(String::from).unwrap_or_default();
                match find(&|f| f.takes_value() && f.is_named(&first)) {
                    Some((k, f)) if single && inline.is_none() => (k, f, Some(chars.as_str().to_string())),
                    _ => {
                        let shown = arg.split('=').next().unwrap_or(arg);
                        return Err(Rejected {
                            path: path(&levels),
                            error: ArgvError::UnknownFlag(shown.to_string()),
                        });
                    }
                }
            }
        };
        let bad_bool = |value: String| Rejected {
            path: path(&levels),
            error: ArgvError::BadBool { flag: flag.long, value },
        };
        let val = match (flag.kind, inline) {
            (Kind::Switch, None) => Val::On(true),
            (Kind::Switch, Some(v)) => Val::On(parse_bool(&v).ok_or_else(|| bad_bool(v))?),
            (Kind::Bool, Some(v)) => Val::Text(parse_bool(&v).ok_or_else(|| bad_bool(v))?.to_string()),
            (Kind::Bool, None) => {
                // `--accept-dns false` was this CLI's spelling before the Go forms (Go itself
                // reads a separate "false" as a positional argument): take a literal true/false.
                let v = match it.peek().map(|s| s.as_str()) {
                    Some(v @ ("true" | "false")) => {
                        it.next();
                        v == "true"
                    }
                    _ => true,
                };
                Val::Text(v.to_string())
            }
            (Kind::Value | Kind::Repeat, Some(v)) => Val::Text(v),
            (Kind::Value | Kind::Repeat, None) => match it.next() {
                // Go takes the next argument whatever it looks like.
                Some(v) => Val::Text(v.clone()),
                None => {
                    return Err(Rejected {
                        path: path(&levels),
                        error: ArgvError::MissingValue(flag.long),
                    })
                }
            },
        };
        levels[k].items.push(Item::Flag(flag, val));
    }
    let mut out = Vec::new();
    for (k, level) in levels.iter().enumerate() {
        if k > 0 {
            out.push(level.verb.name.to_string());
        }
        for (j, item) in level.items.iter().enumerate() {
            let (flag, val) = match item {
                Item::Arg(a) => {
                    out.push(a.clone());
                    continue;
                }
                Item::Flag(f, v) => (*f, v),
            };
            // Go keeps the last value; argh would refuse a second one.
            let superseded = flag.kind != Kind::Repeat
                && level.items[j + 1..]
                    .iter()
                    .any(|i| matches!(i, Item::Flag(g, _) if g.long == flag.long));
            match val {
                _ if superseded => {}
                Val::On(false) => {}
                Val::On(true) => out.push(format!("--{}", flag.long)),
                Val::Text(t) => {
                    out.push(format!("--{}", flag.long));
                    out.push(t.clone());
                }
            }
        }
    }
    Ok(Normalized {
        args: out,
        path: path(&levels),
    })
}

#[cfg(test)]
mod tests {
    use argh::{ArgsInfo, FromArgs};
    use proptest::prelude::*;

    use super::*;
    use crate::cli::{Cmd, ServerCmd, Top};

    fn v(s: &str) -> Vec<String> {
        s.split(' ').filter(|x| !x.is_empty()).map(str::to_string).collect()
    }

    fn norm(s: &str) -> Vec<String> {
        normalize(&v(s)).unwrap_or_else(|e| panic!("{s}: {e:?}")).args
    }

    fn err(s: &str) -> ArgvError {
        normalize(&v(s)).expect_err(s).error
    }

    #[test]
    fn value_flags_take_every_go_form() {
        let want = v("up --login-server http://ip:8080");
        for s in [
            "up --login-server=http://ip:8080",
            "up --login-server http://ip:8080",
            "up -login-server=http://ip:8080",
            "up -login-server http://ip:8080",
        ] {
            assert_eq!(norm(s), want, "{s}");
        }
        // One-letter names: -c 3, -c=3, --c 3 (Go), -c3 (pflag).
        for s in [
            "ping -c 3 peer",
            "ping -c=3 peer",
            "ping --c 3 peer",
            "ping -c3 peer",
            "ping --count=3 peer",
        ] {
            assert_eq!(norm(s), v("ping --count 3 peer"), "{s}");
        }
        // Go takes the next argument as the value whatever it looks like.
        assert_eq!(norm("up --hostname -x"), v("up --hostname -x"));
        assert_eq!(norm("up --hostname=-x"), v("up --hostname -x"));
        assert_eq!(norm("up --advertise-tags=tag:a=b"), v("up --advertise-tags tag:a=b"));
    }

    #[test]
    fn empty_value_is_kept() {
        let n = normalize(&v("up --exit-node=")).unwrap();
        assert_eq!(n.args, ["up", "--exit-node", ""]);
        let n = normalize(&["up".to_string(), "--exit-node".to_string(), String::new()]).unwrap();
        assert_eq!(n.args, ["up", "--exit-node", ""]);
    }

    #[test]
    fn booleans_take_every_go_form() {
        for (form, want) in [
            ("--accept-routes", "true"),
            ("-accept-routes", "true"),
            ("--accept-routes=true", "true"),
            ("--accept-routes=false", "false"),
            ("-accept-routes=false", "false"),
            ("--accept-routes true", "true"),
            ("--accept-routes false", "false"),
        ] {
            assert_eq!(norm(&format!("up {form}")), ["up", "--accept-routes", want], "{form}");
        }
        for lit in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(
                norm(&format!("up --accept-dns={lit}")),
                v("up --accept-dns true"),
                "{lit}"
            );
        }
        for lit in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(
                norm(&format!("up --accept-dns={lit}")),
                v("up --accept-dns false"),
                "{lit}"
            );
            // A default-true setting can be turned off.
            assert_eq!(
                norm(&format!("up --snat-subnet-routes={lit}")),
                v("up --snat-subnet-routes false")
            );
        }
        // Switches: present when true, absent when false.
        assert_eq!(norm("up --qr"), v("up --qr"));
        assert_eq!(norm("up --qr=true"), v("up --qr"));
        assert_eq!(norm("up --qr=T"), v("up --qr"));
        assert_eq!(norm("up --qr=false"), v("up"));
        assert_eq!(norm("up --force-reauth=0 --reset=1"), v("up --reset"));
        // A switch never takes the next argument (Go): it stays positional.
        assert_eq!(norm("ping --until-count true"), v("ping --until-count true"));
        // Only a literal true/false after a tri-state flag is its value.
        assert_eq!(norm("ping --until-direct peer"), v("ping --until-direct true peer"));
    }

    #[test]
    fn bad_booleans_name_the_flag() {
        assert_eq!(
            err("up --accept-routes=yes"),
            ArgvError::BadBool {
                flag: "accept-routes",
                value: "yes".into()
            }
        );
        assert_eq!(
            err("up --accept-dns="),
            ArgvError::BadBool {
                flag: "accept-dns",
                value: String::new()
            }
        );
        assert_eq!(
            err("up --qr=maybe"),
            ArgvError::BadBool {
                flag: "qr",
                value: "maybe".into()
            }
        );
        let text = err("up --accept-routes=yes").to_string();
        assert!(
            text.contains("--accept-routes=false") && text.contains("\"yes\""),
            "{text}"
        );
    }

    #[test]
    fn unknown_flags_and_missing_values_are_named() {
        assert_eq!(err("up --bogus=1"), ArgvError::UnknownFlag("--bogus".into()));
        assert_eq!(err("up -bogus"), ArgvError::UnknownFlag("-bogus".into()));
        // A flag of another verb is unknown here.
        assert_eq!(
            err("status --accept-routes"),
            ArgvError::UnknownFlag("--accept-routes".into())
        );
        let r = normalize(&v("server nodes list --key k")).unwrap_err();
        assert_eq!(r.error, ArgvError::UnknownFlag("--key".into()));
        assert_eq!(r.path, ["server", "nodes", "list"]);
        assert_eq!(err("up --hostname"), ArgvError::MissingValue("hostname"));
        assert_eq!(err("up -login-server"), ArgvError::MissingValue("login-server"));
        assert_eq!(err("server nodes delete -i"), ArgvError::MissingValue("identifier"));
        assert!(err("up --timeout").to_string().contains("--timeout=VALUE"));
        assert_eq!(err("up ---qr"), ArgvError::BadSyntax("---qr".into()));
        assert_eq!(err("up --=x"), ArgvError::BadSyntax("--=x".into()));
    }

    #[test]
    fn last_value_wins_but_lists_accumulate() {
        assert_eq!(norm("up --hostname a --hostname=b"), v("up --hostname b"));
        assert_eq!(
            norm("up --accept-routes --accept-routes=false"),
            v("up --accept-routes false")
        );
        assert_eq!(norm("up --qr --qr=false"), v("up"));
        assert_eq!(
            norm("server routes enable -i 1 -r 10.0.0.0/8 --route=10.1.0.0/16"),
            v("server routes enable --identifier 1 --route 10.0.0.0/8 --route 10.1.0.0/16")
        );
    }

    #[test]
    fn positionals_and_double_dash_pass_through() {
        assert_eq!(norm("ping -- -odd-name"), v("ping -- -odd-name"));
        assert_eq!(
            norm("ping peer -c 2 --until-count"),
            v("ping peer --count 2 --until-count")
        );
        assert_eq!(norm("ping -- --count"), v("ping -- --count"));
        assert_eq!(
            norm("server users create default -o json"),
            v("server users create default --output json")
        );
        assert_eq!(
            norm("server nodes rename -i 3 new-name"),
            v("server nodes rename --identifier 3 new-name")
        );
        assert_eq!(norm("ping -"), v("ping -"));
        // A word after `--` is never a verb.
        assert_eq!(norm("server -- nodes"), v("server -- nodes"));
        assert_eq!(norm("help"), v("help"));
        assert_eq!(norm("up -h"), v("up --help"));
        assert_eq!(norm("server nodes -help"), v("server nodes --help"));
    }

    #[test]
    fn headscale_commands_and_flags_have_their_aliases() {
        for (given, want) in [
            ("server namespaces create default", "server users create default"),
            ("server namespace list", "server users list"),
            ("server ns ls", "server users list"),
            ("server user create default", "server users create default"),
            ("server users new default", "server users create default"),
            ("server users delete default", "server users destroy default"),
            ("server node list", "server nodes list"),
            ("server nodes ls", "server nodes list"),
            ("server machines show", "server nodes list"),
            ("server machine del -i 2", "server nodes delete --identifier 2"),
            ("server route list", "server routes list"),
            ("server r ls -i 1", "server routes list --identifier 1"),
            ("server preauthkey list", "server preauthkeys list"),
            ("server pre ls", "server preauthkeys list"),
            (
                "server authkey c -n default --reusable",
                "server preauthkeys create --user default --reusable",
            ),
            (
                "server nodes register --namespace default --key k",
                "server nodes register --user default --key k",
            ),
            (
                "server nodes register -n=default -k k",
                "server nodes register --user default --key k",
            ),
            (
                "server nodes mv -i 1 -u bob",
                "server nodes move --identifier 1 --user bob",
            ),
            (
                "server routes enable -a -i 1",
                "server routes enable --all --identifier 1",
            ),
        ] {
            assert_eq!(norm(given), v(want), "{given}");
        }
    }

    #[test]
    fn enclosing_verb_flags_move_back_to_it() {
        assert_eq!(
            norm("server nodes list --config /x -o json"),
            v("server --config /x nodes list --output json")
        );
        assert_eq!(norm("server -c /y users list"), v("server --config /y users list"));
        assert_eq!(
            norm("server users list --config=/z"),
            v("server --config /z users list")
        );
        assert_eq!(norm("server serve -config /w"), v("server --config /w serve"));
        assert_eq!(norm("status"), v("status"));
    }

    #[test]
    fn tailscale_spellings() {
        assert_eq!(norm("up --authkey=tskey-1"), v("up --auth-key tskey-1"));
        assert_eq!(norm("up --auth-key file:/k"), v("up --auth-key file:/k"));
        assert_eq!(
            norm("daemon --statedir=/s --tun=none --port=0"),
            v("daemon --state-dir /s --tun none --port 0")
        );
        assert_eq!(norm("ip -4"), v("ip --v4"));
    }

    #[test]
    fn version_flag_is_the_version_verb() {
        for line in ["--version", "-version", "daemon --version", "server -version"] {
            assert_eq!(norm(line), v("version"), "{line}");
        }
        // Elsewhere it stays an unknown flag.
        assert_eq!(err("up --version"), ArgvError::UnknownFlag("--version".into()));
    }

    #[test]
    fn program_names() {
        assert_eq!(multi_call("/usr/bin/headscale"), ["server"]);
        assert_eq!(multi_call("headscale"), ["server"]);
        assert_eq!(multi_call("/usr/sbin/tailscaled"), ["daemon"]);
        assert!(multi_call("/usr/bin/tailscale").is_empty());
        assert!(multi_call("tinyscale").is_empty());
        assert!(multi_call("").is_empty());
    }

    /// `set` takes Go's flag forms and states only the prefs given; nothing given is refused.
    #[test]
    fn set_states_only_the_prefs_given() {
        let set = |line: &str| {
            let n = normalize(&v(line)).unwrap();
            let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
            let Cmd::Set(s) = Top::from_args(&["tinyscale"], &strs).unwrap().cmd else {
                panic!("not set")
            };
            s.up_args()
        };
        let a = set("set --accept-routes --exit-node= -shields-up=false --advertise-routes 10.1.0.0/16,fd00::/64")
            .expect("prefs");
        assert_eq!(a.accept_routes, Some(true));
        assert_eq!(a.exit_node.as_deref(), Some(""));
        assert_eq!(a.shields_up, Some(false));
        assert_eq!(
            a.advertise_routes,
            Some(vec!["10.1.0.0/16".to_string(), "fd00::/64".to_string()])
        );
        assert_eq!((a.hostname, a.accept_dns, a.login_server), (None, None, None));
        assert!(set("set").is_none());
        assert!(set("set --socket /tmp/x.sock").is_none());
        assert!(
            normalize(&v("set --login-server=http://x")).is_err(),
            "set does not log in"
        );
    }

    /// The guide's `up` line reaches argh's struct with its meaning intact.
    #[test]
    fn guide_up_line_parses_into_prefs() {
        let n = normalize(&v(
            "up --login-server=http://ip:8080 --accept-routes=true --accept-dns=false --advertise-routes=192.168.188.0/24",
        ))
        .unwrap();
        let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
        let Cmd::Up(u) = Top::from_args(&["tinyscale"], &strs).unwrap().cmd else {
            panic!("not up")
        };
        assert_eq!(u.login_server.as_deref(), Some("http://ip:8080"));
        assert_eq!(u.accept_routes, Some(true));
        assert_eq!(u.accept_dns, Some(false));
        assert_eq!(u.advertise_routes.as_deref(), Some("192.168.188.0/24"));
        assert_eq!(u.advertise_exit_node, None);
        let n = normalize(&v("up --advertise-exit-node=false --exit-node= --advertise-lan=br-lan")).unwrap();
        let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
        let Cmd::Up(u) = Top::from_args(&["tinyscale"], &strs).unwrap().cmd else {
            panic!("not up")
        };
        assert_eq!(u.advertise_exit_node, Some(false));
        assert_eq!(u.exit_node.as_deref(), Some(""));
        assert_eq!(u.advertise_lan.as_deref(), Some("br-lan"));
        // headscale's way in.
        let mut args: Vec<String> = multi_call("headscale").iter().map(|s| s.to_string()).collect();
        args.extend(v("nodes register --namespace default --key abc -c /etc/x"));
        let n = normalize(&args).unwrap();
        let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
        let Cmd::Server(s) = Top::from_args(&["tinyscale"], &strs).unwrap().cmd else {
            panic!("not server")
        };
        assert_eq!(s.config.as_deref(), Some(std::path::Path::new("/etc/x")));
        assert!(matches!(s.cmd, ServerCmd::Nodes(_)));
    }

    #[test]
    fn shields_up_and_debug_filter_parse() {
        let parse = |line: &str| {
            let n = normalize(&v(line)).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
            Top::from_args(&["tinyscale"], &strs).map(|t| t.cmd)
        };
        for (line, want) in [
            ("up --shields-up", Some(true)),
            ("up -shields-up=false", Some(false)),
            ("up --shields-up=0", Some(false)),
            ("up", None),
        ] {
            let Ok(Cmd::Up(u)) = parse(line) else {
                panic!("{line}: not up")
            };
            assert_eq!(u.shields_up, want, "{line}");
        }
        let Ok(Cmd::Debug(d)) = parse("debug filter -socket=/tmp/ts.sock") else {
            panic!("not debug")
        };
        let crate::cli::DebugSub::Filter(f) = d.cmd else {
            panic!("not debug filter")
        };
        assert_eq!(f.socket.as_deref(), Some(std::path::Path::new("/tmp/ts.sock")));
        assert!(parse("debug").is_err(), "debug needs a subcommand");
        let Ok(Cmd::Debug(d)) = parse("debug dns-uci --remove -dhcp=/tmp/dhcp") else {
            panic!("not debug")
        };
        let crate::cli::DebugSub::DnsUci(u) = d.cmd else {
            panic!("not debug dns-uci")
        };
        assert!(u.remove);
        assert_eq!(u.dhcp.as_deref(), Some(std::path::Path::new("/tmp/dhcp")));
    }

    #[test]
    fn whois_dns_and_metrics_lines_parse() {
        let parse = |line: &str| {
            let n = normalize(&v(line)).unwrap_or_else(|e| panic!("{line}: {e:?}"));
            let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
            Top::from_args(&["tinyscale"], &strs)
                .unwrap_or_else(|e| panic!("{line}: {}", e.output))
                .cmd
        };
        let Cmd::Whois(w) = parse("whois -json 100.64.0.2:22") else {
            panic!("not whois")
        };
        assert!(w.json);
        assert_eq!(w.addr, "100.64.0.2:22");
        let Cmd::Dns(crate::cli::DnsCmd {
            cmd: crate::cli::DnsSub::Query(q),
        }) = parse("dns query gonode AAAA --json")
        else {
            panic!("not dns query")
        };
        assert_eq!(
            (q.name.as_str(), q.qtype.as_deref(), q.json),
            ("gonode", Some("AAAA"), true)
        );
        assert!(matches!(
            parse("dns status --json=false"),
            Cmd::Dns(crate::cli::DnsCmd {
                cmd: crate::cli::DnsSub::Status(crate::cli::DnsStatus { json: false, .. })
            })
        ));
        // `metrics` and tailscale's `metrics print`, the socket flag on either side.
        for line in [
            "metrics --socket /s",
            "metrics print --socket=/s",
            "metrics -socket /s print",
        ] {
            let Cmd::Metrics(m) = parse(line) else {
                panic!("{line}: not metrics")
            };
            assert_eq!(m.socket.as_deref(), Some(std::path::Path::new("/s")), "{line}");
            assert_eq!(m.cmd.is_some(), line.contains("print"), "{line}");
        }
    }

    #[test]
    fn help_teaches_the_forms() {
        let help = |args: &[&str]| {
            Top::from_args(&["tinyscale"], args)
                .err()
                .map(|e| e.output)
                .unwrap_or_default()
        };
        let top = help(&["--help"]);
        assert!(top.contains("--flag=value") && top.contains("--flag=false"), "{top}");
        assert!(top.contains("headscale") && top.contains("tailscaled"), "{top}");
        let up = help(&["up", "--help"]);
        assert!(
            up.contains("--accept-routes <bool>") && up.contains("--accept-dns=false"),
            "{up}"
        );
        assert!(up.contains("--auth-key"), "{up}");
    }

    // ---- the tree against the argh structs ----

    fn walk(verb: &'static Verb, info: &argh::CommandInfoWithArgs, path: &mut Vec<&'static str>) {
        let flags: Vec<_> = info.flags.iter().filter(|f| f.long != "--help").collect();
        let names: Vec<_> = flags.iter().map(|f| f.long).collect();
        assert_eq!(flags.len(), verb.flags.len(), "{path:?}: argh has {names:?}");
        for fi in flags {
            let long = fi.long.trim_start_matches("--");
            let f = verb
                .flags
                .iter()
                .find(|f| f.long == long)
                .unwrap_or_else(|| panic!("{path:?}: --{long} is missing from TREE"));
            assert_eq!(f.short, fi.short, "{path:?} --{long}: short");
            let switch = matches!(fi.kind, argh::FlagInfoKind::Switch);
            assert_eq!(f.kind == Kind::Switch, switch, "{path:?} --{long}: switch");
            let repeat = matches!(fi.optionality, argh::Optionality::Repeating);
            assert_eq!(
                f.kind == Kind::Repeat,
                repeat && !switch,
                "{path:?} --{long}: repeating"
            );
            if !switch {
                // Bool ⇔ argh parses the value as a bool: true and false pass, anything else fails.
                let rejects = |value: &str| {
                    let flag = format!("--{long}");
                    let mut args = path.clone();
                    args.extend([flag.as_str(), value]);
                    Top::from_args(&["tinyscale"], &args)
                        .err()
                        .is_some_and(|e| e.output.contains(&format!("Error parsing option '{flag}'")))
                };
                let is_bool = !rejects("true") && !rejects("false") && rejects("maybe");
                assert_eq!(f.kind == Kind::Bool, is_bool, "{path:?} --{long}: bool-typed");
            }
        }
        let subs: Vec<_> = info.commands.iter().map(|c| c.name).collect();
        let ours: Vec<_> = verb.subs.iter().map(|v| v.name).collect();
        assert_eq!(subs, ours, "{path:?}: subcommands");
        for (sub, c) in verb.subs.iter().zip(&info.commands) {
            path.push(sub.name);
            walk(sub, &c.command, path);
            path.pop();
        }
    }

    #[test]
    fn tree_matches_the_argh_structs() {
        walk(&TREE, &Top::get_args_info(), &mut Vec::new());
    }

    #[test]
    fn names_are_unambiguous() {
        fn names(f: &Flag) -> Vec<String> {
            let mut n: Vec<String> = std::iter::once(f.long.to_string())
                .chain(f.aliases.iter().map(|a| a.to_string()))
                .chain(f.short.map(String::from))
                .collect();
            n.sort();
            n
        }
        fn check(verb: &'static Verb, outer: &[String]) {
            let mut seen = outer.to_vec();
            for f in verb.flags {
                for n in names(f) {
                    assert!(!seen.contains(&n), "{}: flag name {n} used twice", verb.name);
                    assert!(
                        !matches!(n.as_str(), "h" | "help"),
                        "{}: {n} is the help flag",
                        verb.name
                    );
                    seen.push(n);
                }
            }
            let mut verbs = Vec::new();
            for s in verb.subs {
                for n in std::iter::once(&s.name).chain(s.aliases) {
                    assert!(!verbs.contains(n), "{}: verb name {n} used twice", verb.name);
                    verbs.push(*n);
                }
                check(s, &seen);
            }
        }
        check(&TREE, &[]);
    }

    // ---- properties ----

    /// One `up` flag written in a random Go form, and what argh should get for it.
    fn up_flag() -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
        let flags: Vec<&'static Flag> = TREE.sub("up").expect("up").flags.iter().collect();
        (
            proptest::sample::select(flags),
            any::<bool>(),
            "[a-z0-9./:-]{0,10}",
            0usize..4,
            0usize..6,
        )
            .prop_map(|(f, b, text, dashes, form)| {
                let dash = if dashes % 2 == 0 { "--" } else { "-" };
                let name = format!("{dash}{}", f.long);
                let lits = if b {
                    ["1", "t", "T", "TRUE", "true", "True"]
                } else {
                    ["0", "f", "F", "FALSE", "false", "False"]
                };
                let lit = lits[form % lits.len()];
                let long = format!("--{}", f.long);
                match f.kind {
                    Kind::Value | Kind::Repeat => {
                        let given = if form % 2 == 0 {
                            vec![format!("{name}={text}")]
                        } else {
                            vec![name, text.clone()]
                        };
                        (given, vec![long, text])
                    }
                    Kind::Bool => {
                        let given = match (form % 3, b) {
                            (0, true) => vec![name],
                            (1, _) => vec![name, b.to_string()],
                            _ => vec![format!("{name}={lit}")],
                        };
                        (given, vec![long, b.to_string()])
                    }
                    Kind::Switch => {
                        let given = if form % 2 == 0 && b {
                            vec![name]
                        } else {
                            vec![format!("{name}={lit}")]
                        };
                        (given, if b { vec![long] } else { vec![] })
                    }
                }
            })
    }

    proptest! {
        #[test]
        fn any_go_form_of_up_flags_normalizes(flags in proptest::collection::vec(up_flag(), 0..8)) {
            // Keep each flag once: repeats are the last-wins rule, tested above.
            let mut seen = Vec::new();
            let mut given = vec!["up".to_string()];
            let mut want = vec!["up".to_string()];
            for (g, w) in flags {
                let key = g[0].trim_start_matches('-').split('=').next().unwrap_or("").to_string();
                if seen.contains(&key) {
                    continue;
                }
                seen.push(key);
                given.extend(g);
                want.extend(w);
            }
            let n = normalize(&given).unwrap();
            prop_assert_eq!(&n.args, &want);
            // And argh takes the result.
            let strs: Vec<&str> = n.args.iter().map(String::as_str).collect();
            prop_assert!(Top::from_args(&["tinyscale"], &strs).is_ok(), "{:?}", n.args);
        }

        #[test]
        fn arbitrary_argv_never_panics(args in proptest::collection::vec("(-{0,3})[a-z=-]{0,6}(=?)[a-z]{0,3}", 0..8)) {
            let _ = normalize(&args);
            let mut server = vec!["server".to_string()];
            server.extend(args);
            let _ = normalize(&server);
        }
    }
}
