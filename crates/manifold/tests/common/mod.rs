//! Running the real `manifold` binary on the test guests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod multi;
pub mod net;

/// A guard against a hung guest: far above any expected run, not a performance assertion.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of a built test guest; builds the guests once per test process if needed.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    BUILT.get_or_init(|| {
        let _g = LOCK.lock();
        // nextest runs each test in a process of its own: without a lock across processes,
        // two makes in a fresh tree write the same objects at once and one test fails.
        let build = repo_root().join("tests/guests/build");
        std::fs::create_dir_all(&build).expect("guest build directory");
        let lock = std::fs::File::create(build.join(".lock")).expect("guest build lock file");
        // SAFETY: flock takes no pointers; the fd is open for the call. The lock goes with
        // the file at the end of this closure.
        let _ = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        let status = Command::new("make")
            .args(["-s", "-C"])
            .arg(repo_root().join("tests/guests"))
            .status()
            .expect("run make for the test guests");
        assert!(status.success(), "building the test guests failed");
    });
    let p = repo_root().join("tests/guests/build").join(name);
    assert!(p.exists(), "test guest {} missing", p.display());
    p
}

pub fn manifold() -> Command {
    Command::new(env!("CARGO_BIN_EXE_manifold"))
}

/// What a finished run printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// A running manifold whose stdout is read line by line.
pub struct Running {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
    started: Instant,
    limit: Duration,
}

impl Running {
    pub fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn manifold");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            stderr,
            started: Instant::now(),
            limit: HANG_LIMIT,
        }
    }

    /// A hang guard other than [`HANG_LIMIT`], for guests that take minutes (stock Linux).
    pub fn with_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Wait for a stdout line containing `needle`; panics (with what was seen) on hang or EOF.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let left = self.limit.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no line with {needle:?} in time; saw {:#?}", self.seen);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("output ended before {needle:?}; saw {:#?}", self.seen)
                }
            }
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to manifold stdin");
        stdin.flush().expect("flush");
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Wait for the process to end and collect everything it printed.
    pub fn finish(mut self) -> Output {
        drop(self.stdin.take());
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut rest: Vec<String> = self.lines.iter().collect();
                self.seen.append(&mut rest);
                return Output {
                    status,
                    stdout: self.seen.join("\n"),
                    stderr: self.stderr.join().unwrap_or_default(),
                };
            }
            if self.started.elapsed() > self.limit {
                let _ = self.child.kill();
                panic!("manifold did not exit in time; saw {:#?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Run manifold to completion with stdin closed.
pub fn run(args: &[&str]) -> Output {
    let mut cmd = manifold();
    cmd.args(args);
    Running::start(&mut cmd).finish()
}

/// The path of a test guest as a string, for an argument.
pub fn guest_path(name: &str) -> String {
    guest(name).to_string_lossy().into_owned()
}

/// A scratch file removed on drop.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("manifold-test-{}-{name}", std::process::id()));
        std::fs::write(&p, contents).expect("write temp file");
        Self(p)
    }
    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A scratch directory removed (with what is in it) on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("manifold-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).expect("create temp dir");
        Self(p)
    }
    pub fn join(&self, name: &str) -> String {
        self.0
            .join(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every queue kick of a run was caught by an ioeventfd (needs `--log-level debug`).
pub fn assert_kicks_stayed_in_the_kernel(out: &Output) {
    assert!(
        !out.stderr.contains("queue notify through an MMIO exit"),
        "a kick left the guest: {out:?}"
    );
}

/// Each of `lines` is somewhere in what the guest printed on COM1.
pub fn assert_printed(out: &Output, lines: &[&str]) {
    for line in lines {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
}

/// A network namespace of the test's own, deleted on drop (also when the test panics).
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("manifold-{tag}-{}", std::process::id());
        if std::path::Path::new("/run/netns").join(&name).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        Self(name)
    }

    /// Run `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> bool {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Run a thread that enters the namespace, call `f` there, return its result. What `f`
    /// creates there (sockets) stays in the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns() on a descriptor we own; it changes this thread's network
            // namespace only, and the thread ends when `f` returns.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

pub fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this host can run the tap tests; if not, they are skipped, except on CI.
pub fn can_make_taps() -> bool {
    // SAFETY: geteuid() has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: needs root and /dev/net/tun");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with /dev/net/tun"
        );
        return false;
    }
    true
}
