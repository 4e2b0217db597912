//! SYSRET (64-bit mode, CPL 0): back to user mode after SYSCALL. RIP = RCX (ECX for the 32-bit
//! form), RFLAGS = R11 with RF and VM cleared and bit 1 set, CS and SS from IA32_STAR[63:48]
//! (+16 and +8 for the 64-bit form, +0 and +8 for the 32-bit one) with RPL 3 and the fixed flat
//! descriptors the SDM gives (not read from the GDT).

use iced_x86::{Code, Instruction};
use kvm_bindings::kvm_segment;

use super::state::{Mode, State};
use super::syscall::MSR_STAR;
use super::{Exception, Refusal};

const RF_VM: u64 = (1 << 16) | (1 << 17);
/// RFLAGS bits 63:22, 15, 5 and 3 are reserved (read as 0) and bit 1 as 1.
const RFLAGS_LOADABLE: u64 = 0x3c_7fd5;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    if st.mode() != Mode::Long64 {
        return Err(Refusal::Unsupported("SYSRET outside 64-bit mode"));
    }
    if st.cpl() != 0 {
        return Err(Refusal::Fault("SYSRET above CPL 0", Exception::Gp(0)));
    }
    let to_64 = insn.code() == Code::Sysretq;
    let rip = if to_64 {
        st.regs.rcx
    } else {
        st.regs.rcx & 0xffff_ffff
    };
    if to_64 && !st.canonical(rip) {
        return Err(Refusal::Fault(
            "SYSRET to a non-canonical RIP",
            Exception::Gp(0),
        ));
    }
    let [star] = st.msrs([MSR_STAR])?;
    let base = ((star >> 48) & 0xffff) as u16;
    let cs_sel = if to_64 { base + 16 } else { base } | 3;
    st.sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs_sel,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: u8::from(!to_64),
        s: 1,
        l: u8::from(to_64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    st.sregs.ss = kvm_segment {
        selector: (base + 8) | 3,
        type_: 0x3,
        db: 1,
        l: 0,
        ..st.sregs.cs
    };
    st.regs.rflags = (st.regs.r11 & RFLAGS_LOADABLE & !RF_VM) | 0x2;
    st.regs.rip = rip;
    Ok(())
}
