//! What the virtio-net benchmarks share: a network namespace of their own with taps in it,
//! and the frames they send.

use std::process::Command;

use devices::virtio::net::Tap;

/// The feature Linux negotiates for its receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// An ethertype no protocol handles: frames written to a tap are dropped right after the
/// driver layer, the same way for every side.
pub const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

pub fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// An Ethernet frame of `len` bytes from `src` to `dst`: an unhandled ethertype, a counting
/// payload.
pub fn frame(len: usize, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// Move this process into a fresh network namespace, which goes away with it. Ok(false): not
/// root.
pub fn own_namespace() -> Result<bool, String> {
    // SAFETY: unshare(2) with a flag, no memory; the benchmark is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = last_err();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(false);
        }
        return Err(format!("unshare(CLONE_NEWNET): {e}"));
    }
    // No IPv6 in the namespace: its router and multicast-listener messages would be frames on
    // the taps that the benchmark did not send. (Absent when the host has no IPv6 at all.)
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    Ok(true)
}

/// A new tap named after `pattern` (e.g. `mbench%d`), up, with a transmit queue of 1000.
pub fn tap_up(pattern: &str) -> Result<Tap, String> {
    let tap = Tap::open(pattern).map_err(|e| format!("tap: {e}"))?;
    let name = tap.name().to_owned();
    for args in [
        vec!["link", "set", "dev", name.as_str(), "txqueuelen", "1000"],
        vec!["link", "set", "dev", name.as_str(), "up"],
    ] {
        let st = Command::new("ip")
            .args(&args)
            .status()
            .map_err(|e| format!("ip: {e}"))?;
        if !st.success() {
            return Err(format!("ip {}: {st}", args.join(" ")));
        }
    }
    Ok(tap)
}
