//! IRET / IRETD / IRETQ in protected mode and IA-32e mode, after the SDM's IRET pseudo-code
//! (Vol. 2A). KVM's emulator implements only the real-mode form.
//!
//! Frame, lowest address first, each item the operand size (2, 4 or 8 bytes):
//! IP, CS, FLAGS, then SP, SS when returning to an outer privilege level or from 64-bit mode.

use iced_x86::{Code, Instruction};
use kvm_bindings::kvm_segment;

use super::state::{Descriptor, Mode, RFLAGS_FIXED, RFLAGS_NT, RFLAGS_VM, State};
use super::{Exception, Refusal};

// RFLAGS bits IRET may load.
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const TF: u64 = 1 << 8;
const IF: u64 = 1 << 9;
const DF: u64 = 1 << 10;
const OF: u64 = 1 << 11;
const IOPL: u64 = 3 << 12;
const RF: u64 = 1 << 16;
const AC: u64 = 1 << 18;
const VIF: u64 = 1 << 19;
const VIP: u64 = 1 << 20;
const ID: u64 = 1 << 21;

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    let size: usize = match insn.code() {
        Code::Iretw => 2,
        Code::Iretd => 4,
        _ => 8,
    };
    let mode = st.mode();
    match mode {
        // KVM's emulator does these itself; seeing one here means something else went wrong.
        Mode::Real => return Err(Refusal::Unsupported("IRET in real mode")),
        Mode::Virtual8086 => return Err(Refusal::Unsupported("IRET in virtual-8086 mode")),
        Mode::Protected | Mode::Compatibility | Mode::Long64 => {}
    }
    let long = st.long();
    if st.regs.rflags & RFLAGS_NT != 0 {
        return Err(if long {
            Refusal::Fault("EFLAGS.NT set in IA-32e mode", Exception::Gp(0))
        } else {
            Refusal::Unsupported("a task return (EFLAGS.NT set)")
        });
    }
    let cpl = st.cpl();

    let mut head = [0u8; 24];
    let head = &mut head[..3 * size];
    st.read_stack(0, head)?;
    let new_ip = item(head, 0, size);
    let cs_sel = item(head, 1, size) as u16;
    let temp_flags = item(head, 2, size);

    if !long && size == 4 && cpl == 0 && temp_flags & RFLAGS_VM != 0 {
        return Err(Refusal::Unsupported("a return to virtual-8086 mode"));
    }

    let cs_desc = check_cs(st, cs_sel, cpl, long)?;
    let rpl = cs_sel & 3;
    let to_64 = long && cs_desc.l();
    let cs = cs_desc.load(cs_sel, long);

    // Outside 64-bit mode SS:SP are on the frame only for a return to an outer level; in 64-bit
    // mode they always are (whatever the operand size).
    let pops_stack = rpl > cpl || mode == Mode::Long64;
    let (ss, new_rsp) = if pops_stack {
        let mut tail = [0u8; 16];
        let tail = &mut tail[..2 * size];
        st.read_stack(3 * size as u64, tail)?;
        let new_sp = item(tail, 0, size);
        let ss_sel = item(tail, 1, size) as u16;
        let ss = load_ss(st, ss_sel, rpl, to_64)?;
        let rsp = if to_64 {
            // In 64-bit mode all of RSP comes from the frame (zero-extended if narrower).
            new_sp
        } else if ss.db != 0 {
            // A 32-bit stack: ESP, zero-extended (the upper half is not visible outside 64-bit
            // mode, and the frame of an IRETQ to compatibility mode holds 64 bits).
            new_sp & 0xffff_ffff
        } else {
            (st.regs.rsp & !0xffff) | (new_sp & 0xffff)
        };
        (Some(ss), rsp)
    } else {
        (None, st.popped_sp(3 * size as u64))
    };

    if to_64 {
        if !st.canonical(new_ip) {
            return Err(Refusal::Fault("non-canonical return RIP", Exception::Gp(0)));
        }
    } else if new_ip > u64::from(cs.limit) {
        return Err(Refusal::Fault(
            "return EIP beyond the CS limit",
            Exception::Gp(0),
        ));
    }

    // Every check passed. (Writes queued so far, such as accessed bits, are dropped with the
    // state on a refusal: nothing reaches the vCPU before commit.)
    st.set_accessed(&cs_desc)?;
    st.regs.rflags = new_rflags(st.regs.rflags, temp_flags, size, cpl, st.iopl());
    st.regs.rip = new_ip;
    st.regs.rsp = new_rsp;
    st.sregs.cs = cs;
    if let Some(ss) = ss {
        st.sregs.ss = ss;
    }
    if rpl > cpl {
        // Data segment registers the new privilege level may not use become null.
        let s = &mut st.sregs;
        for seg in [&mut s.es, &mut s.ds, &mut s.fs, &mut s.gs] {
            invalidate_if_privileged(seg, rpl);
        }
    }
    st.unblock_nmi = true;
    Ok(())
}

/// Item `i` of a frame of `size`-byte little-endian items.
fn item(frame: &[u8], i: usize, size: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..size].copy_from_slice(&frame[i * size..(i + 1) * size]);
    u64::from_le_bytes(b)
}

