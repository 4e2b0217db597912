//! Completions checked on a real KVM vCPU (never run): set registers and a stack frame, complete
//! the instruction, compare with the state the SDM prescribes.

#![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES,
    KVM_VCPUEVENT_VALID_SHADOW, kvm_regs, kvm_run, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::*;

mod kinds;

const MEM_SIZE: usize = 4 << 20;
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
const PT: u64 = 0x5000;
/// Linear pages 0x20_0000 and 0x20_1000 map to these (not adjacent) physical pages; the rest of
/// the first 4 MiB is identity-mapped.
const PAGE_A: u64 = 0x30_0000;
const PAGE_B: u64 = 0x38_1000;

// Selectors (GDT index * 8 + RPL).
const CODE32: u16 = 0x08;
const DATA0: u16 = 0x10;
const CODE64: u16 = 0x18;
const DATA3: u16 = 0x23;
const CODE64_3: u16 = 0x2b;
const CODE32_3: u16 = 0x33;
const CODE32_UNACCESSED: u16 = 0x38;
const CODE32_ABSENT: u16 = 0x40;
const DATA0_UNACCESSED: u16 = 0x48;
const DATA0_READONLY: u16 = 0x50;

const GDT_ENTRIES: [u64; 11] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08 code32, DPL 0
    0x00cf_9300_0000_ffff, // 0x10 data, DPL 0
    0x00af_9b00_0000_ffff, // 0x18 code64, DPL 0
    0x00cf_f300_0000_ffff, // 0x20 data, DPL 3
    0x00af_fb00_0000_ffff, // 0x28 code64, DPL 3
    0x00cf_fb00_0000_ffff, // 0x30 code32, DPL 3
    0x00cf_9a00_0000_ffff, // 0x38 code32, DPL 0, accessed bit clear
    0x00cf_1b00_0000_ffff, // 0x40 code32, DPL 0, not present
    0x00cf_9200_0000_ffff, // 0x48 data, DPL 0, accessed bit clear
    0x00cf_9100_0000_ffff, // 0x50 read-only data, DPL 0
];

const IRET: &[u8] = &[0xcf];
const IRETW: &[u8] = &[0x66, 0xcf];
const IRETQ: &[u8] = &[0x48, 0xcf];

const IF: u64 = 1 << 9;
const IOPL3: u64 = 3 << 12;
const NT: u64 = 1 << 14;

struct TestVm {
    // Dropped in this order: the vCPU and VM before the memory their slot points into.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
}

