//! The vCPU loop: `KVM_RUN`, hand port I/O and MMIO to the buses, stop when told. It names no
//! device.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Arc;

use devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmOutcome;
use crate::complete::Completer;
use crate::control::Control;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The guest did something the VMM cannot go on from; `state` is the register dump, given
    /// by [`crate::Error::details`] so that the headline stays one line.
    #[error("vCPU {id}: {reason}")]
    Guest {
        id: u8,
        reason: String,
        state: String,
    },
    #[error("vCPU {0}: KVM_RUN failed")]
    Run(u8, #[source] kvm_ioctls::Error),
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: makes the vCPU's current or next `KVM_RUN` return at once, so that the loop
/// sees the stop flag. Setting `immediate_exit` (rather than relying on EINTR alone) closes the
/// race with a signal that lands between the flag check and the ioctl.
pub extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread to its vCPU's kvm_run mapping, which
            // lives as long as the VcpuFd that the loop below owns; a byte write is atomic.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Exits to userspace by kind, counted by the loop (a few additions per exit) and logged at
/// debug level when it ends: how many round trips a guest's device accesses cost. A queue
/// notification caught by an ioeventfd never shows up here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    pub pio_out: u64,
    pub pio_in: u64,
    pub mmio_write: u64,
    pub mmio_read: u64,
    /// Instructions completed for KVM (emulation failures).
    pub completions: u64,
    /// Interrupted runs (kicks, signals).
    pub interrupted: u64,
    pub other: u64,
}

impl ExitCounts {
    pub fn total(&self) -> u64 {
        self.pio_out
            + self.pio_in
            + self.mmio_write
            + self.mmio_read
            + self.completions
            + self.interrupted
            + self.other
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
}

impl Vcpu {
    /// Run until the VM stops; reports how it ended to `control` and returns.
    pub fn run(mut self, control: &Control) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run()));
        let mut completer = Completer::new();
        let mut exits = ExitCounts::default();
        let result = self.run_loop(control, &mut completer, &mut exits);
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        completer.log_counts(self.id);
        tracing::debug!(
            vcpu = self.id,
            total = exits.total(),
            pio_out = exits.pio_out,
            pio_in = exits.pio_in,
            mmio_write = exits.mmio_write,
            mmio_read = exits.mmio_read,
            completions = exits.completions,
            interrupted = exits.interrupted,
            other = exits.other,
            "vCPU exits to userspace"
        );
        match result {
            Ok(Some(outcome)) => control.finish(Ok(outcome)),
            Ok(None) => {}
            Err(e) => control.finish(Err(e.into())),
        }
    }

    fn run_loop(
        &mut self,
        control: &Control,
        completer: &mut Completer,
        exits: &mut ExitCounts,
    ) -> Result<Option<VmOutcome>, VcpuError> {
        while !control.stopping() {
            let exit = self.fd.run();
            match &exit {
                Ok(VcpuExit::IoOut(..)) => exits.pio_out += 1,
                Ok(VcpuExit::IoIn(..)) => exits.pio_in += 1,
                Ok(VcpuExit::MmioWrite(..)) => exits.mmio_write += 1,
                Ok(VcpuExit::MmioRead(..)) => exits.mmio_read += 1,
                Ok(VcpuExit::InternalError) => exits.completions += 1,
                Err(_) => exits.interrupted += 1,
                Ok(_) => exits.other += 1,
            }
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) {
                        tracing::trace!(port, ?data, "write to unmapped port");
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        tracing::trace!(port, "read from unmapped port");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!(addr, "write to unmapped MMIO");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!(addr, "read from unmapped MMIO");
                    }
                }
                Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                    return Ok(Some(VmOutcome::Shutdown));
                }
                Ok(VcpuExit::SystemEvent(kind, _)) if kind == KVM_SYSTEM_EVENT_RESET => {
                    return Ok(Some(VmOutcome::Reset));
                }
                Ok(VcpuExit::Shutdown) => return Err(self.fault("triple fault (shutdown)")),
                Ok(VcpuExit::Hlt) => return Err(self.fault("halted with no irqchip to wake it")),
                Ok(VcpuExit::InternalError) => {
                    // An instruction KVM could not emulate: complete it here and go on.
                    let failed = match completer.complete_exit(&mut self.fd, &self.mem) {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => format!(": {e}"),
                        None => String::new(),
                    };
                    let reason = self.internal_error() + &failed;
                    return Err(self.fault(&reason));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let r = format!("VM entry failed: reason {reason:#x} on host cpu {cpu}");
                    return Err(self.fault(&r));
                }
                Ok(other) => {
                    let r = format!("unexpected exit {other:?}");
                    return Err(self.fault(&r));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: the loop condition decides. Clear the request so that a kick that
                    // was not a stop (none today) does not spin.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(VcpuError::Run(self.id, e)),
            }
        }
        Ok(None)
    }

    /// Describe a `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let kind = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "internal error",
        };
        format!(
            "KVM internal error {} ({kind}), data [{}]",
            internal.suberror,
            data.join(", ")
        )
    }

    fn fault(&self, reason: &str) -> VcpuError {
        VcpuError::Guest {
            id: self.id,
            reason: reason.to_string(),
            state: self.dump(),
        }
    }

    /// Registers and the bytes at the instruction pointer, for a post-mortem.
    fn dump(&self) -> String {
        let mut s = String::new();
        let (Ok(r), Ok(sr)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "registers unavailable".into();
        };
        let _ = writeln!(
            s,
            "rip={:#018x} rsp={:#018x} rflags={:#010x}",
            r.rip, r.rsp, r.rflags
        );
        let _ = writeln!(
            s,
            "rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            r.rax, r.rbx, r.rcx, r.rdx
        );
        let _ = writeln!(
            s,
            "rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
            r.rsi, r.rdi, r.rbp, r.r8
        );
        let _ = writeln!(
            s,
            "r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
            r.r9, r.r10, r.r11, r.r12
        );
        let _ = writeln!(
            s,
            "r13={:#018x} r14={:#018x} r15={:#018x}",
            r.r13, r.r14, r.r15
        );
        let _ = writeln!(
            s,
            "cs={:#06x} (base {:#x}, l={}, db={}) ss={:#06x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            sr.cs.selector,
            sr.cs.base,
            sr.cs.l,
            sr.cs.db,
            sr.ss.selector,
            sr.cr0,
            sr.cr2,
            sr.cr3,
            sr.cr4,
            sr.efer
        );
        // Real mode and non-paged code: linear = cs.base + rip; KVM_TRANSLATE does the rest.
        let linear = if sr.cs.l == 1 {
            r.rip
        } else {
            sr.cs.base.wrapping_add(r.rip)
        };
        let mut bytes = [0u8; 16];
        let code = self
            .fd
            .translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                self.mem
                    .read_slice(&mut bytes, GuestAddress(t.physical_address))
                    .ok()
            });
        match code {
            Some(()) => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let _ = write!(s, "code at rip: {}", hex.join(" "));
            }
            None => {
                let _ = write!(s, "code at rip: unreadable (linear {linear:#x})");
            }
        }
        s
    }
}
