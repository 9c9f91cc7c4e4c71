//! The README's example is the crate front page's, which rustdoc runs as a
//! doctest: the code a reader copies from the README is tested code.

/// The lines of the first code block of `lines` that opens with `fence`,
/// each stripped of `prefix` (`//! ` for a doc comment).
fn first_block(text: &str, prefix: &str, fence: &str) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| {
            l.strip_prefix(prefix)
                .unwrap_or(l.strip_prefix(prefix.trim_end()).unwrap_or(l))
        })
        .collect();
    let open = lines
        .iter()
        .position(|l| *l == fence)
        .unwrap_or_else(|| panic!("no {fence:?} block"));
    lines[open + 1..]
        .iter()
        .take_while(|l| !l.starts_with("```"))
        .map(|l| l.to_string())
        .collect()
}

#[test]
fn readme_example_is_the_front_page_doctest() {
    // Compiled in, so the test runs where the source tree is absent (the
    // kernel lane's guest).
    let lib = include_str!("../src/lib.rs");
    let readme = include_str!("../README.md");
    // The front page's first example as rustdoc shows it: hidden lines out.
    let front: Vec<String> = first_block(lib, "//! ", "```")
        .into_iter()
        .filter(|l| !(l == "#" || l.starts_with("# ")))
        .collect();
    let readme = first_block(readme, "", "```rust");
    assert!(
        front.iter().any(|l| l.contains("set_memory_region")),
        "{front:#?}"
    );
    assert_eq!(
        readme, front,
        "kvm-gmem/README.md's example differs from the front page's (src/lib.rs): \
         copy the front page's visible lines into the README"
    );
}
