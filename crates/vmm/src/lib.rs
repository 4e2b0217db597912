//! KVM and wiring: builds a VM from an [`api::VmConfig`] and runs it. Owns the threads.

use api::VmConfig;

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
    #[error("Not implemented yet")]
    Todo,
}

/// Build the VM described by `config` and run it until it ends.
pub fn run(config: &VmConfig) -> Result<VmOutcome, Error> {
    let _ = config;
    Err(Error::Todo)
}
