//! SWAPGS: exchange GS.base with IA32_KERNEL_GS_BASE (64-bit mode, CPL 0). Linux runs one at
//! every entry from and exit to user mode; KVM's emulator does not implement it.

use iced_x86::Instruction;

use super::operand::next_rip;
use super::state::{Mode, State};
use super::{Exception, Refusal};

pub(super) const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    if st.mode() != Mode::Long64 {
        return Err(Refusal::Fault("SWAPGS outside 64-bit mode", Exception::Ud));
    }
    if st.cpl() != 0 {
        return Err(Refusal::Fault("SWAPGS above CPL 0", Exception::Gp(0)));
    }
    let [kernel_gs] = st.msrs([MSR_KERNEL_GS_BASE])?;
    st.set_msr(MSR_KERNEL_GS_BASE, st.sregs.gs.base);
    st.sregs.gs.base = kernel_gs;
    st.regs.rip = next_rip(insn, st);
    Ok(())
}
