//! The i8042 keyboard controller, with no keyboard or mouse behind it: enough for a guest to find a
//! controller, run its self tests and reset the machine (command 0xFE).
//!
//! Every controller command that has a reply answers at once, so a guest polling the status
//! register never waits for a timeout. The AUX (mouse) port fails Linux's bit-assignment test (0xA7
//! and 0xA8 do not move the CTR bit) so the guest concludes there is none. Bytes sent to the
//! keyboard are dropped: without an IRQ 1 line a keyboard could not answer anyway. Linux guests
//! boot fastest with `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`, as on Firecracker.

use std::sync::{Arc, Mutex};

use tracing::debug;

use super::{read_bytes, write_bytes};
use crate::bus::{BusDevice, lock};
use crate::{VmEvent, VmEvents};

// Status register bits.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STS_CMD: u8 = 0x08;
/// Keyboard not inhibited (no key lock).
const STS_UNLOCKED: u8 = 0x10;
const STS_AUX_DATA: u8 = 0x20;

// Controller configuration byte (CTR, RAM byte 0) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_XLATE: u8 = 0x40;

// Output port bits.
const OUTP_RESET_HIGH: u8 = 0x01;
const OUTP_A20: u8 = 0x02;

/// Which of the two ports a handle serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Port {
    /// Port 0x60: data in both directions.
    Data,
    /// Port 0x64: status on read, command on write.
    Command,
}

/// A command waiting for its parameter on the data port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    WriteRam(u8),
    WriteOutputPort,
    KbdLoop,
    AuxLoop,
    AuxSend,
}

struct Controller {
    events: Arc<dyn VmEvents>,
    /// Internal RAM; byte 0 is the CTR.
    ram: [u8; 32],
    output_port: u8,
    /// The output buffer: a byte for the guest and whether it came from the AUX port.
    out: Option<(u8, bool)>,
    pending: Pending,
    last_was_command: bool,
}

impl Controller {
    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if let Some((_, aux)) = self.out {
            s |= STS_OBF;
            if aux {
                s |= STS_AUX_DATA;
            }
        }
        if self.ram[0] & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.last_was_command {
            s |= STS_CMD;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        // An empty output buffer reads as 0, like Firecracker's controller.
        self.out.take().map_or(0, |(b, _)| b)
    }

    fn reply(&mut self, b: u8) {
        self.out = Some((b, false));
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.pending = Pending::None;
        match cmd {
            0x20..=0x3f => self.reply(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f => self.pending = Pending::WriteRam(cmd & 0x1f),
            // Controller self-test passed.
            0xaa => self.reply(0x55),
            // Keyboard and AUX interface tests: no error.
            0xab | 0xa9 => self.reply(0x00),
            0xad => self.ram[0] |= CTR_KBD_DISABLED,
            0xae => self.ram[0] &= !CTR_KBD_DISABLED,
            0xd0 => self.reply(self.output_port),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 => self.pending = Pending::KbdLoop,
            0xd3 => self.pending = Pending::AuxLoop,
            0xd4 => self.pending = Pending::AuxSend,
            // Pulse output lines low for 6 us; bit 0 is the CPU reset line (0xFE is the usual).
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.events.request(VmEvent::Reset);
                }
            }
            _ => debug!("i8042: unhandled command {cmd:#04x}"),
        }
    }

    fn write_data(&mut self, b: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteRam(i) => self.ram[usize::from(i)] = b,
            Pending::WriteOutputPort => {
                self.output_port = b;
                if b & OUTP_RESET_HIGH == 0 {
                    self.events.request(VmEvent::Reset);
                }
            }
            Pending::KbdLoop => self.out = Some((b, false)),
            Pending::AuxLoop => self.out = Some((b, true)),
            Pending::AuxSend => debug!("i8042: byte {b:#04x} for absent AUX device dropped"),
            Pending::None => debug!("i8042: byte {b:#04x} for absent keyboard dropped"),
        }
    }
}

/// One i8042 controller. Hand its two ports to the bus with [`I8042::port`].
#[derive(Clone)]
pub struct I8042 {
    inner: Arc<Mutex<Controller>>,
}

impl I8042 {
    /// A controller as a BIOS leaves it (keyboard interrupt on, translation on, POST passed);
    /// resets go to `events`.
    pub fn new(events: Arc<dyn VmEvents>) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_KBD_INT | CTR_SYS | CTR_XLATE;
        let c = Controller {
            events,
            ram,
            output_port: OUTP_RESET_HIGH | OUTP_A20,
            out: None,
            pending: Pending::None,
            last_was_command: false,
        };
        Self {
            inner: Arc::new(Mutex::new(c)),
        }
    }

    /// A bus device for one port, to insert with length 1 (Data at 0x60, Command at 0x64).
    pub fn port(&self, port: I8042Port) -> I8042PortDevice {
        I8042PortDevice {
            inner: self.inner.clone(),
            port,
        }
    }
}

/// One port of an [`I8042`]; both share the controller state.
pub struct I8042PortDevice {
    inner: Arc<Mutex<Controller>>,
    port: I8042Port,
}