/// The kvm_segment for GDT entry `raw` loaded with `selector`, written out independently of the
/// code under test.
fn seg(raw: u64, selector: u16) -> kvm_segment {
    let g = ((raw >> 55) & 1) as u8;
    let limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: 0,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((raw >> 40) & 0xf) as u8,
        present: ((raw >> 47) & 1) as u8,
        dpl: ((raw >> 45) & 3) as u8,
        db: ((raw >> 54) & 1) as u8,
        s: ((raw >> 44) & 1) as u8,
        l: ((raw >> 53) & 1) as u8,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn gdt_seg(selector: u16) -> kvm_segment {
    seg(GDT_ENTRIES[usize::from(selector >> 3)], selector)
}

impl TestVm {
    fn new() -> Self {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let region = mem.iter().next().unwrap();
        let desc = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping is owned by `mem`, which TestVm drops after the VM.
        unsafe { vm.set_user_memory_region(desc) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // Long mode in KVM_SET_SREGS needs LM in the guest CPUID.
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();

        for (i, e) in GDT_ENTRIES.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        w(PDPT | 7, PML4);
        w(PD | 7, PDPT);
        w(0x87, PD); // 0..2 MiB, one large page
        w(PT | 7, PD + 8);
        for i in 0..512u64 {
            let phys = match i {
                0 => PAGE_A,
                1 => PAGE_B,
                _ => 0x20_0000 + i * 0x1000,
            };
            w(phys | 7, PT + 8 * i);
        }
        TestVm {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            mem,
        }
    }

    /// Legacy protected mode, paging off, flat segments at privilege `cpl` (0 or 3).
    fn protected(&self, cpl: u16, rsp: u64, rflags: u64) {
        let mut s = self.vcpu.get_sregs().unwrap();
        s.cr0 = 0x11; // PE, ET
        s.cr4 = 0;
        s.efer = 0;
        let (code, data) = if cpl == 3 {
            (CODE32_3, DATA3)
        } else {
            (CODE32, DATA0)
        };
        self.load(&mut s, code, data);
        self.vcpu.set_sregs(&s).unwrap();
        self.set_regs(0x1000, rsp, rflags);
    }

    /// IA-32e mode with a 64-bit code segment at privilege `cpl`.
    fn long(&self, cpl: u16, rsp: u64, rflags: u64) {
        let mut s = self.vcpu.get_sregs().unwrap();
        s.cr0 = 0x8000_0011; // PG, ET, PE
        s.cr3 = PML4;
        s.cr4 = 0x20; // PAE
        s.efer = 0x500; // LMA, LME
        let (code, data) = if cpl == 3 {
            (CODE64_3, DATA3)
        } else {
            (CODE64, DATA0)
        };
        self.load(&mut s, code, data);
        self.vcpu.set_sregs(&s).unwrap();
        self.set_regs(0x1000, rsp, rflags);
    }

    fn load(&self, s: &mut kvm_sregs, code: u16, data: u16) {
        s.gdt.base = GDT;
        s.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
        s.cs = gdt_seg(code);
        for r in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
            *r = gdt_seg(data);
        }
    }

    fn set_regs(&self, rip: u64, rsp: u64, rflags: u64) {
        let regs = kvm_regs {
            rax: 0x1111,
            rbx: 0x2222,
            rbp: 0x3333,
            rip,
            rsp,
            rflags,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).unwrap();
    }

    /// Physical address of a linear address under the test page tables (identity outside the
    /// two remapped pages).
    fn phys(linear: u64) -> u64 {
        match linear & !0xfff {
            0x20_0000 => PAGE_A + (linear & 0xfff),
            0x20_1000 => PAGE_B + (linear & 0xfff),
            _ => linear,
        }
    }

    /// Write `items` of `size` bytes at linear `at`, byte by byte through the test mapping.
    fn frame(&self, at: u64, size: usize, items: &[u64]) {
        for (i, v) in items.iter().enumerate() {
            for (j, b) in v.to_le_bytes()[..size].iter().enumerate() {
                let lin = at + (i * size + j) as u64;
                self.mem
                    .write_obj(*b, GuestAddress(Self::phys(lin)))
                    .unwrap();
            }
        }
    }

    fn complete(&self, bytes: &[u8]) -> Result<Kind, CompleteError> {
        Completer::new().complete(&self.vcpu, &self.mem, Some(bytes))
    }

    fn state(&self) -> (kvm_regs, kvm_sregs) {
        (
            self.vcpu.get_regs().unwrap(),
            self.vcpu.get_sregs().unwrap(),
        )
    }

    fn gdt_type(&self, selector: u16) -> u8 {
        let b: u8 = self
            .mem
            .read_obj(GuestAddress(GDT + u64::from(selector >> 3) * 8 + 5))
            .unwrap();
        b & 0xf
    }
}

#[test]
fn iretd_same_privilege_32() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2);
    vm.frame(0x8000, 4, &[0x1234, u64::from(CODE32), 0x246 | IF]);
    let (before, sbefore) = vm.state();
    assert_eq!(vm.complete(IRET).unwrap(), Kind::Iret);
    let (r, s) = vm.state();
    assert_eq!(r.rip, 0x1234);
    assert_eq!(r.rsp, 0x800c);
    assert_eq!(r.rflags, 0x246 | IF);
    // Nothing else moves: general registers, SS, data segments.
    assert_eq!((r.rax, r.rbx, r.rbp), (before.rax, before.rbx, before.rbp));
    assert_eq!(s.cs, gdt_seg(CODE32));
    assert_eq!((s.ss, s.ds), (sbefore.ss, sbefore.ds));
}

