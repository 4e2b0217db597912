//! Architectural state of a vCPU at boot: CPUID with per-vCPU topology, MSRs, FPU, LAPIC, and the
//! registers each boot protocol prescribes.

use kvm_bindings::{
    CpuId, Msrs, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_GDT, BOOT_IDT, BOOT_STACK, PD, PDPT, PML4};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_SET_CPUID2 failed")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {0} of {1} MSRs")]
    PartialMsrs(usize, usize),
    #[error("Cannot build the MSR list")]
    MsrList,
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("Cannot access the local APIC state")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("Cannot set registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("Cannot read registers")]
    GetRegs(#[source] kvm_ioctls::Error),
    #[error("Cannot write boot tables to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol (bzImage, or an ELF without PVH note): long mode, identity
    /// mapped, `rsi` = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
}

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Fill the topology leaves of the host-supported CPUID for vCPU `id` of `count`: one socket,
/// one thread per core, APIC id = vCPU index.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    // Bits needed to number `count` cores.
    let core_bits = u32::BITS - u32::from(count.saturating_sub(1)).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; threads sharing this cache - 1 in [25:14].
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    u32::from(count) - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3ff) | ((u32::from(count) - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core.
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(count);
                        e.ecx = 1 | (2 << 8);
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ECX[7:0], APIC id size in ECX[15:12].
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(count) - 1);
            }
            _ => {}
        }
    }
    cpuid
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ])
    .map_err(|_| CpuError::MsrList)
}

// Local APIC registers (offsets into the 1 KiB register page).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[i8; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i].to_ne_bytes()[0];
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [i8; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = i8::from_ne_bytes([*b]);
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// State every vCPU needs, boot or application processor: CPUID, MSRs, FPU, LINT0/LINT1.
pub fn setup_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuError::SetCpuid)?;
    let msrs = boot_msrs()?;
    let n = vcpu.set_msrs(&msrs).map_err(CpuError::SetMsrs)?;
    if n != msrs.as_slice().len() {
        return Err(CpuError::PartialMsrs(n, msrs.as_slice().len()));
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)?;
    let mut lapic = vcpu.get_lapic().map_err(CpuError::Lapic)?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(CpuError::Lapic)
}

/// A GDT entry from base, limit and flags (access byte in bits 0-7, flags in 12-15).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The kvm_segment KVM wants for GDT entry `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Identity-map the first 4 GiB with 2 MiB pages (the 64-bit boot protocol wants the kernel,
/// zero page and command line mapped; the local and I/O APICs come for free).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(CpuError::Memory);
    w(PDPT | 0x3, PML4)?;
    let mut pd = Vec::with_capacity(4 * 512 * 8);
    for i in 0..4u64 {
        w((PD + i * 0x1000) | 0x3, PDPT + i * 8)?;
    }
    for j in 0..4 * 512u64 {
        // Present, writable, page size (2 MiB).
        pd.extend_from_slice(&((j << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD))
        .map_err(CpuError::Memory)
}

/// Registers of the boot vCPU for `entry`, with the GDT (and page tables for 64-bit) written to
/// guest memory.
pub fn setup_boot_regs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), CpuError> {
    let code = match entry {
        BootEntry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        BootEntry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT + i as u64 * 8))
            .map_err(CpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(CpuError::Memory)?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(CpuError::GetRegs)?;
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.gdt = kvm_dtable {
        base: BOOT_GDT,
        limit: (gdt.len() * 8 - 1) as u16,
        ..Default::default()
    };
    sregs.idt = kvm_dtable {
        base: BOOT_IDT,
        limit: 7,
        ..Default::default()
    };
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = zero_page;
        }
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = (sregs.cr0 & !CR0_PG) | CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs).map_err(CpuError::SetRegs)?;
    vcpu.set_regs(&regs).map_err(CpuError::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code64 = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code64, 0x00af_9b00_0000_ffff);
        let s = segment(code64, 1);
        assert_eq!((s.selector, s.type_, s.l, s.db, s.g), (8, 0xb, 1, 0, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        let code32 = gdt_entry(0xc09b, 0, 0xfffff);
        assert_eq!(code32, 0x00cf_9b00_0000_ffff);
        let s = segment(code32, 1);
        assert_eq!((s.l, s.db, s.present, s.s, s.dpl), (0, 1, 1, 1, 0));
        let tss = segment(gdt_entry(0x008b, 0, 0xfffff), 3);
        assert_eq!((tss.type_, tss.s, tss.g, tss.limit), (0xb, 0, 0, 0xfffff));
    }

    #[test]
    fn topology_leaves() {
        use kvm_bindings::kvm_cpuid_entry2;
        let e = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[e(1, 0), e(0xb, 0), e(0xb, 1), e(0xb, 2)]).unwrap();
        let c = cpuid_for(&base, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((s[1].ebx, s[1].edx, s[1].ecx >> 8), (1, 3, 1));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, 2));
        assert_eq!(s[3].ecx, 2);
        let one = cpuid_for(&base, 0, 1);
        assert_eq!(one.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(one.as_slice()[2].eax, 0);
    }
}
