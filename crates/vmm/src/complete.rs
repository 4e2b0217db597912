//! Completion of instructions that KVM hands back as emulation failures.
//!
//! On some hosts (the nested machines Manifold is developed on, see `docs/ARCHITECTURE.md`) KVM
//! runs guest kernel code through its instruction emulator, and an instruction that emulator does
//! not implement stops the vCPU with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`,
//! the vCPU still at that instruction. This module carries the instruction out instead, so the
//! guest goes on: it decodes the bytes at CS:RIP in the vCPU's current mode (iced-x86), makes the
//! checks the Intel SDM prescribes, and only then writes the new state back (registers, segment
//! registers, guest memory, event state), so that a refusal leaves the vCPU as it was.
//!
//! What the guest would take as an exception (#GP, #SS, #NP) is not injected: the completion
//! refuses with the exception named, and the VM ends with that message. Such a fault is a guest
//! bug on every path we complete, and a clear stop is easier to debug than an injected fault that
//! KVM's emulator would then have to deliver. Debug traps that the instruction would raise
//! (single-step with TF set before it, data breakpoints on its memory accesses) are not
//! delivered. Guest page permissions are not checked (KVM_TRANSLATE does not report them).
//!
//! Adding an instruction: a [`Kind`], a file with its `complete(insn, state)` function that reads
//! through [`state::State`] and returns a [`Refusal`] for anything it does not do exactly, and an
//! arm in [`dispatch`].

mod ac;
pub(crate) mod cmpxchg16b;
mod fwait;
mod int3;
mod iret;
mod operand;
mod popcnt;
mod rdrand;
mod shift;
mod state;
mod swapgs;
mod syscall;
mod sysret;
#[cfg(test)]
mod tests;

use std::fmt;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction};
use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, kvm_run,
};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use state::State;

/// What a completion carried out, for the per-kind counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// IRET / IRETD / IRETQ in protected or IA-32e mode.
    Iret,
    Clac,
    Stac,
    Popcnt,
    Fwait,
    Shlx,
    Shrx,
    Sarx,
    /// INT3 delivered through the 64-bit IDT.
    Int3,
    Rdrand,
    Rdseed,
    /// CMPXCHG16B / CMPXCHG8B.
    Cmpxchg16b,
    /// A user-mode SYSCALL redone when the entry's CLAC shows it stayed in user mode.
    Syscall,
    Swapgs,
    Sysret,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Iret,
        Kind::Clac,
        Kind::Stac,
        Kind::Popcnt,
        Kind::Fwait,
        Kind::Shlx,
        Kind::Shrx,
        Kind::Sarx,
        Kind::Int3,
        Kind::Rdrand,
        Kind::Rdseed,
        Kind::Cmpxchg16b,
        Kind::Syscall,
        Kind::Swapgs,
        Kind::Sysret,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Iret => "iret",
            Kind::Clac => "clac",
            Kind::Stac => "stac",
            Kind::Popcnt => "popcnt",
            Kind::Fwait => "fwait",
            Kind::Shlx => "shlx",
            Kind::Shrx => "shrx",
            Kind::Sarx => "sarx",
            Kind::Int3 => "int3",
            Kind::Rdrand => "rdrand",
            Kind::Rdseed => "rdseed",
            Kind::Cmpxchg16b => "cmpxchg16b",
            Kind::Syscall => "syscall fix-up",
            Kind::Swapgs => "swapgs",
            Kind::Sysret => "sysret",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An exception the instruction would raise in the guest, with its error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exception {
    Ud,
    Nm,
    Mf,
    Gp(u16),
    Ss(u16),
    Np(u16),
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, code) = match self {
            Exception::Ud => return f.write_str("#UD"),
            Exception::Nm => return f.write_str("#NM"),
            Exception::Mf => return f.write_str("#MF"),
            Exception::Gp(c) => ("GP", c),
            Exception::Ss(c) => ("SS", c),
            Exception::Np(c) => ("NP", c),
        };
        if *code == 0 {
            write!(f, "#{name}(0)")
        } else {
            write!(f, "#{name}({code:#x})")
        }
    }
}