#[test]
fn iretd_loads_the_descriptor_and_sets_its_accessed_bit() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2);
    vm.frame(0x8000, 4, &[0x2000, u64::from(CODE32_UNACCESSED), 0x2]);
    assert_eq!(vm.gdt_type(CODE32_UNACCESSED), 0xa);
    vm.complete(IRET).unwrap();
    let (_, s) = vm.state();
    assert_eq!(s.cs.selector, CODE32_UNACCESSED);
    assert_eq!(s.cs.type_, 0xb);
    assert_eq!(vm.gdt_type(CODE32_UNACCESSED), 0xb);
}

#[test]
fn iretw_pops_words() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2 | (1 << 18)); // AC set: a 16-bit image cannot touch it
    vm.frame(0x8000, 2, &[0x3456, u64::from(CODE32), 0x0203]);
    vm.complete(IRETW).unwrap();
    let (r, _) = vm.state();
    assert_eq!((r.rip, r.rsp), (0x3456, 0x8006));
    assert_eq!(r.rflags, 0x0203 | (1 << 18));
}

#[test]
fn iretd_to_ring3_32() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2);
    vm.frame(
        0x8000,
        4,
        &[0x4000, u64::from(CODE32_3), 0x202, 0x9000, u64::from(DATA3)],
    );
    vm.complete(IRET).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp, r.rflags), (0x4000, 0x9000, 0x202));
    assert_eq!(s.cs, gdt_seg(CODE32_3));
    assert_eq!(s.ss, gdt_seg(DATA3));
    // DS/ES/FS/GS held a DPL 0 data segment: null at CPL 3.
    for d in [s.ds, s.es, s.fs, s.gs] {
        assert_eq!(d.selector, 0);
        assert!(d.unusable != 0 || d.present == 0);
    }
}

#[test]
fn iretq_to_ring0() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    vm.frame(
        0x7000,
        8,
        &[0x1_0000, u64::from(CODE64), 0x202, 0x9000, u64::from(DATA0)],
    );
    vm.complete(IRETQ).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp, r.rflags), (0x1_0000, 0x9000, 0x202));
    assert_eq!(s.cs, gdt_seg(CODE64));
    assert_eq!(s.cs.l, 1);
    assert_eq!(s.ss, gdt_seg(DATA0));
}

#[test]
fn iretq_sets_the_ss_accessed_bit() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let frame = [
        0x1_0000,
        u64::from(CODE64),
        0x2,
        0x9000,
        u64::from(DATA0_UNACCESSED),
    ];
    vm.frame(0x7000, 8, &frame);
    vm.complete(IRETQ).unwrap();
    let (_, s) = vm.state();
    assert_eq!((s.ss.selector, s.ss.type_), (DATA0_UNACCESSED, 0x3));
    assert_eq!(vm.gdt_type(DATA0_UNACCESSED), 0x3);
}

#[test]
fn iretq_to_compatibility_mode() {
    // A 64-bit kernel returning to a 32-bit process: CS.L = 0, ESP from the low half.
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let frame = [
        0x4000,
        u64::from(CODE32_3),
        0x202,
        0x7_fff0,
        u64::from(DATA3),
    ];
    vm.frame(0x7000, 8, &frame);
    vm.complete(IRETQ).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp, r.rflags), (0x4000, 0x7_fff0, 0x202));
    assert_eq!((s.cs.l, s.cs.db, s.cs.selector), (0, 1, CODE32_3));
    assert_eq!(s.ss, gdt_seg(DATA3));
}

