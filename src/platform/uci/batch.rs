//! `uci batch` commands applied to a parsed file, and `uci export`-style output: enough of
//! the uci CLI (`cli.c` `uci_do_section_cmd`, `uci_do_add`) to check what the package's
//! uci-defaults scripts do to another package's config (fw4's `/etc/config/firewall`)
//! without OpenWrt.
//!
//! ```text
//! set firewall.tinyscale=zone              create (or retype) a named section
//! set firewall.tinyscale.input='ACCEPT'    set an option, replacing all its values in place
//! add_list firewall.tinyscale.device=tun0  append to a list (a single value becomes a list)
//! delete firewall.tinyscale[.option]       remove a section or option; absent is a no-op
//! add firewall rule                        append an anonymous section
//! commit [firewall]                        accepted, nothing to do in memory
//! ```
//!
//! Words are split and unquoted exactly as in config files (the same lexer). Only named
//! sections are addressed: `@type[N]` paths are refused, since the package's scripts never
//! use them (an index is not stable across edits).
//!
//! Pure: the caller passes the file and the batch text.

#![forbid(unsafe_code)]

use super::syntax::{quote, valid_name, valid_type, Lexer, UciFile, UciOption, UciSection};

/// A batch line that cannot be applied, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch line {line}: {reason}")]
pub struct BatchError {
    /// 1-based line in the batch text.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Applies `batch` to `file`, which holds uci package `package`. Stops at the first error.
pub fn apply(file: &mut UciFile, package: &str, batch: &str) -> Result<(), BatchError> {
    let mut lx = Lexer {
        b: batch.as_bytes(),
        pos: 0,
        line: 1,
    };
    loop {
        lx.skip_inline_space();
        match lx.peek() {
            None => return Ok(()),
            Some(b'\n') => {
                lx.newline();
                continue;
            }
            _ => {}
        }
        let line = lx.line;
        let err = |reason: String| BatchError { line, reason };
        let args = lx.statement().map_err(|e| err(e.to_string()))?;
        let Some((cmd, rest)) = args.split_first() else {
            continue;
        };
        match (cmd.as_str(), rest) {
            ("commit" | "revert", _) => {}
            ("add", [pkg, kind]) => {
                check_package(pkg, package).map_err(err)?;
                if !valid_type(kind) {
                    return Err(err(format!("invalid section type {kind:?}")));
                }
                file.sections.push(UciSection {
                    kind: kind.clone(),
                    name: None,
                    line: 0,
                    options: Vec::new(),
                });
            }
            ("set" | "add_list", [arg]) => {
                let (path, value) = arg
                    .split_once('=')
                    .ok_or_else(|| err(format!("{cmd} needs PATH=VALUE, got {arg:?}")))?;
                let (sec, opt) = split_path(path, package).map_err(err)?;
                match (cmd.as_str(), opt) {
                    ("set", None) => set_section(file, sec, value).map_err(err)?,
                    ("set", Some(o)) => set_option(file, sec, o, value, false).map_err(err)?,
                    (_, Some(o)) => set_option(file, sec, o, value, true).map_err(err)?,
                    (_, None) => return Err(err("add_list needs an option".into())),
                }
            }
            ("delete", [path]) => {
                let (sec, opt) = split_path(path, package).map_err(err)?;
                match opt {
                    None => file.sections.retain(|s| s.name.as_deref() != Some(sec)),
                    Some(o) => {
                        for s in file.sections.iter_mut().filter(|s| s.name.as_deref() == Some(sec)) {
                            s.options.retain(|x| x.name != o);
                        }
                    }
                }
            }
            _ => return Err(err(format!("unsupported command {:?}", args.join(" ")))),
        }
    }
}

fn check_package(pkg: &str, package: &str) -> Result<(), String> {
    if pkg != package {
        return Err(format!("package {pkg:?} is not {package:?}"));
    }
    Ok(())
}

/// `pkg.section[.option]` → (section, option).
fn split_path<'a>(path: &'a str, package: &str) -> Result<(&'a str, Option<&'a str>), String> {
    let mut it = path.splitn(3, '.');
    let pkg = it.next().unwrap_or_default();
    check_package(pkg, package)?;
    let sec = it.next().ok_or_else(|| format!("{path:?} names no section"))?;
    let opt = it.next();
    if !valid_name(sec, false) {
        return Err(format!(
            "section {sec:?} is not a plain name (@type[N] is not supported)"
        ));
    }
    if let Some(o) = opt {
        if !valid_name(o, false) {
            return Err(format!("invalid option name {o:?}"));
        }
    }
    Ok((sec, opt))
}

