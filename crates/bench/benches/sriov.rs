//! SR-IOV VF lifecycle costs, measured in one run on a real KVM VM (no vCPU runs: the config
//! writes a guest's vCPU would make are made here, through the same ECAM front door and PCI
//! root, so the VM's GSI routing, irqfds and ioeventfds are KVM's own):
//!
//! 1. **Enable**: from the write that sets VF Enable (with VF MSE) in a virtio-blk PF's SR-IOV
//!    capability until every VF is usable: its config space answers at its routing id and its
//!    BAR 0 answers at aperture + i x 32 KiB (the virtio common configuration's `num_queues`
//!    reads 1). The VMM does all of it inside that write, so "usable" is checked after it
//!    returns. For 1, 8 and 64 VFs; the growth is reported as ratios against 1 VF (and per
//!    VF). Disable (VF Enable cleared: everything released) is timed the same way.
//! 2. **Memory per VF**: VMM heap held per live VF (a counting allocator: bytes in use with 64
//!    VFs enabled minus with none, / 64). A VF's queues live in guest memory, not here, so this
//!    is all "beyond its queues' memory"; plus the kernel objects per VF (fds: eventfds for
//!    queue kicks and MSI-X vectors).
//! 3. **virtio-net VF memory**: the heap of what `NetVfs` makes per VF (its `Net` and switch
//!    port), 64 against none; the transport is the one measured in 2.
//!
//! Run with `cargo bench -p bench --bench sriov` (needs /dev/kvm). `MANIFOLD_BENCH_ROUNDS`
//! (default 11). Prints min/median/max and ratios; asserts nothing about time, and fails only
//! when a VF is not usable after the write.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{Counting, IN_USE};
use devices::bus::Bus;
use devices::pci::{Bdf, PciEcam, PciRoot};
use devices::virtio::block::{BlockBackend, BlockOptions};
use devices::virtio::net::switch::{Limits, Switch};
use vmm::interrupts::GsiRouting;
use vmm::sriov::{VfFactory, VfParts};
use vmm::sriov_net::NetVfs;
use vmm::virtio_pci::{BarAllocator, VirtioPci};

/// Heap bytes in use, for memory per VF.
#[global_allocator]
static ALLOC: Counting = Counting;

const ECAM: u64 = 0xe000_0000;
const TOTAL_VFS: u16 = 64;
/// The SR-IOV capability's place in the PF (after PCIe's ARI at 0x100): found, not assumed.
const EXT_SRIOV: u16 = 0x0010;
const VF_BAR_SIZE: u64 = 0x8000;

struct Rig {
    mmio: Arc<Bus>,
    pf: Bdf,
    cap: u16,
    aperture: u64,
    // Keep the VM and the root alive for the run.
    _vm: vmm::vm::Vm,
    _root: Arc<Mutex<PciRoot>>,
    _image: std::path::PathBuf,
}