#[test]
fn iretd_in_64bit_mode_pops_ss_and_rsp() {
    // Without REX.W, IRET in 64-bit mode pops five 4-byte items, even at the same level.
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    vm.frame(
        0x7000,
        4,
        &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, u64::from(DATA0)],
    );
    vm.complete(IRET).unwrap();
    let (r, _) = vm.state();
    assert_eq!((r.rip, r.rsp), (0x1_0000, 0x9000));
}

#[test]
fn iretq_with_null_ss_at_ring0() {
    // The frame of an interrupt taken in a kernel entered from user mode: SS = 0.
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, 0]);
    vm.complete(IRETQ).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp), (0x1_0000, 0x9000));
    assert_eq!((s.ss.selector, s.ss.dpl), (0, 0));
}

#[test]
fn iretq_to_ring3() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    // A user FS (DPL 3) survives the return; the kernel DS does not.
    let mut s = vm.vcpu.get_sregs().unwrap();
    s.fs = gdt_seg(DATA3);
    s.fs.base = 0x7fff_0000;
    s.gs.base = 0x1234_5000;
    vm.vcpu.set_sregs(&s).unwrap();
    vm.frame(
        0x7000,
        8,
        &[
            0x40_1000,
            u64::from(CODE64_3),
            0x202,
            0x7fff_fff0,
            u64::from(DATA3),
        ],
    );
    vm.complete(IRETQ).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp, r.rflags), (0x40_1000, 0x7fff_fff0, 0x202));
    assert_eq!(s.cs, gdt_seg(CODE64_3));
    assert_eq!(s.ss, gdt_seg(DATA3));
    assert_eq!((s.cs.selector & 3, s.ss.dpl), (3, 3));
    assert_eq!(s.fs.selector, DATA3);
    assert_eq!(s.fs.base, 0x7fff_0000);
    assert_eq!(s.ds.selector, 0);
    assert_eq!(s.gs.selector, 0);
    // A null GS keeps its base (64-bit code reaches it through the MSR).
    assert_eq!(s.gs.base, 0x1234_5000);
}

#[test]
fn if_changes_at_cpl0() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2 | IF);
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), IOPL3, 0x9000, 0]);
    vm.complete(IRETQ).unwrap();
    // IF cleared, IOPL loaded.
    assert_eq!(vm.state().0.rflags, 0x2 | IOPL3);

    vm.long(0, 0x7000, 0x2);
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), IF, 0x9000, 0]);
    vm.complete(IRETQ).unwrap();
    assert_eq!(vm.state().0.rflags, 0x2 | IF);
}

#[test]
fn iopl_and_if_at_cpl3() {
    let vm = TestVm::new();
    // CPL 3, IOPL 0, IF set: the image can change neither IF nor IOPL.
    vm.long(3, 0x7000, 0x2 | IF);
    vm.frame(
        0x7000,
        8,
        &[
            0x40_1000,
            u64::from(CODE64_3),
            IOPL3 | 1,
            0x9000,
            u64::from(DATA3),
        ],
    );
    vm.complete(IRETQ).unwrap();
    assert_eq!(vm.state().0.rflags, 0x2 | IF | 1);

    // CPL 3 with IOPL 3: IF follows the image, IOPL still does not.
    vm.long(3, 0x7000, 0x2 | IF | IOPL3);
    vm.frame(
        0x7000,
        8,
        &[0x40_1000, u64::from(CODE64_3), 0, 0x9000, u64::from(DATA3)],
    );
    vm.complete(IRETQ).unwrap();
    assert_eq!(vm.state().0.rflags, 0x2 | IOPL3);
}

