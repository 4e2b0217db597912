//! The switch on its own (ports driven through [`NetBackend`], a fake uplink), then two
//! virtio-net devices on switch ports driven as a guest would.

use std::sync::Arc;

use super::*;
use crate::fuzzing::net_switch::{FakeUplink, Wire};
use crate::virtio::net::{Net, NetConfig, RX_QUEUE, TX_QUEUE};
use crate::virtio::testutil::{Desc, RecordingInterrupt, TestDriver, XorShift, test_memory};
use crate::virtio::{DmaSpace, VirtioDevice, features};

const BROADCAST: Mac = [0xff; 6];
const PF: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn mac(n: u8) -> Mac {
    [0x02, 0, 0, 0, 0, n]
}

/// Header (with bytes the switch must clear), destination, source, an ethertype, a payload.
fn frame(dst: Mac, src: Mac, payload: u8) -> Vec<u8> {
    let mut f = vec![0x01, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend(std::iter::repeat_n(payload, 46));
    f
}

/// What a device reading `port` gets, all of it.
fn drain(port: &mut SwitchPort) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    loop {
        match port.read_frame(&mut [IoSliceMut::new(&mut buf)]) {
            Ok(n) => out.push(buf[..n].to_vec()),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                return out;
            }
        }
    }
}

fn send(port: &mut SwitchPort, f: &[u8]) {
    assert_eq!(port.write_frame(&[IoSlice::new(f)]).unwrap(), f.len());
}

/// The frame as delivered: header zeroed.
fn delivered(f: &[u8]) -> Vec<u8> {
    let mut d = f.to_vec();
    d[..VNET_HDR_LEN].fill(0);
    d
}

fn switch_with_uplink(limits: Limits) -> (Arc<Switch>, Arc<Mutex<Wire>>) {
    let wire = Arc::new(Mutex::new(Wire::default()));
    let sw = Switch::new(Some(Box::new(FakeUplink(wire.clone()))), limits);
    (sw, wire)
}

#[test]
fn vf_macs_are_distinct_unicast_and_deterministic() {
    let mut seen = std::collections::HashSet::new();
    seen.insert(PF);
    for i in 0..256 {
        let m = vf_mac(PF, i);
        assert_eq!(m, vf_mac(PF, i));
        assert!(!is_group(&m) && m[0] & 0x02 != 0, "{}", MacFmt(m));
        assert!(seen.insert(m), "VF {i} repeats {}", MacFmt(m));
    }
    assert_eq!(vf_mac(PF, 0), [0x52, 0x54, 0x00, 0x12, 0x34, 0x57]);
    // The low 24 bits wrap without touching the prefix.
    assert_eq!(vf_mac([0, 1, 2, 0xff, 0xff, 0xff], 0), [2, 1, 2, 0, 0, 0]);
    assert_eq!(default_pf_mac("tap0"), default_pf_mac("tap0"));
    assert_ne!(default_pf_mac("tap0"), default_pf_mac("tap1"));
    assert!(!is_group(&default_pf_mac("x")));
}