/// Why a decoded instruction was not completed. Messages are written into the VM's error, so
/// they carry their detail in the text.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The guest would take an exception (not injected: see the module notes).
    #[error("{0}: the guest would take {1}")]
    Fault(&'static str, Exception),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    #[error("linear address {linear:#x} is not mapped")]
    Unmapped { linear: u64 },
    #[error("linear address {linear:#x} (guest physical {gpa:#x}) is not RAM")]
    NotRam { linear: u64, gpa: u64 },
    #[error("{0} failed: {1}")]
    Vcpu(&'static str, kvm_ioctls::Error),
}

/// Why an emulation failure was not completed. Messages are self-contained (no `source`): they go
/// into the vCPU fault's reason text.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("{0} failed: {1}")]
    Vcpu(&'static str, kvm_ioctls::Error),
    #[error("Cannot fetch the instruction at linear address {linear:#x}: {why}")]
    Fetch { linear: u64, why: Refusal },
    #[error("Cannot decode instruction bytes [{0}]")]
    Decode(String),
    #[error("No completion for `{0}`")]
    Unknown(String),
    #[error("Cannot complete `{insn}`: {why}")]
    Refused { insn: String, why: Refusal },
    #[error("Cannot write guest memory at {0:#x}")]
    Write(u64),
    #[error("KVM refused an MSR write")]
    Msrs,
}

impl CompleteError {
    /// The decoded instruction, when decoding got that far.
    pub fn insn(&self) -> Option<&str> {
        match self {
            CompleteError::Unknown(insn) | CompleteError::Refused { insn, .. } => Some(insn),
            _ => None,
        }
    }
}

/// Completes instructions for one vCPU and counts them per kind.
#[derive(Debug, Default)]
pub struct Completer {
    counts: [u64; Kind::ALL.len()],
}

impl Completer {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many instructions of `kind` were completed.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[kind as usize]
    }

    /// Log the per-kind counts at debug level (when a vCPU loop ends).
    pub fn log_counts(&self, vcpu: u8) {
        for kind in Kind::ALL {
            let count = self.count(kind);
            if count > 0 {
                tracing::debug!(vcpu, kind = kind.name(), count, "completed instructions");
            }
        }
    }

    /// Handle a `KVM_EXIT_INTERNAL_ERROR`: `None` if it is not an emulation failure (nothing to
    /// complete), else the outcome of [`Completer::complete`] with the bytes KVM reported.
    pub fn complete_exit(
        &mut self,
        vcpu: &mut VcpuFd,
        mem: &GuestMemoryMmap,
    ) -> Option<Result<Kind, CompleteError>> {
        let reported = ReportedBytes::from_run(vcpu.get_kvm_run())?;
        Some(self.complete(vcpu, mem, reported.as_slice()))
    }

    /// Carry out the instruction at the vCPU's CS:RIP, which KVM failed to emulate, and leave the
    /// vCPU after it. `insn_bytes` are the bytes KVM reported, if any (they are read from guest
    /// memory otherwise, or when they end before the instruction does).
    pub fn complete(
        &mut self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        insn_bytes: Option<&[u8]>,
    ) -> Result<Kind, CompleteError> {
        let mut state = State::read(vcpu, mem)?;
        let (insn, bytes) = decode(&state, insn_bytes)?;
        let kind = match dispatch(&insn, &mut state) {
            Some(Ok(kind)) => kind,
            Some(Err(why)) => {
                let insn = format_insn(&insn, &bytes);
                return Err(CompleteError::Refused { insn, why });
            }
            None => return Err(CompleteError::Unknown(format_insn(&insn, &bytes))),
        };
        state.commit()?;
        self.counts[kind as usize] += 1;
        Ok(kind)
    }
}

/// Pick the completion for `insn`: `None` if there is none.
fn dispatch(insn: &Instruction, state: &mut State<'_>) -> Option<Result<Kind, Refusal>> {
    let code = insn.code();
    let done = match code {
        Code::Iretw | Code::Iretd | Code::Iretq => iret::complete(insn, state).map(|()| Kind::Iret),
        Code::Clac => match syscall::fixup(state) {
            Ok(true) => Ok(Kind::Syscall),
            Ok(false) => ac::complete(insn, state).map(|()| Kind::Clac),
            Err(e) => Err(e),
        },
        Code::Stac => ac::complete(insn, state).map(|()| Kind::Stac),
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => {
            popcnt::complete(insn, state).map(|()| Kind::Popcnt)
        }
        Code::Swapgs => swapgs::complete(insn, state).map(|()| Kind::Swapgs),
        Code::Sysretd | Code::Sysretq => sysret::complete(insn, state).map(|()| Kind::Sysret),
        Code::Wait => fwait::complete(insn, state).map(|()| Kind::Fwait),
        Code::Int3 => int3::complete(insn, state).map(|()| Kind::Int3),
        Code::Rdrand_r16 | Code::Rdrand_r32 | Code::Rdrand_r64 => {
            rdrand::complete(insn, state).map(|()| Kind::Rdrand)
        }
        Code::Rdseed_r16 | Code::Rdseed_r32 | Code::Rdseed_r64 => {
            rdrand::complete(insn, state).map(|()| Kind::Rdseed)
        }
        Code::Cmpxchg16b_m128 | Code::Cmpxchg8b_m64 => {
            cmpxchg16b::complete(insn, state).map(|()| Kind::Cmpxchg16b)
        }
        _ => {
            let shift = shift::kind(code)?;
            let kind = match shift {
                shift::Shift::Left => Kind::Shlx,
                shift::Shift::Logical => Kind::Shrx,
                shift::Shift::Arithmetic => Kind::Sarx,
            };
            shift::complete(insn, state, shift).map(|()| kind)
        }
    };
    Some(done)
}