impl Rig {
    fn new() -> Self {
        let vm = vmm::vm::Vm::new(64 << 20).expect("KVM VM");
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let mut root = PciRoot::new(&mmio, &pio);
        root.set_ioevent_registry(Arc::new(vmm::ioevents::KvmIoEvents::new(vm.shared_fd())));
        let root = Arc::new(Mutex::new(root));
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            ECAM,
            0x1000_0000,
        )
        .expect("ECAM");
        let routing = GsiRouting::new(vm.shared_fd());
        let mut bars = BarAllocator::new(64 << 20);
        let image =
            std::env::temp_dir().join(format!("manifold-bench-sriov-{}", std::process::id()));
        std::fs::write(&image, vec![0u8; 64 << 20]).expect("image");
        let backend = BlockBackend::open(&image, &BlockOptions::default()).expect("open image");
        let mem = vm.memory().clone();
        let mut virtio = VirtioPci {
            root: &root,
            routing: &routing,
            mem: &mem,
            bars: &mut bars,
            iommu: None,
            sriov: Default::default(),
        };
        // The queue notifier of the PF is not needed: nothing kicks its queues here.
        let _ = virtio.add_block_pf(backend, TOTAL_VFS, false).expect("PF");
        let pf = Bdf::new(1, 0, 0);
        let mut this = Self {
            mmio,
            pf,
            cap: 0,
            aperture: 0,
            _vm: vm,
            _root: root,
            _image: image,
        };
        this.cap = this.find_ext(EXT_SRIOV);
        assert_ne!(this.cap, 0, "the PF has an SR-IOV capability");
        // Where the builder put the aperture (as firmware would).
        this.aperture = u64::from(this.read32(pf, this.cap + 0x24) & !0xf)
            | (u64::from(this.read32(pf, this.cap + 0x28)) << 32);
        // ARI forwarding on the port, so that VFs past function 7 are reachable.
        let port = Bdf::new(0, 1, 0);
        this.write16(port, 0x40 + 0x28, 1 << 5);
        this
    }

    fn addr(bdf: Bdf, reg: u16) -> u64 {
        ECAM + (u64::from(bdf.raw()) << 12) + u64::from(reg)
    }

    fn read32(&self, bdf: Bdf, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(Self::addr(bdf, reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn write16(&self, bdf: Bdf, reg: u16, v: u16) {
        self.mmio.write(Self::addr(bdf, reg), &v.to_le_bytes());
    }

    fn find_ext(&self, id: u16) -> u16 {
        let mut at = 0x100u16;
        for _ in 0..64 {
            let h = self.read32(self.pf, at);
            if h & 0xffff == u32::from(id) {
                return at;
            }
            at = (h >> 20) as u16;
            if at < 0x100 {
                return 0;
            }
        }
        0
    }

    /// Every one of `n` VFs answers in config space and in its BAR.
    fn all_usable(&self, n: u16) -> bool {
        (0..n).all(|i| {
            let vf = Bdf::from_raw(self.pf.raw() + 1 + i);
            let class = self.read32(vf, 0x08) >> 8;
            // virtio common config: num_queues (16 bits at 0x12) of VF i's BAR 0.
            let mut q = [0u8; 2];
            self.mmio
                .read(self.aperture + u64::from(i) * VF_BAR_SIZE + 0x12, &mut q);
            class == 0x01_8000 && u16::from_le_bytes(q) == 1
        })
    }

    fn none_left(&self, n: u16) -> bool {
        (0..n).all(|i| self.read32(Bdf::from_raw(self.pf.raw() + 1 + i), 0) == u32::MAX)
    }

    /// (enable, disable) times for `n` VFs.
    fn cycle(&self, n: u16) -> (Duration, Duration) {
        self.write16(self.pf, self.cap + 0x10, n);
        let t = Instant::now();
        self.write16(self.pf, self.cap + 0x08, 0x9);
        assert!(self.all_usable(n), "{n} VFs usable after VF Enable");
        let enable = t.elapsed();
        let t = Instant::now();
        self.write16(self.pf, self.cap + 0x08, 0x0);
        assert!(self.none_left(n), "{n} VFs gone after VF Enable cleared");
        (enable, t.elapsed())
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn stats(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// `a - b` with its sign.
fn delta(a: usize, b: usize) -> String {
    if a >= b {
        format!("+{}", a - b)
    } else {
        format!("-{}", b - a)
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("MANIFOLD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11)
        .max(1);
    let rig = Rig::new();
    // Warm up once (allocator arenas, KVM routing table growth).
    let _ = rig.cycle(TOTAL_VFS);

    let counts = [1u16, 8, 64];
    let mut enable: Vec<Vec<Duration>> = vec![Vec::new(); counts.len()];
    let mut disable: Vec<Vec<Duration>> = vec![Vec::new(); counts.len()];
    for round in 0..rounds {
        // Rotate the order so that no count always runs first.
        for k in 0..counts.len() {
            let j = (k + round) % counts.len();
            let (e, d) = rig.cycle(counts[j]);
            enable[j].push(e);
            disable[j].push(d);
        }
    }
    println!("SR-IOV VF lifecycle, {rounds} rounds (min / median / max, microseconds)");
    println!("| VFs | enable -> all usable | per VF | ratio vs 1 VF | disable | per VF |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let base = stats(&mut enable[0].clone()).1;
    for (j, &n) in counts.iter().enumerate() {
        let (emin, emed, emax) = stats(&mut enable[j]);
        let (dmin, dmed, dmax) = stats(&mut disable[j]);
        println!(
            "| {n} | {:.0} / {:.0} / {:.0} | {:.1} | {:.2}x | {:.0} / {:.0} / {:.0} | {:.1} |",
            us(emin),
            us(emed),
            us(emax),
            us(emed) / f64::from(n),
            emed.as_secs_f64() / base.as_secs_f64(),
            us(dmin),
            us(dmed),
            us(dmax),
            us(dmed) / f64::from(n),
        );
    }

    // Memory: heap and fds with 64 VFs live against none.
    let (heap0, fds0) = (IN_USE.load(Ordering::Relaxed), open_fds());
    rig.write16(rig.pf, rig.cap + 0x10, TOTAL_VFS);
    rig.write16(rig.pf, rig.cap + 0x08, 0x9);
    assert!(rig.all_usable(TOTAL_VFS));
    let (heap1, fds1) = (IN_USE.load(Ordering::Relaxed), open_fds());
    rig.write16(rig.pf, rig.cap + 0x08, 0x0);
    let (heap2, fds2) = (IN_USE.load(Ordering::Relaxed), open_fds());
    let per_vf = heap1.saturating_sub(heap0) as f64 / f64::from(TOTAL_VFS);
    println!(
        "memory per VF (VMM heap, {TOTAL_VFS} VFs): {:.1} KiB (goal <= 64 KiB: {}); fds per VF: {:.1}; after disable: heap {} bytes, fds {}",
        per_vf / 1024.0,
        if per_vf <= 64.0 * 1024.0 {
            "met"
        } else {
            "not met"
        },
        (fds1 - fds0) as f64 / f64::from(TOTAL_VFS),
        delta(heap2, heap0),
        delta(fds2, fds0),
    );
    let _ = std::fs::remove_file(&rig._image);
    net_vf_memory();
}

/// A virtio-net VF's own heap: what [`NetVfs`] makes per VF (its `Net` and its switch port),
/// 64 of them against none. The PCI transport around it is the same as a virtio-blk VF's
/// (measured above, with the blk device); a net PF needs a tap, hence this part on its own,
/// on a switch without an uplink.
fn net_vf_memory() {
    let mut factory = NetVfs {
        switch: Switch::new(None, Limits::default()),
        pf_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
    };
    let heap0 = IN_USE.load(Ordering::Relaxed);
    let vfs: Vec<VfParts> = (0..TOTAL_VFS)
        .map(|i| factory.make(i, TOTAL_VFS).expect("net VF"))
        .collect();
    let heap1 = IN_USE.load(Ordering::Relaxed);
    drop(vfs);
    let per_vf = heap1.saturating_sub(heap0) as f64 / f64::from(TOTAL_VFS);
    println!(
        "virtio-net VF device and switch port (VMM heap, {TOTAL_VFS} VFs, transport excluded): {:.1} KiB per VF",
        per_vf / 1024.0
    );
}
