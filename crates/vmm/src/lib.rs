//! KVM and wiring: builds a VM from an [`api::VmConfig`] and runs it. Owns the threads.
//!
//! Threads: the caller's thread runs the event loop (stdin, signals, VM control); one thread per
//! vCPU runs [`vcpu::Vcpu::run`].

pub mod acpi;
pub mod boot;
pub mod builder;
pub mod complete;
pub mod control;
pub mod cpu;
pub mod event_loop;
pub mod firmware;
pub mod host;
pub mod interrupts;
pub mod ioevents;
pub mod iommu;
pub mod layout;
pub mod mptable;
pub mod serial_input;
pub mod sriov;
pub mod sriov_net;
pub mod vcpu;
pub mod virtio_devices;
pub mod virtio_pci;
pub mod vm;

use api::{OnReboot, VmConfig};

/// How a VM run ended without a VMM error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset the machine (and `--on-reboot exit` was asked for).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The host asked us to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (too many vCPUs, memory size, ...).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareError),
    #[error("Cannot open serial output {0}")]
    SerialFile(std::path::PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    VirtioPci(#[from] virtio_pci::VirtioPciWiringError),
    #[error(transparent)]
    Devices(#[from] virtio_devices::DeviceError),
    #[error("Cannot place device on the bus")]
    Bus(#[from] devices::bus::BusError),
    #[error("Event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("Cannot set up {0}")]
    Host(&'static str, #[source] std::io::Error),
}

impl Error {
    /// Errors that come from what the user asked for (exit status 2) rather than from the host
    /// or the guest.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Config(_) | Error::SerialFile(..) => true,
            Error::Boot(e) => e.is_bad_input(),
            Error::VirtioPci(e) => e.is_bad_input(),
            Error::Devices(e) => e.is_bad_input(),
            Error::Firmware(e) => e.is_bad_input(),
            _ => false,
        }
    }

    /// A multi-line post-mortem to print after the headline (the vCPU's registers and code).
    pub fn details(&self) -> Option<&str> {
        match self {
            Error::Vcpu(vcpu::VcpuError::Guest { state, .. }) => Some(state),
            _ => None,
        }
    }
}

/// Checks that need no KVM, done before anything is created. The rules live in `api` so that
/// the command line, the config file and library users share them.
pub fn validate(config: &VmConfig) -> Result<(), Error> {
    config.validate().map_err(|e| Error::Config(e.to_string()))
}

/// Build the VM described by `config` and run it until it ends. With `--on-reboot restart`, a
/// guest reset builds and boots a fresh VM.
pub fn run(config: &VmConfig) -> Result<VmOutcome, Error> {
    validate(config)?;
    let signals = event_loop::Signals::install()?;
    loop {
        let outcome = event_loop::run_once(config, &signals)?;
        // A stop signal wins over whatever the guest did at the same moment.
        if let Some(sig) = signals.received() {
            return Ok(VmOutcome::Signal(sig));
        }
        if outcome == VmOutcome::Reset && config.on_reboot == OnReboot::Restart {
            tracing::info!("guest reset: restarting the VM");
            continue;
        }
        return Ok(outcome);
    }
}
