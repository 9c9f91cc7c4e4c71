//! Prints the typed capability report for a default VM.
//!
//! ```text
//! cargo run -p kvm-gmem --all-features --example capabilities
//! ```

use kvm_gmem::{Capabilities, KvmDevice, VmType};

fn main() -> Result<(), kvm_gmem::Error> {
    let kvm = KvmDevice::open()?;
    let vm = kvm.create_vm(VmType::DEFAULT)?;
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT)?;
    print!("{caps}");
    Ok(())
}
