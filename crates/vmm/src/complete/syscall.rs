//! The fix-up for a user-mode SYSCALL on hosts that get it wrong.
//!
//! On the nested hosts this module was written for, a SYSCALL at CPL 3 jumps to the kernel's
//! entry point (IA32_LSTAR) and sets RCX and R11 but leaves the vCPU in user mode, so the
//! entry's first privileged instruction (`swapgs`) faults, and the fault delivers the guest to its
//! #GP (or #UD) handler, whose first instruction, `clac`, KVM hands back. That state is
//! recognisable: a CLAC at CPL 0 with, on top of the stack, an exception frame whose saved RIP is
//! the SYSCALL entry (or the instruction after its ENDBR64) and whose saved CS is a user one.
//! The completion then does what SYSCALL should have done, from the frame: CS and SS from
//! IA32_STAR[47:32] (flat, DPL 0), RIP = IA32_LSTAR, RFLAGS = R11 & ~IA32_FMASK (RF cleared), RSP
//! back to the user stack pointer. RCX and R11 already hold what SYSCALL put there. The entry
//! then runs again, at CPL 0 this time.

use kvm_bindings::kvm_segment;

use super::Refusal;
use super::state::{Mode, State};

pub(super) const MSR_STAR: u32 = 0xc000_0081;
pub(super) const MSR_LSTAR: u32 = 0xc000_0082;
pub(super) const MSR_FMASK: u32 = 0xc000_0084;
/// ENDBR64 may come first at the entry (with IBT kernels).
const ENDBR64_LEN: u64 = 4;
const RF: u64 = 1 << 16;

/// If the vCPU (at a CLAC) is in a fault handler entered from a SYSCALL that stayed in user
/// mode, redo the SYSCALL and return true; false (nothing changed) otherwise.
pub(super) fn fixup(st: &mut State<'_>) -> Result<bool, Refusal> {
    if st.mode() != Mode::Long64 || st.cpl() != 0 {
        return Ok(false);
    }
    // The frame: [error code,] RIP, CS, RFLAGS, RSP, SS. Try with and without an error code.
    let mut raw = [0u8; 48];
    if st.read_linear(st.regs.rsp, &mut raw).is_err() {
        return Ok(false);
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let user_cs = |cs: u64| cs & 3 == 3 && cs >> 16 == 0;
    let frame = if user_cs(word(2)) {
        1
    } else if user_cs(word(1)) {
        0
    } else {
        return Ok(false);
    };
    let (rip, user_rsp) = (word(frame), word(frame + 3));
    let [star, lstar, fmask] = st.msrs([MSR_STAR, MSR_LSTAR, MSR_FMASK])?;
    if rip != lstar && rip != lstar.wrapping_add(ENDBR64_LEN) {
        return Ok(false);
    }
    let cs_sel = ((star >> 32) & 0xfffc) as u16;
    st.sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs_sel,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    st.sregs.ss = kvm_segment {
        selector: cs_sel + 8,
        type_: 0x3,
        db: 1,
        l: 0,
        ..st.sregs.cs
    };
    st.regs.rip = lstar;
    st.regs.rsp = user_rsp;
    st.regs.rflags = (st.regs.r11 & !fmask & !RF) | 0x2;
    Ok(true)
}
