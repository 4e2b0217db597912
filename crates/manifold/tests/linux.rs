//! The slow tier: the Debian 13 cloud kernel (6.12) boots under the real `manifold` binary with
//! every device, and its `/init` (tests/linux/init.c) proves them from inside Linux with the stock
//! drivers; the host checks the other end of each. Two boots (every device; a virtio-net SR-IOV
//! PF), each minutes long on hosts whose KVM hands instructions back; nextest runs them side by
//! side. Needs /dev/kvm, root and /dev/net/tun (tap in a network namespace).

mod common;

use common::{NetNs, Running, TempDir, can_make_taps, repo_root};
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

/// A guard against a hung boot, far above the ~15 minutes it takes on the nested hosts.
const LINUX_LIMIT: Duration = Duration::from_secs(60 * 60);

/// Where /init writes its pattern and how long it is (init.c's BLK_LEN), and the region the host
/// fills for the guest to read (BLK_HOST_AT).
const BLK_LEN: usize = 65536;
const BLK_HOST_AT: usize = 1 << 20;

/// The pattern init.c writes to the start of /dev/vda.
fn blk_pattern() -> Vec<u8> {
    let mut p: Vec<u8> = (0..BLK_LEN as u32)
        .map(|i| (i.wrapping_mul(31) + i / 512 + 0x5a) as u8)
        .collect();
    p[..20].copy_from_slice(b"manifold-blk-pattern");
    p
}

/// FNV-1a, 32 bits, as init.c computes it.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// The guest kernel and initramfs, built by scripts/guest-assets (idempotent, ~0.1 s when
/// nothing changed; it rebuilds the initramfs when init.c did).
fn guest_assets() -> (String, String) {
    let root = repo_root();
    let status = Command::new(root.join("scripts/guest-assets"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run scripts/guest-assets");
    assert!(status.success(), "scripts/guest-assets failed");
    let dir = root.join(".cache/guest");
    let s = |p: &str| dir.join(p).to_str().expect("utf-8 path").to_owned();
    (s("vmlinuz"), s("initramfs.cpio"))
}

/// `manifold run` of the Debian kernel and initramfs with 256 MiB and `cmdline`, inside the
/// network namespace `ns` (where the test's tap is); the caller adds the devices.
fn linux_in(ns: &NetNs, cmdline: &str) -> Command {
    let (kernel, initramfs) = guest_assets();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_manifold"))
        .args(["run", "--kernel", &kernel, "--initramfs", &initramfs])
        .args(["--cmdline", cmdline, "--memory", "size=256M"]);
    cmd
}

/// The boot options every Linux run here uses (tests/linux/cmdline, shared with scripts/demo).
fn base_cmdline() -> String {
    std::fs::read_to_string(repo_root().join("tests/linux/cmdline"))
        .expect("tests/linux/cmdline")
        .trim()
        .to_owned()
}

/// One boot of stock Linux with two vCPUs, the virtio-iommu, a disk and a NIC behind it, rng,
/// console and vsock beside it. Inside: both vCPUs online, the virtio functions on PCI, modules
/// loaded, the disk and NIC in IOMMU groups (and nothing else), a pattern written to /dev/vda
/// with direct I/O and read back, a host-written region read, eth0 reaching a UDP responder on
/// the tap's side, /dev/hwrng, a line on hvc0, vsock both ways; then power-off, status 0. The
/// host checks the image, the datagram, the console file and the vsock data.
#[test]
fn linux_proves_the_devices_from_inside() {
    if !can_make_taps() {
        return;
    }
    let dir = TempDir::new("linux");

    // The disk: zeros where the guest writes, a pattern of the host's where it reads.
    let mut image = vec![0u8; 4 << 20];
    for (i, b) in image[BLK_HOST_AT..BLK_HOST_AT + BLK_LEN]
        .iter_mut()
        .enumerate()
    {
        *b = (i * 13 + 1) as u8;
    }
    let host_fnv = fnv1a(&image[BLK_HOST_AT..BLK_HOST_AT + BLK_LEN]);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, &image).expect("write the disk image");
    let hvc = dir.join("hvc0.txt");

    // The NIC's tap, with the host's address, and a UDP responder on it.
    const TAP: &str = "ltap0";
    let ns = NetNs::new("linux");
    assert!(ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]));
    assert!(ns.ip(&["addr", "add", "10.0.2.2/24", "dev", TAP]));
    assert!(ns.ip(&["link", "set", TAP, "up"]));
    let udp = ns.run(|| UdpSocket::bind("10.0.2.2:5555").expect("bind UDP 10.0.2.2:5555"));
    let (datagrams, got_datagram) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(b"manifold-net pong", from);
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if datagrams.send((text, from)).is_err() {
                break;
            }
        }
    });

    // vsock: the guest connects to host port 5000 (PATH_5000), says hello and gets an answer.
    let socket = dir.join("vsock.sock");
    let listener = UnixListener::bind(format!("{socket}_5000")).expect("listen on PATH_5000");
    let (hellos, got_hello) = channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut line = String::new();
        let _ = BufReader::new(&stream).read_line(&mut line);
        let _ = (&stream).write_all(b"hello linux\n");
        let _ = hellos.send(line);
    });

    let cmdline = format!(
        "{} manifold_cpus=2 manifold_pci=1057,1042,1041,1044,1043,1053 \
         manifold_iommu=1042,1041 manifold_blk=1 manifold_net=10.0.2.15,10.0.2.2 manifold_rng=1 \
         manifold_hvc=1 manifold_vsock=5000,1234",
        base_cmdline()
    );
    let mut cmd = linux_in(&ns, &cmdline);
    cmd.args([
        "--cpus",
        "boot=2",
        "--iommu",
        "--disk",
        &format!("path={disk},iommu=on"),
        "--net",
        &format!("tap={TAP},mac=52:54:00:12:34:56,iommu=on"),
        "--rng",
        "--console",
        &format!("file={hvc}"),
        "--vsock",
        &format!("cid=3,socket={socket}"),
        "--log-level",
        "debug",
    ]);
    let started = Instant::now();
    let mut vm = Running::start(&mut cmd).with_limit(LINUX_LIMIT);
    vm.wait_for("Run /init as init process");
    let to_init = started.elapsed();

    // vsock the other way: the host connects to the guest's listener.
    vm.wait_for("manifold-init: vsock listening on 1234");
    let stream = UnixStream::connect(&socket).expect("connect to the vsock socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("read timeout");
    let mut reader = BufReader::new(&stream);
    (&stream)
        .write_all(b"CONNECT 1234\n")
        .expect("write CONNECT");
    let mut ok = String::new();
    reader.read_line(&mut ok).expect("read OK");
    assert!(ok.starts_with("OK "), "not an OK line: {ok:?}");
    (&stream)
        .write_all(b"ping from host\n")
        .expect("write to the guest");
    let mut echo = String::new();
    reader.read_line(&mut echo).expect("read the echo");
    assert_eq!(echo, "echo: ping from host\n");

    let out = vm.finish();
    let total = started.elapsed();
    eprintln!(
        "linux: /init after {:.0} s, power-off after {:.0} s",
        to_init.as_secs_f64(),
        total.as_secs_f64()
    );
    for line in out.stderr.lines().filter(|l| l.contains("complet")) {
        eprintln!("{line}");
    }
    assert_eq!(out.code(), 0, "{out:?}");
    for check in [
        "manifold-check console ok",
        "manifold-check cpus-online ok 0-1",
        "manifold-check pci ok",
        "manifold-check hvc0 ok",
        "manifold-check rng ok virtio_rng",
        "manifold-check blk ok",
        "manifold-check net ok",
        "manifold-check iommu-groups ok",
        "manifold-check vsock-connect ok",
        "manifold-check vsock-accept ok on port 1234: got ping from host",
        "manifold-init: 0 checks failed",
    ] {
        assert!(out.stdout.contains(check), "missing `{check}`: {out:?}");
    }
    assert!(!out.stdout.contains("FAIL"), "{out:?}");

    // The host's side of each device.
    let image = std::fs::read(&disk).expect("read the disk image");
    assert!(
        image[..BLK_LEN] == blk_pattern()[..],
        "the guest's pattern is not in the image"
    );
    assert!(
        out.stdout
            .contains(&format!("host region fnv {host_fnv:08x}")),
        "the guest read other bytes than the host wrote (fnv {host_fnv:08x}): {out:?}"
    );
    let (datagram, from) = got_datagram
        .try_recv()
        .expect("no datagram from the guest on the tap");
    assert!(datagram.starts_with("manifold-net ping"), "{datagram:?}");
    assert_eq!(from.ip().to_string(), "10.0.2.15");
    let console = std::fs::read_to_string(&hvc).expect("read the console file");
    assert!(
        console.contains("manifold-hvc0: hello from linux"),
        "{console:?}"
    );
    assert_eq!(
        got_hello
            .try_recv()
            .expect("the guest never connected to port 5000"),
        "hello from linux\n"
    );
}

