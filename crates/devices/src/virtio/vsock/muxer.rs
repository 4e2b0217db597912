//! The host side of virtio-vsock: guest stream connections mapped onto Unix sockets, in the
//! style of Firecracker's hybrid vsock.
//!
//! - Host-initiated: the host connects to the Unix socket at PATH and writes `CONNECT <port>\n`.
//!   The muxer sends the guest a REQUEST from a fresh host-side port to `<port>`; when the guest
//!   answers RESPONSE it writes `OK <host port>\n` back and the stream carries data from then on.
//! - Guest-initiated: a REQUEST to host port P is connected to the Unix socket at `PATH_P`;
//!   refused or absent, the guest gets RST.
//!
//! All host sockets are nonblocking and watched by an epoll instance of the muxer's own, so the
//! VMM watches one file descriptor whatever the number of connections. The epoll set is level
//! triggered and only holds what the muxer can act on now: a connection waiting for guest
//! credit or for rx buffers is taken out of it, so an idle VMM never spins.
//!
//! Flow control (virtio 1.2, 5.10.6.3): the guest is never sent more than its advertised
//! `buf_alloc - (tx_cnt - fwd_cnt)`; the guest is given [`CONN_BUF_SIZE`] per connection, the
//! bytes the host stream has not taken yet are buffered up to that, and a guest that sends more
//! than its credit is reset.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::VsockError;
use super::conn::{Conn, Key, State};
use super::packet::{
    HDR_LEN, HOST_CID, Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op,
};
use super::unix::{SocketPath, connect_nonblocking, parse_connect, prepare_path, send};

/// Largest payload of one packet, either way.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Receive buffer the guest is given per connection (`buf_alloc`): guest bytes the host stream
/// has not taken yet are held up to this.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes not yet reported to the guest that trigger a CREDIT_UPDATE. A quarter of the
/// buffer keeps a sender that waits for credit moving without an update per packet.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// Connections (and host connections still sending their CONNECT line) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Replies waiting for rx buffers past which tx processing pauses ([`Muxer::backlogged`]).
const TX_STALL_REPLIES: usize = 256;
/// Hard cap on control packets waiting for rx buffers (tx pauses long before; host events such
/// as timeouts can add more). Past it packets are dropped rather than host memory grown.
const MAX_CONTROL: usize = 4 * MAX_CONNECTIONS;
/// `CONNECT 4294967295` is 18 bytes; anything longer is garbage.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host connection may take to send its CONNECT line, and the guest to answer a
/// REQUEST.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the host stream may take to drain after the guest shut a connection down.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the listener rests after accept failed for lack of file descriptors or memory.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Host-side ports of host-initiated connections are taken from here up (as Firecracker does),
/// clear of the well-known ports a guest listens on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

/// A host connection that has not sent its CONNECT line yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What [`Muxer::next_data`] found.
enum Data {
    /// A RW packet of this total length is in the buffer.
    Packet(usize),
    /// A control packet was queued: look again.
    Retry,
    Nothing,
}

