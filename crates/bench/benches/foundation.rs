//! Foundation benchmarks: manifold against a raw KVM runner (`raw-runner`, nothing between the
//! guest and KVM), both measured in the same run, interleaved round by round so that machine noise
//! hits both alike. Prints min/median/max of each and the ratio of the medians; asserts nothing
//! about time. Exits non-zero only when a run fails (a guest that does not print what it should,
//! a VMM that exits with the wrong status).
//!
//! Run with `cargo bench -p bench`. The harness builds `manifold` and `raw-runner` itself
//! (`cargo build --release -p manifold -p bench --bins`) and the test guests if they are missing
//! (`make -C tests/guests`).
//!
//! Environment:
//! - `MANIFOLD_BENCH_ROUNDS`: rounds (runs of each VMM per measurement), default 7.
//! - `MANIFOLD_BENCH_EXITS`: port writes done by the exit loop guest, default 200000.
//! - `MANIFOLD_BENCH_MANIFOLD`: a manifold executable to measure instead of the one just built
//!   (to compare a candidate build, e.g. another profile or linking, against the same baseline).
//!
//! What is measured:
//! 1. Exit round trip: `pio-loop-pvh.elf` with `n=N`, 128 MiB. Time from reading the guest's
//!    `start` line on the serial pipe to reading its `done N` line, divided by N.
//! 2. Start-up: the same runs, from just before spawning the VMM to the first byte of guest
//!    output on the pipe (the guest's first exit is a UART register write a few instructions
//!    earlier; the first byte follows after a handful of exits, the same for both VMMs).
//! 3. Memory overhead: `idle-pvh.elf` (prints `ready`, then `cli; hlt` forever) with 128 MiB and
//!    2 GiB. 200 ms after `ready`, /proc/PID/smaps: total Rss minus the Rss of the guest RAM
//!    mappings. Guest RAM mappings are the anonymous mappings at least as large as the smallest
//!    RAM range of the guest (manifold: `[0, min(size, 3 GiB))` and the rest above 4 GiB; raw:
//!    one range). What the guest touched (and what the loader wrote) is Rss of those mappings,
//!    so the difference is what the VMM itself holds: binary, libraries, heap, stacks. Kernel
//!    memory that KVM allocates for the VM (page tables, vCPU state) is not in any process's
//!    Rss and is not counted, for either. The overhead is split into its anonymous part (the
//!    process's own: heap, stacks, relocated data) and the rest, file pages (executable and
//!    shared libraries, in the page cache and shared with every process that maps them); a
//!    breakdown by mapping of the last 128 MiB run of each follows the table.
//! 4. Memory overhead with devices (as root): the same with 128 MiB, manifold given a virtio-blk
//!    disk (a 16 MiB image), a virtio-net NIC on a tap it creates in a network namespace that the
//!    benchmark makes and removes (`ip netns`), virtio-rng and a virtio-console writing to a
//!    file; the baseline has none. Without root this row is skipped with a message.
//!
//! The baseline, `raw-runner` (src/bin/raw-runner.rs), boots the same PVH guests with one memory
//! slot, no irqchip and no threads, and answers the guest's port I/O inline in its `KVM_RUN`
//! loop.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The exit status of a guest that wrote 0 to the debug-exit port: `(0 << 1) | 1`.
const DEBUG_EXIT_OK: i32 = 1;
/// manifold's exit status when stopped by SIGTERM (128 + 15).
const MANIFOLD_SIGTERM_STATUS: i32 = 128 + libc::SIGTERM;

/// Goals from the issue.
const GOAL_EXIT_RATIO: f64 = 1.01;
const GOAL_START_RATIO: f64 = 1.5;
const GOAL_MEMORY_MIB: f64 = 3.0;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
    // a test run should not spend a minute measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("foundation: skipped (run it with `cargo bench -p bench`)");
        return;
    }
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("foundation bench: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Raw,
    Manifold,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Raw => "raw",
            Vmm::Manifold => "manifold",
        }
    }
}

struct Setup {
    raw: PathBuf,
    manifold: PathBuf,
    pio_guest: PathBuf,
    idle_guest: PathBuf,
    rounds: usize,
    exits: u64,
    /// Devices to give manifold (memory with devices).
    devices: Option<Devices>,
}

/// What manifold gets for the memory-with-devices figure, and the namespace its tap lives in.
struct Devices {
    netns: String,
    disk: PathBuf,
    console: PathBuf,
}

