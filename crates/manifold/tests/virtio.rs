//! The virtio device guests on KVM with the real `manifold` binary: blk, rng, console, vsock
//! and net over PCI, a misbehaving driver, and several devices side by side. Needs /dev/kvm.

mod common;

use common::{
    Running, TempDir, TempFile, assert_kicks_stayed_in_the_kernel, assert_printed,
    guest_path as path, manifold, run,
};

/// The blk guest drives two virtio-blk functions through ECAM, BAR assignment, MSI-X and one
/// queue each: a pattern written to sector 5 of the first disk must be in the image file, the
/// second disk (readonly=on) must refuse a write, and no queue notification may reach
/// userspace through an MMIO exit (the ioeventfds followed the BARs the guest moved). Twice:
/// with the features Linux accepts, then with VERSION_1 only.
#[test]
fn virtio_blk_over_pci() {
    const SECTOR: u64 = 5;
    // As Linux drives it (event index, requests in indirect tables), then with VERSION_1 only
    // (requests as chains of three descriptors).
    for cmdline in ["blk-serial-0", "blk-serial-0 plain=1"] {
        let rw = TempFile::new("blk-rw.img", &vec![0u8; 1 << 20]);
        let ro = TempFile::new("blk-ro.img", &vec![0xa5u8; 1 << 20]);
        let out = run(&[
            "run",
            "--kernel",
            &path("blk-pvh.elf"),
            "--cmdline",
            cmdline,
            "--memory",
            "size=64M",
            "--disk",
            &format!("path={},serial=blk-serial-0", rw.path()),
            "--disk",
            &format!("path={},readonly=on", ro.path()),
            "--log-level",
            "debug",
        ]);
        assert_eq!(out.code(), 1, "{out:?}");
        assert_printed(
            &out,
            &[
                "virtio-blk functions: 2",
                "capacity: 2048 sectors",
                "write: ok",
                "read: ok",
                "compare: ok",
                "flush: ok",
                "get-id: ok",
                "id: blk-serial-0",
                "read-only feature: ok",
                "read-only write refused: ok",
                "read-only read: ok",
                "blk passed",
            ],
        );
        let accepted = if cmdline.contains("plain=1") {
            "accepted 1:00000000"
        } else {
            "accepted 3:30000000"
        };
        assert!(out.stdout.contains(accepted), "{out:?}");
        // Six requests, one MSI-X interrupt each.
        assert!(out.stdout.contains("interrupts: 6"), "{out:?}");
        assert!(
            !out.stderr.contains("queue notify through an MMIO exit"),
            "a kick left the guest: {out:?}"
        );
        let image = std::fs::read(rw.path()).expect("read image");
        let at = (SECTOR * 512) as usize;
        let expect: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(&image[at..at + 512], &expect[..]);
        assert!(image[..at].iter().all(|&b| b == 0));
        assert!(image[at + 512..].iter().all(|&b| b == 0));
        let untouched = std::fs::read(ro.path()).expect("read image");
        assert!(untouched.iter().all(|&b| b == 0xa5));
    }
}

