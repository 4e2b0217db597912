//! FWAIT / WAIT: checks for pending unmasked x87 exceptions, otherwise does nothing.

use iced_x86::Instruction;

use super::operand::next_rip;
use super::state::State;
use super::{Exception, Refusal};

const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
/// x87 status word: error summary (an unmasked exception is pending).
const FSW_ES: u16 = 1 << 7;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    if st.sregs.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        return Err(Refusal::Fault(
            "FWAIT with CR0.MP and CR0.TS set",
            Exception::Nm,
        ));
    }
    if st.fpu()?.fsw & FSW_ES != 0 {
        return Err(Refusal::Fault(
            "FWAIT with an unmasked x87 exception pending",
            Exception::Mf,
        ));
    }
    st.regs.rip = next_rip(insn, st);
    Ok(())
}