#[test]
fn frame_across_a_page_boundary() {
    // RSP 16 bytes below the end of linear page 0x20_0000: the frame continues on the next
    // linear page, which the page tables place far from the first.
    let vm = TestVm::new();
    let rsp = 0x20_0ff0;
    vm.long(0, rsp, 0x2);
    vm.frame(
        rsp,
        8,
        &[0x1_0000, u64::from(CODE64), 0x202, 0x9000, u64::from(DATA0)],
    );
    // The page-crossing items are where the mapping says, not after the first page.
    let rflags: u64 = vm.mem.read_obj(GuestAddress(PAGE_B)).unwrap();
    assert_eq!(rflags, 0x202);
    vm.complete(IRETQ).unwrap();
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp, r.rflags), (0x1_0000, 0x9000, 0x202));
    assert_eq!(s.ss.selector, DATA0);
}

#[test]
fn instruction_bytes_read_from_memory() {
    // Without KVM's bytes, the instruction is fetched at CS:RIP through the page tables.
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let mut r = vm.vcpu.get_regs().unwrap();
    r.rip = 0x20_0ffe; // `48 cf` is the last two bytes of page A
    vm.vcpu.set_regs(&r).unwrap();
    vm.mem
        .write_slice(IRETQ, GuestAddress(PAGE_A + 0xffe))
        .unwrap();
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, 0]);
    assert_eq!(
        Completer::new().complete(&vm.vcpu, &vm.mem, None).unwrap(),
        Kind::Iret
    );
    assert_eq!(vm.state().0.rsp, 0x9000);
}

/// Complete `bytes` expecting a refusal; the vCPU and the GDT must be as they were.
fn refused(vm: &TestVm, bytes: &[u8]) -> CompleteError {
    let before = vm.state();
    let gdt: Vec<u8> = (0..GDT_ENTRIES.len() as u64 * 8)
        .map(|i| vm.mem.read_obj(GuestAddress(GDT + i)).unwrap())
        .collect();
    let err = vm.complete(bytes).unwrap_err();
    assert_eq!(vm.state(), before, "refusal changed the vCPU: {err}");
    let after: Vec<u8> = (0..GDT_ENTRIES.len() as u64 * 8)
        .map(|i| vm.mem.read_obj(GuestAddress(GDT + i)).unwrap())
        .collect();
    assert_eq!(after, gdt, "refusal changed the GDT: {err}");
    err
}

fn assert_fault(err: &CompleteError, exception: Exception) {
    match err {
        CompleteError::Refused {
            why: Refusal::Fault(_, e),
            ..
        } => assert_eq!(*e, exception, "{err}"),
        other => panic!("expected a fault, got {other}"),
    }
}

#[test]
fn null_cs_is_refused() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2);
    vm.frame(0x8000, 4, &[0x1234, 0, 0x2]);
    let err = refused(&vm, IRET);
    assert_fault(&err, Exception::Gp(0));
    assert_eq!(err.insn(), Some("iretd"));
    assert_eq!(
        err.to_string(),
        "Cannot complete `iretd`: return CS selector is null: the guest would take #GP(0)"
    );
    assert_eq!(Exception::Np(0x40).to_string(), "#NP(0x40)");
}

#[test]
fn nested_task_return_is_refused() {
    let vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2 | NT);
    vm.frame(0x8000, 4, &[0x1234, u64::from(CODE32), 0x2]);
    let err = refused(&vm, IRET);
    assert!(
        matches!(
            err,
            CompleteError::Refused {
                why: Refusal::Unsupported(_),
                ..
            }
        ),
        "{err}"
    );
    // In IA-32e mode NT makes IRET fault.
    vm.long(0, 0x7000, 0x2 | NT);
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, 0]);
    assert_fault(&refused(&vm, IRETQ), Exception::Gp(0));
}

