//! INT3 delivered through the 64-bit IDT, after the SDM's INT n pseudo-code for IA-32e mode
//! (Vol. 2A "INT n/INTO/INT3/INT1", Vol. 3A 6.14 "Exception and interrupt handling in 64-bit
//! mode"). Linux's alternatives self-test executes one at boot and expects its #BP handler to
//! run.
//!
//! Gate: a 16-byte interrupt (0xE) or trap (0xF) gate; as a software interrupt its DPL must be at
//! least CPL. Target: a 64-bit code segment; a non-conforming one with DPL below CPL switches to
//! that level, taking RSP from the TSS (RSPn) unless the gate names an IST entry, which always
//! gives RSP. The new RSP is aligned down to 16 bytes, then SS, RSP, RFLAGS, CS and the return RIP
//! (after INT3: it is a trap) are pushed as 8-byte items. After the push TF, NT, RF and VM are
//! cleared, and IF too through an interrupt gate. A privilege change loads SS with a null selector
//! whose RPL is the new CPL.

use iced_x86::Instruction;
use kvm_bindings::kvm_segment;

use super::operand::next_rip;
use super::state::{Mode, RFLAGS_NT, RFLAGS_VM, State};
use super::{Exception, Refusal};

const VECTOR: u16 = 3;
/// Error code naming an IDT entry: index * 8 + IDT bit (2).
const IDT_ERROR: u16 = VECTOR * 8 + 2;
const GATE_INTERRUPT: u8 = 0xe;
const GATE_TRAP: u8 = 0xf;
const TF: u64 = 1 << 8;
const IF: u64 = 1 << 9;
const RF: u64 = 1 << 16;
/// Offsets in the 64-bit TSS.
const TSS_RSP0: u64 = 0x04;
const TSS_IST1: u64 = 0x24;

/// A 64-bit IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Gate {
    pub offset: u64,
    pub selector: u16,
    pub ist: u8,
    pub type_: u8,
    pub dpl: u16,
    pub present: bool,
}

impl Gate {
    pub fn parse(raw: [u8; 16]) -> Gate {
        let lo = u64::from_le_bytes(raw[..8].try_into().unwrap_or([0; 8]));
        let hi = u64::from_le_bytes(raw[8..].try_into().unwrap_or([0; 8]));
        Gate {
            offset: (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32),
            selector: (lo >> 16) as u16,
            ist: ((lo >> 32) & 7) as u8,
            type_: ((lo >> 40) & 0xf) as u8,
            dpl: ((lo >> 45) & 3) as u16,
            present: (lo >> 47) & 1 == 1,
        }
    }
}

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    if st.mode() != Mode::Long64 {
        // The kernels we run execute INT3 in 64-bit mode only.
        return Err(Refusal::Unsupported("INT3 outside 64-bit mode"));
    }
    let cpl = st.cpl();
    let gp_idt = |what| Refusal::Fault(what, Exception::Gp(IDT_ERROR));

    let index = u64::from(VECTOR) * 16;
    if index + 15 > u64::from(st.sregs.idt.limit) {
        return Err(gp_idt("IDT entry beyond the IDT limit"));
    }
    let mut raw = [0u8; 16];
    st.read_linear(st.sregs.idt.base.wrapping_add(index), &mut raw)?;
    let gate = Gate::parse(raw);
    if gate.type_ != GATE_INTERRUPT && gate.type_ != GATE_TRAP {
        return Err(gp_idt("IDT entry is not a 64-bit interrupt or trap gate"));
    }
    if gate.dpl < cpl {
        return Err(gp_idt("gate DPL below CPL for a software interrupt"));
    }
    if !gate.present {
        return Err(Refusal::Fault(
            "IDT gate not present",
            Exception::Np(IDT_ERROR),
        ));
    }

    let sel = gate.selector;
    if sel & !3 == 0 {
        return Err(Refusal::Fault("gate selector is null", Exception::Gp(0)));
    }
    let desc = st.descriptor(sel)?;
    let gp_sel = |what| Refusal::Fault(what, Exception::Gp(sel & !3));
    if !desc.is_code() {
        return Err(gp_sel("gate target is not a code segment"));
    }
    if !desc.l() || desc.db() {
        return Err(gp_sel("gate target is not a 64-bit code segment"));
    }
    if desc.dpl() > cpl {
        return Err(gp_sel("gate target DPL above CPL"));
    }
    if !desc.present() {
        return Err(Refusal::Fault(
            "gate target not present",
            Exception::Np(sel & !3),
        ));
    }
    let new_cpl = if desc.is_conforming_code() {
        cpl
    } else {
        desc.dpl()
    };

    let stack = if gate.ist != 0 {
        Some(TSS_IST1 + 8 * u64::from(gate.ist - 1))
    } else if new_cpl < cpl {
        Some(TSS_RSP0 + 8 * u64::from(new_cpl))
    } else {
        None
    };
    let rsp = match stack {
        Some(offset) => tss_read(st, offset)?,
        None => st.regs.rsp,
    } & !0xf;
    if !st.canonical(rsp) || !st.canonical(rsp.wrapping_sub(40)) {
        return Err(Refusal::Fault(
            "non-canonical interrupt stack",
            Exception::Ss(0),
        ));
    }
    if !st.canonical(gate.offset) {
        return Err(Refusal::Fault(
            "non-canonical handler address",
            Exception::Gp(0),
        ));
    }

    let frame = [
        next_rip(insn, st),
        u64::from(st.sregs.cs.selector),
        st.regs.rflags,
        st.regs.rsp,
        u64::from(st.sregs.ss.selector),
    ];
    let mut bytes = [0u8; 40];
    for (chunk, v) in bytes.chunks_exact_mut(8).zip(frame) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    st.write_linear(rsp - 40, &bytes)?;

    st.set_accessed(&desc)?;
    st.sregs.cs = desc.load((sel & !3) | new_cpl, true);
    if new_cpl < cpl {
        st.sregs.ss = kvm_segment {
            selector: new_cpl,
            dpl: new_cpl as u8,
            unusable: 1,
            ..Default::default()
        };
    }
    let mut clear = TF | RFLAGS_NT | RF | RFLAGS_VM;
    if gate.type_ == GATE_INTERRUPT {
        clear |= IF;
    }
    st.regs.rflags &= !clear;
    st.regs.rsp = rsp - 40;
    st.regs.rip = gate.offset;
    Ok(())
}

/// An 8-byte stack pointer from the current TSS.
fn tss_read(st: &State<'_>, offset: u64) -> Result<u64, Refusal> {
    let tr = &st.sregs.tr;
    if tr.unusable != 0 || tr.present == 0 {
        return Err(Refusal::Unsupported(
            "an interrupt stack switch without a TSS",
        ));
    }
    if offset + 7 > u64::from(tr.limit) {
        return Err(Refusal::Unsupported(
            "a TSS stack pointer beyond the TSS limit (#TS)",
        ));
    }
    let mut b = [0u8; 8];
    st.read_linear(tr.base.wrapping_add(offset), &mut b)?;
    Ok(u64::from_le_bytes(b))
}