/// The instruction bytes KVM reports with an emulation failure
/// (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`).
#[derive(Clone, Copy, Debug)]
struct ReportedBytes {
    len: usize,
    bytes: [u8; 15],
}

impl ReportedBytes {
    /// `None` unless `run` holds an emulation failure; `Some(empty)` when KVM gave no bytes.
    fn from_run(run: &kvm_run) -> Option<Self> {
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return None;
        }
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, whose union members (`internal`
        // and `emulation_failure`, the layout KVM uses for this suberror) are plain integers
        // that any bit pattern makes valid.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return None;
        }
        let mut reported = ReportedBytes {
            len: 0,
            bytes: [0; 15],
        };
        // ndata counts the u64 words KVM filled after the header: flags, then the 16 bytes of
        // size and instruction bytes.
        let flag = u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
        if failure.flags & flag != 0 && failure.ndata >= 3 {
            // SAFETY: same union of plain integers as above.
            let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
            reported.len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            reported.bytes = insn.insn_bytes;
        }
        Some(reported)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        (self.len > 0).then(|| &self.bytes[..self.len])
    }
}

/// The longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// Decode the instruction at CS:RIP in the vCPU's current mode; returns it with the bytes it
/// was decoded from (for messages).
fn decode(
    state: &State<'_>,
    reported: Option<&[u8]>,
) -> Result<(Instruction, [u8; MAX_INSN_LEN]), CompleteError> {
    let bits = state.code_bits();
    let rip = state.regs.rip;
    let mut buf = [0u8; MAX_INSN_LEN];
    if let Some(b) = reported
        && let Some(insn) = decode_bytes(bits, b, rip)
    {
        let n = b.len().min(MAX_INSN_LEN);
        buf[..n].copy_from_slice(&b[..n]);
        return Ok((insn, buf));
    }
    // No bytes from KVM, or too few: its fetch stops at a page boundary.
    let n = state
        .fetch(&mut buf)
        .map_err(|(linear, why)| CompleteError::Fetch { linear, why })?;
    match decode_bytes(bits, &buf[..n], rip) {
        Some(insn) => Ok((insn, buf)),
        None => Err(CompleteError::Decode(hex(&buf[..n]))),
    }
}

fn decode_bytes(bits: u32, bytes: &[u8], rip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::try_with_ip(bits, bytes, rip, DecoderOptions::NONE).ok()?;
    let insn = decoder.decode();
    (decoder.last_error() == DecoderError::None && !insn.is_invalid()).then_some(insn)
}

/// An instruction for a message: its name if it is one of those completed here, else its
/// bytes and address, as KVM reports an emulation failure (any disassembler tells what they
/// are). iced's formatter would be ~130 KB of code and tables, resident in every VMM process,
/// for these messages alone.
fn format_insn(insn: &Instruction, bytes: &[u8; MAX_INSN_LEN]) -> String {
    let name = match insn.code() {
        Code::Iretw => "iret",
        Code::Iretd => "iretd",
        Code::Iretq => "iretq",
        Code::Clac => "clac",
        Code::Stac => "stac",
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => "popcnt",
        Code::Swapgs => "swapgs",
        Code::Sysretd => "sysretd",
        Code::Sysretq => "sysretq",
        Code::Wait => "fwait",
        Code::Int3 => "int3",
        Code::Rdrand_r16 | Code::Rdrand_r32 | Code::Rdrand_r64 => "rdrand",
        Code::Rdseed_r16 | Code::Rdseed_r32 | Code::Rdseed_r64 => "rdseed",
        Code::Cmpxchg16b_m128 => "cmpxchg16b",
        Code::Cmpxchg8b_m64 => "cmpxchg8b",
        code => match shift::kind(code) {
            Some(shift::Shift::Left) => "shlx",
            Some(shift::Shift::Logical) => "shrx",
            Some(shift::Shift::Arithmetic) => "sarx",
            None => {
                let n = insn.len().min(MAX_INSN_LEN);
                return format!("{} at {:#x}", hex(&bytes[..n]), insn.ip());
            }
        },
    };
    name.to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
