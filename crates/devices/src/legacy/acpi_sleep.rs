//! The registers of a hardware-reduced ACPI platform (ACPI 6.5, 4.8.3.6 and 4.8.3.7): the sleep
//! control and sleep status registers, which share one byte port as on Cloud Hypervisor and
//! QEMU's microvm, and the reset register in the next port. Insert with length
//! [`AcpiSleep::LEN`]; the FADT names these ports and the DSDT's `\_S5_` package names
//! [`AcpiSleep::SLP_TYP_S5`].
//!
//! A guest powers off by writing `SLP_TYP << 2 | SLP_EN` (Linux's `acpi_hw_extended_sleep`); it
//! first clears the wake status by writing `WAK_STS` to the status register, which is the same
//! port here, so a write without `SLP_EN` never starts a transition.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::{read_bytes, write_bytes};
use crate::bus::BusDevice;
use crate::{VmEvent, VmEvents};

/// Sleep control register: sleep type, bits 4:2.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// Sleep control register: enter the sleep state in `SLP_TYP`.
const SLP_EN: u8 = 1 << 5;
/// Sleep status register: the platform woke up (write 1 to clear).
const WAK_STS: u8 = 1 << 7;

/// Hardware-reduced ACPI sleep control/status and reset registers.
pub struct AcpiSleep {
    events: Arc<dyn VmEvents>,
    /// Set when a sleep request was refused, so that a guest polling for the wake-up (as Linux
    /// does after any sleep request but S5) returns at once instead of spinning forever.
    wake_status: bool,
    /// An unsupported sleep request is a warning once, then debug, so a guest cannot flood the log.
    warned: bool,
}

impl AcpiSleep {
    /// Ports taken: sleep control (write) / status (read) at +0, reset at +1.
    pub const LEN: u64 = 2;
    /// Offset of the sleep control and status register.
    pub const SLEEP_OFFSET: u64 = 0;
    /// Offset of the reset register.
    pub const RESET_OFFSET: u64 = 1;
    /// What a guest writes to the reset register to reset the machine (the FADT's RESET_VALUE).
    pub const RESET_VALUE: u8 = 1;
    /// The `SLP_TYP` of S5 (soft off): any 3-bit value works if the DSDT's `\_S5_` says the same;
    /// 5 is what Cloud Hypervisor uses, so that guests that hard-code it also power off.
    pub const SLP_TYP_S5: u8 = 5;

    pub fn new(events: Arc<dyn VmEvents>) -> Self {
        Self {
            events,
            wake_status: false,
            warned: false,
        }
    }

    fn write_sleep(&mut self, value: u8) {
        if value & WAK_STS != 0 {
            self.wake_status = false;
        }
        if value & SLP_EN == 0 {
            return;
        }
        let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if slp_typ == Self::SLP_TYP_S5 {
            info!("acpi: guest entered S5 (soft off)");
            self.events.request(VmEvent::Shutdown);
            return;
        }
        if self.warned {
            debug!("acpi: sleep type {slp_typ} not supported; waking at once");
        } else {
            warn!("acpi: sleep type {slp_typ} not supported; waking at once");
            self.warned = true;
        }
        self.wake_status = true;
    }

    fn write_reset(&mut self, value: u8) {
        if value == Self::RESET_VALUE {
            info!("acpi: guest wrote the reset register");
            self.events.request(VmEvent::Reset);
        } else {
            debug!("acpi: reset register write {value:#x} ignored");
        }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, Self::LEN, data, |port| match port {
            Self::SLEEP_OFFSET if self.wake_status => WAK_STS,
            _ => 0,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, Self::LEN, data, |port, value| match port {
            Self::SLEEP_OFFSET => self.write_sleep(value),
            _ => self.write_reset(value),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{RecordingEvents, fuzz, read1};

    fn device() -> (Arc<RecordingEvents>, AcpiSleep) {
        let ev = Arc::new(RecordingEvents::default());
        (ev.clone(), AcpiSleep::new(ev))
    }

    fn sleep_value(slp_typ: u8) -> u8 {
        (slp_typ << SLP_TYP_SHIFT) | SLP_EN
    }

    #[test]
    fn s5_shuts_down() {
        let (ev, mut d) = device();
        // Linux's sequence: clear WAK_STS, then SLP_TYP | SLP_EN.
        d.write(AcpiSleep::SLEEP_OFFSET, &[WAK_STS]);
        assert!(ev.take().is_empty());
        d.write(
            AcpiSleep::SLEEP_OFFSET,
            &[sleep_value(AcpiSleep::SLP_TYP_S5)],
        );
        assert_eq!(ev.take(), [VmEvent::Shutdown]);
        assert_eq!(sleep_value(AcpiSleep::SLP_TYP_S5), 0x34);
    }

    #[test]
    fn s5_without_slp_en_does_nothing() {
        let (ev, mut d) = device();
        d.write(
            AcpiSleep::SLEEP_OFFSET,
            &[AcpiSleep::SLP_TYP_S5 << SLP_TYP_SHIFT],
        );
        d.write(AcpiSleep::SLEEP_OFFSET, &[!SLP_EN]);
        assert!(ev.take().is_empty());
    }

    #[test]
    fn other_sleep_types_wake_at_once() {
        let (ev, mut d) = device();
        assert_eq!(read1(&mut d, AcpiSleep::SLEEP_OFFSET), 0);
        for slp_typ in (0..8).filter(|t| *t != AcpiSleep::SLP_TYP_S5) {
            d.write(AcpiSleep::SLEEP_OFFSET, &[sleep_value(slp_typ)]);
            assert!(ev.take().is_empty(), "SLP_TYP {slp_typ}");
            assert_eq!(read1(&mut d, AcpiSleep::SLEEP_OFFSET), WAK_STS);
            // Write 1 to clear.
            d.write(AcpiSleep::SLEEP_OFFSET, &[WAK_STS]);
            assert_eq!(read1(&mut d, AcpiSleep::SLEEP_OFFSET), 0);
        }
    }

    #[test]
    fn reset_register() {
        let (ev, mut d) = device();
        d.write(
            AcpiSleep::RESET_OFFSET,
            &[AcpiSleep::RESET_VALUE.wrapping_add(1)],
        );
        d.write(AcpiSleep::RESET_OFFSET, &[0]);
        assert!(ev.take().is_empty());
        d.write(AcpiSleep::RESET_OFFSET, &[AcpiSleep::RESET_VALUE]);
        assert_eq!(ev.take(), [VmEvent::Reset]);
        assert_eq!(read1(&mut d, AcpiSleep::RESET_OFFSET), 0);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let (ev, mut d) = device();
        // A 16-bit write reaches both registers, as an ISA byte-lane split would.
        d.write(
            AcpiSleep::SLEEP_OFFSET,
            &[sleep_value(AcpiSleep::SLP_TYP_S5), AcpiSleep::RESET_VALUE],
        );
        assert_eq!(ev.take(), [VmEvent::Shutdown, VmEvent::Reset]);
        // Bytes beyond the device are dropped / read as all-ones.
        d.write(
            AcpiSleep::RESET_OFFSET,
            &[0, AcpiSleep::RESET_VALUE, 0xff, 0xff],
        );
        assert!(ev.take().is_empty());
        let mut b = [0u8; 4];
        d.read(AcpiSleep::SLEEP_OFFSET, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let (_, mut d) = device();
        fuzz(&mut d, 0xac91, AcpiSleep::LEN + 2, 10_000);
    }
}
