//! SR-IOV virtio-net on KVM with the real `manifold` binary: a PF on a tap in a network
//! namespace of the test's (`--net tap=NAME,mac=MAC,vfs=4`), driven by the `sriov-net` test
//! guest, which enables VFs the way Linux's PCI core does and sends frames between them through
//! the embedded switch and to and from the tap. Needs /dev/kvm, root and /dev/net/tun (skipped
//! without the last two, except on CI).

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use common::net::{ETH_P_TEST, packet_socket, recv_frame};
use common::{HANG_LIMIT, NetNs, Running, can_make_taps, guest_path as path, run};

const TAP: &str = "msriov0";
const PF_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The address the guest sends "up" frames to and the test sends from (as in sriov-net.c).
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x88, 0x01];
const BROADCAST: [u8; 6] = [0xff; 6];

/// VF `i`'s MAC: the PF's low 24 bits + 1 + i (`switch::vf_mac`).
fn vf_mac(i: u8) -> [u8; 6] {
    let mut m = PF_MAC;
    m[5] += 1 + i;
    m
}

/// The next `n` frames of [`ETH_P_TEST`] on the tap.
fn frames(sock: &OwnedFd, n: usize) -> Vec<Vec<u8>> {
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(started.elapsed() < HANG_LIMIT, "frames on the tap: {out:?}");
        if let Some(f) = recv_frame(sock) {
            out.push(f);
        }
    }
    out
}

/// A frame as the guest builds it: `text`, then the cycle and the sender's VF number.
fn check(frame: &[u8], dst: [u8; 6], src: [u8; 6], text: &str, cycle: u8, vf: u8) {
    let what = format!("{text} (cycle {cycle}, VF {vf}): {frame:02x?}");
    assert!(frame.len() >= 14 + text.len() + 2, "{what}");
    assert_eq!(frame[0..6], dst, "destination of {what}");
    assert_eq!(frame[6..12], src, "source of {what}");
    assert_eq!(frame[12..14], ETH_P_TEST.to_be_bytes(), "{what}");
    let p = &frame[14..];
    assert_eq!(&p[..text.len()], text.as_bytes(), "{what}");
    assert_eq!(p[text.len()..text.len() + 2], [cycle, vf], "{what}");
}

/// Threads and open fds of a process.
fn usage(pid: u32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).expect("proc dir").count();
    (
        count(format!("/proc/{pid}/task")),
        count(format!("/proc/{pid}/fd")),
    )
}

/// Enable 2, 4 and 3 VFs in turn. Each cycle: VF-to-VF unicasts reach their VF only and never
/// the tap; broadcasts reach every other VF and the tap; a frame to an address not yet learned
/// is flooded (the tap sees it); a frame from the tap reaches the VF it is for; once the host's
/// address is learned on the uplink, frames to it go to the tap only. The tap sees exactly the
/// broadcasts and the frames for the host, in order. Disabling leaves no thread or fd behind.
#[test]
fn net_vfs_switch_frames_between_vfs_and_the_tap() {
    if !can_make_taps() {
        return;
    }
    let counts: [u8; 3] = [2, 4, 3];
    let ns = NetNs::new("sriovnet");
    assert!(ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]));
    assert!(ns.ip(&["link", "set", TAP, "up"]));
    let (sock, _) = ns.run(|| packet_socket(TAP));
    let list: Vec<String> = counts.iter().map(u8::to_string).collect();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_manifold"))
        .args([
            "run",
            "--kernel",
            &path("sriov-net-pvh.elf"),
            "--cmdline",
            &format!("vfs={}", list.join(".")),
            "--memory",
            "size=64M",
            "--net",
            &format!("tap={TAP},mac=52:54:00:12:34:56,vfs=4"),
        ]);
    let mut vm = Running::start(&mut cmd);
    // `ip netns exec` execs manifold: the same process.
    let pid = vm.child.id();
    vm.wait_for("pf mac 52:54:00:12:34:56");
    let mut baseline = None;
    for (cycle, &n) in counts.iter().enumerate() {
        let c = cycle as u8;
        let last = n - 1;
        vm.wait_for(&format!("sriov-net cycle {cycle} sent"));
        // VF 0 -> VF 1 and VF 1 -> VF 0 stayed inside; the broadcast and the flooded frame
        // for the unknown host came out, in that order.
        let got = frames(&sock, 2);
        check(&got[0], BROADCAST, vf_mac(0), "manifold-sriov-bcast", c, 0);
        check(
            &got[1],
            HOST_MAC,
            vf_mac(last),
            "manifold-sriov-up",
            c,
            last,
        );

        // The host answers VF 1 from the tap.
        let mut f = Vec::new();
        f.extend_from_slice(&vf_mac(1));
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&ETH_P_TEST.to_be_bytes());
        f.extend_from_slice(b"manifold-sriov-down");
        f.extend_from_slice(&[c, 0]);
        f.resize(60, 0);
        // SAFETY: sends `f`, which lives for the call, on the socket bound to the tap.
        let sent = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(sent, 60, "send: {}", std::io::Error::last_os_error());
        vm.write(b"s");
        vm.wait_for(&format!("sriov-net cycle {cycle} done"));
        // Learned on the uplink now: the second frame for the host came out (and no VF got
        // it, which the guest checked); then VF 0's second broadcast.
        let got = frames(&sock, 2);
        check(
            &got[0],
            HOST_MAC,
            vf_mac(last),
            "manifold-sriov-up2",
            c,
            last,
        );
        check(&got[1], BROADCAST, vf_mac(0), "manifold-sriov-bcast2", c, 0);
        assert_eq!(recv_frame(&sock), None, "nothing else on the tap");
        vm.write(b"d");

        vm.wait_for(&format!("sriov-net cycle {cycle} disabled"));
        let now = usage(pid);
        match baseline {
            // After the first cycle: the VF event set and allocator arenas exist.
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "threads and fds after cycle {cycle}"),
        }
        vm.write(b"e");
    }
    vm.wait_for("sriov-net passed");
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(!out.stdout.contains("FAILED"), "{out:?}");
}

/// `vfs=` on `--net` is checked like on `--disk` (bad input, status 2, one line) and shown by
/// `--dry-run`.
#[test]
fn net_vfs_option_checked_and_shown() {
    for bad in ["vfs=256", "vfs=x", "vfs=-1"] {
        let out = run(&[
            "run",
            "--kernel",
            "/nonexistent",
            "--net",
            &format!("tap=t0,{bad}"),
        ]);
        assert_eq!(out.code(), 2, "{bad}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{bad}: {out:?}");
        assert!(out.stderr.contains("vfs"), "{bad}: {out:?}");
    }
    let out = run(&[
        "run",
        "--kernel",
        &path("sriov-net-pvh.elf"),
        "--net",
        "tap=t0,vfs=4",
        "--dry-run",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("\"vfs\": 4"), "{out:?}");
}