impl Devices {
    /// A network namespace and a disk image of the benchmark's own; None (with a message)
    /// when that cannot be had (not root).
    fn make() -> Option<Self> {
        let id = std::process::id();
        let d = Self {
            netns: format!("manifold-bench-{id}"),
            disk: std::env::temp_dir().join(format!("manifold-bench-{id}-disk.img")),
            console: std::env::temp_dir().join(format!("manifold-bench-{id}-hvc0.log")),
        };
        let ns = Command::new("ip")
            .args(["netns", "add", &d.netns])
            .stderr(Stdio::null())
            .status();
        if !matches!(ns, Ok(s) if s.success()) {
            println!("memory with devices: skipped (needs root and `ip` to make a namespace)");
            return None;
        }
        let image = std::fs::File::create(&d.disk).and_then(|f| f.set_len(16 * MIB));
        if let Err(e) = image {
            println!(
                "memory with devices: skipped (disk image {}: {e})",
                d.disk.display()
            );
            return None;
        }
        Some(d)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_file(&self.disk);
        let _ = std::fs::remove_file(&self.console);
    }
}

impl Setup {
    fn command(&self, vmm: Vmm, guest: &Path, mem: u64, cmdline: &str) -> Command {
        self.command_with(vmm, guest, mem, cmdline, None)
    }

    fn command_with(
        &self,
        vmm: Vmm,
        guest: &Path,
        mem: u64,
        cmdline: &str,
        devices: Option<&Devices>,
    ) -> Command {
        let mut cmd = match vmm {
            Vmm::Raw => {
                let mut c = Command::new(&self.raw);
                c.arg(guest).arg((mem / MIB).to_string()).arg(cmdline);
                c
            }
            Vmm::Manifold => {
                // `ip netns exec` execs manifold in the namespace: the pid stays manifold's.
                let mut c = match devices {
                    Some(d) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", &d.netns]).arg(&self.manifold);
                        c
                    }
                    None => Command::new(&self.manifold),
                };
                if let Some(d) = devices {
                    c.arg("run")
                        .arg("--disk")
                        .arg(format!("path={}", d.disk.display()))
                        .args(["--net", "tap=mbench0", "--rng", "--console"])
                        .arg(format!("file={}", d.console.display()));
                } else {
                    c.arg("run");
                }
                c.arg("--kernel")
                    .arg(guest)
                    .arg("--cmdline")
                    .arg(cmdline)
                    .arg("--memory")
                    .arg(format!("size={}M", mem / MIB))
                    .arg("--serial")
                    .arg("tty");
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name}={v}: want a positive integer")),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root
        .canonicalize()
        .map_err(|e| format!("workspace root {}: {e}", root.display()))?;
    let rounds = usize::try_from(env_number("MANIFOLD_BENCH_ROUNDS", 7)?)
        .map_err(|e| format!("MANIFOLD_BENCH_ROUNDS: {e}"))?;
    let exits = env_number("MANIFOLD_BENCH_EXITS", 200_000)?;

    let (raw, mut manifold) = build_binaries(&root)?;
    if let Some(other) = std::env::var_os("MANIFOLD_BENCH_MANIFOLD") {
        manifold = PathBuf::from(other);
        if !manifold.is_file() {
            return Err(format!(
                "MANIFOLD_BENCH_MANIFOLD={}: no such file",
                manifold.display()
            ));
        }
    }
    let (pio_guest, idle_guest) = build_guests(&root)?;
    let mut setup = Setup {
        raw,
        manifold,
        pio_guest,
        idle_guest,
        rounds,
        exits,
        devices: None,
    };
    println!("raw-runner: {}", setup.raw.display());
    println!("manifold:   {}", setup.manifold.display());
    println!("rounds: {rounds}, exits per run: {exits}\n");

    let pio = bench_pio(&setup)?;
    let mem128 = bench_memory(&setup, 128 * MIB)?;
    let mem2g = bench_memory(&setup, 2 * GIB)?;
    setup.devices = Devices::make();
    let mem_dev = match setup.devices {
        Some(_) => Some(bench_memory(&setup, 128 * MIB)?),
        None => None,
    };

    println!();
    print_table(&pio, &mem128, &mem2g, mem_dev.as_ref());
    println!();
    print_breakdown(&mem128, &setup);
    Ok(())
}

// ---- building ----------------------------------------------------------------------------------

/// `cargo build --release -p manifold -p bench --bins`, reading the executables' paths from
/// cargo's JSON messages (so `CARGO_TARGET_DIR` and the like are honoured).
fn build_binaries(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building manifold and raw-runner (release)...");
    let mut child = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "manifold",
            "-p",
            "bench",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().ok_or("cargo: no stdout")?;
    let (mut raw, mut manifold) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo output: {e}"))?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        match msg["target"]["name"].as_str() {
            Some("raw-runner") => raw = Some(PathBuf::from(exe)),
            Some("manifold") => manifold = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    let status = child.wait().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build failed: {status}"));
    }
    match (raw, manifold) {
        (Some(r), Some(m)) => Ok((r, m)),
        _ => Err("cargo build did not report both executables".into()),
    }
}

