//! The completions other than IRET, each checked against a reference: for arithmetic the same
//! instruction run natively in this process, for INT3 the frame the SDM prescribes.

use core::arch::asm;

use super::*;

const AC: u64 = 1 << 18;
const TF: u64 = 1 << 8;
const RF: u64 = 1 << 16;
const ARITH: u64 = 0x8d5; // CF PF AF ZF SF OF

/// A 64-bit CPL 0 vCPU at RIP 0x1000 with `set` applied to its registers.
fn long0(set: impl FnOnce(&mut kvm_regs)) -> TestVm {
    let vm = TestVm::new();
    vm.long(0, 0x7000, 0x2);
    let mut r = vm.vcpu.get_regs().unwrap();
    set(&mut r);
    vm.vcpu.set_regs(&r).unwrap();
    vm
}

/// Complete `bytes`, check it counted as `kind`, and return the registers after it.
fn run(vm: &TestVm, bytes: &[u8], kind: Kind) -> kvm_regs {
    let mut c = Completer::new();
    assert_eq!(c.complete(&vm.vcpu, &vm.mem, Some(bytes)).unwrap(), kind);
    assert_eq!(c.count(kind), 1);
    let r = vm.vcpu.get_regs().unwrap();
    assert_eq!(
        r.rip,
        0x1000 + bytes.len() as u64,
        "RIP after the instruction"
    );
    r
}

#[test]
fn clac_and_stac_flip_ac_only() {
    let vm = long0(|r| r.rflags = 0x2 | AC | 0x1);
    let r = run(&vm, &[0x0f, 0x01, 0xca], Kind::Clac);
    assert_eq!(r.rflags, 0x2 | 0x1);
    let vm = long0(|r| r.rflags = 0x2);
    let r = run(&vm, &[0x0f, 0x01, 0xcb], Kind::Stac);
    assert_eq!(r.rflags, 0x2 | AC);
}

#[test]
fn clac_at_cpl3_is_refused() {
    let vm = TestVm::new();
    vm.long(3, 0x7000, 0x2 | AC);
    assert_fault(&refused(&vm, &[0x0f, 0x01, 0xca]), Exception::Ud);
}

/// Run `popcnt` natively: (result, arithmetic flags).
fn native_popcnt64(v: u64) -> (u64, u64) {
    let out: u64;
    let flags: u64;
    // SAFETY: popcnt on registers and pushfq/pop on our own stack; the CPU has POPCNT (checked by
    // the caller).
    unsafe {
        asm!("popcnt {o}, {i}", "pushfq", "pop {f}", o = out(reg) out, i = in(reg) v,
             f = out(reg) flags);
    }
    (out, flags & ARITH)
}

fn native_popcnt16(v: u16) -> (u16, u64) {
    let out: u16;
    let flags: u64;
    // SAFETY: as above.
    unsafe {
        asm!("popcnt {o:x}, {i:x}", "pushfq", "pop {f}", o = out(reg) out, i = in(reg) v,
             f = out(reg) flags);
    }
    (out, flags & ARITH)
}

#[test]
fn popcnt_matches_the_cpu() {
    if !std::is_x86_feature_detected!("popcnt") {
        return;
    }
    for v in [
        0u64,
        1,
        0x8000_0000_0000_0001,
        u64::MAX,
        0x1234_5678_9abc_def0,
    ] {
        // popcnt rax, rbx, starting from flags all set (they must all be rewritten).
        let vm = long0(|r| {
            r.rbx = v;
            r.rax = 0xdead;
            r.rflags = 0x2 | ARITH;
        });
        let r = run(&vm, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3], Kind::Popcnt);
        let (want, flags) = native_popcnt64(v);
        assert_eq!((r.rax, r.rflags & ARITH), (want, flags), "{v:#x}");

        // popcnt ax, bx keeps the upper bits of RAX.
        let vm = long0(|r| {
            r.rbx = v;
            r.rax = 0xffff_ffff_ffff_ffff;
        });
        let r = run(&vm, &[0x66, 0xf3, 0x0f, 0xb8, 0xc3], Kind::Popcnt);
        let (want, flags) = native_popcnt16(v as u16);
        assert_eq!(r.rax, 0xffff_ffff_ffff_0000 | u64::from(want));
        assert_eq!(r.rflags & ARITH, flags);
    }
    // popcnt eax, [rsi]: a memory operand, and the 32-bit write clears the upper half.
    let vm = long0(|r| {
        r.rsi = 0x6000;
        r.rax = u64::MAX;
    });
    vm.mem.write_obj(0xf0f0_u32, GuestAddress(0x6000)).unwrap();
    let r = run(&vm, &[0xf3, 0x0f, 0xb8, 0x06], Kind::Popcnt);
    assert_eq!(r.rax, 8);
}