#[test]
fn bad_return_segments_are_refused() {
    let vm = TestVm::new();
    // RPL below CPL: ring 3 cannot return to ring 0.
    vm.long(3, 0x7000, 0x2);
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, 0]);
    assert_fault(&refused(&vm, IRETQ), Exception::Gp(CODE64));

    vm.protected(0, 0x8000, 0x2);
    // A data segment as CS.
    vm.frame(0x8000, 4, &[0x1234, u64::from(DATA0), 0x2]);
    assert_fault(&refused(&vm, IRET), Exception::Gp(DATA0));
    // A CS that is not present.
    vm.frame(0x8000, 4, &[0x1234, u64::from(CODE32_ABSENT), 0x2]);
    assert_fault(&refused(&vm, IRET), Exception::Np(CODE32_ABSENT));
    // Beyond the GDT limit.
    vm.frame(0x8000, 4, &[0x1234, 0x1000, 0x2]);
    assert_fault(&refused(&vm, IRET), Exception::Gp(0x1000));
    // A return to ring 3 with a read-only stack segment.
    vm.frame(
        0x8000,
        4,
        &[
            0x4000,
            u64::from(CODE32_3),
            0x2,
            0x9000,
            u64::from(DATA0_READONLY | 3),
        ],
    );
    assert_fault(&refused(&vm, IRET), Exception::Gp(DATA0_READONLY));
    // A null SS outside 64-bit mode.
    vm.frame(0x8000, 4, &[0x4000, u64::from(CODE32_3), 0x2, 0x9000, 0]);
    assert_fault(&refused(&vm, IRET), Exception::Gp(0));
    // An SS whose DPL is not the new CPL.
    vm.frame(
        0x8000,
        4,
        &[
            0x4000,
            u64::from(CODE32_3),
            0x2,
            0x9000,
            u64::from(DATA0_UNACCESSED | 3),
        ],
    );
    assert_fault(&refused(&vm, IRET), Exception::Gp(DATA0_UNACCESSED));
    // Non-canonical RIP.
    vm.long(0, 0x7000, 0x2);
    vm.frame(
        0x7000,
        8,
        &[0x8000_0000_0000, u64::from(CODE64), 0x2, 0x9000, 0],
    );
    assert_fault(&refused(&vm, IRETQ), Exception::Gp(0));
}

#[test]
fn unknown_instruction_names_itself() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let err = refused(&vm, &[0x0f, 0xae, 0x28]); // xrstor [rax]
    assert!(matches!(err, CompleteError::Unknown(_)), "{err}");
    assert_eq!(err.insn(), Some("0f ae 28 at 0x1000"));
}

#[test]
fn short_reported_bytes_fall_back_to_memory() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    // KVM's bytes stop short: the instruction is read at RIP (0x1000, the GDT's null entry,
    // whose zeros decode as `add [rax],al`, which has no completion).
    let err = vm.complete(&[0x48]).unwrap_err();
    assert_eq!(err.insn(), Some("00 00 at 0x1000"));
}

#[test]
fn undecodable_bytes_are_reported() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let mut r = vm.vcpu.get_regs().unwrap();
    r.rip = 0x6000;
    vm.vcpu.set_regs(&r).unwrap();
    vm.mem
        .write_slice(&[0x06; 15], GuestAddress(0x6000))
        .unwrap(); // push es: invalid in 64-bit
    let err = refused(&vm, &[0x06]);
    assert!(matches!(err, CompleteError::Decode(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("Cannot decode instruction bytes [06 06"),
        "{err}"
    );
}

#[test]
fn iret_ends_nmi_blocking_and_the_interrupt_shadow() {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2 | IF);
    let mut ev = vm.vcpu.get_vcpu_events().unwrap();
    ev.nmi.masked = 1;
    ev.interrupt.shadow = 1; // STI blocking
    ev.flags = KVM_VCPUEVENT_VALID_SHADOW;
    vm.vcpu.set_vcpu_events(&ev).unwrap();
    let ev = vm.vcpu.get_vcpu_events().unwrap();
    assert_eq!((ev.nmi.masked, ev.interrupt.shadow), (1, 1));
    vm.frame(0x7000, 8, &[0x1_0000, u64::from(CODE64), 0x2, 0x9000, 0]);
    vm.complete(IRETQ).unwrap();
    let ev = vm.vcpu.get_vcpu_events().unwrap();
    assert_eq!((ev.nmi.masked, ev.interrupt.shadow), (0, 0));
}