fn build_guests(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = root.join("tests/guests");
    let pio = dir.join("build/pio-loop-pvh.elf");
    let idle = dir.join("build/idle-pvh.elf");
    if !pio.is_file() || !idle.is_file() {
        eprintln!("building test guests (make -C tests/guests)...");
        let status = Command::new("make")
            .arg("-C")
            .arg(&dir)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run make: {e}"))?;
        if !status.success() || !pio.is_file() || !idle.is_file() {
            return Err(format!("make -C {} failed: {status}", dir.display()));
        }
    }
    Ok((pio, idle))
}

// ---- running a VMM -----------------------------------------------------------------------------

/// A spawned VMM with its serial output piped to us and a watchdog that kills it (SIGKILL) if
/// it outlives its deadline, so that a hung guest fails the bench instead of hanging it.
struct Run {
    vmm: Vmm,
    child: Child,
    out: std::process::ChildStdout,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<bool>)>,
    /// Everything read so far, for error messages.
    text: Vec<u8>,
}

impl Run {
    fn spawn(mut cmd: Command, vmm: Vmm, deadline: Duration) -> Result<Self> {
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", vmm.name()))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let pid = libc::pid_t::try_from(child.id()).map_err(|e| format!("pid: {e}"))?;
        let (tx, rx) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(deadline) == Err(mpsc::RecvTimeoutError::Timeout) {
                // SAFETY: kill(2) has no memory effects. The child is not reaped before this
                // thread is joined (see `finish`), so the pid still names it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return true;
            }
            false
        });
        Ok(Self {
            vmm,
            child,
            out,
            watchdog: Some((tx, watchdog)),
            text: Vec::new(),
        })
    }

    /// Read whatever the pipe has (blocking until at least one byte, or EOF: returns 0).
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            match self.out.read(buf) {
                Ok(n) => {
                    self.text.extend_from_slice(&buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{}: reading serial output: {e}", self.vmm.name())),
            }
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    /// Drain the pipe to EOF, stop the watchdog, reap the process.
    fn finish(mut self) -> Result<ExitStatus> {
        let mut buf = [0u8; 4096];
        while self.read_some(&mut buf)? > 0 {}
        let killed = match self.watchdog.take() {
            Some((tx, handle)) => {
                let _ = tx.send(());
                handle.join().unwrap_or(true)
            }
            None => false,
        };
        let status = self
            .child
            .wait()
            .map_err(|e| format!("{}: wait: {e}", self.vmm.name()))?;
        if killed {
            return Err(format!(
                "{} timed out and was killed; output: {:?}",
                self.vmm.name(),
                self.output()
            ));
        }
        Ok(status)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Only on an error path: do not leave a VMM behind.
        if let Some((tx, handle)) = self.watchdog.take() {
            let _ = self.child.kill();
            let _ = tx.send(());
            let _ = handle.join();
            let _ = self.child.wait();
        }
    }
}

// ---- exit round trip and start-up --------------------------------------------------------------

struct PioRun {
    /// Spawn to first byte of guest output.
    startup: Duration,
    /// `start` line to `done` line, per exit.
    per_exit_ns: f64,
}

fn pio_once(setup: &Setup, vmm: Vmm, exits: u64) -> Result<PioRun> {
    let cmd = setup.command(vmm, &setup.pio_guest, 128 * MIB, &format!("n={exits}"));
    // Generous: ~10 us per exit is expected here; a minute on top for a slow start.
    let deadline = Duration::from_secs(60) + Duration::from_micros(exits.saturating_mul(200));
    let t0 = Instant::now();
    let mut run = Run::spawn(cmd, vmm, deadline)?;
    let mut buf = [0u8; 256];
    let (mut first, mut start, mut done) = (None, None, None);
    let mut line = Vec::new();
    while done.is_none() {
        let n = run.read_some(&mut buf)?;
        let now = Instant::now();
        if n == 0 {
            break;
        }
        first.get_or_insert(now);
        for &b in &buf[..n] {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            if line == b"start" && start.is_none() {
                start = Some(now);
            } else if line.starts_with(b"done ") && start.is_some() {
                let want = format!("done {exits}");
                if line != want.as_bytes() {
                    return Err(format!(
                        "{}: guest printed {:?}, want {want:?}",
                        vmm.name(),
                        String::from_utf8_lossy(&line)
                    ));
                }
                done = Some(now);
            }
            line.clear();
        }
    }
    let output = run.output();
    let status = run.finish()?;
    let (Some(first), Some(start), Some(done)) = (first, start, done) else {
        return Err(format!(
            "{}: guest did not print start/done ({status}); output: {output:?}",
            vmm.name()
        ));
    };
    if status.code() != Some(DEBUG_EXIT_OK) {
        return Err(format!(
            "{}: exit status {status}, want {DEBUG_EXIT_OK} (debug exit 0); output: {output:?}",
            vmm.name()
        ));
    }
    #[allow(clippy::cast_precision_loss)] // exits is far below 2^52
    let per_exit_ns = (done - start).as_secs_f64() * 1e9 / exits as f64;
    Ok(PioRun {
        startup: first - t0,
        per_exit_ns,
    })
}

/// Alternate the order within each round so that neither VMM always runs first.
fn order(round: usize) -> [Vmm; 2] {
    if round % 2 == 0 {
        [Vmm::Raw, Vmm::Manifold]
    } else {
        [Vmm::Manifold, Vmm::Raw]
    }
}

struct PioResults {
    startup_ms: [Vec<f64>; 2],
    per_exit_ns: [Vec<f64>; 2],
}

fn slot(vmm: Vmm) -> usize {
    match vmm {
        Vmm::Raw => 0,
        Vmm::Manifold => 1,
    }
}

fn bench_pio(setup: &Setup) -> Result<PioResults> {
    // Warm-up, not counted: page cache, binary loading, KVM module state.
    for vmm in [Vmm::Raw, Vmm::Manifold] {
        pio_once(setup, vmm, 1000)?;
    }
    let mut r = PioResults {
        startup_ms: [Vec::new(), Vec::new()],
        per_exit_ns: [Vec::new(), Vec::new()],
    };
    for round in 0..setup.rounds {
        let mut line = format!("exit loop round {}/{}:", round + 1, setup.rounds);
        for vmm in order(round) {
            let p = pio_once(setup, vmm, setup.exits)?;
            let ms = p.startup.as_secs_f64() * 1e3;
            let _ = write!(
                line,
                "  {} start-up {ms:.2} ms, {:.0} ns/exit;",
                vmm.name(),
                p.per_exit_ns
            );
            r.startup_ms[slot(vmm)].push(ms);
            r.per_exit_ns[slot(vmm)].push(p.per_exit_ns);
        }
        println!("{line}");
    }
    Ok(r)
}

// ---- memory ------------------------------------------------------------------------------------

/// One mapping of /proc/PID/smaps.
#[derive(Clone, Debug)]
struct Mapping {
    range: String,
    perms: String,
    path: String,
    size: u64,
    rss: u64,
    anonymous: u64,
}

fn parse_smaps(text: &str) -> Result<Vec<Mapping>> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-') {
            // A mapping header: range perms offset dev inode [path].
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                let perms = fields.next().unwrap_or_default().to_owned();
                let path = fields.skip(3).collect::<Vec<_>>().join(" ");
                maps.push(Mapping {
                    range: first.to_owned(),
                    perms,
                    path,
                    size: hi - lo,
                    rss: 0,
                    anonymous: 0,
                });
                continue;
            }
        }
        if first == "Rss:" || first == "Anonymous:" {
            let kb: u64 = fields
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("bad smaps line {line:?}"))?;
            if let Some(m) = maps.last_mut() {
                if first == "Rss:" {
                    m.rss = kb * 1024;
                } else {
                    m.anonymous = kb * 1024;
                }
            }
        }
    }
    if maps.is_empty() {
        return Err("empty smaps".into());
    }
    Ok(maps)
}

