//! SR-IOV virtio-net: frames per second VF to VF through the embedded switch against a PF on
//! its tap, in the same run, interleaved round by round (which goes first alternates).
//!
//! Every device is the real model driven in-process by a synthetic driver (split queues of 256
//! in real guest memory, `BATCH` transmit chains per kick, 2 KiB receive buffers with
//! MRG_RXBUF as Linux negotiates it):
//!
//! - **PF -> tap** (baseline): a virtio-net device on a tap (`Net<Tap>`, the path of a plain
//!   `--net`) transmits; the host kernel takes each frame (and drops it: unhandled ethertype).
//! - **VF -> VF**: VF 0 transmits to VF 1's MAC; the switch queues each frame for VF 1's port
//!   and VF 1's device moves it into its receive buffers (`process_backend`, what the VMM calls
//!   when the port's eventfd fires). Timed: both sides, transmit and receive.
//! - **VF -> tap**: VF 0 transmits to an address learned on the uplink, a tap: the switch writes
//!   each frame to the tap.
//!
//! The tap lives in a network namespace of the benchmark's own (`unshare(CLONE_NEWNET)`); that
//! needs root, without which only VF -> VF runs (against nothing). Prints min/median/max kpps
//! of each and the ratio of the medians against PF -> tap; asserts nothing about time.
//!
//! Run with `cargo bench -p bench --bench sriov_net`. Environment: `MANIFOLD_BENCH_ROUNDS`
//! (default 11), `MANIFOLD_BENCH_ONLY` (workloads whose name contains it, e.g. `64 B`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::net::{VIRTIO_NET_F_MRG_RXBUF, frame, own_namespace, tap_up};
use common::{NoInterrupt, queue, spread};
use devices::virtio::net::switch::{Limits, Mac, Switch, SwitchPort, UPLINK, vf_mac};
use devices::virtio::net::{Net, NetBackend, NetConfig, TX_QUEUE, Tap, VNET_HDR_LEN};
use devices::virtio::{DmaSpace, VirtioDevice, features};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

const QSIZE: u16 = 256;
/// Transmit chains made available per kick.
const BATCH: u16 = 64;
/// Frames per round and workload.
const FRAMES: u32 = 16384;
/// Each device's part of guest memory: receive ring, transmit ring, receive buffers, transmit
/// buffers (2 KiB each).
const DEV_SPAN: u64 = 0x40_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const BUF_LEN: u64 = 2048;
const DEVICES: u64 = 3;
const PF_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A host behind the uplink.
const HOST_MAC: Mac = [0x02, 0x00, 0x00, 0xaa, 0xbb, 0xcc];

/// The driver's side of one device's two queues at `base` in guest memory, through one slice
/// (as cheap as a guest's plain stores).
struct Driver<'m> {
    mem: VolatileSlice<'m>,
    base: u64,
    tx_avail: u16,
    tx_used: u16,
    rx_avail: u16,
    rx_used: u16,
}

impl<'m> Driver<'m> {
    fn new(mem: VolatileSlice<'m>, base: u64) -> Self {
        Self {
            mem,
            base,
            tx_avail: 0,
            tx_used: 0,
            rx_avail: 0,
            rx_used: 0,
        }
    }