fn set_section(file: &mut UciFile, name: &str, kind: &str) -> Result<(), String> {
    if !valid_type(kind) {
        return Err(format!("invalid section type {kind:?}"));
    }
    match file.sections.iter_mut().find(|s| s.name.as_deref() == Some(name)) {
        Some(s) => s.kind = kind.to_string(),
        None => file.sections.push(UciSection {
            kind: kind.to_string(),
            name: Some(name.to_string()),
            line: 0,
            options: Vec::new(),
        }),
    }
    Ok(())
}

fn set_option(file: &mut UciFile, sec: &str, name: &str, value: &str, list: bool) -> Result<(), String> {
    let s = file
        .sections
        .iter_mut()
        .rev()
        .find(|s| s.name.as_deref() == Some(sec))
        .ok_or_else(|| format!("section {sec:?} not found"))?;
    let new = UciOption {
        name: name.to_string(),
        value: value.to_string(),
        list,
        line: 0,
    };
    if list {
        // A single value turns into a list that keeps it (libuci `uci_add_list`).
        for o in s.options.iter_mut().filter(|o| o.name == name) {
            o.list = true;
        }
        s.options.push(new);
        return Ok(());
    }
    match s.options.iter().position(|o| o.name == name) {
        Some(i) => {
            s.options[i] = new;
            let mut k = 0;
            s.options.retain(|o| {
                k += 1;
                k - 1 == i || o.name != name
            });
        }
        None => s.options.push(new),
    }
    Ok(())
}

/// The file as `uci export` prints it: `package`, then each section with its options quoted.
pub fn export(file: &UciFile, package: &str) -> String {
    // Byte for byte as libuci's export: a blank line after the package line and after
    // every section (tests/vectors/openwrt/firewall.after-add was recorded from it).
    let mut out = format!("package {package}\n\n");
    for s in &file.sections {
        match &s.name {
            Some(n) => out.push_str(&format!("config {} {}\n", s.kind, quote(n))),
            None => out.push_str(&format!("config {}\n", s.kind)),
        }
        for o in &s.options {
            let kw = if o.list { "list" } else { "option" };
            out.push_str(&format!("\t{kw} {} {}\n", o.name, quote(&o.value)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::uci::parse;

    fn run(text: &str, batch: &str) -> String {
        let mut f = parse(text).expect("valid file");
        apply(&mut f, "firewall", batch).expect("batch applies");
        export(&f, "firewall")
    }

    #[test]
    fn set_creates_and_replaces_in_place() {
        let out = run(
            "config zone 'z'\n\toption name 'a'\n\toption input 'DROP'\n",
            "set firewall.z.input='ACCEPT'\nset firewall.n=forwarding\nset firewall.n.src=\"lan\"\ncommit firewall\n",
        );
        assert_eq!(
            out,
            "package firewall\n\nconfig zone 'z'\n\toption name 'a'\n\toption input 'ACCEPT'\n\n\
             config forwarding 'n'\n\toption src 'lan'\n\n"
        );
    }

    #[test]
    fn add_list_delete_and_add() {
        let out = run(
            "config zone 'z'\n\toption device 'x'\n\toption masq '1'\n",
            "add_list firewall.z.device=y\ndelete firewall.z.masq\ndelete firewall.gone\nadd firewall rule\n",
        );
        assert_eq!(
            out,
            "package firewall\n\nconfig zone 'z'\n\tlist device 'x'\n\tlist device 'y'\n\nconfig rule\n\n"
        );
        let out = run("config zone 'z'\nconfig zone 'k'\n", "delete firewall.z\n");
        assert_eq!(out, "package firewall\n\nconfig zone 'k'\n\n");
    }

    #[test]
    fn errors_name_the_line() {
        let mut f = parse("config zone 'z'\n").expect("valid");
        let e = |b: &str, f: &mut UciFile| apply(f, "firewall", b).expect_err("refused").to_string();
        assert_eq!(
            e("\nset network.x=y\n", &mut f),
            "batch line 2: package \"network\" is not \"firewall\""
        );
        assert!(e("set firewall.@zone[0].x=1\n", &mut f).contains("@type[N] is not supported"));
        assert!(e("set firewall.nope.x=1\n", &mut f).contains("section \"nope\" not found"));
        assert!(e("rename firewall.z=k\n", &mut f).contains("unsupported command"));
        assert!(e("set firewall.z\n", &mut f).contains("PATH=VALUE"));
    }

    #[test]
    fn export_parses_back() {
        let text = "config zone 'z'\n\toption name 'it''s'\n\tlist network 'lan'\nconfig rule\n\toption x 'a b'\n";
        let f = parse(text).expect("valid");
        let again = parse(&export(&f, "firewall")).expect("export parses");
        assert_eq!(export(&again, "firewall"), export(&f, "firewall"));
        assert_eq!(again.sections[0].options[0].value, "its");
    }
}