#[test]
fn fwait_does_nothing_but_advance() {
    let vm = long0(|r| r.rflags = 0x2 | 0x1);
    let before = vm.vcpu.get_regs().unwrap();
    let r = run(&vm, &[0x9b], Kind::Fwait);
    assert_eq!(
        kvm_regs {
            rip: before.rip,
            ..r
        },
        before
    );
}

#[test]
fn fwait_with_mp_and_ts_is_refused() {
    let vm = long0(|_| {});
    let mut s = vm.vcpu.get_sregs().unwrap();
    s.cr0 |= 0xa; // MP, TS
    vm.vcpu.set_sregs(&s).unwrap();
    assert_fault(&refused(&vm, &[0x9b]), Exception::Nm);
}

macro_rules! native_shift {
    ($name:ident, $insn:literal, $ty:ty, $mod:literal) => {
        fn $name(src: $ty, count: $ty) -> $ty {
            let out: $ty;
            // SAFETY: a BMI2 shift on registers only; the caller checked the CPU has BMI2.
            unsafe {
                asm!(concat!($insn, " {o", $mod, "}, {s", $mod, "}, {c", $mod, "}"),
                     o = out(reg) out, s = in(reg) src, c = in(reg) count,
                     options(nomem, nostack, preserves_flags));
            }
            out
        }
    };
}
native_shift!(shlx64, "shlx", u64, "");
native_shift!(shrx64, "shrx", u64, "");
native_shift!(sarx64, "sarx", u64, "");
native_shift!(shlx32, "shlx", u32, ":e");
native_shift!(shrx32, "shrx", u32, ":e");
native_shift!(sarx32, "sarx", u32, ":e");

#[test]
fn shlx_shrx_sarx_match_the_cpu() {
    if !std::is_x86_feature_detected!("bmi2") {
        return;
    }
    // (bytes, kind, 64-bit?, native) for `op rax/eax, rbx/ebx, rcx/ecx`.
    type Native64 = fn(u64, u64) -> u64;
    type Native32 = fn(u32, u32) -> u32;
    let wide: [(&[u8], Kind, Native64); 3] = [
        (&[0xc4, 0xe2, 0xf1, 0xf7, 0xc3], Kind::Shlx, shlx64),
        (&[0xc4, 0xe2, 0xf3, 0xf7, 0xc3], Kind::Shrx, shrx64),
        (&[0xc4, 0xe2, 0xf2, 0xf7, 0xc3], Kind::Sarx, sarx64),
    ];
    let narrow: [(&[u8], Kind, Native32); 3] = [
        (&[0xc4, 0xe2, 0x71, 0xf7, 0xc3], Kind::Shlx, shlx32),
        (&[0xc4, 0xe2, 0x73, 0xf7, 0xc3], Kind::Shrx, shrx32),
        (&[0xc4, 0xe2, 0x72, 0xf7, 0xc3], Kind::Sarx, sarx32),
    ];
    let values = [0x8000_0000_8000_0001_u64, 0x1234_5678_9abc_def0, u64::MAX];
    let counts = [0u64, 1, 31, 32, 63, 64, 65, 0xffff_ffff_ffff_ff21];
    for v in values {
        for c in counts {
            for (bytes, kind, native) in wide {
                let vm = long0(|r| {
                    (r.rbx, r.rcx, r.rflags) = (v, c, 0x2 | 0x1);
                });
                let r = run(&vm, bytes, kind);
                assert_eq!(r.rax, native(v, c), "{kind} {v:#x} {c}");
                assert_eq!(r.rflags, 0x2 | 0x1, "flags untouched");
            }
            for (bytes, kind, native) in narrow {
                let vm = long0(|r| {
                    (r.rax, r.rbx, r.rcx) = (u64::MAX, v, c);
                });
                let r = run(&vm, bytes, kind);
                assert_eq!(r.rax, u64::from(native(v as u32, c as u32)), "{kind}32");
            }
        }
    }
    // shlx rax, [rsi], rcx
    let vm = long0(|r| (r.rsi, r.rcx) = (0x6000, 4));
    vm.mem.write_obj(0x1234_u64, GuestAddress(0x6000)).unwrap();
    let r = run(&vm, &[0xc4, 0xe2, 0xf1, 0xf7, 0x06], Kind::Shlx);
    assert_eq!(r.rax, 0x12340);
}

