//! One guest connection's state: ports, protocol state, credit both ways and the guest bytes
//! the host stream has not taken yet.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::SHUTDOWN_RCV;
use super::unix::send;

/// One connection: host-side port (`local`) and guest-side port (`peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub local: u32,
    pub peer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// The guest shut both directions while guest bytes still wait for the host stream: RST
    /// once they are written (or at the deadline).
    Draining,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) state: State,
    pub(super) deadline: Option<Instant>,
    /// Events registered with the epoll set (empty: not registered).
    pub(super) registered: EventSet,
    /// In the ready list: the host stream had data or news when last looked at.
    pub(super) readable: bool,
    /// The host stream reached end of file; the guest was sent SHUTDOWN(SEND).
    pub(super) host_eof: bool,
    /// SHUTDOWN flags received from the guest.
    pub(super) peer_shutdown: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    pub(super) tx_cnt: Wrapping<u32>,
    /// Payload bytes received from the guest.
    pub(super) rx_cnt: Wrapping<u32>,
    /// Of those, bytes the host stream took.
    pub(super) fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub(super) fwd_cnt_sent: Wrapping<u32>,
    pub(super) credit_update_queued: bool,
    pub(super) credit_requested: bool,
    /// Guest bytes the host stream has not taken yet.
    pub(super) to_host: VecDeque<u8>,
}

impl Conn {
    pub(super) fn new(
        stream: UnixStream,
        token: u64,
        state: State,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            stream,
            token,
            state,
            deadline,
            registered: EventSet::empty(),
            readable: false,
            host_eof: false,
            peer_shutdown: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            credit_update_queued: false,
            credit_requested: false,
            to_host: VecDeque::new(),
        }
    }

    /// Bytes the guest can take now. A guest reporting more forwarded than it was sent gets
    /// nothing rather than a huge credit.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub(super) fn wanted_events(&self) -> EventSet {
        let mut want = EventSet::empty();
        match self.state {
            State::Connecting => {}
            State::Established => {
                if !self.readable && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0 {
                    want |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    want |= EventSet::OUT;
                }
            }
            State::Draining => {
                if !self.to_host.is_empty() {
                    want |= EventSet::OUT;
                }
            }
        }
        want
    }

    /// Write as much of `to_host` as the stream takes. `Err` means the stream is broken.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send(&self.stream, front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