/// Guest RAM ranges as each VMM lays them out (manifold: below the 3 GiB MMIO hole, the rest
/// above 4 GiB; raw: one range).
fn ram_ranges(vmm: Vmm, size: u64) -> Vec<u64> {
    const HOLE: u64 = 3 * GIB;
    match vmm {
        Vmm::Raw => vec![size],
        Vmm::Manifold if size > HOLE => vec![HOLE, size - HOLE],
        Vmm::Manifold => vec![size],
    }
}

fn is_guest_ram(m: &Mapping, smallest_range: u64) -> bool {
    m.path.is_empty() && m.perms.starts_with("rw") && m.size >= smallest_range
}

struct MemRun {
    total_rss: u64,
    guest_rss: u64,
    maps: Vec<Mapping>,
    guest_maps: Vec<Mapping>,
}

impl MemRun {
    fn overhead(&self) -> u64 {
        self.total_rss - self.guest_rss
    }

    /// The part of the overhead that is this process's own (anonymous: heap, stacks, relocated
    /// data), as opposed to file pages (executable, libraries) shared with every process that
    /// maps the same file.
    fn anonymous_overhead(&self) -> u64 {
        let guest: u64 = self.guest_maps.iter().map(|m| m.anonymous).sum();
        self.maps.iter().map(|m| m.anonymous).sum::<u64>() - guest
    }
}

