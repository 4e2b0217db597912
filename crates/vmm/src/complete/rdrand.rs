//! RDRAND / RDSEED r16/32/64: a random value from the host's getrandom, CF = 1 (valid), OF, SF,
//! ZF, AF and PF cleared.

use iced_x86::Instruction;

use super::Refusal;
use super::operand::{self, ARITH_FLAGS, CF, next_rip};
use super::state::State;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    let dest = insn.op0_register();
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the buffer, which outlives the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(b.len()) {
        // Reported to the guest as the instruction does when no value is ready: CF = 0.
        operand::set_gpr(&mut st.regs, dest, 0)?;
        st.regs.rflags &= !ARITH_FLAGS;
    } else {
        operand::set_gpr(&mut st.regs, dest, u64::from_le_bytes(b))?;
        st.regs.rflags = (st.regs.rflags & !ARITH_FLAGS) | CF;
    }
    st.regs.rip = next_rip(insn, st);
    Ok(())
}
