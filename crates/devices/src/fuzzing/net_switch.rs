//! The virtio-net embedded switch fed frames on random ports, with ports added and removed,
//! queues read with buffers of any size and the uplink failing.
//!
//! Two modes, chosen by the first byte:
//!
//! - **Exact**: addresses from a small pool (valid, group, zero), limits large enough that
//!   nothing is evicted or aged. A shadow switch (fixed addresses, learned addresses, per-port
//!   queues with their bounds) predicts where every frame goes; each port's frames, the uplink's
//!   included, must be exactly the predicted ones in order, headers zeroed, cut to the reader's
//!   buffer.
//! - **Bounded**: addresses from the input, tiny limits, time moving on by up to hours per step.
//!   Checked: the forwarding database never grows past the ports' shares, queues stay within
//!   their bounds, a frame never comes back out of the port it went in by, never arrives twice
//!   or out of order, and arrives byte for byte as sent (header aside).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Input;
use crate::bus::lock;
use crate::virtio::net::switch::{Limits, Mac, PortId, Switch, SwitchPort, UPLINK};
use crate::virtio::net::{MAX_FRAME_LEN, NetBackend, VNET_HDR_LEN};

const ETH_HLEN: usize = 14;
/// Tag (sequence number, ingress port) at this offset of the Ethernet frame (the ethertype).
const TAG: usize = VNET_HDR_LEN + 12;
const TAGGED_MIN: usize = TAG + 5;
const MAX_GUEST_PORTS: usize = 6;

/// The uplink's side of a switch under test: frames the switch wrote, frames it will read,
/// whether writes fail (EAGAIN, as a full tap queue). Shared with the switch's unit tests.
#[derive(Default)]
pub(crate) struct Wire {
    pub sent: Vec<Vec<u8>>,
    pub inbound: VecDeque<Vec<u8>>,
    pub fail_writes: bool,
}

/// A tap stand-in: reads cut a frame to the buffer, as a tap does.
pub(crate) struct FakeUplink(pub Arc<Mutex<Wire>>);