pub struct Muxer {
    guest_cid: u64,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    /// What the timer is armed for.
    timer_deadline: Option<Instant>,
    /// The listener is out of the epoll set until then (accept failed for lack of resources).
    listener_paused_until: Option<Instant>,
    next_token: u64,
    next_local_port: u32,
    pending: HashMap<u64, Pending>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    /// Control packets for the guest, sent before any data.
    control: VecDeque<Header>,
    /// Connections whose host stream has something for the guest (data or end of file).
    ready: VecDeque<Key>,
    // Last, so that the socket file goes after the listener is closed.
    path: SocketPath,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("path", &self.path.0)
            .field("connections", &self.conns.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Muxer {
    pub fn new(path: &Path, guest_cid: u64) -> Result<Self, VsockError> {
        prepare_path(path)?;
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let path = SocketPath(path.to_owned());
        listener.set_nonblocking(true).map_err(VsockError::Epoll)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VsockError::Epoll)?;
        }
        Ok(Self {
            guest_cid,
            listener,
            epoll,
            timer,
            timer_deadline: None,
            listener_paused_until: None,
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            pending: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path.0
    }

    /// The epoll file descriptor the VMM watches (readable: call [`Muxer::process_events`]).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Forget every guest connection (device reset): host streams are closed. Host connections
    /// still sending their CONNECT line stay.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            self.tokens.remove(&conn.token);
        }
        self.control.clear();
        self.ready.clear();
        self.arm_timer();
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_TOKEN);
        t
    }

    // ---- host side ----------------------------------------------------------------------

    /// Serve what the epoll set reports. Call when the epoll fd is readable.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::warn!("vsock: epoll_wait failed: {e}");
                0
            }
        };
        let mut timer_fired = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept(),
                TOKEN_TIMER => timer_fired = true,
                token => self.host_event(token, ev.event_set()),
            }
        }
        if timer_fired {
            // Disarming also clears the expiry count, so the timer fd stops being readable.
            if let Err(e) = self.timer.clear() {
                tracing::warn!("vsock: cannot disarm the timer: {e}");
            }
            self.timer_deadline = None;
            self.expire(Instant::now());
        }
        self.arm_timer();
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The client gave up before we got to it.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of file descriptors or memory: the listener stays readable, so stop
                    // watching it for a while rather than spin.
                    tracing::warn!("vsock: accept failed, pausing the listener: {e}");
                    self.pause_listener();
                    return;
                }
            };
            if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
                tracing::debug!("vsock: too many connections, host connection refused");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::debug!("vsock: cannot make a host stream nonblocking: {e}");
                continue;
            }
            let token = self.alloc_token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                tracing::warn!("vsock: cannot watch a host stream: {e}");
                continue;
            }
            self.pending.insert(
                token,
                Pending {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + CONNECT_TIMEOUT,
                },
            );
        }
    }

    fn pause_listener(&mut self) {
        if self.listener_paused_until.is_some() {
            return;
        }
        let fd = self.listener.as_raw_fd();
        match self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            Ok(()) => self.listener_paused_until = Some(Instant::now() + ACCEPT_RETRY),
            Err(e) => tracing::warn!("vsock: cannot pause the listener: {e}"),
        }
    }

    fn resume_listener(&mut self) {
        let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
        let fd = self.listener.as_raw_fd();
        match self.epoll.ctl(ControlOperation::Add, fd, ev) {
            Ok(()) => self.listener_paused_until = None,
            Err(e) => {
                tracing::warn!("vsock: cannot resume the listener: {e}");
                self.listener_paused_until = Some(Instant::now() + ACCEPT_RETRY);
            }
        }
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        if self.pending.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP)
            && !conn.to_host.is_empty()
        {
            self.flush(key);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP)
            && conn.state == State::Established
            && !conn.readable
            && !conn.host_eof
            && conn.peer_shutdown & SHUTDOWN_RCV == 0
        {
            // Read when there is an rx buffer to read into (next_rx).
            conn.readable = true;
            self.ready.push_back(key);
        }
        self.sync(key);
    }

    /// Read the CONNECT line a byte at a time, so that no data after it is taken.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let complete = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break false,
                Ok(_) if byte[0] == b'\n' => break true,
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break false,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        match parse_connect(&p.line).filter(|_| complete) {
            Some(port) => self.connect_guest(token, p.stream, port),
            None => tracing::debug!(
                line = %String::from_utf8_lossy(&p.line),
                "vsock: bad CONNECT line from the host, closing"
            ),
        }
        // A stream dropped here leaves the epoll set when its fd is closed.
    }

    /// A host connection asked for guest port `peer`: send the guest a REQUEST.
    fn connect_guest(&mut self, token: u64, stream: UnixStream, peer: u32) {
        let key = loop {
            let local = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .filter(|&p| p < u32::MAX)
                .unwrap_or(FIRST_LOCAL_PORT);
            let key = Key { local, peer };
            if !self.conns.contains_key(&key) {
                break key;
            }
        };
        let mut conn = Conn::new(
            stream,
            token,
            State::Connecting,
            Some(Instant::now() + CONNECT_TIMEOUT),
        );
        conn.registered = EventSet::IN;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.control_packet(key, op::REQUEST, 0);
        self.sync(key);
    }

    /// Bring the epoll registration of `key` in line with what it waits for.
    fn sync(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.wanted_events();
        if want == conn.registered {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let (operation, ev) = if want.is_empty() {
            (ControlOperation::Delete, EpollEvent::default())
        } else if conn.registered.is_empty() {
            (ControlOperation::Add, EpollEvent::new(want, conn.token))
        } else {
            (ControlOperation::Modify, EpollEvent::new(want, conn.token))
        };
        match self.epoll.ctl(operation, fd, ev) {
            Ok(()) => conn.registered = want,
            Err(e) => {
                tracing::warn!("vsock: cannot watch a host stream: {e}");
                self.rst(key);
            }
        }
    }

    /// Write buffered guest bytes; finish a drain or a guest half-close when done.
    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = conn.flush() {
            tracing::debug!(?key, "vsock: host stream write failed: {e}");
            self.rst(key);
            return;
        }
        if conn.to_host.is_empty() {
            if conn.state == State::Draining {
                // Everything the guest sent is out: complete its clean shutdown.
                self.rst(key);
                return;
            }
            if conn.peer_shutdown & SHUTDOWN_SEND != 0 {
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        self.maybe_credit_update(key);
        self.sync(key);
    }

    fn expire(&mut self, now: Instant) {
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.resume_listener();
        }
        self.pending.retain(|_, p| {
            let keep = p.deadline > now;
            if !keep {
                tracing::debug!("vsock: host connection sent no CONNECT line in time");
            }
            keep
        });
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            tracing::debug!(?key, "vsock: connection timed out");
            self.rst(key);
        }
    }

    /// Arm the timer for the earliest deadline. Call after a batch of guest packets (which may
    /// start a drain); host events do it themselves.
    pub fn arm_timer(&mut self) {
        let next = self
            .pending
            .values()
            .map(|p| p.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.listener_paused_until)
            .min();
        if next == self.timer_deadline {
            return;
        }
        let result = match next {
            None => self.timer.clear(),
            Some(t) => {
                let wait = t
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
        };
        match result {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::warn!("vsock: cannot arm the timer: {e}"),
        }
    }

    // ---- guest side ---------------------------------------------------------------------

    fn header(&self, key: Key, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_CONTROL {
            tracing::debug!(
                op = hdr.op,
                "vsock: too many control packets queued, dropped"
            );
            return;
        }
        self.control.push_back(hdr);
    }

    fn control_packet(&mut self, key: Key, op: u16, flags: u32) {
        let hdr = self.header(key, op, flags);
        self.push_control(hdr);
    }

    /// Reset a connection: RST to the guest, host stream closed.
    fn rst(&mut self, key: Key) {
        self.control_packet(key, op::RST, 0);
        self.remove(key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
        }
    }

    fn maybe_credit_update(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.credit_update_queued
            && (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
        {
            conn.credit_update_queued = true;
            self.control_packet(key, op::CREDIT_UPDATE, 0);
        }
    }

    /// A packet from the guest, with a header already checked for addresses and length
    /// (`payload` is `hdr.len` bytes).
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            tracing::debug!(type_ = hdr.type_, "vsock: unsupported socket type");
            self.guest_fault(hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_host(key, hdr),
                op::RST => {}
                _ => {
                    tracing::debug!(?key, op = hdr.op, "vsock: packet for no connection");
                    self.control_packet(key, op::RST, 0);
                }
            }
            return;
        };
        // Every header carries the sender's credit.
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if conn.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        match (conn.state, hdr.op) {
            (_, op::RST) => self.remove(key),
            (State::Connecting, op::RESPONSE) => self.established(key),
            (State::Established, op::RW) => self.forward(key, payload),
            (State::Established | State::Draining, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => {
                if !conn.credit_update_queued {
                    conn.credit_update_queued = true;
                    self.control_packet(key, op::CREDIT_UPDATE, 0);
                }
            }
            (State::Draining, op::CREDIT_REQUEST | op::SHUTDOWN) => {}
            (State::Established, op::SHUTDOWN) => self.peer_shutdown(key, hdr.flags),
            (state, op) => {
                tracing::debug!(?key, ?state, op, "vsock: unexpected packet, resetting");
                self.rst(key);
            }
        }
        self.sync(key);
    }

    /// A malformed packet (bad type, bad length): RST its connection unless it is an RST.
    pub fn guest_fault(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        let key = Key {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        let mut rst = self.header(key, op::RST, 0);
        // Answer in the packet's own type, as a peer that does not know it would.
        rst.type_ = hdr.type_;
        self.push_control(rst);
        if hdr.type_ == TYPE_STREAM {
            self.remove(key);
        }
    }

    /// A packet the guest should have received was lost (its rx buffer was unreachable): the
    /// connection cannot go on.
    pub fn rx_failed(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        let key = Key {
            local: hdr.src_port,
            peer: hdr.dst_port,
        };
        if self.conns.contains_key(&key) {
            self.rst(key);
        }
    }

    /// The guest's REQUEST to host port `key.local`: connect to `PATH_<port>`.
    fn connect_host(&mut self, key: Key, hdr: &Header) {
        if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!(?key, "vsock: too many connections, guest request refused");
            self.control_packet(key, op::RST, 0);
            return;
        }
        let mut path = OsString::from(self.path.0.as_os_str());
        path.push(format!("_{}", key.local));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let token = self.alloc_token();
                let mut conn = Conn::new(stream, token, State::Established, None);
                // The REQUEST carries the guest's buffer: the host may speak first.
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
                self.conns.insert(key, conn);
                self.tokens.insert(token, key);
                self.control_packet(key, op::RESPONSE, 0);
                self.sync(key);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "vsock: guest connection refused: {e}");
                self.control_packet(key, op::RST, 0);
            }
        }
    }

    /// The guest accepted a host-initiated connection: tell the host its port.
    fn established(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.state = State::Established;
        conn.deadline = None;
        let line = format!("OK {}\n", key.local);
        // A fresh stream's send buffer is empty, so the line goes out whole unless the host
        // has gone.
        match send(&conn.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(_) | Err(_) => {
                tracing::debug!(?key, "vsock: host went away before OK");
                self.rst(key);
            }
        }
    }

    fn forward(&mut self, key: Key, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.peer_shutdown & SHUTDOWN_SEND != 0 {
            tracing::debug!(?key, "vsock: data after the guest's SHUTDOWN(SEND)");
            self.rst(key);
            return;
        }
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let buffered = (conn.rx_cnt - conn.fwd_cnt).0;
        if buffered.saturating_add(len) > CONN_BUF_SIZE {
            tracing::debug!(?key, "vsock: guest sent more than its credit");
            self.rst(key);
            return;
        }
        conn.rx_cnt += Wrapping(len);
        conn.to_host.extend(payload);
        // The only copy that stays is the part the stream did not take.
        self.flush(key);
    }

    fn peer_shutdown(&mut self, key: Key, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if conn.peer_shutdown & SHUTDOWN_RCV != 0 {
            // Its ready-list entry goes stale and is skipped.
            conn.readable = false;
        }
        if conn.peer_shutdown == SHUTDOWN_BOTH {
            if conn.to_host.is_empty() {
                // Clean close: the guest waits for our RST.
                self.rst(key);
            } else {
                conn.state = State::Draining;
                conn.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
            }
        } else if conn.peer_shutdown & SHUTDOWN_SEND != 0 && conn.to_host.is_empty() {
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
    }

    /// Too many replies wait for rx buffers: stop taking tx packets (which make more) until the
    /// guest takes some, as vhost-vsock does, instead of dropping replies.
    pub fn backlogged(&self) -> bool {
        self.control.len() >= TX_STALL_REPLIES
    }

    /// Whether a control packet (header only) waits for the guest.
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// Whether there may be something for the guest's rx queue.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Put the next packet for the guest in `buf` (header, then payload) and return its
    /// length, or `None` if there is nothing to send. `buf` is the rx buffer's size, at least
    /// [`HDR_LEN`]; the payload never exceeds the guest's credit or [`MAX_PAYLOAD`].
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<usize> {
        if buf.len() < HDR_LEN {
            return None;
        }
        loop {
            while let Some(mut hdr) = self.control.pop_front() {
                let key = Key {
                    local: hdr.src_port,
                    peer: hdr.dst_port,
                };
                match self.conns.get_mut(&key) {
                    Some(conn) if hdr.type_ == TYPE_STREAM => {
                        hdr.buf_alloc = CONN_BUF_SIZE;
                        hdr.fwd_cnt = conn.fwd_cnt.0;
                        conn.fwd_cnt_sent = conn.fwd_cnt;
                        if hdr.op == op::CREDIT_UPDATE {
                            conn.credit_update_queued = false;
                        }
                    }
                    // The connection went away since: only its RST still matters.
                    None if hdr.op != op::RST => continue,
                    _ => {}
                }
                buf[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
                return Some(HDR_LEN);
            }
            match self.next_data(buf) {
                Data::Packet(n) => return Some(n),
                Data::Retry => {}
                Data::Nothing => return None,
            }
        }
    }

    fn next_data(&mut self, buf: &mut [u8]) -> Data {
        let room = (buf.len() - HDR_LEN).min(MAX_PAYLOAD);
        if room == 0 {
            // A zero-length read would look like end of file.
            return Data::Nothing;
        }
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if !conn.readable || conn.state != State::Established {
                conn.readable = false;
                continue;
            }
            let credit = usize::try_from(conn.peer_credit()).unwrap_or(usize::MAX);
            if credit == 0 {
                self.ready.push_back(key);
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.control_packet(key, op::CREDIT_REQUEST, 0);
                    return Data::Retry;
                }
                continue;
            }
            let want = credit.min(room);
            match conn.stream.read(&mut buf[HDR_LEN..HDR_LEN + want]) {
                Ok(0) => {
                    // The host will send no more; the guest may still send.
                    conn.readable = false;
                    conn.host_eof = true;
                    self.control_packet(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    self.sync(key);
                    return Data::Retry;
                }
                Ok(n) => {
                    let len = u32::try_from(n).unwrap_or(u32::MAX);
                    conn.tx_cnt += Wrapping(len);
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    let fwd_cnt = conn.fwd_cnt.0;
                    let mut hdr = self.header(key, op::RW, 0);
                    hdr.len = len;
                    hdr.buf_alloc = CONN_BUF_SIZE;
                    hdr.fwd_cnt = fwd_cnt;
                    buf[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
                    // Round robin: the next packet comes from another connection.
                    self.ready.push_back(key);
                    return Data::Packet(HDR_LEN + n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.readable = false;
                    self.sync(key);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => self.ready.push_back(key),
                Err(e) => {
                    tracing::debug!(?key, "vsock: host stream read failed: {e}");
                    self.rst(key);
                    return Data::Retry;
                }
            }
        }
        Data::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ready(m: &Muxer) -> bool {
        let ep = Epoll::new().unwrap();
        ep.ctl(
            ControlOperation::Add,
            m.epoll_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
        let mut ev = [EpollEvent::default(); 1];
        ep.wait(0, &mut ev).unwrap() == 1
    }

    #[test]
    fn paused_listener_comes_back() {
        let dir = std::env::temp_dir().join(format!("manifold-vsock-mux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let mut m = Muxer::new(&path, 3).unwrap();
        // As after EMFILE: a waiting client does not wake the VMM until the retry time.
        m.pause_listener();
        m.arm_timer();
        let mut c = UnixStream::connect(&path).unwrap();
        assert!(!ready(&m));
        std::thread::sleep(ACCEPT_RETRY + Duration::from_millis(20));
        assert!(ready(&m));
        m.process_events();
        assert!(m.listener_paused_until.is_none());
        assert!(ready(&m));
        m.process_events();
        assert_eq!(m.pending.len(), 1);
        c.write_all(b"CONNECT 5\n").unwrap();
        m.process_events();
        assert_eq!(m.connection_count(), 1);
        let mut buf = [0u8; HDR_LEN];
        assert_eq!(m.next_rx(&mut buf), Some(HDR_LEN));
        assert_eq!(Header::from_bytes(&buf).op, op::REQUEST);
        drop(m);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