/// The checks on the return code segment (PROTECTED-MODE-RETURN in the SDM).
fn check_cs(st: &State<'_>, sel: u16, cpl: u16, long: bool) -> Result<Descriptor, Refusal> {
    if sel & !3 == 0 {
        return Err(Refusal::Fault(
            "return CS selector is null",
            Exception::Gp(0),
        ));
    }
    let desc = st.descriptor(sel)?;
    let rpl = sel & 3;
    let gp = |what| Err(Refusal::Fault(what, Exception::Gp(sel & !3)));
    if !desc.is_code() {
        return gp("return CS is not a code segment");
    }
    if rpl < cpl {
        return gp("return CS RPL is below CPL");
    }
    if desc.is_conforming_code() && desc.dpl() > rpl {
        return gp("conforming return CS has DPL above its RPL");
    }
    if !desc.is_conforming_code() && desc.dpl() != rpl {
        return gp("non-conforming return CS has DPL other than its RPL");
    }
    if long && desc.l() && desc.db() {
        return gp("return CS has both L and D set");
    }
    if !desc.present() {
        return Err(Refusal::Fault(
            "return CS is not present",
            Exception::Np(sel & !3),
        ));
    }
    Ok(desc)
}

/// Check the popped SS selector and build the SS register for new privilege level `rpl`.
fn load_ss(st: &mut State<'_>, sel: u16, rpl: u16, to_64: bool) -> Result<kvm_segment, Refusal> {
    if sel & !3 == 0 {
        // A null SS is allowed only on a return to 64-bit mode at CPL < 3. The processor marks it
        // unusable; its DPL is the new CPL (KVM reads CPL from SS.DPL).
        if !to_64 || rpl == 3 {
            return Err(Refusal::Fault(
                "return SS selector is null",
                Exception::Gp(0),
            ));
        }
        return Ok(kvm_segment {
            selector: sel,
            dpl: rpl as u8,
            unusable: 1,
            ..Default::default()
        });
    }
    let desc = st.descriptor(sel)?;
    let gp = |what| Err(Refusal::Fault(what, Exception::Gp(sel & !3)));
    if sel & 3 != rpl {
        return gp("return SS RPL differs from CS RPL");
    }
    if !desc.is_writable_data() {
        return gp("return SS is not a writable data segment");
    }
    if desc.dpl() != rpl {
        return gp("return SS DPL differs from CS RPL");
    }
    if !desc.present() {
        return Err(Refusal::Fault(
            "return SS is not present",
            Exception::Ss(sel & !3),
        ));
    }
    st.set_accessed(&desc)?;
    Ok(desc.load(sel, st.long()))
}

/// The flags after IRET: which bits the image may change depends on operand size, CPL and IOPL
/// (both before the return). VM is never loaded here (a return to virtual-8086 mode is refused
/// before, and IA-32e mode ignores the bit); reserved bits keep their fixed values.
fn new_rflags(old: u64, image: u64, size: usize, cpl: u16, iopl: u16) -> u64 {
    let mut mask = CF | PF | AF | ZF | SF | TF | DF | OF | RFLAGS_NT;
    if size >= 4 {
        mask |= RF | AC | ID;
    }
    if cpl <= iopl {
        mask |= IF;
    }
    if cpl == 0 {
        mask |= IOPL;
        if size >= 4 {
            mask |= VIF | VIP;
        }
    }
    (old & !mask) | (image & mask) | RFLAGS_FIXED
}

/// On a return to an outer level, DS/ES/FS/GS holding a data or non-conforming code segment
/// more privileged than the new CPL are made null (selector 0, unusable; base and limit stay,
/// as on the processor, which matters for FS/GS bases in 64-bit mode).
fn invalidate_if_privileged(seg: &mut kvm_segment, new_cpl: u16) {
    let null = seg.selector & !3 == 0 || seg.unusable != 0;
    let code = seg.type_ & 0x8 != 0;
    let conforming = code && seg.type_ & 0x4 != 0;
    if !null && seg.s != 0 && !conforming && new_cpl > u16::from(seg.dpl) {
        seg.selector = 0;
        seg.present = 0;
        seg.unusable = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_at_cpl0_load_if_and_iopl() {
        let old = RFLAGS_FIXED;
        let image = IF | IOPL | CF | ZF | AC | VIF | RF;
        assert_eq!(new_rflags(old, image, 4, 0, 0), RFLAGS_FIXED | image);
        // 16-bit frame: the upper half (RF, AC, VIF) stays as it was.
        assert_eq!(
            new_rflags(old, image, 2, 0, 0),
            RFLAGS_FIXED | IF | IOPL | CF | ZF
        );
        // IF is cleared as well as set.
        assert_eq!(new_rflags(RFLAGS_FIXED | IF, 0, 8, 0, 0), RFLAGS_FIXED);
    }

    #[test]
    fn flags_at_cpl3_keep_iopl_and_if_unless_iopl_allows() {
        let old = RFLAGS_FIXED | IF; // IOPL 0
        let image = IOPL | CF; // IF clear in the image
        assert_eq!(new_rflags(old, image, 8, 3, 0), RFLAGS_FIXED | IF | CF);
        // With IOPL 3, CPL 3 may change IF (but still not IOPL).
        let old3 = old | IOPL;
        assert_eq!(new_rflags(old3, CF, 8, 3, 3), RFLAGS_FIXED | IOPL | CF);
        // VIF/VIP only at CPL 0; reserved bits never.
        assert_eq!(
            new_rflags(
                RFLAGS_FIXED,
                VIF | VIP | (1 << 3) | (1 << 40) | RFLAGS_VM,
                8,
                1,
                0
            ),
            RFLAGS_FIXED
        );
    }

    #[test]
    fn frame_items() {
        let f = [1, 0, 2, 0, 3, 0];
        assert_eq!((item(&f, 0, 2), item(&f, 2, 2)), (1, 3));
    }
}