fn memory_once(setup: &Setup, vmm: Vmm, mem: u64) -> Result<MemRun> {
    let cmd = setup.command_with(vmm, &setup.idle_guest, mem, "", setup.devices.as_ref());
    let mut run = Run::spawn(cmd, vmm, Duration::from_secs(60))?;
    let mut buf = [0u8; 256];
    while !run.text.windows(6).any(|w| w == b"ready\n") {
        if run.read_some(&mut buf)? == 0 {
            let output = run.output();
            let status = run.finish()?;
            return Err(format!(
                "{}: idle guest ended before `ready` ({status}); output: {output:?}",
                vmm.name()
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let smaps_path = format!("/proc/{}/smaps", run.child.id());
    let smaps = std::fs::read_to_string(&smaps_path).map_err(|e| format!("{smaps_path}: {e}"))?;
    let maps = parse_smaps(&smaps)?;

    let pid = libc::pid_t::try_from(run.child.id()).map_err(|e| format!("pid: {e}"))?;
    // SAFETY: kill(2) has no memory effects; the child is alive and not reaped (we hold it).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!("kill: {}", std::io::Error::last_os_error()));
    }
    let status = run.finish()?;
    let stopped = match vmm {
        Vmm::Raw => {
            use std::os::unix::process::ExitStatusExt;
            status.signal() == Some(libc::SIGTERM)
        }
        Vmm::Manifold => status.code() == Some(MANIFOLD_SIGTERM_STATUS),
    };
    if !stopped {
        return Err(format!(
            "{} did not stop as expected on SIGTERM: {status}",
            vmm.name()
        ));
    }

    let ranges = ram_ranges(vmm, mem);
    let smallest = ranges.iter().copied().min().unwrap_or(mem);
    let guest_maps: Vec<Mapping> = maps
        .iter()
        .filter(|m| is_guest_ram(m, smallest))
        .cloned()
        .collect();
    let guest_size: u64 = guest_maps.iter().map(|m| m.size).sum();
    if guest_size != mem {
        return Err(format!(
            "{}: guest RAM mappings found ({:?}) add up to {guest_size} bytes, not {mem}",
            vmm.name(),
            guest_maps.iter().map(|m| &m.range).collect::<Vec<_>>()
        ));
    }
    Ok(MemRun {
        total_rss: maps.iter().map(|m| m.rss).sum(),
        guest_rss: guest_maps.iter().map(|m| m.rss).sum(),
        maps,
        guest_maps,
    })
}

struct MemResults {
    mem: u64,
    /// Manifold had a disk, a NIC, rng and console.
    devices: bool,
    overhead_mib: [Vec<f64>; 2],
    total_mib: [Vec<f64>; 2],
    anon_mib: [Vec<f64>; 2],
    guest_mib: [Vec<f64>; 2],
    /// The last run of each, for the breakdown.
    last: [Option<MemRun>; 2],
}

#[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn size_name(mem: u64) -> String {
    if mem % GIB == 0 {
        format!("{} GiB", mem / GIB)
    } else {
        format!("{} MiB", mem / MIB)
    }
}

fn bench_memory(setup: &Setup, mem: u64) -> Result<MemResults> {
    let mut r = MemResults {
        mem,
        devices: setup.devices.is_some(),
        overhead_mib: [Vec::new(), Vec::new()],
        total_mib: [Vec::new(), Vec::new()],
        anon_mib: [Vec::new(), Vec::new()],
        guest_mib: [Vec::new(), Vec::new()],
        last: [None, None],
    };
    for round in 0..setup.rounds {
        let mut line = format!(
            "memory {}{} round {}/{}:",
            size_name(mem),
            if setup.devices.is_some() {
                " with devices"
            } else {
                ""
            },
            round + 1,
            setup.rounds
        );
        for vmm in order(round) {
            let m = memory_once(setup, vmm, mem)?;
            let _ = write!(
                line,
                "  {} rss {:.2} MiB, guest {:.2} MiB, overhead {:.2} MiB;",
                vmm.name(),
                mib(m.total_rss),
                mib(m.guest_rss),
                mib(m.overhead())
            );
            r.overhead_mib[slot(vmm)].push(mib(m.overhead()));
            r.total_mib[slot(vmm)].push(mib(m.total_rss));
            r.anon_mib[slot(vmm)].push(mib(m.anonymous_overhead()));
            r.guest_mib[slot(vmm)].push(mib(m.guest_rss));
            r.last[slot(vmm)] = Some(m);
        }
        println!("{line}");
    }
    Ok(r)
}

// ---- report ------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    };
    Stats {
        min: s.first().copied().unwrap_or(f64::NAN),
        median,
        max: s.last().copied().unwrap_or(f64::NAN),
    }
}

fn fmt_stats(s: Stats, prec: usize) -> String {
    format!("{:.p$} / {:.p$} / {:.p$}", s.min, s.median, s.max, p = prec)
}

struct Row {
    metric: String,
    raw: String,
    manifold: String,
    ratio: String,
    goal: String,
    met: String,
}

fn ratio_row(metric: &str, raw: &[f64], manifold: &[f64], prec: usize, goal: f64) -> Row {
    let (r, m) = (stats(raw), stats(manifold));
    let ratio = m.median / r.median;
    Row {
        metric: metric.into(),
        raw: fmt_stats(r, prec),
        manifold: fmt_stats(m, prec),
        ratio: format!("{ratio:.3}x"),
        goal: format!("<= {goal}x raw"),
        met: yes_no(ratio <= goal),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.into()
}

fn memory_rows(m: &MemResults) -> [Row; 3] {
    let mut name = size_name(m.mem);
    if m.devices {
        name.push_str(" + disk, net, rng, console");
    }
    let (r, f) = (stats(&m.overhead_mib[0]), stats(&m.overhead_mib[1]));
    let (ra, fa) = (stats(&m.anon_mib[0]), stats(&m.anon_mib[1]));
    let (rt, ft) = (stats(&m.total_mib[0]), stats(&m.total_mib[1]));
    [
        Row {
            metric: format!("memory overhead, {name} guest (MiB)"),
            raw: fmt_stats(r, 2),
            manifold: fmt_stats(f, 2),
            ratio: format!("{:.2}x", f.median / r.median),
            goal: format!("<= {GOAL_MEMORY_MIB} MiB"),
            met: yes_no(f.median <= GOAL_MEMORY_MIB),
        },
        Row {
            metric: format!("  of which anonymous, {name} (MiB)"),
            raw: fmt_stats(ra, 2),
            manifold: fmt_stats(fa, 2),
            ratio: format!("{:.2}x", fa.median / ra.median),
            goal: "-".into(),
            met: "-".into(),
        },
        Row {
            metric: format!("total Rss, {name} guest (MiB)"),
            raw: fmt_stats(rt, 2),
            manifold: fmt_stats(ft, 2),
            ratio: format!("{:.2}x", ft.median / rt.median),
            goal: "-".into(),
            met: "-".into(),
        },
    ]
}

fn print_table(
    pio: &PioResults,
    mem128: &MemResults,
    mem2g: &MemResults,
    mem_dev: Option<&MemResults>,
) {
    let mut rows = vec![
        Row {
            metric: "metric".into(),
            raw: "raw min / median / max".into(),
            manifold: "manifold min / median / max".into(),
            ratio: "ratio".into(),
            goal: "goal".into(),
            met: "met".into(),
        },
        ratio_row(
            "exit round trip (ns/exit)",
            &pio.per_exit_ns[0],
            &pio.per_exit_ns[1],
            0,
            GOAL_EXIT_RATIO,
        ),
        ratio_row(
            "start-up to first output (ms)",
            &pio.startup_ms[0],
            &pio.startup_ms[1],
            2,
            GOAL_START_RATIO,
        ),
    ];
    rows.extend(memory_rows(mem128));
    rows.extend(memory_rows(mem2g));
    if let Some(m) = mem_dev {
        rows.extend(memory_rows(m));
    }
    let w = |f: fn(&Row) -> &String| rows.iter().map(|r| f(r).len()).max().unwrap_or(0);
    let widths = [
        w(|r| &r.metric),
        w(|r| &r.raw),
        w(|r| &r.manifold),
        w(|r| &r.ratio),
        w(|r| &r.goal),
        w(|r| &r.met),
    ];
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:<a$} | {:>b$} | {:>c$} | {:>d$} | {:<e$} | {}",
            r.metric,
            r.raw,
            r.manifold,
            r.ratio,
            r.goal,
            r.met,
            a = widths[0],
            b = widths[1],
            c = widths[2],
            d = widths[3],
            e = widths[4],
        );
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
            println!("{}", "-".repeat(total));
        }
    }
    let guest = |m: &MemResults, i: usize| stats(&m.guest_mib[i]).median;
    println!(
        "(guest RAM Rss subtracted, medians: 128 MiB raw {:.2} / manifold {:.2} MiB; 2 GiB raw \
         {:.2} / manifold {:.2} MiB)",
        guest(mem128, 0),
        guest(mem128, 1),
        guest(mem2g, 0),
        guest(mem2g, 1)
    );
    // The two runs of a round share the machine's state of the moment; their ratio is a second
    // view of the same figure that drift between rounds does not move.
    for (name, v) in [
        ("exit round trip", &pio.per_exit_ns),
        ("start-up", &pio.startup_ms),
    ] {
        let ratios: Vec<f64> = v[1].iter().zip(&v[0]).map(|(m, r)| m / r).collect();
        let s = stats(&ratios);
        println!(
            "({name}: manifold/raw within each round, min / median / max: {:.3}x / {:.3}x / \
             {:.3}x)",
            s.min, s.median, s.max
        );
    }
}