/// The rng guest asks virtio-rng twice for 64 bytes through its own PCI driver (ECAM found
/// through ACPI's MCFG, BAR, MSI-X, one queue): both requests come back whole, not all zeros,
/// and different; the same with the queue polled instead of interrupting.
#[test]
fn virtio_rng_over_pci() {
    let out = run(&[
        "run",
        "--kernel",
        &path("rng-pvh.elf"),
        "--memory",
        "size=64M",
        "--rng",
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
    assert!(
        out.stdout.contains("pci ecam at e0000000 (MCFG)"),
        "{out:?}"
    );
    // What Linux accepts: VERSION_1, ACCESS_PLATFORM, RING_EVENT_IDX, RING_INDIRECT_DESC.
    assert!(
        out.stdout
            .contains("features: offered 3:30000000 accepted 3:30000000"),
        "{out:?}"
    );
    assert!(out.stdout.contains("rng ok"), "{out:?}");
    let hex = |label: &str| -> String {
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` line: {out:?}"));
        assert_eq!(line.len(), 128, "64 bytes in hex: {line:?}");
        assert!(line.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
        line.to_owned()
    };
    let (a, b) = (hex("rng 0: "), hex("rng 1: "));
    assert_ne!(a, b, "two requests gave the same bytes");
    assert_ne!(a, "0".repeat(128));
    assert!(out.stdout.contains("request 0: 64 bytes"), "{out:?}");
    assert!(out.stdout.contains("request 1: 64 bytes"), "{out:?}");
    // Each request waited for its MSI-X interrupt.
    assert!(out.stdout.contains("interrupts: 2"), "{out:?}");

    // Polled: the queue has no MSI-X vector (NO_VECTOR), and no interrupt arrives; VERSION_1
    // only (no event index).
    let out = run(&[
        "run",
        "--kernel",
        &path("rng-pvh.elf"),
        "--cmdline",
        "poll=1 plain=1",
        "--memory",
        "size=64M",
        "--rng",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains("virtio: polling"), "{out:?}");
    assert!(
        out.stdout
            .contains("features: offered 3:30000000 accepted 1:00000000"),
        "{out:?}"
    );
    assert!(out.stdout.contains("interrupts: 0"), "{out:?}");
    assert!(out.stdout.contains("rng ok"), "{out:?}");
}

/// Chains a broken or hostile driver might post, through the real transport: buffers beyond RAM
/// or on a BAR, a descriptor loop, nothing writable, a next index out of range, a good buffer
/// before a bad one. Each comes back used with only the bytes that reached guest memory
/// counted, each costs a log line, and the device goes on serving good requests.
#[test]
fn virtio_rng_survives_bad_chains() {
    let out = run(&[
        "run",
        "--kernel",
        &path("rng-pvh.elf"),
        "--cmdline",
        "bad=1",
        "--memory",
        "size=64M",
        "--rng",
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &[
            "bad chain, beyond RAM: 0 bytes: ok",
            "bad chain, on a BAR: 0 bytes: ok",
            "bad chain, loop: 0 bytes: ok",
            "bad chain, readable only: 0 bytes: ok",
            "bad chain, next out of range: 0 bytes: ok",
            "bad chain, second buffer beyond RAM: 16 bytes: ok",
            "after the bad chains: 64 bytes: ok",
            "rng ok",
        ],
    );
    let logged = out
        .stderr
        .lines()
        .filter(|l| l.contains("virtio-rng:"))
        .count();
    assert!(logged >= 6, "a log line per bad chain: {out:?}");
}

/// A driver that breaks the virtio-pci rules on purpose (read-only fields written, features
/// not offered or no VERSION_1, DRIVER_OK too early, bad queue sizes and vectors, writes past
/// the MSI-X table, rings outside RAM): each mistake is refused as the spec says, with a log
/// line, rings outside RAM set DEVICE_NEEDS_RESET, and after a reset and a BAR move the
/// device works (its kicks still caught by an ioeventfd at the new address).
#[test]
fn virtio_pci_refuses_a_misbehaving_driver() {
    let out = run(&[
        "run",
        "--kernel",
        &path("vbad-pvh.elf"),
        "--memory",
        "size=64M",
        "--rng",
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &[
            "num_queues is read-only: ok",
            "device_feature is read-only: ok",
            "FEATURES_OK refused for a feature not offered: ok",
            "FEATURES_OK refused without VERSION_1: ok",
            "DRIVER_OK refused without FEATURES_OK: ok",
            "queue size 3 refused: ok",
            "queue size above the maximum refused: ok",
            "queue vector beyond the table reads NO_VECTOR: ok",
            "config vector beyond the table reads NO_VECTOR: ok",
            "write past the MSI-X table ignored: ok",
            "rings beyond RAM: DEVICE_NEEDS_RESET: ok",
            "reset clears DEVICE_NEEDS_RESET: ok",
            "BAR 0 moved: ok",
            "request after all that: ok",
            "vbad ok",
        ],
    );
    assert!(
        out.stderr
            .contains("device activation failed, it needs a reset"),
        "{out:?}"
    );
    let logged = out
        .stderr
        .lines()
        .filter(|l| l.contains("virtio-pci:"))
        .count();
    assert!(logged >= 10, "a log line per mistake: {out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
}

/// Four kinds of virtio device in one VM (blk, rng, console, vsock): one function each on bus
/// 0, BARs apart, MSI-X each, and each works beside the others.
#[test]
fn virtio_devices_side_by_side() {
    let (out, written) = common::multi::run_multi("multi", false);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_printed(
        &out,
        &[
            "1af4:1042",
            "1af4:1044",
            "1af4:1043",
            "1af4:1053",
            "blk sector 0 read: ok",
            "rng 16 bytes: ok",
            "console line sent: ok",
            "vsock cid 7",
            "distinct BARs: ok",
            "interrupts: 3",
            "multi ok",
        ],
    );
    assert_kicks_stayed_in_the_kernel(&out);
    assert_eq!(written, "multi hvc0\n");
}

/// The console guest writes through virtio-console's transmit queue: with `--console
/// file=PATH` the line lands in the file (and not on the terminal); with `--console off` there
/// is no device for the guest to find.
#[test]
fn virtio_console_to_a_file_and_off() {
    let file = TempFile::new("console.out", b"");
    let out = run(&[
        "run",
        "--kernel",
        &path("console-pvh.elf"),
        "--memory",
        "size=64M",
        "--console",
        &format!("file={}", file.path()),
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
    assert!(out.stdout.contains("console sent"), "{out:?}");
    assert!(!out.stdout.contains("hello from hvc0"), "{out:?}");
    let written = std::fs::read_to_string(file.path()).expect("read console file");
    assert_eq!(written, "hello from hvc0\n");

    let out = run(&[
        "run",
        "--kernel",
        &path("console-pvh.elf"),
        "--memory",
        "size=64M",
        "--console",
        "off",
    ]);
    assert_eq!(out.code(), 3, "the guest finds no console: {out:?}");
    assert!(
        out.stdout.contains("virtio device type 3 not found"),
        "{out:?}"
    );
}

/// `--console tty`: the guest's output appears on manifold's stdout, and a line written to
/// manifold's stdin reaches the guest through the console's receive queue (the guest reports
/// it on COM1), whole although it is longer than the buffers the guest has posted at any time.
#[test]
fn virtio_console_on_the_terminal_both_ways() {
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        &path("console-pvh.elf"),
        "--cmdline",
        "read=1",
        "--memory",
        "size=64M",
        "--console",
        "tty",
        "--log-level",
        "debug",
    ]);
    let mut vm = Running::start(&mut cmd);
    vm.wait_for("console reading");
    // Longer than the 4 x 32 bytes of receive buffers the guest posts at a time: the rest waits
    // in the VMM until the guest posts more (flow control, nothing lost).
    let line: String = (0..400u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    vm.write(format!("typed into hvc0 {line}\n").as_bytes());
    vm.wait_for(&format!("console got: typed into hvc0 {line}"));
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
    // One write of the device's, so whole even if it lands inside a line of COM1's.
    assert!(out.stdout.contains("hello from hvc0\n"), "{out:?}");
}

/// One `\n`-terminated line from a stream (without the `\n`); panics at end of file.
fn read_line(r: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read a line");
    assert!(line.ends_with('\n'), "stream ended: {line:?}");
    line.pop();
    line
}

/// The vsock guest and host programs exchange data both ways over virtio-vsock's hybrid Unix
/// socket backend: the host connects to the guest's port 1234 (`CONNECT 1234`), sends a line
/// and reads the guest's echo, then sends 16 KiB against 4 KiB of guest credit; the guest
/// connects to host port 5000 (`PATH_5000`), sends a line
/// and reads the host's answer.
#[test]
fn virtio_vsock_both_ways() {
    use std::io::{BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    let dir = TempDir::new("vsock");
    let socket = dir.join("vsock.sock");
    let listener = UnixListener::bind(format!("{socket}_5000")).expect("listen on PATH_5000");
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        &path("vsock-pvh.elf"),
        "--cmdline",
        "bulk=16384",
        "--memory",
        "size=64M",
        "--vsock",
        &format!("cid=3,socket={socket}"),
        "--log-level",
        "debug",
    ]);
    let mut vm = Running::start(&mut cmd);
    vm.wait_for("vsock cid 3");
    // Connect only once the guest has posted its receive buffers: the device gives a guest
    // a few seconds to answer a REQUEST.
    vm.wait_for("vsock ready");

    let stream = UnixStream::connect(&socket).expect("connect to the vsock socket");
    stream
        .set_read_timeout(Some(common::HANG_LIMIT))
        .expect("read timeout");
    let mut reader = BufReader::new(&stream);
    (&stream)
        .write_all(b"CONNECT 1234\n")
        .expect("write CONNECT");
    let ok = read_line(&mut reader);
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an OK line: {ok:?}"));
    vm.wait_for(&format!("vsock request from host port {port}"));
    (&stream)
        .write_all(b"ping from host\n")
        .expect("write to the guest");
    assert_eq!(read_line(&mut reader), "echo: ping from host");
    vm.wait_for("vsock got: ping from host");

    // Four times the credit the guest gives: it gets through only if the guest's credit
    // updates reach the device and the device honours them.
    let bulk: Vec<u8> = (0..16384u32).map(|i| (i * 13 + 7) as u8).collect();
    let sum = bulk
        .iter()
        .map(|&b| u32::from(b))
        .fold(0u32, u32::wrapping_add);
    (&stream).write_all(&bulk).expect("write bulk data");
    assert_eq!(read_line(&mut reader), format!("bulk 16384 sum {sum}"));
    let line = vm.wait_for("vsock bulk: 16384 bytes");
    let updates: u32 = line
        .strip_suffix(" credit updates")
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    // 12 KiB past the first 4 KiB of credit needs at least three updates of 4 KiB.
    assert!(updates >= 3, "{line:?}");

    let started = std::time::Instant::now();
    let guest = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    started.elapsed() < common::HANG_LIMIT,
                    "the guest never connected to port 5000"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    guest.set_nonblocking(false).expect("blocking stream");
    guest
        .set_read_timeout(Some(common::HANG_LIMIT))
        .expect("read timeout");
    let mut reader = BufReader::new(&guest);
    assert_eq!(read_line(&mut reader), "hello from guest 3");
    (&guest)
        .write_all(b"bye from host\n")
        .expect("write to the guest");
    vm.wait_for("vsock got on 5000: bye from host");
    vm.wait_for("vsock done");
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
    drop(stream);
}

/// The net guest and a tap inside a network namespace of the test's: the guest's broadcast
/// frames (a small one, a full-size one) show up on the tap (seen by an AF_PACKET socket
/// there), and frames sent there to the guest's MAC (a full-size one, then 31 small ones)
/// reach the guest through virtio-net's receive queue, all and in order. Manifold runs inside
/// the namespace (`ip netns exec`), so it opens the tap there. Needs root and /dev/net/tun.
#[test]
fn virtio_net_frames_both_ways_through_a_tap() {
    common::net::net_round_trip(true, false);
}

/// The same with a tap that does not exist yet: manifold creates it in its namespace; the test
/// brings it up while the guest waits, then tells the guest to go on.
#[test]
fn virtio_net_creates_its_tap_in_the_namespace() {
    common::net::net_round_trip(false, false);
}