#[test]
fn assigned_macs_are_forwarded_to_their_port_only() {
    let (sw, wire) = switch_with_uplink(Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(Some(mac(2))).unwrap();
    let mut c = sw.add_port(Some(mac(3))).unwrap();
    let f = frame(mac(2), mac(1), 7);
    send(&mut a, &f);
    assert_eq!(drain(&mut b), vec![delivered(&f)]);
    assert!(drain(&mut c).is_empty(), "isolation: c sees nothing");
    assert!(drain(&mut a).is_empty(), "nothing back out of its port");
    assert!(lock(&wire).sent.is_empty(), "VF to VF stays in the VMM");
    let s = sw.stats();
    assert_eq!((s.forwarded, s.flooded), (1, 0));
    assert_eq!(sw.port_stats(a.id()).unwrap().tx_frames, 1);
    assert_eq!(sw.port_stats(b.id()).unwrap().rx_frames, 1);
    assert_eq!(a.mac(), Some(mac(1)));
}

#[test]
fn source_addresses_are_learned_and_moves_followed() {
    let (sw, wire) = switch_with_uplink(Limits::default());
    let mut a = sw.add_port(None).unwrap();
    let mut b = sw.add_port(None).unwrap();
    let mut c = sw.add_port(None).unwrap();
    let host = [0x02, 0xaa, 0, 0, 0, 1];
    // Unknown unicast: flooded to b, c and the uplink.
    let f = frame(host, mac(10), 1);
    send(&mut a, &f);
    assert_eq!(drain(&mut b), vec![delivered(&f)]);
    assert_eq!(drain(&mut c), vec![delivered(&f)]);
    assert_eq!(lock(&wire).sent, vec![delivered(&f)]);
    assert_eq!(sw.lookup(mac(10)), Some(a.id()));
    // The host answers from the uplink: learned there, and the answer goes to a alone.
    lock(&wire).inbound.push_back(frame(mac(10), host, 2));
    assert_eq!(sw.uplink_input(), 1);
    assert_eq!(sw.lookup(host), Some(UPLINK));
    assert_eq!(drain(&mut a).len(), 1);
    assert!(drain(&mut b).is_empty() && drain(&mut c).is_empty());
    // Now a's frames to the host go to the uplink only.
    send(&mut a, &frame(host, mac(10), 3));
    assert_eq!(lock(&wire).sent.len(), 2);
    assert!(drain(&mut b).is_empty() && drain(&mut c).is_empty());
    // mac(10) moves to c: frames for it follow.
    send(&mut c, &frame(host, mac(10), 4));
    assert_eq!(sw.lookup(mac(10)), Some(c.id()));
    send(&mut b, &frame(mac(10), mac(11), 5));
    assert_eq!(drain(&mut c).len(), 1);
    assert!(drain(&mut a).is_empty());
    // A frame for an address on its own port is filtered.
    send(&mut b, &frame(mac(11), mac(12), 6));
    assert_eq!(sw.stats().filtered, 1);
    assert!(drain(&mut a).is_empty() && drain(&mut c).is_empty());
}

#[test]
fn broadcast_and_multicast_flood_every_other_port() {
    let (sw, wire) = switch_with_uplink(Limits::default());
    let mut ports: Vec<SwitchPort> = (1..=4)
        .map(|i| sw.add_port(Some(mac(i))).unwrap())
        .collect();
    for (n, dst) in [
        BROADCAST,
        [0x01, 0x00, 0x5e, 0, 0, 1],
        [0x33, 0x33, 0, 0, 0, 1],
    ]
    .into_iter()
    .enumerate()
    {
        let f = frame(dst, mac(1), n as u8);
        send(&mut ports[0], &f);
        assert!(drain(&mut ports[0]).is_empty());
        for p in &mut ports[1..] {
            assert_eq!(drain(p), vec![delivered(&f)]);
        }
        assert_eq!(lock(&wire).sent.pop(), Some(delivered(&f)));
    }
    // From the uplink: every guest port, not the uplink.
    let f = frame(BROADCAST, [0x02, 9, 9, 9, 9, 9], 9);
    lock(&wire).inbound.push_back(f.clone());
    sw.uplink_input();
    for p in &mut ports {
        assert_eq!(drain(p), vec![delivered(&f)]);
    }
    assert!(lock(&wire).sent.is_empty());
    assert_eq!(sw.stats().flooded, 4);
}

#[test]
fn a_port_cannot_take_another_ports_assigned_address() {
    let (sw, _wire) = switch_with_uplink(Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(Some(mac(2))).unwrap();
    let mut c = sw.add_port(Some(mac(3))).unwrap();
    // c claims to be a: a's traffic still goes to a.
    send(&mut c, &frame(BROADCAST, mac(1), 0));
    drain(&mut a);
    drain(&mut b);
    assert_eq!(sw.lookup(mac(1)), Some(a.id()));
    send(&mut b, &frame(mac(1), mac(2), 1));
    assert_eq!(drain(&mut a).len(), 1);
    assert!(drain(&mut c).is_empty());
    assert!(matches!(
        sw.add_port(Some(mac(1))),
        Err(SwitchError::MacTaken { .. })
    ));
    assert!(matches!(
        sw.add_port(Some(BROADCAST)),
        Err(SwitchError::BadMac(_))
    ));
    assert!(matches!(
        sw.add_port(Some([0; 6])),
        Err(SwitchError::BadMac(_))
    ));
}

#[test]
fn learned_addresses_age_and_assigned_ones_do_not() {
    let limits = Limits::default();
    let (sw, wire) = switch_with_uplink(limits);
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(None).unwrap();
    let t0 = Instant::now();
    sw.input_at(b.id(), &frame(BROADCAST, mac(20), 0), t0);
    drain(&mut a);
    lock(&wire).sent.clear();
    // Fresh at exactly the age: forwarded to b only.
    sw.input_at(a.id(), &frame(mac(20), mac(1), 1), t0 + limits.age);
    assert_eq!(drain(&mut b).len(), 1);
    assert!(lock(&wire).sent.is_empty());
    // Past it: forgotten, so flooded (uplink too), and counted.
    sw.input_at(
        a.id(),
        &frame(mac(20), mac(1), 2),
        t0 + limits.age * 2 + Duration::from_secs(1),
    );
    assert_eq!(drain(&mut b).len(), 1);
    assert_eq!(lock(&wire).sent.len(), 1);
    assert_eq!(sw.stats().aged, 1);
    // a's assigned address is never forgotten.
    sw.input_at(b.id(), &frame(mac(1), mac(21), 3), t0 + limits.age * 100);
    assert_eq!(drain(&mut a).len(), 1);
    assert_eq!(lock(&wire).sent.len(), 1);
}

#[test]
fn a_port_spraying_source_addresses_is_bounded_to_its_own_share() {
    let limits = Limits {
        macs_per_port: 16,
        uplink_macs: 32,
        ..Limits::default()
    };
    let (sw, wire) = switch_with_uplink(limits);
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(None).unwrap();
    // b learns one address of its own first.
    send(&mut b, &frame(mac(1), mac(50), 0));
    let mut rng = XorShift(7);
    for i in 0..20_000u32 {
        let r = rng.next().to_le_bytes();
        let src = [r[0] & !1, r[1], r[2], r[3], r[4], r[5]];
        if src == [0; 6] || src == mac(1) || src == mac(50) {
            continue;
        }
        let from = if i % 2 == 0 { &mut a } else { &mut b };
        send(from, &frame(mac(1), src, 0));
        // From the uplink as well.
        lock(&wire).inbound.push_back(frame(
            mac(1),
            [src[0], 0xee, src[2], src[3], src[4], src[5]],
            0,
        ));
        sw.uplink_input();
        drain(&mut a);
    }
    // Fixed (1) + each port's share: the table never grew past it.
    assert!(sw.fdb_len() <= 1 + 16 + 16 + 32, "{}", sw.fdb_len());
    assert!(sw.stats().evicted > 0);
    // Every eviction queue is bounded too.
    let inner = lock(&sw.inner);
    assert!(inner.fdb.order.iter().all(|o| o.len() <= 32));
    drop(inner);
    // Traffic still flows: a's assigned address still reaches a.
    send(&mut b, &frame(mac(1), mac(60), 1));
    assert_eq!(drain(&mut a).len(), 1);
}

#[test]
fn full_queues_drop_and_count() {
    let limits = Limits {
        queue_frames: 8,
        queue_bytes: 8 * 80,
        ..Limits::default()
    };
    let sw = Switch::new(None, limits);
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(Some(mac(2))).unwrap();
    for i in 0..20 {
        send(&mut a, &frame(mac(2), mac(1), i));
    }
    assert_eq!(sw.queued(b.id()), 8);
    let st = sw.port_stats(b.id()).unwrap();
    assert_eq!((st.rx_frames, st.rx_dropped), (8, 12));
    let got = drain(&mut b);
    assert_eq!(got.len(), 8);
    // The first eight, in order.
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &delivered(&frame(mac(2), mac(1), i as u8)));
    }
    // The byte bound: big frames hit it before the frame bound.
    let mut big = frame(mac(2), mac(1), 0);
    big.resize(300, 0);
    for _ in 0..4 {
        send(&mut a, &big);
    }
    assert_eq!(sw.queued(b.id()), 2, "640 bytes hold two 300-byte frames");
}

