//! The README's example is the crate front page's doc test, word for word
//! (the doc test is what runs).

/// The lines of the first fenced code block after `marker`.
fn block_after<'a>(lines: &[&'a str], marker: &str) -> Vec<&'a str> {
    let at = lines
        .iter()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker:?} not found"));
    let mut rest = lines[at..].iter().skip_while(|l| !l.starts_with("```"));
    rest.next().expect("an opening fence");
    rest.take_while(|l| !l.starts_with("```"))
        .copied()
        .collect()
}

#[test]
fn readme_example_is_the_front_page_doc_test() {
    let readme: Vec<&str> = include_str!("../README.md").lines().collect();
    let lib: Vec<&str> = include_str!("../src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let ours = block_after(&readme, "## Example");
    let tested = block_after(&lib, "# Example: serving missing faults");
    assert!(ours.len() > 10, "{ours:?}");
    assert_eq!(ours, tested, "README.md and src/lib.rs's example differ");
}
