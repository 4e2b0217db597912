//! Operands of an instruction as a completion reads and writes them: general registers with
//! their x86 write rules, and memory operands at their linear address.

use iced_x86::{Instruction, OpKind, Register};
use kvm_bindings::kvm_regs;

use super::Refusal;
use super::state::{Mode, State};

// RFLAGS arithmetic bits.
pub(super) const CF: u64 = 1 << 0;
pub(super) const PF: u64 = 1 << 2;
pub(super) const AF: u64 = 1 << 4;
pub(super) const ZF: u64 = 1 << 6;
pub(super) const SF: u64 = 1 << 7;
pub(super) const OF: u64 = 1 << 11;
pub(super) const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// The 64-bit register slot of general register number `n` (RAX = 0 ... R15 = 15).
fn slot(regs: &mut kvm_regs, n: usize) -> Option<&mut u64> {
    Some(match n {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        15 => &mut regs.r15,
        _ => return None,
    })
}

/// Slot number, bit shift and size in bytes of a general register (AH..BH are bits 8..15 of
/// RAX..RBX). iced-x86 numbers each size's registers contiguously: AL..R15L, AX..R15W,
/// EAX..R15D, RAX..R15.
fn locate(reg: Register) -> Option<(usize, u32, usize)> {
    let r = reg as usize;
    let in_group = |first: Register, n: usize| r.checked_sub(first as usize).filter(|i| *i < n);
    if let Some(i) = in_group(Register::AL, 20) {
        // AL, CL, DL, BL, AH, CH, DH, BH, SPL, BPL, SIL, DIL, R8L..R15L.
        return Some(match i {
            0..=3 => (i, 0, 1),
            4..=7 => (i - 4, 8, 1),
            _ => (i - 4, 0, 1),
        });
    }
    if let Some(i) = in_group(Register::AX, 16) {
        return Some((i, 0, 2));
    }
    if let Some(i) = in_group(Register::EAX, 16) {
        return Some((i, 0, 4));
    }
    in_group(Register::RAX, 16).map(|i| (i, 0, 8))
}

/// Size in bytes of a general register, 0 for any other register.
pub(super) fn size(reg: Register) -> usize {
    locate(reg).map_or(0, |(_, _, size)| size)
}

fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// The value of a general register, zero-extended.
pub(super) fn gpr(regs: &kvm_regs, reg: Register) -> Result<u64, Refusal> {
    let (n, shift, size) = locate(reg).ok_or(Refusal::Unsupported("a non-general register"))?;
    let mut copy = *regs;
    let v = *slot(&mut copy, n).ok_or(Refusal::Unsupported("a non-general register"))?;
    Ok((v >> shift) & mask(size))
}

/// Write a general register as an instruction does: a 32-bit write zero-extends into the whole
/// register, 8- and 16-bit writes keep the other bits.
pub(super) fn set_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> Result<(), Refusal> {
    let (n, shift, size) = locate(reg).ok_or(Refusal::Unsupported("a non-general register"))?;
    let r = slot(regs, n).ok_or(Refusal::Unsupported("a non-general register"))?;
    *r = if size == 4 {
        value & 0xffff_ffff
    } else {
        let m = mask(size) << shift;
        (*r & !m) | ((value << shift) & m)
    };
    Ok(())
}

/// Linear address of the memory operand `op`.
pub(super) fn linear(insn: &Instruction, op: u32, st: &State<'_>) -> Result<u64, Refusal> {
    let long64 = st.mode() == Mode::Long64;
    let s = &st.sregs;
    let regs = st.regs;
    let va = insn.virtual_address(op, 0, |reg, _, _| {
        let base = |seg: &kvm_bindings::kvm_segment| Some(seg.base);
        match reg {
            Register::FS => base(&s.fs),
            Register::GS => base(&s.gs),
            // In 64-bit mode the other segments have base 0 whatever their cache says.
            Register::ES | Register::CS | Register::SS | Register::DS if long64 => Some(0),
            Register::ES => base(&s.es),
            Register::CS => base(&s.cs),
            Register::SS => base(&s.ss),
            Register::DS => base(&s.ds),
            Register::RIP | Register::EIP => Some(regs.rip),
            r => gpr(&regs, r).ok(),
        }
    });
    let va = va.ok_or(Refusal::Unsupported("this memory operand's addressing"))?;
    if long64 && !st.canonical(va) {
        return Err(Refusal::Fault(
            "non-canonical memory operand",
            super::Exception::Gp(0),
        ));
    }
    Ok(va)
}

/// Read operand `op` (a general register or memory) of `size` bytes.
pub(super) fn read(
    insn: &Instruction,
    op: u32,
    size: usize,
    st: &State<'_>,
) -> Result<u64, Refusal> {
    match insn.op_kind(op) {
        OpKind::Register => gpr(&st.regs, insn.op_register(op)),
        OpKind::Memory => {
            let at = linear(insn, op, st)?;
            let mut b = [0u8; 8];
            st.read_linear(at, &mut b[..size])?;
            Ok(u64::from_le_bytes(b))
        }
        _ => Err(Refusal::Unsupported("this operand kind")),
    }
}

/// RIP after the instruction (wrapped to the code size outside 64-bit mode).
pub(super) fn next_rip(insn: &Instruction, st: &State<'_>) -> u64 {
    let next = st.regs.rip.wrapping_add(insn.len() as u64);
    match st.code_bits() {
        64 => next,
        32 => next & 0xffff_ffff,
        _ => next & 0xffff,
    }
}
