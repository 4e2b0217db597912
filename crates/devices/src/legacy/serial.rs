//! COM1: a 16550A UART, the register model of `vm_superio::Serial` behind our bus and IRQ traits.
//!
//! Output policy: each byte the guest writes to THR is handed to the writer at once, but the writer
//! is flushed only after a newline, when the guest next touches a register other than THR (write)
//! or LSR (read), on [`Serial::flush_output`], and on drop. Drivers touch another register when a
//! burst ends (Linux restores IER after a console write and reads IIR in its interrupt handler), so
//! a prompt without a newline still shows up, while a line costs one flush instead of one per byte.
//! Give it `std::io::stdout()` (line-buffered), a `File` (unbuffered) or `std::io::sink()`.
//!
//! Input: the VMM offers bytes with [`Serial::enqueue`], which takes what fits in the 64-byte FIFO.
//! When it could not take everything, the `input_room` line is raised once the guest has drained
//! the FIFO, so the event loop knows when to offer the rest: nothing is lost, nothing is polled.

use std::cell::Cell;
use std::io::{self, Write};
use std::sync::Arc;

use tracing::debug;
use vm_superio::serial::{Error as UartError, SerialEvents};

use super::{read_bytes, write_bytes};
use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

/// Receive FIFO depth of the emulated 16550A.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Number of ports (registers) of the UART.
const PORTS: u64 = 8;
const THR: u64 = 0;
const LSR: u64 = 5;

/// The guest's interrupt line, as vm-superio wants it.
struct Irq(Arc<dyn IrqLine>);

impl vm_superio::Trigger for Irq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Tells the event loop that the receive FIFO has room again, but only when it is waiting for it
/// (armed by a short [`Serial::enqueue`]): a guest polling an empty RBR causes no wake-ups.
struct InputRoom {
    line: Option<Arc<dyn IrqLine>>,
    armed: Cell<bool>,
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if self.armed.replace(false) {
            if let Some(line) = &self.line {
                if let Err(e) = line.trigger() {
                    debug!("serial: cannot signal input room: {e}");
                }
            }
        }
    }
}

/// The writer, with vm-superio's flush after every byte turned into the policy of this module.
struct Output {
    inner: Box<dyn Write + Send>,
    /// Bytes written since the last flush.
    dirty: bool,
    /// The last write held a newline: the next `flush` from vm-superio goes through.
    newline: bool,
}

impl Output {
    fn flush_now(&mut self) -> io::Result<()> {
        self.dirty = false;
        self.newline = false;
        self.inner.flush()
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.dirty |= n > 0;
        self.newline |= buf.get(..n).is_some_and(|b| b.contains(&b'\n'));
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.newline {
            self.flush_now()
        } else {
            Ok(())
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if self.dirty {
            let _ = self.inner.flush();
        }
    }
}

type Uart = vm_superio::Serial<Irq, InputRoom, Output>;

/// A 16550A UART at 8 consecutive ports (offset = register).
pub struct Serial {
    uart: Uart,
}

impl Serial {
    /// `irq` is the guest's interrupt line (ISA IRQ 4 for COM1); guest output goes to `out`;
    /// `input_room` (optional) is raised when the guest drains the receive FIFO after an
    /// [`enqueue`](Self::enqueue) that could not take all its bytes.
    pub fn new(
        irq: Arc<dyn IrqLine>,
        out: Box<dyn Write + Send>,
        input_room: Option<Arc<dyn IrqLine>>,
    ) -> Self {
        let out = Output {
            inner: out,
            dirty: false,
            newline: false,
        };
        let events = InputRoom {
            line: input_room,
            armed: Cell::new(false),
        };
        Self {
            uart: vm_superio::Serial::with_events(Irq(irq), events, out),
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queue input for the guest: takes as many bytes as fit and returns how many; the caller
    /// keeps the rest and offers it again once `input_room` fires. Takes nothing while the guest
    /// has the UART in loopback mode.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        let fits = bytes.len().min(self.uart.fifo_capacity());
        let taken = match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(UartError::FullFifo) => 0,
            // The bytes are queued before the interrupt is raised.
            Err(e) => {
                debug!("serial: input queued but interrupt failed: {e}");
                fits
            }
        };
        if taken < bytes.len() {
            self.uart.events().armed.set(true);
        }
        taken
    }

