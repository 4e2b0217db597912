//! Host input for the guest's UART: reads stdin only as fast as the guest drains the receive
//! FIFO, so that no byte is dropped.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: RawFd,
    /// Raised by the UART when the guest drained the FIFO after a partial enqueue.
    room: Arc<EventFd>,
    /// Read from the host, not yet taken by the UART.
    pending: Vec<u8>,
    watching_input: bool,
    input_open: bool,
}

impl SerialInput {
    /// `input` must stay open for the life of this subscriber (stdin does).
    pub fn new(serial: Arc<Mutex<Serial>>, input: RawFd, room: Arc<EventFd>) -> Self {
        Self {
            serial,
            input,
            room,
            pending: Vec::new(),
            watching_input: false,
            input_open: true,
        }
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 64];
        // SAFETY: reading at most buf.len() bytes into buf from an fd we watch.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => self.input_open = false,
            n if n > 0 => self.pending.extend_from_slice(&buf[..n.unsigned_abs()]),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    tracing::warn!("serial input closed: {e}");
                    self.input_open = false;
                }
            }
        }
    }

    /// Offer pending bytes to the UART, then watch the input only if there is room for more.
    fn pump(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let n = lock(&self.serial).enqueue(&self.pending);
            self.pending.drain(..n);
        }
        let want = self.input_open && self.pending.is_empty();
        if want != self.watching_input {
            let ev = Events::new_raw(self.input, EventSet::IN);
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.watching_input = want,
                Err(e) => {
                    // Not pollable (a regular file, /dev/null): no input for the guest.
                    tracing::debug!(?e, "serial input not watchable");
                    self.input_open = false;
                    self.watching_input = false;
                }
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
        } else if events.fd() == self.input {
            if events.event_set().contains(EventSet::IN) {
                self.read_input();
            } else {
                // Hang-up or error with nothing to read.
                self.input_open = false;
            }
        }
        self.pump(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.room.as_ref(), EventSet::IN)) {
            tracing::error!(?e, "cannot watch serial FIFO room");
        }
        self.pump(ops);
    }
}