impl BusDevice for I8042PortDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut c = lock(&self.inner);
        read_bytes(offset, 1, data, |_| match self.port {
            I8042Port::Data => c.read_data(),
            I8042Port::Command => c.status(),
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut c = lock(&self.inner);
        write_bytes(offset, 1, data, |_, b| match self.port {
            I8042Port::Data => c.write_data(b),
            I8042Port::Command => c.command(b),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{RecordingEvents, fuzz, read1};

    struct Kbc {
        data: I8042PortDevice,
        cmd: I8042PortDevice,
        events: Arc<RecordingEvents>,
    }

    impl Kbc {
        fn new() -> Self {
            let events = Arc::new(RecordingEvents::default());
            let k = I8042::new(events.clone());
            Self {
                data: k.port(I8042Port::Data),
                cmd: k.port(I8042Port::Command),
                events,
            }
        }
        fn status(&mut self) -> u8 {
            read1(&mut self.cmd, 0)
        }
        fn command(&mut self, c: u8) {
            self.cmd.write(0, &[c]);
        }
        fn put(&mut self, b: u8) {
            self.data.write(0, &[b]);
        }
        fn get(&mut self) -> u8 {
            read1(&mut self.data, 0)
        }
        /// What a polling driver does: wait for OBF, then read.
        fn reply(&mut self, c: u8) -> Option<u8> {
            self.command(c);
            (self.status() & STS_OBF != 0).then(|| self.get())
        }
    }

    #[test]
    fn idle_status_and_empty_data() {
        let mut k = Kbc::new();
        assert_eq!(k.status(), STS_UNLOCKED | STS_SYS);
        assert_eq!(k.get(), 0);
        assert_eq!(k.status() & STS_OBF, 0);
    }

    #[test]
    fn ctr_read_write() {
        let mut k = Kbc::new();
        assert_eq!(k.reply(0x20), Some(0x45));
        assert_eq!(k.status() & STS_OBF, 0);
        k.command(0x60);
        assert_eq!(k.status() & STS_CMD, STS_CMD);
        k.put(0x30);
        assert_eq!(k.status() & STS_CMD, 0);
        assert_eq!(k.reply(0x20), Some(0x30));
        // SYS in the status register follows the CTR.
        assert_eq!(k.status() & STS_SYS, 0);
        // Other RAM bytes, and the keyboard enable commands.
        k.command(0x65);
        k.put(0x99);
        assert_eq!(k.reply(0x25), Some(0x99));
        k.command(0xae);
        assert_eq!(k.reply(0x20), Some(0x20));
        k.command(0xad);
        assert_eq!(k.reply(0x20), Some(0x30));
        assert!(k.events.take().is_empty());
    }

    #[test]
    fn self_tests() {
        let mut k = Kbc::new();
        assert_eq!(k.reply(0xaa), Some(0x55));
        assert_eq!(k.reply(0xab), Some(0x00));
        assert_eq!(k.reply(0xa9), Some(0x00));
        assert_eq!(k.reply(0xd0), Some(0x03));
    }

    #[test]
    fn loops_echo_and_aux_toggle_is_inert() {
        let mut k = Kbc::new();
        k.command(0xd3);
        k.put(0x5a);
        assert_eq!(
            k.status() & (STS_OBF | STS_AUX_DATA),
            STS_OBF | STS_AUX_DATA
        );
        assert_eq!(k.get(), 0x5a);
        k.command(0xd2);
        k.put(0xa4);
        assert_eq!(k.status() & (STS_OBF | STS_AUX_DATA), STS_OBF);
        assert_eq!(k.get(), 0xa4);
        // No AUX port: disabling it leaves the CTR alone.
        k.command(0xa7);
        assert_eq!(k.reply(0x20), Some(0x45));
        // Bytes for the absent devices vanish.
        k.put(0xff);
        k.command(0xd4);
        k.put(0xf4);
        assert_eq!(k.status() & STS_OBF, 0);
        // An unknown command produces nothing and cancels a pending parameter.
        k.command(0x60);
        k.command(0x01);
        k.put(0x00);
        assert_eq!(k.reply(0x20), Some(0x45));
    }

    #[test]
    fn reset_requests() {
        let mut k = Kbc::new();
        k.command(0xfe);
        assert_eq!(k.events.take(), [VmEvent::Reset]);
        k.command(0xff);
        assert!(k.events.take().is_empty());
        // Through the output port, reset line low.
        k.command(0xd1);
        k.put(0x03);
        assert!(k.events.take().is_empty());
        k.command(0xd1);
        k.put(0x02);
        assert_eq!(k.events.take(), [VmEvent::Reset]);
        // 0xFE written to the data port is a keyboard byte, not a reset.
        k.put(0xfe);
        assert!(k.events.take().is_empty());
    }

    #[test]
    fn wide_accesses_touch_only_the_first_byte() {
        let mut k = Kbc::new();
        k.cmd.write(0, &[0x20, 0xfe, 0xfe, 0xfe]);
        assert!(k.events.take().is_empty());
        let mut w = [0u8; 2];
        k.data.read(0, &mut w);
        assert_eq!(w, [0x45, 0xff]);
        k.cmd.write(1, &[0xfe]);
        assert!(k.events.take().is_empty());
        assert_eq!(read1(&mut k.cmd, 3), 0xff);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let mut k = Kbc::new();
        fuzz(&mut k.data, 0x60, 2, 20_000);
        fuzz(&mut k.cmd, 0x64, 2, 20_000);
    }
}