    /// Flush guest output that is still buffered in the writer.
    pub fn flush_output(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush_now()
    }

    /// A register access that ends an output burst: push out what the guest wrote so far.
    fn flush_if_burst_ended(&mut self, offset: u64, is_write: bool) {
        let data_path = if is_write {
            offset == THR
        } else {
            offset == LSR
        };
        if !data_path && self.uart.writer().dirty {
            if let Err(e) = self.flush_output() {
                debug!("serial: flushing output failed: {e}");
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !data.is_empty() {
            self.flush_if_burst_ended(offset, false);
        }
        let uart = &mut self.uart;
        // `p < PORTS`, so it fits a u8.
        read_bytes(offset, PORTS, data, |p| uart.read(p as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !data.is_empty() {
            self.flush_if_burst_ended(offset, true);
        }
        let uart = &mut self.uart;
        write_bytes(offset, PORTS, data, |p, b| {
            // The writer's errors mean lost output; the guest cannot be stalled, so go on.
            if let Err(e) = uart.write(p as u8, b) {
                debug!("serial: write of {b:#04x} to register {p}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::lock;
    use crate::interrupt::CountingIrq;
    use crate::legacy::testutil::{fuzz, read1};

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const SCR: u64 = 7;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE_TEMT: u8 = 0x60;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;

    /// A writer the test can look into, counting flushes.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            lock(&self.0).1 += 1;
            Ok(())
        }
    }

    impl Shared {
        fn bytes(&self) -> Vec<u8> {
            lock(&self.0).0.clone()
        }
        fn flushes(&self) -> usize {
            lock(&self.0).1
        }
    }

    fn uart() -> (Serial, Arc<CountingIrq>, Arc<CountingIrq>, Shared) {
        let irq = CountingIrq::new();
        let room = CountingIrq::new();
        let out = Shared::default();
        let s = Serial::new(irq.clone(), Box::new(out.clone()), Some(room.clone()));
        (s, irq, room, out)
    }

    #[test]
    fn reset_values() {
        let (mut s, irq, _, _) = uart();
        assert_eq!(read1(&mut s, IER), 0);
        assert_eq!(read1(&mut s, IIR), 0xc1); // FIFOs on, nothing pending
        assert_eq!(read1(&mut s, LCR), 0x03); // 8N1
        assert_eq!(read1(&mut s, MCR), 0x08); // OUT2
        assert_eq!(read1(&mut s, LSR), LSR_THRE_TEMT);
        assert_eq!(read1(&mut s, 6), 0xb0); // DCD, DSR, CTS
        assert_eq!(irq.count(), 0);
        s.write(SCR, &[0x5a]);
        assert_eq!(read1(&mut s, SCR), 0x5a);
        // Divisor latch behind DLAB.
        s.write(LCR, &[0x83]);
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        assert_eq!(read1(&mut s, 0), 0x01);
        s.write(LCR, &[0x03]);
        assert_eq!(read1(&mut s, IER), 0);
    }

    #[test]
    fn transmit_and_thre_interrupt() {
        let (mut s, irq, _, out) = uart();
        s.write(THR, b"h");
        s.write(THR, b"i");
        assert_eq!(out.bytes(), b"hi");
        assert_eq!(irq.count(), 0);
        s.write(IER, &[IER_THRE]);
        assert_eq!(irq.count(), 1);
        assert_eq!(read1(&mut s, IIR), 0xc2);
        s.write(THR, b"!");
        assert_eq!(irq.count(), 2);
        assert_eq!(out.bytes(), b"hi!");
    }

    #[test]
    fn flush_policy() {
        let (mut s, _, _, out) = uart();
        for &b in b"abc" {
            assert_eq!(read1(&mut s, LSR) & LSR_THRE_TEMT, LSR_THRE_TEMT);
            s.write(THR, &[b]);
        }
        assert_eq!(out.flushes(), 0);
        s.write(THR, b"\n");
        assert_eq!(out.flushes(), 1);
        s.write(THR, b"$");
        s.write(THR, b" ");
        assert_eq!(out.flushes(), 1);
        // The burst ends: Linux restores IER.
        s.write(IER, &[0]);
        assert_eq!(out.flushes(), 2);
        // Nothing new: no flush.
        s.write(IER, &[0]);
        read1(&mut s, IIR);
        assert_eq!(out.flushes(), 2);
        s.write(THR, b"x");
        assert!(s.flush_output().is_ok());
        assert_eq!(out.flushes(), 3);
        s.write(THR, b"y");
        drop(s);
        assert_eq!(out.flushes(), 4);
        assert_eq!(out.bytes(), b"abc\n$ xy");
    }

    #[test]
    fn receive_fifo_full_and_drained() {
        let (mut s, irq, room, _) = uart();
        s.write(IER, &[IER_RDA]);
        assert_eq!(s.fifo_room(), SERIAL_FIFO_SIZE);
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(s.enqueue(&input), SERIAL_FIFO_SIZE);
        assert_eq!(s.fifo_room(), 0);
        assert_eq!(irq.count(), 1);
        assert_eq!(read1(&mut s, IIR), 0xc4);
        assert_eq!(s.enqueue(&input[64..]), 0);
        assert_eq!(room.count(), 0);
        for i in 0..SERIAL_FIFO_SIZE {
            assert_eq!(read1(&mut s, LSR) & LSR_DR, LSR_DR);
            assert_eq!(usize::from(read1(&mut s, THR)), i);
        }
        assert_eq!(read1(&mut s, LSR) & LSR_DR, 0);
        // Drained after a short enqueue: the event loop hears of it, once.
        assert_eq!(room.count(), 1);
        read1(&mut s, THR);
        assert_eq!(room.count(), 1);
        assert_eq!(s.enqueue(&input[64..]), 36);
        assert_eq!(irq.count(), 2);
        for _ in 0..36 {
            read1(&mut s, THR);
        }
        // Everything fit last time: nobody waits, no notification.
        assert_eq!(room.count(), 1);
        assert_eq!(s.enqueue(&[]), 0);
    }

    #[test]
    fn loopback_takes_no_input() {
        let (mut s, _, room, out) = uart();
        s.write(MCR, &[0x10]);
        assert_eq!(s.enqueue(b"abc"), 0);
        s.write(THR, b"z");
        assert_eq!(out.bytes(), b"");
        assert_eq!(read1(&mut s, THR), b'z');
        assert_eq!(room.count(), 1);
    }

    #[test]
    fn wide_accesses_are_split() {
        let (mut s, _, _, out) = uart();
        // A word write at SCR: the second byte falls off the end.
        s.write(SCR, &[0x11, 0x22]);
        assert_eq!(read1(&mut s, SCR), 0x11);
        let mut w = [0u8; 4];
        s.read(LSR, &mut w);
        assert_eq!(w, [LSR_THRE_TEMT, 0xb0, 0x11, 0xff]);
        s.write(THR, &[b'o', 0x02]);
        assert_eq!(out.bytes(), b"o");
        assert_eq!(read1(&mut s, IER), 0x02);
        s.read(u64::MAX, &mut w);
        assert_eq!(w, [0xff; 4]);
    }

    #[test]
    fn failing_writer_does_not_stop_the_guest() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::Error::other("gone"))
            }
        }
        let irq = CountingIrq::new();
        let mut s = Serial::new(irq.clone(), Box::new(Broken), None);
        s.write(IER, &[IER_THRE]);
        s.write(THR, b"a\n");
        assert!(irq.count() >= 1);
        assert_eq!(s.enqueue(&[0; 70]), 64);
        for _ in 0..64 {
            read1(&mut s, THR);
        }
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let (mut s, _, _, _) = uart();
        let mut rng = crate::legacy::testutil::XorShift(0x3f8);
        for round in 0..200 {
            fuzz(&mut s, round + 1, 10, 100);
            let n = rng.below(80) as usize;
            let taken = s.enqueue(&vec![0x41; n]);
            assert!(taken <= n);
            assert!(s.fifo_room() <= SERIAL_FIFO_SIZE);
        }
    }
}