#[test]
fn rdrand_and_rdseed_give_a_value_with_cf() {
    let vm = long0(|r| r.rflags = 0x2 | ARITH);
    let r = run(&vm, &[0x48, 0x0f, 0xc7, 0xf0], Kind::Rdrand);
    assert_eq!(r.rflags, 0x2 | 0x1);
    let first = r.rax;
    let vm = long0(|r| r.rax = u64::MAX);
    let r = run(&vm, &[0x0f, 0xc7, 0xf8], Kind::Rdseed);
    assert_eq!(r.rflags & ARITH, 0x1);
    assert_eq!(r.rax >> 32, 0, "a 32-bit destination is zero-extended");
    assert_ne!((first, r.rax), (0, 0));
}

#[test]
fn cmpxchg16b_matches_the_cpu() {
    const ZF: u64 = 1 << 6;
    #[repr(align(16))]
    struct Cell([u64; 2]);
    for (mem, rdx_rax) in [([1u64, 2], (2u64, 1u64)), ([1, 2], (2, 3))] {
        // Natively first.
        let mut cell = Cell(mem);
        let (mut rax, mut rdx) = (rdx_rax.1, rdx_rax.0);
        // SAFETY: `cell` is a 16-byte aligned 16-byte buffer we own.
        let eq = unsafe {
            crate::complete::cmpxchg16b::cmpxchg16b(
                cell.0.as_mut_ptr().cast(),
                &mut rax,
                &mut rdx,
                7,
                8,
            )
        };
        let vm = long0(|r| {
            (r.rsi, r.rax, r.rdx, r.rbx, r.rcx) = (0x6000, rdx_rax.1, rdx_rax.0, 7, 8);
        });
        vm.mem.write_obj(mem[0], GuestAddress(0x6000)).unwrap();
        vm.mem.write_obj(mem[1], GuestAddress(0x6008)).unwrap();
        let r = run(&vm, &[0x48, 0x0f, 0xc7, 0x0e], Kind::Cmpxchg16b);
        let got: [u64; 2] = [
            vm.mem.read_obj(GuestAddress(0x6000)).unwrap(),
            vm.mem.read_obj(GuestAddress(0x6008)).unwrap(),
        ];
        assert_eq!(got, cell.0);
        assert_eq!((r.rax, r.rdx), (rax, rdx));
        assert_eq!(r.rflags & ZF != 0, eq);
    }
    // Misaligned: #GP(0).
    let vm = long0(|r| r.rsi = 0x6008);
    assert_fault(&refused(&vm, &[0x48, 0x0f, 0xc7, 0x0e]), Exception::Gp(0));
}

const IDT: u64 = 0xa000;
const TSS: u64 = 0xb000;
const HANDLER: u64 = 0xffff_ffff_8100_0000;

/// An IDT entry for vector 3 and a TSS with RSP0 = 0x9008 and IST1 = 0xc008 (both misaligned so
/// that the alignment shows).
fn idt(vm: &TestVm, type_: u8, dpl: u8, ist: u8, selector: u16) {
    let lo = (HANDLER & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist) << 32)
        | (u64::from(type_) << 40)
        | (u64::from(dpl) << 45)
        | (1 << 47)
        | (((HANDLER >> 16) & 0xffff) << 48);
    let hi = HANDLER >> 32;
    vm.mem.write_obj(lo, GuestAddress(IDT + 48)).unwrap();
    vm.mem.write_obj(hi, GuestAddress(IDT + 56)).unwrap();
    vm.mem.write_obj(0x9008_u64, GuestAddress(TSS + 4)).unwrap();
    vm.mem
        .write_obj(0xc008_u64, GuestAddress(TSS + 0x24))
        .unwrap();
    let mut s = vm.vcpu.get_sregs().unwrap();
    s.idt.base = IDT;
    s.idt.limit = 0xfff;
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x58,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    vm.vcpu.set_sregs(&s).unwrap();
}