#[test]
fn counts_per_kind() {
    let vm = TestVm::new();
    let mut c = Completer::new();
    for _ in 0..2 {
        vm.protected(0, 0x8000, 0x2);
        vm.frame(0x8000, 4, &[0x1234, u64::from(CODE32), 0x2]);
        c.complete(&vm.vcpu, &vm.mem, Some(IRET)).unwrap();
    }
    assert_eq!(c.count(Kind::Iret), 2);
}

#[test]
fn reported_bytes_from_kvm_run() {
    let mut run = kvm_run {
        exit_reason: KVM_EXIT_INTERNAL_ERROR,
        ..Default::default()
    };
    run.__bindgen_anon_1.emulation_failure.suberror = KVM_INTERNAL_ERROR_EMULATION;
    // An emulation failure without bytes.
    assert!(ReportedBytes::from_run(&run).unwrap().as_slice().is_none());
    // The layout KVM writes: flags, then size and up to 15 bytes (as seen on an `iret` exit).
    // SAFETY: writing plain integers into the union member KVM fills for this exit.
    unsafe {
        let f = &mut run.__bindgen_anon_1.emulation_failure;
        f.ndata = 8;
        f.flags = 1;
        f.__bindgen_anon_1.__bindgen_anon_1.insn_size = 2;
        f.__bindgen_anon_1.__bindgen_anon_1.insn_bytes[..2].copy_from_slice(&[0x48, 0xcf]);
    }
    let r = ReportedBytes::from_run(&run).unwrap();
    assert_eq!(r.as_slice(), Some(&[0x48, 0xcf][..]));
    // Another suberror is not ours to complete.
    run.__bindgen_anon_1.emulation_failure.suberror = 2;
    assert!(ReportedBytes::from_run(&run).is_none());
}

impl TestVm {
    /// Put `out 0x80, al; hlt` at linear `rip`, run the vCPU, and return the port it wrote: the
    /// completed state passes VM entry and executes where the frame said.
    fn run_to_out(&mut self, rip: u64) -> u16 {
        self.mem
            .write_slice(&[0xe6, 0x80, 0xf4], GuestAddress(Self::phys(rip)))
            .unwrap();
        match self.vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(port, _) => port,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

#[test]
fn runs_after_iretd_32() {
    let mut vm = TestVm::new();
    vm.protected(0, 0x8000, 0x2);
    vm.frame(0x8000, 4, &[0x5000, u64::from(CODE32), 0x2]);
    vm.complete(IRET).unwrap();
    assert_eq!(vm.run_to_out(0x5000), 0x80);
    assert_eq!(vm.state().0.rip, 0x5002);
}

#[test]
fn runs_after_iretq_with_null_ss() {
    let mut vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    vm.frame(0x7000, 8, &[0x5000, u64::from(CODE64), 0x2, 0x9000, 0]);
    vm.complete(IRETQ).unwrap();
    assert_eq!(vm.run_to_out(0x5000), 0x80);
    let (r, s) = vm.state();
    assert_eq!(
        (r.rip, r.rsp, s.ss.selector, s.ss.dpl),
        (0x5002, 0x9000, 0, 0)
    );
}

#[test]
fn runs_after_iretq_to_ring3() {
    let mut vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    // IOPL 3 lets ring 3 use `out`.
    vm.frame(
        0x7000,
        8,
        &[
            0x20_1000,
            u64::from(CODE64_3),
            0x2 | IOPL3,
            0x7_0000,
            u64::from(DATA3),
        ],
    );
    vm.complete(IRETQ).unwrap();
    assert_eq!(vm.run_to_out(0x20_1000), 0x80);
    let (r, s) = vm.state();
    assert_eq!((r.rip, s.cs.selector, s.ss.dpl), (0x20_1002, CODE64_3, 3));
}
