//! Host input for a guest console (the UART, or the virtio-console): reads stdin only as fast as
//! the guest takes it, so that no byte is dropped.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::legacy::Serial;
use devices::virtio::console::Console;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device that takes host input with flow control: it takes what fits now, returns how many
/// bytes that was, and raises its "room" eventfd when it can take more.
pub trait InputSink: Send {
    fn enqueue(&mut self, bytes: &[u8]) -> usize;
}

impl InputSink for Serial {
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        Serial::enqueue(self, bytes)
    }
}

impl InputSink for Console {
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        Console::enqueue(self, bytes)
    }
}

/// stdin to the UART.
pub type SerialInput = HostInput<Serial>;

pub struct HostInput<S: InputSink> {
    sink: Arc<Mutex<S>>,
    input: RawFd,
    /// Raised by the device when the guest made room after a partial enqueue.
    room: Arc<EventFd>,
    /// Read from the host, not yet taken by the UART.
    pending: Vec<u8>,
    watching_input: bool,
    input_open: bool,
}

impl<S: InputSink> HostInput<S> {
    /// `input` must stay open for the life of this subscriber (stdin does).
    pub fn new(sink: Arc<Mutex<S>>, input: RawFd, room: Arc<EventFd>) -> Self {
        Self {
            sink,
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
                    tracing::warn!("console input closed: {e}");
                    self.input_open = false;
                }
            }
        }
    }

    /// Offer pending bytes to the device, then watch the input only if there is room for more.
    fn pump(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let n = lock(&self.sink).enqueue(&self.pending);
            self.pending.drain(..n.min(self.pending.len()));
        }
        let want = self.input_open && self.pending.is_empty();
        if want != self.watching_input {
            let ev = Events::new_raw(self.input, EventSet::IN);
            let r = if want { ops.add(ev) } else { ops.remove(ev) };
            match r {
                Ok(()) => self.watching_input = want,
                Err(e) => {
                    // Not pollable (a regular file, /dev/null): no input for the guest.
                    tracing::debug!(?e, "console input not watchable");
                    self.input_open = false;
                    self.watching_input = false;
                }
            }
        }
    }
}

impl<S: InputSink> MutEventSubscriber for HostInput<S> {
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
            tracing::error!(?e, "cannot watch console input room");
        }
        self.pump(ops);
    }
}
