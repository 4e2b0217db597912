//! What the host's KVM does with guest code it cannot run natively.
//!
//! On hosts such as the nested cloud machines Manifold is developed on, KVM runs guest
//! kernel-mode and real-mode code through its instruction emulator and hands back what that
//! emulator does not implement (see `complete`). Manifold completes the integer instructions a
//! Linux kernel needs, but not the XSAVE family or SSSE3 and wider SIMD, and on such hosts
//! `KVM_SET_CPUID2` does not hide those from the guest's CPL 0 `cpuid`. So a Linux guest must be
//! told on its command line to leave them alone: [`linux_cmdline_additions`] says what to add.
//!
//! Detection runs a two-instruction guest once per process (a few milliseconds): `popcnt` in real
//! mode, which a real VT-x/AMD-V host runs natively and such a host hands back.

use std::sync::OnceLock;

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Added to a Linux kernel's command line on hosts that hand instructions back: `noxsave` (XSAVE,
/// XRSTOR and friends cannot be completed) and `clearcpuid=ssse3` (SSSE3 code paths, such as the
/// crypto and RAID helpers, would stop on instructions that cannot be completed).
pub const LINUX_CMDLINE: &str = "noxsave clearcpuid=ssse3";

/// Set to 1 to boot Linux with the given command line only, even on such a host.
pub const OPT_OUT_ENV: &str = "MANIFOLD_NO_HOST_CMDLINE";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("Cannot allocate the probe's memory: {0}")]
    Memory(String),
}

/// Whether this host's KVM hands guest instructions back to userspace (probed once).
pub fn hands_back_instructions() -> bool {
    static PROBED: OnceLock<bool> = OnceLock::new();
    *PROBED.get_or_init(|| match probe() {
        Ok(yes) => yes,
        Err(e) => {
            tracing::warn!("host probe failed, assuming KVM runs guest code natively: {e}");
            false
        }
    })
}

/// What to add to a Linux kernel's command line on this host, if anything (and not opted out).
pub fn linux_cmdline_additions() -> Option<&'static str> {
    if std::env::var_os(OPT_OUT_ENV).is_some_and(|v| v == "1") {
        return None;
    }
    hands_back_instructions().then_some(LINUX_CMDLINE)
}

/// Run `popcnt ax, bx; hlt` in real mode at address 0 of a one-page VM.
fn probe() -> Result<bool, ProbeError> {
    const CODE: [u8; 5] = [0xf3, 0x0f, 0xb8, 0xc3, 0xf4];
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    mem.write_slice(&CODE, GuestAddress(0))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| ProbeError::Memory("no region".into()))?;
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the mapping belongs to `mem`, which outlives `vm` and the vCPU (both dropped at
    // the end of this function, before `mem`, in reverse declaration order).
    unsafe { vm.set_user_memory_region(slot) }?;
    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    let handed_back = match vcpu.run()? {
        VcpuExit::InternalError => true,
        VcpuExit::Hlt => false,
        other => {
            tracing::debug!(exit = ?other, "host probe: unexpected exit");
            false
        }
    };
    tracing::debug!(handed_back, "host probe: popcnt in real mode");
    Ok(handed_back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_runs() {
        // Either answer is right, depending on the host; it must not fail.
        let yes = probe()
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("this host hands instructions back: {yes}");
    }
}
