//! The `SKIP` lines of the lane's serial log, per test executable. A test
//! that cannot run for want of a kernel capability prints
//! `SKIP <test>: <capability> = <value> on <kernel>`; the lane lists the
//! capabilities its kernel must have, and a skip naming one is a failure.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One `SKIP` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// From `SKIP` to the end of the line.
    pub line: String,
    /// The capability it names: the reason's first word where the reason is
    /// `<capability> = <value> ...` or starts with a device (`/dev/...`).
    pub capability: Option<String>,
}

impl Skip {
    /// A `SKIP <test>: <reason>` line, at the start of `line` or after
    /// libtest's `test <name> ... ` (output not captured).
    pub fn parse(line: &str) -> Option<Skip> {
        let at = if line.starts_with("SKIP ") {
            0
        } else {
            line.find(" ... SKIP ")? + " ... ".len()
        };
        let line = line[at..].trim_end();
        let (_test, reason) = line["SKIP ".len()..].split_once(": ")?;
        let mut words = reason.split_whitespace();
        let first = words.next()?;
        let named = words.next() == Some("=") || first.starts_with("/dev/");
        Some(Skip {
            line: line.to_owned(),
            capability: named.then(|| first.to_owned()),
        })
    }
}

/// The executables of a serial log (`LANE-BEGIN <label>` ...
/// `LANE-END <label> rc=<n>`), in order, each with its `SKIP` lines.
pub fn per_executable(log: &str) -> Vec<(String, Vec<Skip>)> {
    let mut out: Vec<(String, Vec<Skip>)> = Vec::new();
    let mut inside = false;
    for line in log.lines() {
        if let Some(label) = line.strip_prefix("LANE-BEGIN ") {
            out.push((label.trim().to_owned(), Vec::new()));
            inside = true;
        } else if line.starts_with("LANE-END ") {
            inside = false;
        } else if let (true, Some(skip), Some(last)) = (inside, Skip::parse(line), out.last_mut()) {
            last.1.push(skip);
        }
    }
    out
}

/// One line per executable (its count of `SKIP` lines and the distinct
/// capabilities they name), and the distinct `SKIP` lines that name one of
/// `required`.
pub fn summarize(executables: &[(String, Vec<Skip>)], required: &[&str]) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut offending = Vec::new();
    for (label, skips) in executables {
        let named: BTreeSet<&str> = skips
            .iter()
            .filter_map(|s| s.capability.as_deref())
            .collect();
        let unnamed = skips.iter().filter(|s| s.capability.is_none()).count();
        let mut what: Vec<String> = named.into_iter().map(str::to_owned).collect();
        if unnamed > 0 {
            what.push(format!("{unnamed} without a capability"));
        }
        let line = format!("{label:<40} {:>3}  {}", skips.len(), what.join(", "));
        let _ = writeln!(text, "{}", line.trim_end());
        for s in skips {
            let line = format!("{label}: {}", s.line);
            let bad = s
                .capability
                .as_deref()
                .is_some_and(|c| required.contains(&c));
            if bad && !offending.contains(&line) {
                offending.push(line);
            }
        }
    }
    (text, offending)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
LANE-KERNEL 7.3.4+deb13-amd64
SKIP outside: KVM_CAP_GUEST_MEMFD = 0 on 7.3.4
LANE-BEGIN kvm-gmem::misuse
running 3 tests
test a ... ok
test b ... SKIP b: GUEST_MEMFD_FLAG_WRITE = absent (KVM_CAP_GUEST_MEMFD_FLAGS = MMAP|INIT_SHARED (0x3)) on 7.3.4
ok

successes:

---- c stdout ----
SKIP c: KVM_CAP_PRE_FAULT_MEMORY = 0 on 7.3.4
SKIP c: KVM_CAP_PRE_FAULT_MEMORY = 0 on 7.3.4
SKIP c2: GUEST_MEMFD_FLAG_WRITE = absent on 7.3.4
SKIP api via userfaultfd(2): EPERM
test result: ok. 3 passed
LANE-END kvm-gmem::misuse rc=0
LANE-BEGIN gmem::kernel_matrix
not a SKIP line: no
LANE-END gmem::kernel_matrix rc=0
";

    #[test]
    fn parses_skip_lines() {
        let s = Skip::parse("SKIP t: KVM_TDP_MMU = N on 6.18\r").unwrap();
        assert_eq!(s.line, "SKIP t: KVM_TDP_MMU = N on 6.18");
        assert_eq!(s.capability.as_deref(), Some("KVM_TDP_MMU"));
        let dev = Skip::parse("SKIP t: /dev/kvm cannot be opened (ENOENT)").unwrap();
        assert_eq!(dev.capability.as_deref(), Some("/dev/kvm"));
        let free = Skip::parse("test x ... SKIP x: the kernel does not offer RWP").unwrap();
        assert_eq!(free.line, "SKIP x: the kernel does not offer RWP");
        assert_eq!(free.capability, None);
        assert_eq!(Skip::parse("SKIPPED t: X = 1"), None);
        assert_eq!(Skip::parse("no SKIP x: Y = 1"), None);
    }

    #[test]
    fn groups_by_executable() {
        let ex = per_executable(LOG);
        let labels: Vec<&str> = ex.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["kvm-gmem::misuse", "gmem::kernel_matrix"]);
        assert_eq!(ex[0].1.len(), 5);
        assert!(ex[1].1.is_empty());
    }

    #[test]
    fn summary_and_required() {
        let ex = per_executable(LOG);
        let (text, bad) = summarize(&ex, &["KVM_CAP_GUEST_MEMFD", "UFFD_FEATURE_RWP"]);
        assert_eq!(
            text,
            format!(
                "{:<40}   5  GUEST_MEMFD_FLAG_WRITE, KVM_CAP_PRE_FAULT_MEMORY, 1 without a capability\n\
                 {:<40}   0\n",
                "kvm-gmem::misuse", "gmem::kernel_matrix"
            )
        );
        assert!(bad.is_empty(), "{bad:?}");
        let (_, bad) = summarize(
            &ex,
            &["KVM_CAP_PRE_FAULT_MEMORY", "KVM_CAP_GUEST_MEMFD_FLAGS"],
        );
        assert_eq!(
            bad,
            ["kvm-gmem::misuse: SKIP c: KVM_CAP_PRE_FAULT_MEMORY = 0 on 7.3.4"]
        );
    }
}
