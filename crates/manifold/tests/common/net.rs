//! The net guest against a tap in a network namespace of the test's: frames both ways, with the
//! NIC behind the virtio-iommu or not.

use super::{NetNs, Running, assert_kicks_stayed_in_the_kernel, can_make_taps, guest_path as path};

/// Frames the net tests send the guest.
pub const NET_REPLIES: u8 = 32;

/// The local-experimental ethertype the net guest sends and listens for.
pub const ETH_P_TEST: u16 = 0x88b5;

/// An AF_PACKET socket bound to `ifname` for frames of [`ETH_P_TEST`], made in the current
/// thread's network namespace.
pub fn packet_socket(ifname: &str) -> (std::os::fd::OwnedFd, i32) {
    use std::os::fd::FromRawFd;
    let proto = i32::from(ETH_P_TEST.to_be());
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "no interface {ifname}");
    let ifindex = i32::try_from(ifindex).expect("ifindex");
    // SAFETY: sockaddr_ll is plain old data, for which all zeros is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_TEST.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a valid sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    (fd, ifindex)
}

/// Receive one frame (waiting at most a second); None on timeout.
pub fn recv_frame(fd: &std::os::fd::OwnedFd) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 2048];
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).expect("recv");
    buf.truncate(n);
    Some(buf)
}

/// The net guest and a tap inside a network namespace of the test's: the guest's broadcast
/// frames (a small one, a full-size one) show up on the tap (seen by an AF_PACKET socket
/// there), and frames sent there to the guest's MAC (a full-size one, then 31 small ones)
/// reach the guest through virtio-net's receive queue, all and in order. Manifold runs inside
/// the namespace (`ip netns exec`), so it opens the tap there. With `precreate` false manifold
/// creates the tap and the test brings it up while the guest waits. With `iommu` the NIC is
/// behind `--iommu` and the guest programs it (`iommu=1`): every ring and buffer at an IOVA
/// beyond guest RAM. Needs root and /dev/net/tun (skipped otherwise, except on CI).
pub fn net_round_trip(precreate: bool, iommu: bool) {
    const TAP: &str = "mtap0";
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    if !can_make_taps() {
        return;
    }
    let ns = NetNs::new(if precreate { "net" } else { "netnew" });
    let mut socket = None;
    if precreate {
        assert!(ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]));
        assert!(ns.ip(&["link", "set", TAP, "up"]));
        socket = Some(ns.run(|| packet_socket(TAP)));
    }

    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_manifold"))
        .args([
            "run",
            "--kernel",
            &path("net-pvh.elf"),
            "--cmdline",
            &format!(
                "replies={NET_REPLIES}{}{}",
                if precreate { "" } else { " wait=1" },
                if iommu { " iommu=1" } else { "" }
            ),
            "--memory",
            "size=64M",
            "--net",
            &format!(
                "tap={TAP},mac=52:54:00:12:34:56{}",
                if iommu { ",iommu=on" } else { "" }
            ),
            "--log-level",
            "debug",
        ]);
    if iommu {
        cmd.arg("--iommu");
    }
    let mut vm = Running::start(&mut cmd);
    if iommu {
        vm.wait_for("net behind the iommu: endpoint");
    }
    vm.wait_for("mac 52:54:00:12:34:56");
    vm.wait_for("link up");
    let (sock, ifindex) = match socket {
        Some(s) => s,
        None => {
            vm.wait_for("net waiting");
            assert!(ns.ip(&["link", "set", TAP, "up"]), "manifold made {TAP}");
            let s = ns.run(|| packet_socket(TAP));
            vm.write(b"\n");
            s
        }
    };
    vm.wait_for("net sent big");

    // The guest's frames: broadcast, from its MAC, our ethertype, our payload; first a small
    // one, then a full-size one whose header came in a buffer of its own.
    let started = std::time::Instant::now();
    let next_frame = || loop {
        assert!(
            started.elapsed() < super::HANG_LIMIT,
            "no frame from the guest on the tap"
        );
        if let Some(f) = recv_frame(&sock) {
            break f;
        }
    };
    let frame = next_frame();
    assert!(frame.len() >= 60, "{frame:?}");
    assert_eq!(frame[0..6], [0xff; 6], "broadcast");
    assert_eq!(frame[6..12], MAC, "from the guest's MAC");
    assert_eq!(frame[12..14], ETH_P_TEST.to_be_bytes());
    assert!(frame[14..].starts_with(b"manifold-net-test"), "{frame:?}");
    let big = next_frame();
    assert_eq!(big.len(), 1514, "a full-size frame");
    assert_eq!(big[0..6], [0xff; 6], "broadcast");
    assert_eq!(big[6..12], MAC, "from the guest's MAC");
    assert_eq!(big[12..14], ETH_P_TEST.to_be_bytes());
    let tag = b"manifold-net-big";
    assert!(big[14..].starts_with(tag), "{big:?}");
    for i in tag.len()..1500 {
        assert_eq!(big[14 + i], (i * 7) as u8, "payload byte {i}");
    }

    // The replies, to the guest's MAC, numbered: four times the receive buffers the guest
    // keeps posted, so most wait in the tap until the guest gives buffers back.
    // SAFETY: sockaddr_ll is plain old data, for which all zeros is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_TEST.to_be();
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&MAC);
    for seq in 0..NET_REPLIES {
        let mut reply = Vec::new();
        reply.extend_from_slice(&MAC);
        reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        reply.extend_from_slice(&ETH_P_TEST.to_be_bytes());
        reply.extend_from_slice(b"manifold-net-reply");
        reply.push(seq);
        // The first full-size, the others the minimum.
        reply.resize(if seq == 0 { 1514 } else { 60 }, 0);
        // SAFETY: `reply` and `to` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                reply.as_ptr().cast(),
                reply.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            usize::try_from(sent).ok(),
            Some(reply.len()),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
    // MRG_RXBUF negotiated: the frame fitted one buffer.
    vm.wait_for("num_buffers 1");
    vm.wait_for("reply from 02:00:00:00:00:01 to 52:54:00:12:34:56, 1514 bytes");
    vm.wait_for(&format!("net got {NET_REPLIES} replies in order"));
    vm.wait_for("net got reply");
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert_kicks_stayed_in_the_kernel(&out);
    if iommu {
        assert_eq!(
            out.stderr.matches("behind the virtio-iommu").count(),
            1,
            "{out:?}"
        );
    }
}