/// The five items pushed, lowest address first: RIP, CS, RFLAGS, RSP, SS.
fn pushed(vm: &TestVm, rsp: u64) -> [u64; 5] {
    std::array::from_fn(|i| vm.mem.read_obj(GuestAddress(rsp + 8 * i as u64)).unwrap())
}

#[test]
fn int3_same_privilege_interrupt_gate() {
    let vm = TestVm::new();
    vm.long(0, 0x7ff8, 0x2 | IF | TF | RF | NT | AC | 0x1);
    idt(&vm, 0xe, 3, 0, CODE64);
    let before = vm.state();
    assert_eq!(vm.complete(&[0xcc]).unwrap(), Kind::Int3);
    let (r, s) = vm.state();
    // Aligned down to 16, then five items.
    assert_eq!(r.rsp, 0x7ff0 - 40);
    assert_eq!(r.rip, HANDLER);
    assert_eq!(
        pushed(&vm, r.rsp),
        [
            0x1001,
            u64::from(CODE64),
            0x2 | IF | TF | RF | NT | AC | 0x1,
            0x7ff8,
            u64::from(DATA0)
        ]
    );
    // TF, NT, RF and (interrupt gate) IF cleared; AC and the arithmetic flags kept.
    assert_eq!(r.rflags, 0x2 | AC | 0x1);
    assert_eq!(s.cs, gdt_seg(CODE64));
    assert_eq!(s.ss, before.1.ss);
    assert_eq!((r.rax, r.rbx), (before.0.rax, before.0.rbx));
}

#[test]
fn int3_trap_gate_keeps_if_and_ist_gives_the_stack() {
    let vm = TestVm::new();
    vm.long(0, 0x7ff8, 0x2 | IF);
    idt(&vm, 0xf, 3, 1, CODE64);
    vm.complete(&[0xcc]).unwrap();
    let (r, _) = vm.state();
    assert_eq!(r.rsp, 0xc000 - 40);
    assert_eq!(r.rflags, 0x2 | IF);
    assert_eq!(pushed(&vm, r.rsp)[3], 0x7ff8);
}

#[test]
fn int3_from_ring3_switches_to_rsp0_with_a_null_ss() {
    let vm = TestVm::new();
    vm.long(3, 0x7ff8, 0x2 | IF);
    idt(&vm, 0xe, 3, 0, CODE64);
    vm.complete(&[0xcc]).unwrap();
    let (r, s) = vm.state();
    assert_eq!(r.rsp, 0x9000 - 40);
    assert_eq!(
        pushed(&vm, r.rsp),
        [
            0x1001,
            u64::from(CODE64_3),
            0x2 | IF,
            0x7ff8,
            u64::from(DATA3)
        ]
    );
    assert_eq!(s.cs, gdt_seg(CODE64));
    assert_eq!((s.ss.selector, s.ss.dpl), (0, 0));
    assert_eq!(r.rflags, 0x2);
}

#[test]
fn int3_gate_checks() {
    // DPL 0 gate from CPL 3: #GP(vector * 8 + 2).
    let vm = TestVm::new();
    vm.long(3, 0x7ff8, 0x2);
    idt(&vm, 0xe, 0, 0, CODE64);
    assert_fault(&refused(&vm, &[0xcc]), Exception::Gp(3 * 8 + 2));
    // A call gate type is no interrupt gate.
    let vm = TestVm::new();
    vm.long(0, 0x7ff8, 0x2);
    idt(&vm, 0xc, 3, 0, CODE64);
    assert_fault(&refused(&vm, &[0xcc]), Exception::Gp(3 * 8 + 2));
    // A 32-bit code segment as target.
    let vm = TestVm::new();
    vm.long(0, 0x7ff8, 0x2);
    idt(&vm, 0xe, 3, 0, CODE32);
    assert_fault(&refused(&vm, &[0xcc]), Exception::Gp(CODE32));
}

fn set_syscall_msrs(vm: &TestVm) {
    use kvm_bindings::{Msrs, kvm_msr_entry};
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        e(0xc000_0081, u64::from(CODE64) << 32 | 0x23 << 48),
        e(0xc000_0082, HANDLER),
        e(0xc000_0084, 0x47700), // Linux's mask: TF DF IF IOPL AC NT
    ])
    .unwrap();
    assert_eq!(vm.vcpu.set_msrs(&msrs).unwrap(), 3);
}