/// Where each VMM's own Rss is: its mappings in the last run, guest RAM left out, grouped by file
/// (the VMM's own executable shown as `[executable]`) or as anonymous memory by permissions.
fn print_breakdown(m: &MemResults, setup: &Setup) {
    let (Some(raw), Some(manifold)) = (&m.last[0], &m.last[1]) else {
        return;
    };
    // name -> [raw Rss, manifold Rss, manifold Anonymous]. File-backed Rss is page cache that
    // other processes mapping the same file share; Anonymous is this process's own.
    let mut groups: Vec<(String, [u64; 3])> = Vec::new();
    for (run, exe, col) in [(raw, &setup.raw, 0), (manifold, &setup.manifold, 1)] {
        for map in &run.maps {
            if run.guest_maps.iter().any(|g| g.range == map.range) || map.rss == 0 {
                continue;
            }
            let name = if map.path.is_empty() {
                format!("[anon {}]", map.perms)
            } else if Path::new(&map.path) == exe.as_path() {
                "[executable]".to_owned()
            } else {
                map.path.clone()
            };
            let idx = match groups.iter().position(|g| g.0 == name) {
                Some(i) => i,
                None => {
                    groups.push((name, [0; 3]));
                    groups.len() - 1
                }
            };
            groups[idx].1[col] += map.rss;
            if col == 1 {
                groups[idx].1[2] += map.anonymous;
            }
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1[1].max(g.1[0])));
    let kib = |b: u64| b / 1024;
    println!(
        "Rss by mapping, {} guest, last run of each, guest RAM excluded (KiB):",
        size_name(m.mem)
    );
    println!(
        "  {:>8} {:>9} {:>14}  mapping",
        "raw", "manifold", "manifold anon"
    );
    let mut total = [0u64; 3];
    for (name, v) in &groups {
        println!(
            "  {:>8} {:>9} {:>14}  {name}",
            kib(v[0]),
            kib(v[1]),
            kib(v[2])
        );
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
    }
    println!(
        "  {:>8} {:>9} {:>14}  total",
        kib(total[0]),
        kib(total[1]),
        kib(total[2])
    );
}
