//! CMPXCHG16B m128 (and CMPXCHG8B m64): compare RDX:RAX (EDX:EAX) with the memory operand; if
//! equal, ZF = 1 and RCX:RBX (ECX:EBX) is stored, else ZF = 0 and the operand is loaded into
//! RDX:RAX (EDX:EAX). Carried out with the same locked instruction on the host mapping of the
//! guest page, so that it stays atomic against the guest's other vCPUs.

use iced_x86::{Code, Instruction};

use super::operand::{self, ZF, next_rip};
use super::state::State;
use super::{Exception, Refusal};

pub(super) fn complete(insn: &Instruction, st: &mut State<'_>) -> Result<(), Refusal> {
    let wide = insn.code() == Code::Cmpxchg16b_m128;
    let size = if wide { 16 } else { 8 };
    let at = operand::linear(insn, 0, st)?;
    if wide && at % 16 != 0 {
        return Err(Refusal::Fault(
            "CMPXCHG16B operand not 16-byte aligned",
            Exception::Gp(0),
        ));
    }
    if at % size != 0 {
        // Crossing a page would need two mappings; the kernel only uses aligned operands.
        return Err(Refusal::Unsupported("an unaligned CMPXCHG8B operand"));
    }
    let ptr = st.host_ptr(at, size as usize)?;
    let r = &mut st.regs;
    let equal = if wide {
        // SAFETY: `ptr` is 16-byte aligned and points at 16 bytes of guest RAM that the guest
        // memory mapping keeps alive for as long as the VM (and `st`) exists; a locked
        // CMPXCHG16B is what the guest asked for and touches only those bytes.
        unsafe { cmpxchg16b(ptr, &mut r.rax, &mut r.rdx, r.rbx, r.rcx) }
    } else {
        let mut eax = r.rax & 0xffff_ffff;
        let mut edx = r.rdx & 0xffff_ffff;
        let new = (r.rbx & 0xffff_ffff) | (r.rcx << 32);
        let old = eax | (edx << 32);
        // SAFETY: as above, with an 8-byte aligned 8-byte operand.
        let seen = unsafe { cmpxchg8(ptr, old, new) };
        let equal = seen == old;
        if !equal {
            eax = seen & 0xffff_ffff;
            edx = seen >> 32;
            // A 32-bit register write zero-extends.
            r.rax = eax;
            r.rdx = edx;
        }
        equal
    };
    if equal {
        r.rflags |= ZF;
    } else {
        r.rflags &= !ZF;
    }
    st.regs.rip = next_rip(insn, st);
    Ok(())
}

/// `lock cmpxchg16b [ptr]`: true if the exchange happened; otherwise `rax`/`rdx` get the value.
///
/// # Safety
/// `ptr` must be valid for a 16-byte read and write and 16-byte aligned.
pub(super) unsafe fn cmpxchg16b(
    ptr: *mut u8,
    rax: &mut u64,
    rdx: &mut u64,
    rbx: u64,
    rcx: u64,
) -> bool {
    let ok: u8;
    // SAFETY: the caller guarantees `ptr`; rbx cannot be named as an asm operand (LLVM uses it),
    // so it is swapped in and out through a scratch register.
    unsafe {
        core::arch::asm!(
            "xchg {b}, rbx",
            "lock cmpxchg16b [{p}]",
            "sete {ok}",
            "xchg {b}, rbx",
            p = in(reg) ptr,
            b = inout(reg) rbx => _,
            ok = out(reg_byte) ok,
            inout("rax") *rax,
            inout("rdx") *rdx,
            in("rcx") rcx,
            options(nostack),
        );
    }
    ok != 0
}

/// `lock cmpxchg8b` as a 64-bit compare-exchange: returns what was there.
///
/// # Safety
/// `ptr` must be valid for an 8-byte read and write and 8-byte aligned.
unsafe fn cmpxchg8(ptr: *mut u8, old: u64, new: u64) -> u64 {
    // SAFETY: the caller guarantees `ptr` is a valid, aligned u64 location.
    let atomic = unsafe { &*ptr.cast::<std::sync::atomic::AtomicU64>() };
    match atomic.compare_exchange(
        old,
        new,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    ) {
        Ok(v) | Err(v) => v,
    }
}
