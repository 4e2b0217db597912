//! SHLX / SHRX / SARX (BMI2): dest = src shifted by a count register masked to the operand
//! width (5 bits for 32-bit, 6 for 64-bit); flags are not affected.

use iced_x86::{Code, Instruction};

use super::Refusal;
use super::operand::{self, next_rip};
use super::state::State;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shift {
    Left,
    Logical,
    Arithmetic,
}

/// The shift of `code`, if it is one of these.
pub(super) fn kind(code: Code) -> Option<Shift> {
    Some(match code {
        Code::VEX_Shlx_r32_rm32_r32 | Code::VEX_Shlx_r64_rm64_r64 => Shift::Left,
        Code::VEX_Shrx_r32_rm32_r32 | Code::VEX_Shrx_r64_rm64_r64 => Shift::Logical,
        Code::VEX_Sarx_r32_rm32_r32 | Code::VEX_Sarx_r64_rm64_r64 => Shift::Arithmetic,
        _ => return None,
    })
}

pub(super) fn complete(
    insn: &Instruction,
    st: &mut State<'_>,
    shift: Shift,
) -> Result<(), Refusal> {
    let dest = insn.op0_register();
    let size = operand::size(dest);
    let src = operand::read(insn, 1, size, st)?;
    let count = operand::gpr(&st.regs, insn.op2_register())?;
    let value = apply(shift, size, src, count);
    operand::set_gpr(&mut st.regs, dest, value)?;
    st.regs.rip = next_rip(insn, st);
    Ok(())
}

/// The shift itself, on a `size`-byte (4 or 8) operand.
pub(super) fn apply(shift: Shift, size: usize, src: u64, count: u64) -> u64 {
    if size == 8 {
        let n = (count & 63) as u32;
        match shift {
            Shift::Left => src << n,
            Shift::Logical => src >> n,
            Shift::Arithmetic => sar(src, n, 63),
        }
    } else {
        let n = (count & 31) as u32;
        let s = src as u32;
        u64::from(match shift {
            Shift::Left => s << n,
            Shift::Logical => s >> n,
            Shift::Arithmetic => sar(src & 0xffff_ffff, n, 31) as u32,
        })
    }
}

/// Arithmetic right shift of a value whose sign bit is `sign`: shifting the complement of a
/// negative value shifts in its ones.
fn sar(v: u64, n: u32, sign: u32) -> u64 {
    let width_mask = u64::MAX >> (63 - sign);
    if (v >> sign) & 1 == 1 {
        !((!v & width_mask) >> n) & width_mask
    } else {
        v >> n
    }
}