#[test]
fn clac_in_a_fault_from_the_syscall_entry_redoes_the_syscall() {
    // #GP frame (with an error code) from the `swapgs` after ENDBR64 at the entry, at CPL 3.
    let vm = long0(|r| {
        (r.rsp, r.rcx, r.r11) = (0x7000, 0x40_1234, 0x246 | AC);
        r.rflags = 0x2;
    });
    set_syscall_msrs(&vm);
    let frame = [0, HANDLER + 4, 0x33, 0x246, 0x7fff_f000, 0x2b];
    vm.frame(0x7000, 8, &frame);
    let mut c = Completer::new();
    let kind = c.complete(&vm.vcpu, &vm.mem, Some(&[0x0f, 0x01, 0xca]));
    assert_eq!(kind.unwrap(), Kind::Syscall);
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rsp), (HANDLER, 0x7fff_f000));
    // SYSCALL's RFLAGS: R11 with FMASK's bits (and RF) cleared.
    assert_eq!(r.rflags, 0x46);
    assert_eq!((r.rcx, r.r11), (0x40_1234, 0x246 | AC));
    assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (CODE64, 1, 0));
    assert_eq!((s.ss.selector, s.ss.dpl, s.ss.type_), (CODE64 + 8, 0, 3));
}

#[test]
fn clac_in_other_faults_is_a_plain_clac() {
    let vm = long0(|r| {
        r.rsp = 0x7000;
        r.rflags = 0x2 | AC;
    });
    set_syscall_msrs(&vm);
    // A user-mode page fault elsewhere.
    vm.frame(0x7000, 8, &[4, 0x40_0000, 0x33, 0x246, 0x7fff_f000, 0x2b]);
    let r = run(&vm, &[0x0f, 0x01, 0xca], Kind::Clac);
    assert_eq!((r.rsp, r.rflags), (0x7000, 0x2));
}

#[test]
fn swapgs_exchanges_gs_base_with_kernel_gs_base() {
    use kvm_bindings::{Msrs, kvm_msr_entry};
    let vm = long0(|_| {});
    let mut s = vm.vcpu.get_sregs().unwrap();
    s.gs.base = 0x1111_0000;
    vm.vcpu.set_sregs(&s).unwrap();
    let kgs = |data| kvm_msr_entry {
        index: 0xc000_0102,
        data,
        ..Default::default()
    };
    vm.vcpu
        .set_msrs(&Msrs::from_entries(&[kgs(0xffff_8880_0000_0000)]).unwrap())
        .unwrap();
    run(&vm, &[0x0f, 0x01, 0xf8], Kind::Swapgs);
    assert_eq!(vm.vcpu.get_sregs().unwrap().gs.base, 0xffff_8880_0000_0000);
    let mut m = Msrs::from_entries(&[kgs(0)]).unwrap();
    vm.vcpu.get_msrs(&mut m).unwrap();
    assert_eq!(m.as_slice()[0].data, 0x1111_0000);
    // Not at CPL 3.
    let vm = TestVm::new();
    vm.long(3, 0x7000, 0x2);
    assert_fault(&refused(&vm, &[0x0f, 0x01, 0xf8]), Exception::Gp(0));
}

#[test]
fn sysretq_returns_to_ring3() {
    let vm = long0(|r| (r.rcx, r.r11) = (0x40_1000, 0x246 | RF | TF));
    set_syscall_msrs(&vm); // STAR[63:48] = 0x23: user CS 0x33, SS 0x2b
    assert_eq!(vm.complete(&[0x48, 0x0f, 0x07]).unwrap(), Kind::Sysret);
    let (r, s) = vm.state();
    assert_eq!((r.rip, r.rflags), (0x40_1000, 0x346));
    assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db), (0x33, 3, 1, 0));
    assert_eq!((s.ss.selector, s.ss.dpl), (0x2b, 3));
    // A non-canonical RCX: #GP(0).
    let vm = long0(|r| r.rcx = 0x8000_0000_0000_0000);
    set_syscall_msrs(&vm);
    assert_fault(&refused(&vm, &[0x48, 0x0f, 0x07]), Exception::Gp(0));
}