/// Stock Linux with a virtio-net SR-IOV PF (`--net tap=NAME,vfs=4`) and its stock `virtio_pci`
/// and `virtio_net` drivers: `echo 4 > .../sriov_numvfs` makes four virtio-net interfaces appear
/// with the PF's MAC + 1..4; the first two, moved into two network namespaces inside the guest,
/// ping each other (ICMP echo, ARP through the embedded switch); `echo 0` removes them
/// (`check_sriovnet` in tests/linux/init.c); then power-off, status 0.
#[test]
fn linux_enables_net_vfs_that_exchange_frames() {
    if !can_make_taps() {
        return;
    }
    const TAP: &str = "lsriov0";
    let ns = NetNs::new("linuxsriov");
    assert!(ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]));
    assert!(ns.ip(&["link", "set", TAP, "up"]));
    let cmdline = format!("{} manifold_pci=1041 manifold_sriovnet=4", base_cmdline());
    let mut cmd = linux_in(&ns, &cmdline);
    cmd.args(["--net", &format!("tap={TAP},mac=52:54:00:12:34:56,vfs=4")]);
    let out = Running::start(&mut cmd).with_limit(LINUX_LIMIT).finish();
    assert_eq!(out.code(), 0, "{out:?}");
    for check in [
        "manifold-check pci ok",
        "manifold-check sriovnet ok 4 VFs",
        "(netns B, 10.77.0.2): 2 replies",
    ] {
        assert!(out.stdout.contains(check), "missing `{check}`: {out:?}");
    }
    // The line carries the measured round trip: shown with `--success-output immediate`.
    for line in out
        .stdout
        .lines()
        .filter(|l| l.contains("manifold-check sriovnet"))
    {
        println!("{line}");
    }
    assert!(!out.stdout.contains("FAIL"), "{out:?}");
}
