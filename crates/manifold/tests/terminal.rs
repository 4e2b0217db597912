//! `--serial tty` on a real terminal: raw mode while the guest runs, the saved settings back
//! after a signal stops the VM. Runs manifold on a pseudo-terminal that is its controlling
//! terminal (its own session, in the foreground), as in an interactive shell. Needs /dev/kvm.

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{HANG_LIMIT, guest, manifold};

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr on a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn raw_mode_while_running_and_restored_after_sigterm() {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills two new fds; the name, termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let before = termios(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a new pty starts cooked");

    let slave_fd = slave.as_raw_fd();
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        guest("idle-pvh.elf").to_str().expect("utf-8 path"),
        "--serial",
        "tty",
    ])
    .stdin(Stdio::from(slave.try_clone().expect("dup")))
    .stdout(Stdio::from(slave.try_clone().expect("dup")))
    .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec: a new session whose
    // controlling terminal is the pty, so manifold is its foreground process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn manifold");

    // Wait for the guest's "ready" on the terminal.
    let mut reader = std::fs::File::from(master.try_clone().expect("dup"));
    let mut seen = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        assert!(start.elapsed() < HANG_LIMIT, "no ready: {seen:?}");
        let mut buf = [0u8; 256];
        let n = reader.read(&mut buf).expect("read pty");
        seen.extend_from_slice(&buf[..n]);
    }
    let during = termios(&slave);
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw mode"
    );
    assert_ne!(during.c_oflag & libc::OPOST, 0, "output processing kept");

    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < HANG_LIMIT, "manifold did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let after = termios(&slave);
    assert_eq!(after.c_lflag, before.c_lflag);
    assert_eq!(after.c_iflag, before.c_iflag);
    assert_eq!(after.c_oflag, before.c_oflag);
    assert_eq!(after.c_cflag, before.c_cflag);
    assert_eq!(after.c_cc, before.c_cc);
}
