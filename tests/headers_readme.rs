//! `headers/README.md` is the provenance record of `headers/`: every define
//! and every struct that the header reader finds, on every architecture and in
//! every module, must be named there in backticks, and every RFC Message-ID
//! cited in `headers/rfc/*.h` must appear there too.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn headers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("headers")
}

fn readme() -> String {
    let path = headers_dir().join("README.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every define and aggregate name in every translation unit, with the files
/// that define it (a name may be defined in more than one file).
fn header_items() -> BTreeSet<(String, String)> {
    let headers = headers_dir();
    let mut items = BTreeSet::new();
    for arch in gmem_gen::ARCHES {
        for module in gmem_gen::MODULES {
            let unit = gmem_gen::read_unit(&headers, arch, module.entries)
                .unwrap_or_else(|e| panic!("{} {}: {e}", arch.name, module.name));
            for d in &unit.defines {
                items.insert((d.name.clone(), d.file.clone()));
            }
            for a in &unit.aggregates {
                items.insert((a.name.clone(), a.file.clone()));
            }
        }
    }
    items
}

#[test]
fn every_header_item_is_in_the_provenance_table() {
    let items = header_items();
    assert!(
        items.len() > 100,
        "the header reader found only {} items: is headers/ complete?",
        items.len()
    );
    let readme = readme();
    let missing: Vec<String> = items
        .iter()
        .filter(|(name, _)| !readme.contains(&format!("`{name}`")))
        .map(|(name, file)| format!("  `{name}` ({file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "headers/README.md does not name these {} header items in backticks; \
         add each with its origin:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

/// The `<local@domain>` tokens of a text: the Message-IDs it cites.
fn message_ids(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        match after.find('>') {
            Some(end) => {
                let token = &after[..end];
                if token.contains('@') && !token.contains(char::is_whitespace) {
                    ids.push(token.to_string());
                }
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    ids
}

#[test]
fn every_rfc_message_id_is_in_the_readme() {
    let rfc = headers_dir().join("rfc");
    let mut ids = BTreeSet::new();
    let entries = fs::read_dir(&rfc).unwrap_or_else(|e| panic!("{}: {e}", rfc.display()));
    for entry in entries {
        let path = entry.expect("reading headers/rfc").path();
        if path.extension().is_some_and(|e| e == "h") {
            let text =
                fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let found = message_ids(&text);
            assert!(
                !found.is_empty(),
                "{} cites no Message-ID: every RFC header names its series",
                path.display()
            );
            ids.extend(found);
        }
    }
    let readme = readme();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !readme.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "headers/README.md does not cite these Message-IDs from headers/rfc/*.h:\n{}",
        missing
            .iter()
            .map(|id| format!("  <{id}>"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn message_id_extraction() {
    assert_eq!(
        message_ids("#include <linux/kvm.h>\n * v3 <a.1-2@example.com> (x) <not an@id>"),
        ["a.1-2@example.com"]
    );
}