#[test]
fn malformed_frames_are_refused() {
    let (sw, wire) = switch_with_uplink(Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(Some(mac(2))).unwrap();
    let good = frame(BROADCAST, mac(1), 0);
    for bad in [
        Vec::new(),
        vec![0; 5],
        good[..VNET_HDR_LEN + ETH_HLEN - 1].to_vec(),
        frame(mac(2), BROADCAST, 0),
        frame(mac(2), [0x03, 0, 0, 0, 0, 1], 0),
        frame(mac(2), [0; 6], 0),
        vec![0x02; MAX_FRAME_LEN + 1],
    ] {
        send(&mut a, &bad);
        if bad.len() <= MAX_FRAME_LEN {
            // A tap cannot hand over more than the buffer.
            lock(&wire).inbound.push_back(bad);
            sw.uplink_input();
        }
    }
    // Seven from the port, six from the uplink (an empty read there is no frame at all).
    assert_eq!(sw.stats().invalid, 13 - 1);
    assert!(drain(&mut b).is_empty() && drain(&mut a).is_empty());
    assert!(lock(&wire).sent.is_empty());
    // Gathered from several slices, and the shortest legal frame.
    let f = &good[..VNET_HDR_LEN + ETH_HLEN];
    let (x, y) = f.split_at(5);
    assert_eq!(
        a.write_frame(&[IoSlice::new(x), IoSlice::new(y)]).unwrap(),
        f.len()
    );
    assert_eq!(drain(&mut b), vec![delivered(f)]);
}

#[test]
fn uplink_errors_are_counted_and_reads_are_budgeted() {
    let (sw, wire) = switch_with_uplink(Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    lock(&wire).fail_writes = true;
    send(&mut a, &frame(BROADCAST, mac(1), 0));
    assert_eq!(sw.stats().uplink_errors, 1);
    assert_eq!(sw.port_stats(UPLINK).unwrap().rx_dropped, 1);
    for i in 0..UPLINK_BUDGET + 5 {
        lock(&wire)
            .inbound
            .push_back(frame(mac(1), [2, 0, 0, 0, 1, i as u8], 0));
    }
    assert_eq!(sw.uplink_input(), UPLINK_BUDGET);
    assert_eq!(sw.uplink_input(), 5);
    assert_eq!(sw.uplink_input(), 0);
    assert_eq!(drain(&mut a).len(), UPLINK_BUDGET + 5);
    assert_eq!(sw.uplink_fd(), Some(-1));
    assert_eq!(Switch::new(None, Limits::default()).uplink_fd(), None);
}

#[test]
fn the_eventfd_fires_when_an_empty_queue_fills() {
    let sw = Switch::new(None, Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let mut b = sw.add_port(Some(mac(2))).unwrap();
    let readable = |p: &SwitchPort| {
        let mut pfd = libc::pollfd {
            fd: p.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call; zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    };
    assert!(!readable(&b));
    send(&mut a, &frame(mac(2), mac(1), 0));
    assert!(readable(&b));
    send(&mut a, &frame(mac(2), mac(1), 1));
    // Reading every frame resets it.
    assert_eq!(drain(&mut b).len(), 2);
    assert!(!readable(&b));
    send(&mut a, &frame(mac(2), mac(1), 2));
    assert!(readable(&b));
    // For a level-triggered watch: cleared by hand, the frame still queued.
    b.clear_wake();
    assert!(!readable(&b));
    assert_eq!(sw.queued(b.id()), 1);
}

#[test]
fn dropping_a_port_forgets_it_and_frees_its_number() {
    let sw = Switch::new(None, Limits::default());
    let mut a = sw.add_port(Some(mac(1))).unwrap();
    let b = sw.add_port(Some(mac(2))).unwrap();
    let mut c = sw.add_port(None).unwrap();
    let b_id = b.id();
    send(&mut c, &frame(mac(2), mac(30), 0));
    drop(b);
    assert_eq!(sw.lookup(mac(2)), None);
    assert_eq!(sw.port_stats(b_id), None);
    assert_eq!(sw.fdb_len(), 2, "a's assigned address and c's learned one");
    // Frames for the gone port's address are now unknown unicast.
    send(&mut c, &frame(mac(2), mac(30), 1));
    assert_eq!(drain(&mut a).len(), 1);
    drop(c);
    assert_eq!(sw.fdb_len(), 1);
    let again = sw.add_port(Some(mac(2))).unwrap();
    assert_eq!(again.id(), b_id);
    let many: Vec<_> = (0..MAX_PORTS - 3)
        .map(|_| sw.add_port(None).unwrap())
        .collect();
    assert!(matches!(sw.add_port(None), Err(SwitchError::Full)));
    drop(many);
    assert!(sw.add_port(None).is_ok());
}

#[test]
fn ports_offer_no_offloads() {
    let sw = Switch::new(None, Limits::default());
    let net = Net::new(sw.add_port(Some(mac(1))).unwrap(), NetConfig::default());
    let offered = net.offered_features();
    assert_eq!(offered & bit(VIRTIO_NET_F_CSUM), 0);
    assert_eq!(offered & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_ne!(offered & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
}

use super::super::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF, bit};

/// Two virtio-net devices on ports of one switch, each with its queues in its own part of one
/// guest memory: a frame one transmits lands in the other's receive buffer.
#[test]
fn frames_cross_between_two_devices() {
    let mem = test_memory();
    let sw = Switch::new(None, Limits::default());
    let macs = [vf_mac(PF, 0), vf_mac(PF, 1)];
    let mut devs: Vec<Net<SwitchPort>> = macs
        .iter()
        .map(|&m| {
            Net::new(
                sw.add_port(Some(m)).unwrap(),
                NetConfig {
                    mac: Some(m),
                    mtu: None,
                },
            )
        })
        .collect();
    // Rings 4 KiB apart (descriptor tables must be 16-byte aligned).
    let ring_len = TestDriver::rings_len(16).next_multiple_of(0x1000);
    let mut drivers = Vec::new();
    let mut irqs = Vec::new();
    for (i, dev) in devs.iter_mut().enumerate() {
        let base = i as u64 * 2 * ring_len;
        let rx = TestDriver::at(&mem, base, 16);
        let tx = TestDriver::at(&mem, base + ring_len, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        dev.ack_features(dev.offered_features() | features::VERSION_1);
        dev.activate(
            vec![rx.queue(), tx.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .unwrap();
        drivers.push((rx, tx));
        irqs.push(irq);
    }
    // Config space reports each device's MAC.
    let mut m = [0u8; 6];
    devs[1].read_config(0, &mut m);
    assert_eq!(m, macs[1]);
    // Device 1 posts a receive buffer; device 0 transmits a frame to it.
    let rx_buf = 0x2_0000;
    drivers[1].0.add(&[Desc::w(rx_buf, 2048)]);
    devs[1].process_queue(RX_QUEUE);
    let mut f = frame(macs[1], macs[0], 0x5a);
    f[..VNET_HDR_LEN].fill(0);
    let tx_buf = 0x3_0000;
    drivers[0].1.write(tx_buf, &f);
    drivers[0].1.add(&[Desc::r(tx_buf, f.len() as u32)]);
    devs[0].process_queue(TX_QUEUE);
    assert_eq!(drivers[0].1.used_idx(), 1);
    assert_eq!(
        devs[0].stats().tx_frames,
        1,
        "{:?} {:?}",
        devs[0].stats(),
        sw.stats()
    );
    assert_eq!(sw.queued(2), 1, "{:?}", sw.stats());
    // The VMM sees device 1's eventfd fire and calls process_backend.
    devs[1].process_backend();
    assert_eq!(drivers[1].0.used_idx(), 1);
    let (_, len) = drivers[1].0.used(0);
    assert_eq!(len as usize, f.len());
    let got = drivers[1].0.read(rx_buf, f.len());
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    // num_buffers = 1 with MRG_RXBUF, the rest of the header zero.
    assert_eq!(&got[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert!(irqs[1].take_queues().contains(&RX_QUEUE));
    assert_eq!(devs[1].stats().rx_frames, 1);
    assert_eq!(devs[0].stats().tx_frames, 1);
    // Without a receive buffer the frame waits in the port's queue, not lost.
    drivers[0].1.add(&[Desc::r(tx_buf, f.len() as u32)]);
    devs[0].process_queue(TX_QUEUE);
    devs[1].process_backend();
    assert_eq!(drivers[1].0.used_idx(), 1);
    assert_eq!(sw.queued(1 + 1), 1);
    drivers[1].0.add(&[Desc::w(rx_buf, 2048)]);
    devs[1].process_queue(RX_QUEUE);
    assert_eq!(drivers[1].0.used_idx(), 2);
    assert_eq!(sw.queued(2), 0);
}
