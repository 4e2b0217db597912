//! POPCNT r, r/m (16, 32, 64 bits): the count of set bits; ZF = source was zero, CF, OF, SF, AF
//! and PF cleared.

use iced_x86::Instruction;

use super::Refusal;
use super::operand::{self, ARITH_FLAGS, ZF, next_rip};
use super::state::State;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    let dest = insn.op0_register();
    let size = operand::size(dest);
    let src = operand::read(insn, 1, size, st)?;
    operand::set_gpr(&mut st.regs, dest, u64::from(src.count_ones()))?;
    st.regs.rflags &= !ARITH_FLAGS;
    if src == 0 {
        st.regs.rflags |= ZF;
    }
    st.regs.rip = next_rip(insn, st);
    Ok(())
}