impl AsRawFd for FakeUplink {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl NetBackend for FakeUplink {
    fn read_frame(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let frame = lock(&self.0)
            .inbound
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(bufs[0].len());
        bufs[0][..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut w = lock(&self.0);
        if w.fail_writes {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let frame: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = frame.len();
        w.sent.push(frame);
        Ok(n)
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

const POOL: [Mac; 12] = [
    [0x02, 0, 0, 0, 0, 1],
    [0x02, 0, 0, 0, 0, 2],
    [0x02, 0, 0, 0, 0, 3],
    [0x02, 0, 0, 0, 0, 4],
    [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    [0x52, 0x54, 0, 0x12, 0x34, 0x57],
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55],
    [0x06, 0, 0, 0, 0, 9],
    [0xff; 6],
    [0x01, 0x00, 0x5e, 0, 0, 1],
    [0x33, 0x33, 0, 0, 0, 1],
    [0; 6],
];

fn is_group(m: &Mac) -> bool {
    m[0] & 1 != 0
}

fn valid_src(m: &Mac) -> bool {
    !is_group(m) && *m != [0; 6]
}

struct GuestPort {
    handle: SwitchPort,
    mac: Option<Mac>,
    /// Exact mode: frames predicted, as delivered (header zeroed).
    expected: VecDeque<Vec<u8>>,
    /// Last sequence number received (bounded mode's order check).
    last_seq: Option<u32>,
}

struct State {
    exact: bool,
    limits: Limits,
    switch: Arc<Switch>,
    wire: Arc<Mutex<Wire>>,
    ports: HashMap<PortId, GuestPort>,
    /// Exact mode: address -> port learned.
    learned: HashMap<Mac, PortId>,
    uplink_expected: VecDeque<Vec<u8>>,
    uplink_last_seq: Option<u32>,
    /// Every tagged frame sent, by sequence number: (ingress, bytes).
    sent: HashMap<u32, (PortId, Vec<u8>)>,
    seq: u32,
    now: Instant,
}

impl State {
    fn fixed(&self, mac: &Mac) -> Option<PortId> {
        self.ports
            .iter()
            .find(|(_, p)| p.mac.as_ref() == Some(mac))
            .map(|(&id, _)| id)
    }

    fn queued_bytes(q: &VecDeque<Vec<u8>>) -> usize {
        q.iter().map(Vec::len).sum()
    }

    /// Exact mode: where `frame` from `from` goes, and what the queues hold after.
    fn predict(&mut self, from: PortId, frame: &[u8]) {
        if frame.len() < VNET_HDR_LEN + ETH_HLEN || frame.len() > MAX_FRAME_LEN {
            return;
        }
        let mut dst = [0; 6];
        dst.copy_from_slice(&frame[VNET_HDR_LEN..VNET_HDR_LEN + 6]);
        let mut src = [0; 6];
        src.copy_from_slice(&frame[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12]);
        if !valid_src(&src) {
            return;
        }
        if self.fixed(&src).is_none() {
            self.learned.insert(src, from);
        }
        let targets: Vec<PortId> = if is_group(&dst) {
            self.all_but(from)
        } else if let Some(to) = self.fixed(&dst).or_else(|| self.learned.get(&dst).copied()) {
            if to == from { Vec::new() } else { vec![to] }
        } else {
            self.all_but(from)
        };
        let mut out = frame.to_vec();
        out[..VNET_HDR_LEN].fill(0);
        for to in targets {
            if to == UPLINK {
                if !lock(&self.wire).fail_writes {
                    self.uplink_expected.push_back(out.clone());
                }
                continue;
            }
            let Some(p) = self.ports.get_mut(&to) else {
                continue;
            };
            if p.expected.len() < self.limits.queue_frames
                && Self::queued_bytes(&p.expected) + out.len() <= self.limits.queue_bytes
            {
                p.expected.push_back(out.clone());
            }
        }
    }

    fn all_but(&self, from: PortId) -> Vec<PortId> {
        let mut v: Vec<PortId> = self.ports.keys().copied().filter(|&p| p != from).collect();
        if from != UPLINK {
            v.push(UPLINK);
        }
        v
    }

    /// A delivered frame: header zeroed, a tagged one sent before from another port, in order.
    fn check_delivered(&mut self, to: PortId, got: &[u8], whole_len: usize) {
        assert!(
            got[..VNET_HDR_LEN.min(got.len())].iter().all(|&b| b == 0),
            "header"
        );
        if whole_len < TAGGED_MIN || got.len() < TAGGED_MIN {
            return;
        }
        let seq = u32::from_le_bytes([got[TAG], got[TAG + 1], got[TAG + 2], got[TAG + 3]]);
        let Some((from, bytes)) = self.sent.get(&seq) else {
            panic!("port {to} got frame {seq} that was never sent");
        };
        assert_ne!(*from, to, "frame {seq} came back out of its own port");
        assert_eq!(bytes.len(), whole_len, "frame {seq} length");
        assert_eq!(
            &bytes[VNET_HDR_LEN..got.len()],
            &got[VNET_HDR_LEN..],
            "frame {seq} bytes"
        );
        let last = if to == UPLINK {
            &mut self.uplink_last_seq
        } else if let Some(p) = self.ports.get_mut(&to) {
            &mut p.last_seq
        } else {
            return;
        };
        assert!(*last < Some(seq), "port {to}: frame {seq} after {last:?}");
        *last = Some(seq);
    }

    fn check_uplink(&mut self) {
        let sent = std::mem::take(&mut lock(&self.wire).sent);
        for f in sent {
            self.check_delivered(UPLINK, &f, f.len());
            if self.exact {
                assert_eq!(
                    self.uplink_expected.pop_front().as_ref(),
                    Some(&f),
                    "uplink frame"
                );
            }
        }
        if self.exact {
            assert!(self.uplink_expected.is_empty(), "uplink frames missing");
        }
    }

    fn check_bounds(&self) {
        let fixed = self.ports.values().filter(|p| p.mac.is_some()).count();
        let bound = fixed + self.ports.len() * self.limits.macs_per_port + self.limits.uplink_macs;
        // Ports removed leave nothing behind either.
        assert!(
            self.switch.fdb_len() <= bound,
            "fdb {} > {bound}",
            self.switch.fdb_len()
        );
        for &id in self.ports.keys() {
            let q = self.switch.queued(id);
            assert!(q <= self.limits.queue_frames, "port {id} queue {q}");
            if self.exact {
                assert_eq!(q, self.ports[&id].expected.len(), "port {id} queue length");
            }
        }
    }
}

fn frame(input: &mut Input<'_>, exact: bool, seq: u32, from: PortId) -> Vec<u8> {
    let mac = |input: &mut Input<'_>| -> Mac {
        if exact || input.u8() % 2 == 0 {
            input.pick(&POOL)
        } else {
            let b = input.bytes(6);
            let mut m = [0; 6];
            m[..b.len()].copy_from_slice(b);
            m
        }
    };
    let mut f = match input.u8() % 8 {
        // Runts and odd sizes.
        0 => input.bytes(40).to_vec(),
        1 => vec![0x02; MAX_FRAME_LEN + usize::from(input.u8() % 2)],
        _ => {
            let len = TAGGED_MIN + usize::from(input.u8() % 64);
            let mut f = vec![0u8; len];
            let hdr = input.bytes(VNET_HDR_LEN);
            f[..hdr.len()].copy_from_slice(hdr);
            f[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&mac(input));
            f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&mac(input));
            f
        }
    };
    if f.len() >= TAGGED_MIN {
        f[TAG..TAG + 4].copy_from_slice(&seq.to_le_bytes());
        f[TAG + 4] = from as u8;
    }
    f
}

pub fn net_switch(data: &[u8]) {
    let mut input = Input::new(data);
    let exact = input.u8() % 2 == 0;
    let limits = if exact {
        Limits {
            queue_frames: 8,
            queue_bytes: 8 * 80,
            macs_per_port: 64,
            uplink_macs: 64,
            age: Duration::from_secs(3600),
        }
    } else {
        Limits {
            queue_frames: 4,
            queue_bytes: 1 << 20,
            macs_per_port: 4,
            uplink_macs: 8,
            age: Duration::from_secs(60),
        }
    };
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut st = State {
        exact,
        limits,
        switch: Switch::new(Some(Box::new(FakeUplink(wire.clone()))), limits),
        wire,
        ports: HashMap::new(),
        learned: HashMap::new(),
        uplink_expected: VecDeque::new(),
        uplink_last_seq: None,
        sent: HashMap::new(),
        seq: 0,
        now: Instant::now(),
    };
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                // Add a port, with an address from the pool or none.
                let mac = if input.bool() {
                    Some(input.pick(&POOL))
                } else {
                    None
                };
                let taken = mac.is_some_and(|m| st.fixed(&m).is_some());
                let bad = mac.is_some_and(|m| !valid_src(&m));
                let expect_id = (1..).find(|i| !st.ports.contains_key(i)).unwrap_or(1);
                match st.switch.add_port(mac) {
                    Ok(handle) => {
                        assert!(!taken && !bad, "port with address {mac:?} accepted");
                        assert_eq!(handle.id(), expect_id);
                        if let Some(m) = mac {
                            st.learned.remove(&m);
                        }
                        st.ports.insert(
                            handle.id(),
                            GuestPort {
                                handle,
                                mac,
                                expected: VecDeque::new(),
                                last_seq: None,
                            },
                        );
                    }
                    Err(_) => assert!(taken || bad, "port with address {mac:?} refused"),
                }
                if st.ports.len() > MAX_GUEST_PORTS {
                    let id = *st.ports.keys().max().unwrap_or(&1);
                    st.ports.remove(&id);
                    st.learned.retain(|_, p| *p != id);
                }
            }
            1 => {
                // Remove a port.
                let ids: Vec<PortId> = st.ports.keys().copied().collect();
                if !ids.is_empty() {
                    let id = ids[usize::from(input.u8()) % ids.len()];
                    st.ports.remove(&id);
                    st.learned.retain(|_, p| *p != id);
                    assert_eq!(st.switch.port_stats(id), None);
                    // Sending as the removed port does nothing.
                    st.switch.input(id, &[0x02; 64]);
                }
            }
            2..=4 => {
                // A frame from a guest port or the uplink.
                let ids: Vec<PortId> = st.ports.keys().copied().collect();
                let pick = usize::from(input.u8()) % (ids.len() + 1);
                let from = if pick == ids.len() { UPLINK } else { ids[pick] };
                st.seq += 1;
                let f = frame(&mut input, exact, st.seq, from);
                if f.len() >= TAGGED_MIN {
                    st.sent.insert(st.seq, (from, f.clone()));
                }
                if !exact && input.u8() % 4 == 0 {
                    st.now += Duration::from_secs(u64::from(input.u16()));
                }
                let through_tap = from == UPLINK && input.bool();
                if exact {
                    // A tap hands over at most the reader's buffer: the rest is cut off.
                    let seen = if through_tap {
                        &f[..f.len().min(MAX_FRAME_LEN)]
                    } else {
                        &f
                    };
                    st.predict(from, seen);
                }
                if from == UPLINK {
                    if through_tap {
                        lock(&st.wire).inbound.push_back(f);
                        st.switch.uplink_input();
                    } else {
                        st.switch.input_at(UPLINK, &f, st.now);
                    }
                } else if let Some(p) = st.ports.get_mut(&from) {
                    if exact || input.bool() {
                        let (a, b) = f.split_at(usize::from(input.u8()).min(f.len()));
                        assert_eq!(
                            p.handle
                                .write_frame(&[IoSlice::new(a), IoSlice::new(b)])
                                .ok(),
                            Some(f.len())
                        );
                    } else {
                        st.switch.input_at(from, &f, st.now);
                    }
                }
                st.check_uplink();
            }
            5 | 6 => {
                // A port's device reads, with a buffer of any size.
                let ids: Vec<PortId> = st.ports.keys().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[usize::from(input.u8()) % ids.len()];
                let size = match input.u8() % 4 {
                    0 => usize::from(input.u8()),
                    _ => MAX_FRAME_LEN,
                };
                let count = usize::from(input.u8() % 8) + 1;
                for _ in 0..count {
                    let Some(p) = st.ports.get_mut(&id) else {
                        break;
                    };
                    match p
                        .handle
                        .read_frame(&mut [IoSliceMut::new(&mut buf[..size])])
                    {
                        Ok(n) => {
                            assert!(n <= size);
                            let whole = if exact {
                                let Some(e) = p.expected.pop_front() else {
                                    panic!("port {id}: unexpected frame");
                                };
                                assert_eq!(&buf[..n], &e[..n], "port {id} frame");
                                e.len()
                            } else {
                                // Cut frames cannot tell their length: only whole ones are
                                // checked byte for byte.
                                if n < size { n } else { 0 }
                            };
                            let got = buf[..n].to_vec();
                            st.check_delivered(id, &got, whole);
                        }
                        Err(e) => {
                            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                            if exact {
                                assert!(p.expected.is_empty(), "port {id}: frames missing");
                            }
                            break;
                        }
                    }
                }
            }
            _ => {
                let mut w = lock(&st.wire);
                w.fail_writes = !w.fail_writes;
            }
        }
        st.check_bounds();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(super::net_switch, 0x5e17_c400_0000_0001, 3000, 600);
    }

    /// Found by cargo-fuzz: an oversized frame read from the tap is cut to the buffer (and so
    /// becomes a legal frame); the shadow had it refused.
    #[test]
    fn oversized_uplink_frame_is_cut_not_refused() {
        super::net_switch(&[
            0x5c, 0x7a, 0x0a, 0x00, 0x00, 0x00, 0x0e, 0x01, 0x30, 0x21, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x00, 0x00,
            0x21, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x05, 0x08, 0x00, 0xb0, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0xb6, 0xb6, 0xb6, 0xb6, 0x4a, 0x49, 0x49, 0x49, 0xd9, 0x49, 0x49, 0x51, 0xb6, 0xb6,
            0xb6, 0x02, 0x02, 0x02, 0x02, 0x02, 0xff, 0xff, 0xff, 0xff, 0xb3, 0x7e, 0x0a, 0x1e,
            0x00, 0x01, 0x0e, 0x27, 0x3c, 0x3c, 0x3c, 0x3c, 0x00, 0x4a, 0x00, 0x3c, 0x3c, 0x3c,
            0x3c, 0x3c, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x02, 0x02, 0x28,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x36, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x48, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,
            0x62,
        ]);
    }
}
