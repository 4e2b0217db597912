//! The virtio-iommu guests on KVM with the real `manifold` binary: devices behind `--iommu` in
//! bypass, and a guest driver that translates and isolates through it. Needs /dev/kvm.

mod common;

use common::{TempFile, assert_printed, guest_path as path, run};

/// `--iommu` with both disks behind it: a guest without an IOMMU driver still reaches them (the
/// virtio-iommu's `bypass` bit is set at reset, so unattached endpoints are identity-mapped),
/// the IOMMU takes a PCI function of its own and each disk is registered as an endpoint.
#[test]
fn virtio_blk_behind_the_iommu_in_bypass() {
    const SECTOR: u64 = 5;
    let rw = TempFile::new("iommu-rw.img", &vec![0u8; 1 << 20]);
    let ro = TempFile::new("iommu-ro.img", &vec![0xa5u8; 1 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("blk-pvh.elf"),
        "--cmdline",
        "blk-serial-0",
        "--memory",
        "size=64M",
        "--iommu",
        "--disk",
        &format!("path={},serial=blk-serial-0,iommu=on", rw.path()),
        "--disk",
        &format!("path={},readonly=on,iommu=on", ro.path()),
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &["virtio-blk functions: 2", "compare: ok", "blk passed"],
    );
    assert!(out.stderr.contains("virtio-iommu"), "{out:?}");
    assert_eq!(
        out.stderr.matches("behind the virtio-iommu").count(),
        2,
        "{out:?}"
    );
    let image = std::fs::read(rw.path()).expect("read image");
    let at = (SECTOR * 512) as usize;
    let expect: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(&image[at..at + 512], &expect[..]);
    let untouched = std::fs::read(ro.path()).expect("read image");
    assert!(untouched.iter().all(|&b| b == 0xa5));
}

/// The iommu guest programs the virtio-iommu as Linux does (VIOT, config, PROBE, ATTACH, MAP)
/// and drives two disks with rings and buffers at IOVAs of their own domains: the pattern
/// written through IOVAs is in image A; an unmapped buffer, a read-only mapping and disk B
/// pointed at disk A's buffer IOVA are refused with IOERR and a fault event each, and nothing
/// reaches image B.
#[test]
fn virtio_iommu_translates_and_isolates() {
    let a = TempFile::new("iommu-a.img", &vec![0u8; 1 << 20]);
    let b = TempFile::new("iommu-b.img", &vec![0u8; 1 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("iommu-pvh.elf"),
        "--memory",
        "size=64M",
        "--iommu",
        "--disk",
        &format!("path={},iommu=on", a.path()),
        "--disk",
        &format!("path={},iommu=on", b.path()),
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &[
            "iommu: page_size_mask fffffffffffff000 input 0-ffffffffffff domains 0-4294967295 \
         probe_size 512",
            "iommu at 8, disks at 10 and 18",
            "viot: virtio-pci iommu at 8 (found)",
            "viot: endpoints 10-18 id 10 -> node 48",
            "probe: reserved subtype 1 fee00000-feefffff",
            "attach: ok",
            "map: ok",
            "write through iova: ok",
            "read through iova: ok",
            "unmap: ok",
            "read into unmapped refused: ok",
            "fault: reason 2 flags 102 endpoint 10 address 40801000",
            "read into read-only refused: ok",
            "fault: reason 2 flags 102 endpoint 10 address 40802000",
            "cross-domain write refused: ok",
            "fault: reason 2 flags 101 endpoint 18 address 40800000",
            "iommu passed",
        ],
    );
    assert!(!out.stdout.contains("FAILED"), "{out:?}");
    let image = std::fs::read(a.path()).expect("read image A");
    let at = 5 * 512;
    let expect: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
    assert_eq!(&image[at..at + 512], &expect[..]);
    assert!(image[..at].iter().all(|&b| b == 0));
    assert!(image[at + 512..].iter().all(|&b| b == 0));
    let untouched = std::fs::read(b.path()).expect("read image B");
    assert!(untouched.iter().all(|&b| b == 0), "disk B was written");
}

/// Every kind of device with `iommu=on` (blk, rng, console, vsock) behind one `--iommu`: a guest
/// without an IOMMU driver reaches them all through the bypass, and each is an endpoint.
#[test]
fn virtio_devices_side_by_side_behind_the_iommu() {
    let (out, written) = common::multi::run_multi("multi-iommu", true);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &[
            "blk sector 0 read: ok",
            "rng 16 bytes: ok",
            "console line sent: ok",
            "vsock cid 7",
            "multi ok",
        ],
    );
    assert_eq!(
        out.stderr.matches("behind the virtio-iommu").count(),
        4,
        "{out:?}"
    );
    assert_eq!(written, "multi hvc0\n");
}

/// virtio-net behind the virtio-iommu, with a tap in a network namespace of the test's: the net
/// guest attaches the NIC to a domain and maps its memory at IOVA = GPA + 0x4000_0000, beyond
/// guest RAM, before bring-up (as Linux's driver does), so every ring and buffer access is
/// translated; frames go both ways as in the plain net test (broadcasts out, 32 replies in, in
/// order). Needs root and /dev/net/tun.
#[test]
fn virtio_net_behind_the_iommu_exchanges_frames_with_a_tap() {
    common::net::net_round_trip(true, true);
}
