//! The machine a host column comes from: its CPU, kernel and whether KVM is
//! PVM's. Two runs on machines with the same label share a column.

/// A host's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The CPU's model name, as `/proc/cpuinfo` gives it.
    pub cpu: String,
    /// The kernel release.
    pub release: String,
    /// Whether KVM is PVM's (`kvm_pvm` is loaded).
    pub pvm: bool,
}

impl Host {
    /// This machine, running kernel `release`.
    pub fn probe(release: &str) -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Host {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown CPU".into()),
            release: release.to_owned(),
            pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// `host <vendor> <brand> <release>[ (PVM)]`, e.g. `host Intel Xeon
    /// 6.18.44-fc-v1252 (PVM)`: the column's label.
    pub fn label(&self) -> String {
        let pvm = if self.pvm { " (PVM)" } else { "" };
        format!("host {} {}{pvm}", cpu_brand(&self.cpu), self.release)
    }

    /// The column's description.
    pub fn about(&self) -> String {
        let pvm = if self.pvm { " under PVM (kvm_pvm)" } else { "" };
        format!(
            "Linux {}{pvm}, the machine's own `/dev/kvm`; CPU: {}",
            self.release, self.cpu
        )
    }
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

/// A model name's vendor and brand, its first two words without trademark
/// signs: "Intel Xeon", "AMD EPYC", "Intel Core".
pub fn cpu_brand(model: &str) -> String {
    let mut plain = model.to_owned();
    for sign in ["(R)", "(r)", "(TM)", "(tm)"] {
        plain = plain.replace(sign, " ");
    }
    let words: Vec<&str> = plain.split_whitespace().take(2).collect();
    if words.is_empty() {
        "unknown CPU".into()
    } else {
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brands() {
        assert_eq!(cpu_brand("Intel(R) Xeon(R) Processor"), "Intel Xeon");
        assert_eq!(cpu_brand("AMD EPYC 7B13 64-Core Processor"), "AMD EPYC");
        assert_eq!(
            cpu_brand("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"),
            "Intel Core"
        );
        assert_eq!(cpu_brand("  "), "unknown CPU");
    }

    #[test]
    fn model_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 106\n\
                       model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n\n\
                       processor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn labels() {
        let mut h = Host {
            cpu: "AMD EPYC 7B13 64-Core Processor".into(),
            release: "6.18.44-fc-v782".into(),
            pvm: true,
        };
        assert_eq!(h.label(), "host AMD EPYC 6.18.44-fc-v782 (PVM)");
        assert_eq!(
            h.about(),
            "Linux 6.18.44-fc-v782 under PVM (kvm_pvm), the machine's own `/dev/kvm`; \
             CPU: AMD EPYC 7B13 64-Core Processor"
        );
        h.pvm = false;
        assert_eq!(h.label(), "host AMD EPYC 6.18.44-fc-v782");
    }
}
