//! The real binary's command line: exit statuses and error lines. None of these starts a VM, so
//! none needs /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn manifold(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_manifold"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("manifold runs")
}

/// Exit status 2, nothing on stdout, one `manifold: error:` line on stderr that contains `needle`.
fn assert_bad_input(args: &[&str], needle: &str) {
    let out = manifold(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: stdout not empty");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
    assert!(
        lines[0].starts_with("manifold: error: "),
        "{args:?}: {stderr}"
    );
    assert!(lines[0].contains(needle), "{args:?}: {stderr}");
}

/// A scratch directory of its own for each test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("manifold-cli-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write scratch file");
        path_str(&path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

#[test]
fn unknown_flag() {
    assert_bad_input(&["run", "--bogus"], "unexpected argument '--bogus' found");
    assert_bad_input(&["run", "--kernal", "x"], "'--kernel'");
    assert_bad_input(&["bogus"], "unrecognized subcommand 'bogus'");
}

#[test]
fn cpus_out_of_range() {
    let s = Scratch::new("cpus");
    let kernel = s.file("vmlinux", "");
    assert_bad_input(
        &["run", "--kernel", &kernel, "--cpus", "boot=0"],
        "--cpus: Invalid boot=0",
    );
    assert_bad_input(
        &["run", "--kernel", &kernel, "--cpus", "boot=300"],
        "--cpus: Invalid boot=300",
    );
    assert_bad_input(
        &["run", "--kernel", &kernel, "--cpus", "boot=1,max=2"],
        "--cpus: Unknown key `max`",
    );
}

#[test]
fn memory_size() {
    let s = Scratch::new("memory");
    let kernel = s.file("vmlinux", "");
    assert_bad_input(
        &["run", "--kernel", &kernel, "--memory", "size=1K"],
        "below the 16 MiB needed to boot",
    );
    assert_bad_input(
        &["run", "--kernel", &kernel, "--memory", "size=12Q"],
        "Unknown size suffix `Q`",
    );
    assert_bad_input(
        &["run", "--kernel", &kernel, "--memory", "size=2048G"],
        "above the 1 TiB maximum",
    );
}

#[test]
fn serial_mode() {
    let s = Scratch::new("serial");
    let kernel = s.file("vmlinux", "");
    assert_bad_input(
        &["run", "--kernel", &kernel, "--serial", "bogus"],
        "--serial: Expected one of tty, off or file=PATH, got `bogus`",
    );
}

#[test]
fn kernel_missing() {
    assert_bad_input(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "Cannot read kernel /nonexistent/vmlinux",
    );
    assert_bad_input(&["run"], "No kernel or firmware given");
    assert_bad_input(&["run", "--kernel", "/"], "is not a regular file");
    let s = Scratch::new("initramfs");
    let kernel = s.file("vmlinux", "");
    assert_bad_input(
        &[
            "run",
            "--kernel",
            &kernel,
            "--initramfs",
            "/nonexistent/initrd",
        ],
        "Cannot read initramfs /nonexistent/initrd",
    );
}

#[test]
fn config_unreadable() {
    assert_bad_input(
        &["run", "--config", "/nonexistent/vm.toml"],
        "Cannot read config file /nonexistent/vm.toml",
    );
    let s = Scratch::new("unreadable");
    assert_bad_input(
        &["run", "--config", &path_str(&s.0)],
        "Cannot read config file",
    );
}

#[test]
fn config_unknown_key() {
    let s = Scratch::new("unknown");
    let kernel = s.file("vmlinux", "");
    let toml = s.file(
        "vm.toml",
        &format!("[payload]\nkernel = \"{kernel}\"\nimage = \"x\"\n"),
    );
    assert_bad_input(
        &["run", "--config", &toml],
        "line 3, column 1: unknown field `image`",
    );
    let json = s.file("vm.json", r#"{"cpus": {"boot": 1, "max": 2}}"#);
    assert_bad_input(&["run", "--config", &json], "unknown field `max`");
    let bad = s.file("bad.toml", "[cpus]\nboot = 0\n");
    assert_bad_input(&["run", "--config", &bad], "cpus.boot: 0 vCPUs requested");
}

#[test]
fn config_and_flags_merge() {
    let s = Scratch::new("merge");
    let kernel = s.file("vmlinux", "");
    let config = s.file(
        "vm.toml",
        &format!(
            "serial = \"off\"\n[payload]\nkernel = \"{kernel}\"\ncmdline = \"console=ttyS0\"\n\
             [cpus]\nboot = 4\n[memory]\nsize = \"1G\"\n"
        ),
    );
    let out = manifold(&["run", "--config", &config, "--cpus", "boot=2", "--dry-run"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let want = serde_json::json!({
        "payload": {
            "kernel": kernel, "initramfs": null, "cmdline": "console=ttyS0", "firmware": null
        },
        "cpus": {"boot": 2},
        "memory": {"size": 1u64 << 30},
        "serial": "off",
        "on_reboot": "exit",
    });
    assert_eq!(got, want);
}

#[test]
fn version_and_help() {
    let out = manifold(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("manifold {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert!(out.stderr.is_empty());

    let out = manifold(&["help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));

    let out = manifold(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--firmware",
        "--cpus",
        "--memory",
        "--serial",
        "--on-reboot",
        "--config",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }

    // Nothing asked: help on stderr, and a usage error's status.
    let out = manifold(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage:"));
}

#[test]
fn firmware_bad_input() {
    assert_bad_input(
        &["run", "--firmware", "/nonexistent/bios.bin"],
        "Cannot read firmware /nonexistent/bios.bin",
    );
    assert_bad_input(&["run", "--firmware", "/"], "is not a regular file");
    let s = Scratch::new("firmware");
    // Found only when the image is read, still before any VM exists.
    let odd = s.file("odd.bin", &"x".repeat(1000));
    assert_bad_input(
        &["run", "--firmware", &odd],
        "is 1000 bytes: it must be a non-zero multiple of 64 KiB, at most 16 MiB",
    );
    let empty = s.file("empty.bin", "");
    assert_bad_input(&["run", "--firmware", &empty], "is 0 bytes");
    let kernel = s.file("vmlinux", "");
    assert_bad_input(
        &["run", "--firmware", &empty, "--kernel", &kernel],
        "A kernel and a firmware were both given",
    );
    assert_bad_input(
        &["run", "--firmware", &empty, "--cmdline", "quiet"],
        "payload.cmdline needs a kernel",
    );
}

#[test]
fn disk_bad_input() {
    let s = Scratch::new("disk");
    let kernel = s.file("vmlinux", "");
    let img = s.file("disk.img", "");
    let run = |disk: &str, needle: &str| {
        assert_bad_input(&["run", "--kernel", &kernel, "--disk", disk], needle);
    };
    run(
        "path=/nonexistent/disk.img",
        "Cannot read disk image /nonexistent/disk.img",
    );
    run("path=/", "The disk image / is not a regular file");
    run("readonly=on", "--disk: `path` is required (path=...)");
    run("path=", "--disk: Invalid path=");
    run(
        &format!("path={img},readonly=yes"),
        "--disk: Invalid readonly=yes: Expected on or off",
    );
    run(&format!("path={img},ro"), "--disk: Unknown key `ro`");
    run(
        &format!("path={img},serial=123456789012345678901"),
        "A disk serial is 21 bytes long; at most 20 fit",
    );
    // Repeatable, and shown by --dry-run.
    let out = manifold(&[
        "run",
        "--kernel",
        &kernel,
        "--disk",
        &format!("path={img},serial=a"),
        "--disk",
        &format!("path={img},readonly=on,direct=on"),
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let disks = json["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["serial"], "a");
    assert_eq!(disks[1]["readonly"], true);
    assert_eq!(disks[1]["direct"], true);
}

#[test]
fn rng_and_console_bad_input() {
    let s = Scratch::new("rng-console");
    let kernel = s.file("vmlinux", "");
    let run = |flag: &str, value: &str, needle: &str| {
        assert_bad_input(&["run", "--kernel", &kernel, flag, value], needle);
    };
    run("--rng", "src=", "--rng: Invalid src=: Empty path");
    run(
        "--rng",
        "file=/x",
        "--rng: Unknown key `file` (expected src, iommu)",
    );
    run("--rng", "iommu=maybe", "--rng: Invalid iommu=maybe");
    // iommu=on without --iommu is refused, not an implicit IOMMU.
    run("--rng", "iommu=on", "iommu=on needs the virtio-iommu");
    run(
        "--console",
        "tty,iommu=on",
        "iommu=on needs the virtio-iommu",
    );
    run(
        "--console",
        "off,iommu=on",
        "--console: Expected one of off, tty or file=PATH, got `off,iommu=on`",
    );
    // Found when the backends are opened, still before any VM exists.
    run(
        "--rng",
        "src=/nonexistent/random",
        "Cannot open random source /nonexistent/random: No such file or directory",
    );
    run("--rng", "src=/", "Random source / is a directory");
    run(
        "--console",
        "pty",
        "--console: Expected one of off, tty or file=PATH, got `pty`",
    );
    run("--console", "file=", "--console: Invalid file=: Empty path");
    run(
        "--console",
        "file=/nonexistent/hvc0.log",
        "Cannot open console output /nonexistent/hvc0.log",
    );
}

#[test]
fn net_bad_input() {
    let s = Scratch::new("net");
    let kernel = s.file("vmlinux", "");
    let run = |value: &str, needle: &str| {
        assert_bad_input(&["run", "--kernel", &kernel, "--net", value], needle);
    };
    run(
        "mac=52:54:00:00:00:01",
        "--net: `tap` is required (tap=...)",
    );
    run("tap=", "--net: Invalid tap=: Tap name \"\" is empty");
    run(
        "tap=sixteen-bytes-xx",
        "Tap name \"sixteen-bytes-xx\" is empty, longer than 15 bytes",
    );
    run(
        "tap=t0,mac=52:54:00:00:00",
        "--net: Invalid mac=52:54:00:00:00: Expected six hex bytes",
    );
    run(
        "tap=t0,mac=01:00:5e:00:00:01",
        "A multicast address cannot be a NIC's address",
    );
    run("tap=t0,ip=10.0.0.1", "--net: Unknown key `ip`");
    // An interface that exists and is not a tap (without the rights to /dev/net/tun the
    // error is about that instead; either way the tap cannot be opened).
    run("tap=lo", "Cannot open the tap of NIC 0: ");
}

#[test]
fn vsock_bad_input() {
    let s = Scratch::new("vsock");
    let kernel = s.file("vmlinux", "");
    let run = |value: &str, needle: &str| {
        assert_bad_input(&["run", "--kernel", &kernel, "--vsock", value], needle);
    };
    run(
        "cid=2,socket=/tmp/v.sock",
        "--vsock: Invalid cid=2: Guest CID 2 is reserved or out of range (3 to 4294967294)",
    );
    run(
        "cid=4294967295,socket=/tmp/v.sock",
        "Invalid cid=4294967295",
    );
    run(
        "cid=three,socket=/tmp/v.sock",
        "Invalid cid=three: Expected a whole number",
    );
    run("cid=3", "--vsock: `socket` is required (socket=...)");
    run("socket=/tmp/v.sock", "--vsock: `cid` is required (cid=...)");
    run(
        &format!("cid=3,socket=/{}", "s".repeat(120)),
        "A socket path is 121 bytes long; at most 107 fit",
    );
    // A directory that does not exist: the socket cannot be created.
    run(
        "cid=3,socket=/nonexistent/v.sock",
        "Cannot set up virtio-vsock: Cannot listen on /nonexistent/v.sock",
    );
    // Something that is not a socket is never replaced.
    let file = s.file("not-a-socket", "");
    run(
        &format!("cid=3,socket={file}"),
        "exists and is not a socket",
    );
    assert!(Path::new(&file).exists());
}

#[test]
fn device_options_in_dry_run() {
    let s = Scratch::new("devices-dry-run");
    let kernel = s.file("vmlinux", "");
    let sock = s.0.join("v.sock");
    let sock = path_str(&sock);
    let out = manifold(&[
        "run",
        "--kernel",
        &kernel,
        "--net",
        "tap=tap0,mac=52:54:00:AB:CD:01",
        "--net",
        "tap=tap1",
        "--rng",
        "--console",
        "tty",
        "--vsock",
        &format!("cid=42,socket={sock}"),
        "--dry-run",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json["nets"],
        serde_json::json!([{"tap": "tap0", "mac": "52:54:00:ab:cd:01"}, {"tap": "tap1"}])
    );
    assert_eq!(json["rng"], serde_json::json!({}));
    assert_eq!(json["console"], "tty");
    assert_eq!(
        json["vsock"],
        serde_json::json!({"cid": 42, "socket": sock})
    );
    // --dry-run opens no backend.
    assert!(!Path::new(&sock).exists());

    // The config file gives the same keys; flags override them.
    let config = s.file(
        "vm.toml",
        &format!(
            "console = {{ file = \"/tmp/hvc0.log\" }}\n[payload]\nkernel = \"{kernel}\"\n\
             [[nets]]\ntap = \"ftap\"\n[rng]\nsrc = \"/dev/urandom\"\n\
             [vsock]\ncid = 5\nsocket = \"{sock}\"\n"
        ),
    );
    let out = manifold(&[
        "run",
        "--config",
        &config,
        "--vsock",
        &format!("cid=6,socket={sock}"),
        "--dry-run",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["nets"], serde_json::json!([{"tap": "ftap"}]));
    assert_eq!(json["rng"]["src"], "/dev/urandom");
    assert_eq!(json["console"]["file"], "/tmp/hvc0.log");
    assert_eq!(json["vsock"]["cid"], 6);

    let out = manifold(&["run", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--net", "--rng", "--console", "--vsock"] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}