    fn put<T: vm_memory::ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.mem
            .write_obj(v, (self.base + addr) as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn get<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.mem
            .read_obj((self.base + addr) as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn desc(&self, ring: u64, i: u64, addr: u64, len: u32, flags: u16) -> Result<(), String> {
        let at = ring + 16 * i;
        self.put(at, self.base + addr)?;
        self.put(at + 8, len)?;
        self.put(at + 12, flags)?;
        self.put(at + 14, 0u16)
    }

    /// Activate `dev` on this driver's queues.
    fn activate<B: NetBackend>(
        &self,
        dev: &mut Net<B>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        dev.ack_features(features::VERSION_1 | VIRTIO_NET_F_MRG_RXBUF);
        dev.activate(
            vec![
                queue(self.base + RX_RING, QSIZE, 0)?,
                queue(self.base + TX_RING, QSIZE, 0)?,
            ],
            Arc::new(NoInterrupt),
            DmaSpace::identity(mem.clone()),
        )
        .map_err(|e| format!("activate: {e}"))
    }

    /// Transmit descriptors, one per buffer, each holding a zero header and `frame`.
    fn lay_out_tx(&self, frame: &[u8]) -> Result<(), String> {
        let len = u32::try_from(VNET_HDR_LEN + frame.len()).map_err(|e| e.to_string())?;
        for i in 0..u64::from(QSIZE) {
            let buf = TX_BUFS + i * BUF_LEN;
            self.desc(TX_RING, i, buf, len, 0)?;
            let at = (self.base + buf) as usize;
            self.mem
                .write_slice(&[0u8; VNET_HDR_LEN], at)
                .map_err(|e| e.to_string())?;
            self.mem
                .write_slice(frame, at + VNET_HDR_LEN)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Receive descriptors: one writable 2 KiB buffer per chain, all posted.
    fn lay_out_rx(&mut self) -> Result<(), String> {
        for i in 0..u64::from(QSIZE) {
            self.desc(RX_RING, i, RX_BUFS + i * BUF_LEN, BUF_LEN as u32, 2)?;
        }
        self.post_rx(QSIZE)
    }

    fn post_rx(&mut self, n: u16) -> Result<(), String> {
        for _ in 0..n {
            let slot = u64::from(self.rx_avail % QSIZE);
            self.put(RX_RING + 0x1000 + 4 + 2 * slot, self.rx_avail % QSIZE)?;
            self.rx_avail = self.rx_avail.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put(RX_RING + 0x1000 + 2, self.rx_avail)
    }

    /// Make `k` transmit chains available and kick.
    fn kick_tx<B: NetBackend>(&mut self, dev: &mut Net<B>, k: u16) -> Result<(), String> {
        for _ in 0..k {
            let slot = u64::from(self.tx_avail % QSIZE);
            self.put(TX_RING + 0x1000 + 4 + 2 * slot, self.tx_avail % QSIZE)?;
            self.tx_avail = self.tx_avail.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put(TX_RING + 0x1000 + 2, self.tx_avail)?;
        dev.process_queue(TX_QUEUE);
        let used: u16 = self.get(TX_RING + 0x2000 + 2)?;
        if used != self.tx_used.wrapping_add(k) {
            return Err(format!(
                "TX: {} chains used, {k} expected",
                used.wrapping_sub(self.tx_used)
            ));
        }
        self.tx_used = used;
        Ok(())
    }

    /// Receive chains used since the last call, posted again.
    fn recycle_rx(&mut self) -> Result<u16, String> {
        let used: u16 = self.get(RX_RING + 0x2000 + 2)?;
        let n = used.wrapping_sub(self.rx_used);
        self.rx_used = used;
        self.post_rx(n)?;
        Ok(n)
    }
}

/// A fresh network namespace with two taps in it, up: the PF's, and the switch's uplink.
/// Ok(None): not root.
fn setup() -> Result<Option<(Tap, Tap)>, String> {
    if !own_namespace()? {
        return Ok(None);
    }
    Ok(Some((tap_up("msriov%d")?, tap_up("msriov%d")?)))
}

fn kpps(d: Duration) -> f64 {
    f64::from(FRAMES) / d.as_secs_f64() / 1000.0
}

/// A device transmitting `FRAMES` frames, `BATCH` per kick.
fn transmit<B: NetBackend>(dev: &mut Net<B>, drv: &mut Driver<'_>) -> Result<Duration, String> {
    let start = Instant::now();
    for _ in 0..FRAMES / u32::from(BATCH) {
        drv.kick_tx(dev, BATCH)?;
    }
    Ok(start.elapsed())
}

/// VF 0 transmits `BATCH` frames per kick to VF 1, which receives them after each kick.
fn vf_to_vf(
    a: &mut Net<SwitchPort>,
    da: &mut Driver<'_>,
    b: &mut Net<SwitchPort>,
    db: &mut Driver<'_>,
) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    for _ in 0..FRAMES / u32::from(BATCH) {
        let start = Instant::now();
        da.kick_tx(a, BATCH)?;
        b.process_backend();
        total += start.elapsed();
        let n = db.recycle_rx()?;
        if n != BATCH {
            return Err(format!("VF -> VF: {n} frames received, {BATCH} expected"));
        }
    }
    Ok(total)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Work {
    PfTap,
    VfVf,
    VfTap,
}

fn run() -> Result<(), String> {
    let rounds = common::rounds(11);
    let taps = setup()?;
    let span = (DEV_SPAN * DEVICES) as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), span)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let slice = mem
        .get_slice(GuestAddress(0), span)
        .map_err(|e| format!("guest memory: {e}"))?;
    let (pf_tap, uplink) = match taps {
        Some((pf, up)) => (Some(pf), Some(Box::new(up) as Box<dyn NetBackend>)),
        None => {
            println!("sriov_net: not root: no taps, VF -> VF only (no baseline)");
            (None, None)
        }
    };
    let switch = Switch::new(uplink, Limits::default());
    let macs = [vf_mac(PF_MAC, 0), vf_mac(PF_MAC, 1)];
    let vf = |i: usize| -> Result<Net<SwitchPort>, String> {
        let port = switch
            .add_port(Some(macs[i]))
            .map_err(|e| format!("switch port: {e}"))?;
        Ok(Net::new(
            port,
            NetConfig {
                mac: Some(macs[i]),
                mtu: None,
            },
        ))
    };
    let (mut va, mut vb) = (vf(0)?, vf(1)?);
    let (mut da, mut db) = (Driver::new(slice, 0), Driver::new(slice, DEV_SPAN));
    da.activate(&mut va, &mem)?;
    db.activate(&mut vb, &mem)?;
    da.lay_out_rx()?;
    db.lay_out_rx()?;
    let mut pf = match pf_tap {
        Some(tap) => {
            let mut dev = Net::new(tap, NetConfig::default());
            let drv = Driver::new(slice, 2 * DEV_SPAN);
            drv.activate(&mut dev, &mem)?;
            Some((dev, drv))
        }
        None => None,
    };
    // The host behind the uplink announces itself (to itself: learned on the uplink, then
    // filtered there, so no VF sees it). Repeated before each VF -> tap round so that a long
    // run does not outlast the address's ageing.
    let mut hello = vec![0u8; VNET_HDR_LEN];
    hello.extend_from_slice(&frame(64, HOST_MAC, HOST_MAC));
    let hello = || -> Result<(), String> {
        switch.input(UPLINK, &hello);
        if switch.lookup(HOST_MAC) != Some(UPLINK) {
            return Err("the uplink's host was not learned".into());
        }
        Ok(())
    };

    println!(
        "SR-IOV virtio-net: device models in-process, {rounds} interleaved rounds of {FRAMES} \
         frames, {BATCH} per kick; kpps min/median/max; ratio = median / PF -> tap median, and \
         the median of the per-round ratios\n"
    );
    println!(
        "{:<26} {:>20} {:>7} {:>9}",
        "workload", "kpps", "ratio", "per-round"
    );
    let only = std::env::var("MANIFOLD_BENCH_ONLY").unwrap_or_default();
    for len in [64usize, 1514] {
        let works: &[(Work, &str)] = &[
            (Work::PfTap, "PF -> tap"),
            (Work::VfVf, "VF -> VF"),
            (Work::VfTap, "VF -> switch -> tap"),
        ];
        let mut results: Vec<(Work, String, Vec<f64>)> = Vec::new();
        for &(w, name) in works {
            let label = format!("{name} {len} B");
            if !label.contains(only.as_str()) || (w != Work::VfVf && pf.is_none()) {
                continue;
            }
            results.push((w, label, Vec::new()));
        }
        if results.is_empty() {
            continue;
        }
        if let Some((_, drv)) = &pf {
            drv.lay_out_tx(&frame(len, [0x02, 0, 0, 0, 0, 0x99], PF_MAC))?;
        }
        let mut one = |w: Work| -> Result<Duration, String> {
            match w {
                Work::PfTap => {
                    let (dev, drv) = pf.as_mut().ok_or("no PF")?;
                    transmit(dev, drv)
                }
                Work::VfVf => {
                    da.lay_out_tx(&frame(len, macs[1], macs[0]))?;
                    vf_to_vf(&mut va, &mut da, &mut vb, &mut db)
                }
                Work::VfTap => {
                    hello()?;
                    da.lay_out_tx(&frame(len, HOST_MAC, macs[0]))?;
                    transmit(&mut va, &mut da)
                }
            }
        };
        // One unmeasured round each.
        for (w, ..) in &results {
            one(*w)?;
        }
        for i in 0..rounds {
            // Alternate the order round by round.
            let n = results.len();
            for k in 0..n {
                let j = if i % 2 == 0 { k } else { n - 1 - k };
                let d = one(results[j].0)?;
                results[j].2.push(kpps(d));
            }
        }
        let base = results
            .iter()
            .find(|(w, ..)| *w == Work::PfTap)
            .map(|(.., v)| v.clone());
        for (_, label, v) in &results {
            let (lo, mid, hi) = spread(v);
            let (ratio, per) = match &base {
                Some(b) => {
                    let per: Vec<f64> = v.iter().zip(b).map(|(x, y)| x / y).collect();
                    (
                        format!("{:.2}x", mid / spread(b).1),
                        format!("{:.2}x", spread(&per).1),
                    )
                }
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<26} {:>20} {:>7} {:>9}",
                label,
                format!("{lo:.0}/{mid:.0}/{hi:.0}"),
                ratio,
                per
            );
        }
    }
    let (sa, sb) = (va.stats(), vb.stats());
    if sa.tx_dropped != 0 || sb.rx_dropped != 0 || sb.rx_bad_chains != 0 {
        return Err(format!("VFs dropped frames: {sa:?} {sb:?}"));
    }
    if let Some(p) = switch.port_stats(vb.backend().id()) {
        if p.rx_dropped != 0 {
            return Err(format!("the switch dropped frames for VF 1: {p:?}"));
        }
    }
    println!("\nswitch: {:?}", switch.stats());
    Ok(())
}

fn main() {
    common::main("sriov_net", run);
}
