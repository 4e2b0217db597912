//! CLAC / STAC: clear or set RFLAGS.AC (SMAP's "user access allowed"). Linux runs one at every
//! kernel entry, so this is by far the most frequent completion on hosts that hand them back.

use iced_x86::{Code, Instruction};

use super::operand::next_rip;
use super::state::State;
use super::{Exception, Refusal};

const AC: u64 = 1 << 18;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    // #UD outside CPL 0 (and in real/virtual-8086 mode, which cpl() reports as 0 and 3).
    if st.cpl() != 0 {
        return Err(Refusal::Fault("CLAC/STAC above CPL 0", Exception::Ud));
    }
    if insn.code() == Code::Stac {
        st.regs.rflags |= AC;
    } else {
        st.regs.rflags &= !AC;
    }
    st.regs.rip = next_rip(insn, st);
    Ok(())
}
