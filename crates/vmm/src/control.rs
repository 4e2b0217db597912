//! How a running VM is told to stop, and how it says why it stopped.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::{VmEvent, VmEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, VmOutcome};

/// Shared by the vCPU threads, the devices and the main thread. The first outcome wins.
pub struct Control {
    stop: AtomicBool,
    outcome: Mutex<Option<Result<VmOutcome, Error>>>,
    /// Wakes the main thread's event loop.
    pub wake: EventFd,
}

impl Control {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Checked by every vCPU before each `KVM_RUN`.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Record why the VM ends (if nothing was recorded yet) and wake the main thread.
    pub fn finish(&self, outcome: Result<VmOutcome, Error>) {
        {
            let mut o = devices::bus::lock(&self.outcome);
            if o.is_none() {
                *o = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::Release);
        // Cannot fail short of a counter overflow; the stop flag is set either way.
        let _ = self.wake.write(1);
    }

    pub fn take_outcome(&self) -> Option<Result<VmOutcome, Error>> {
        devices::bus::lock(&self.outcome).take()
    }
}

impl VmEvents for Control {
    fn request(&self, event: VmEvent) {
        tracing::debug!(?event, "guest request");
        self.finish(Ok(match event {
            VmEvent::Reset => VmOutcome::Reset,
            VmEvent::Shutdown => VmOutcome::Shutdown,
            VmEvent::DebugExit(v) => VmOutcome::DebugExit(v),
        }));
    }
}
