//! The layering rule of `ARCHITECTURE.md`, enforced: every `crate::<module>`
//! (and `super::<module>` at a crate's top level) that a module of
//! `kvm-gmem` or `uffd-gmem` names must be one its row in the rule allows,
//! and every module must have a row. A module is a file `src/<name>.rs` or a
//! directory `src/<name>/` (all of whose files count as that module).
//!
//! The rule lives between `<!-- layering:begin -->` and
//! `<!-- layering:end -->` in `ARCHITECTURE.md` as a table
//! `| crate | module | may use |`, the last column a comma-separated list of
//! sibling modules (or `-` for none).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Rule = BTreeMap<(String, String), BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The table of `ARCHITECTURE.md`: (crate, module) -> the modules it may use.
fn parse_rule(doc: &str) -> Result<Rule, String> {
    let begin = doc
        .find("<!-- layering:begin -->")
        .ok_or("no <!-- layering:begin --> marker")?;
    let end = doc
        .find("<!-- layering:end -->")
        .ok_or("no <!-- layering:end --> marker")?;
    let mut rule = Rule::new();
    for line in doc[begin..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [krate, module, uses] = cells[..] else {
            return Err(format!("not a 3-column row: {line}"));
        };
        if krate == "crate" || krate.starts_with("---") {
            continue;
        }
        let strip = |s: &str| s.trim_matches('`').to_string();
        let allowed = uses
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty() && *u != "-")
            .map(strip)
            .collect();
        if rule
            .insert((strip(krate), strip(module)), allowed)
            .is_some()
        {
            return Err(format!("two rows for {krate} {module}"));
        }
    }
    Ok(rule)
}

/// The sibling modules `src` names through `crate::` (and `super::` when
/// `top` is set: the file is a crate-level module, so `super` is the root).
fn uses(src: &str, top: bool) -> BTreeSet<String> {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if top {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d as e}`: the first segment of each item.
                let mut depth = 1;
                let inner: String = group
                    .chars()
                    .take_while(|&c| {
                        depth += i32::from(c == '{') - i32::from(c == '}');
                        depth > 0
                    })
                    .collect();
                let mut d = 0;
                let mut item = String::new();
                for c in inner.chars().chain([',']) {
                    match c {
                        '{' => d += 1,
                        '}' => d -= 1,
                        ',' if d == 0 => {
                            found.insert(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
            } else {
                found.insert(first_segment(rest));
            }
        }
    }
    found.remove("");
    found
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Each module of `src_dir` (file stem or directory name, not `lib`) with its
/// source text (a directory's files concatenated) and whether it is a
/// top-level file (`super` is the crate root).
fn modules(src_dir: &Path) -> BTreeMap<String, Vec<(String, bool)>> {
    let mut out: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
    for entry in std::fs::read_dir(src_dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut files = vec![path.clone()];
            while let Some(dir) = files.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        files.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        let text = std::fs::read_to_string(&p).unwrap();
                        out.entry(name.clone()).or_default().push((text, false));
                    }
                }
            }
        } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" {
            let text = std::fs::read_to_string(&path).unwrap();
            out.entry(name).or_default().push((text, true));
        }
    }
    out
}

/// Every violation of `rule` in `krate`'s `src/`.
fn violations(rule: &Rule, krate: &str, src_dir: &Path) -> Vec<String> {
    let mods = modules(src_dir);
    let mut bad = Vec::new();
    for (module, files) in &mods {
        let Some(allowed) = rule.get(&(krate.to_string(), module.clone())) else {
            bad.push(format!(
                "{krate}::{module} has no row in ARCHITECTURE.md's layering table"
            ));
            continue;
        };
        for (text, top) in files {
            for used in uses(text, *top) {
                if used != *module && mods.contains_key(&used) && !allowed.contains(&used) {
                    bad.push(format!(
                        "{krate}::{module} uses {used}, which its row does not allow \
                         (may use: {allowed:?})"
                    ));
                }
            }
        }
    }
    for (k, m) in rule.keys() {
        if k == krate && !mods.contains_key(m) {
            bad.push(format!(
                "ARCHITECTURE.md has a row for {k}::{m}, which does not exist"
            ));
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

#[test]
fn modules_only_use_what_the_rule_allows() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let rule = parse_rule(&doc).unwrap();
    let mut bad = Vec::new();
    let mut checked = 0;
    for krate in ["kvm-gmem", "uffd-gmem"] {
        let src = root().join(krate).join("src");
        checked += modules(&src).len();
        bad.extend(violations(&rule, krate, &src));
    }
    assert!(checked >= 20, "only {checked} modules found");
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

/// The checker itself finds what it must: a `use crate::` edge, a grouped
/// import, a `super::` edge at the top level, a path in an expression, and
/// ignores comments and longer identifiers.
#[test]
fn the_checker_sees_every_edge_form() {
    let src = "use crate::{a, b::{c, d}, e as f};\nuse crate::g::h;\n\
               fn x() { crate::i::j(); super::k::l(); notcrate::m(); }\n// crate::n\n";
    let got: Vec<_> = uses(src, true).into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "g", "i", "k"]);
    assert!(!uses("super::k::l();", false).contains("k"));

    let rule = parse_rule(
        "<!-- layering:begin -->\n| crate | module | may use |\n| --- | --- | --- |\n\
         | `x` | `low` | - |\n| `x` | `high` | `low` |\n<!-- layering:end -->",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("gmem-layering-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("low.rs"), "use crate::high::Thing;\n").unwrap();
    std::fs::write(dir.join("high.rs"), "use crate::low::Other;\n").unwrap();
    std::fs::write(dir.join("extra.rs"), "\n").unwrap();
    let bad = violations(&rule, "x", &dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].contains("x::extra has no row"), "{bad:?}");
    assert!(bad[1].contains("x::low uses high"), "{bad:?}");
}

/// Each published crate's tests build from its own `.crate`, so uffd-gmem
/// carries copies of the test helpers it shares with kvm-gmem instead of
/// including them by path. The copies stay byte-identical: edit kvm-gmem's
/// file and copy it.
#[test]
fn shared_test_helpers_are_identical_copies() {
    let root = root();
    for file in ["capability.rs", "seccomp_filter.rs"] {
        let original = root.join("kvm-gmem/tests/common").join(file);
        let copy = root.join("uffd-gmem/tests/common").join(file);
        let a = std::fs::read(&original).unwrap_or_else(|e| panic!("{}: {e}", original.display()));
        let b = std::fs::read(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
        assert!(
            a == b,
            "{} differs from {}: copy kvm-gmem's file over it",
            copy.display(),
            original.display()
        );
    }
}
