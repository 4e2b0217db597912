//! Booting the test guests on KVM with the real `manifold` binary: PVH, bzImage and ELF64
//! entry, memory layout, SMP, CMOS, reset, signals, serial, config files and faults. Needs
//! /dev/kvm.

mod common;

use common::{Running, TempFile, guest_path as path, manifold, run};

/// RAM the e820 map reports for `mem` bytes: everything but the 0x9FC00..0x100000 BIOS area.
fn e820_ram_kib(mem: u64) -> u64 {
    (mem - (0x10_0000 - 0x9_fc00)) / 1024
}

#[test]
fn pvh_guest_prints_and_exits_through_debug_exit() {
    let out = run(&[
        "run",
        "--kernel",
        &path("hello-pvh.elf"),
        "--cmdline",
        "console=ttyS0 hello=pvh",
        "--memory",
        "size=128M",
    ]);
    assert_eq!(out.code(), 1, "debug-exit 0 gives (0 << 1) | 1: {out:?}");
    assert!(out.stdout.contains("Hello from Manifold (pvh)"), "{out:?}");
    assert!(
        out.stdout.contains("cmdline: console=ttyS0 hello=pvh"),
        "{out:?}"
    );
    let mem = format!("memory: {} KiB", e820_ram_kib(128 << 20));
    assert!(out.stdout.contains(&mem), "{out:?}");
}

/// A deterministic pseudo-random initramfs and the byte sum the guests print for it.
fn initramfs(len: usize) -> (Vec<u8>, u32) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let sum = data.iter().fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
    (data, sum)
}

#[test]
fn bzimage_boot_protocol_with_initramfs() {
    let (data, sum) = initramfs(300_001);
    let rd = TempFile::new("bz-initrd", &data);
    let out = run(&[
        "run",
        "--kernel",
        &path("hello.bzImage"),
        "--initramfs",
        rd.path(),
        "--cmdline",
        "console=ttyS0 boot=bzimage",
        "--memory",
        "size=64M",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stdout.contains("Hello from Manifold (bzimage)"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("cmdline: console=ttyS0 boot=bzimage"),
        "{out:?}"
    );
    let mem = format!("memory: {} KiB", e820_ram_kib(64 << 20));
    assert!(out.stdout.contains(&mem), "{out:?}");
    let rd_line = format!("initramfs: {} bytes, sum {sum}", data.len());
    assert!(out.stdout.contains(&rd_line), "{out:?}");
}

#[test]
fn pvh_initramfs_is_a_module() {
    let (data, sum) = initramfs(4097);
    let rd = TempFile::new("pvh-initrd", &data);
    let out = run(&[
        "run",
        "--kernel",
        &path("hello-pvh.elf"),
        "--initramfs",
        rd.path(),
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    let rd_line = format!("initramfs: {} bytes, sum {sum}", data.len());
    assert!(out.stdout.contains(&rd_line), "{out:?}");
}

#[test]
fn elf_without_pvh_note_enters_in_64_bit_mode() {
    let out = run(&[
        "run",
        "--kernel",
        &path("hello64.elf"),
        "--cmdline",
        "elf64",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stdout.contains("Hello from Manifold (elf64)"),
        "{out:?}"
    );
    assert!(out.stdout.contains("cmdline: elf64"), "{out:?}");
}

#[test]
fn memory_above_the_32_bit_hole() {
    let out = run(&[
        "run",
        "--kernel",
        &path("hello-pvh.elf"),
        "--memory",
        "size=5G",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    let mem = format!("memory: {} KiB", e820_ram_kib(5 << 30));
    assert!(out.stdout.contains(&mem), "{out:?}");
}

fn smp(n: u8) {
    let out = run(&[
        "run",
        "--kernel",
        &path("smp-pvh.elf"),
        "--cpus",
        &format!("boot={n}"),
        "--memory",
        "size=32M",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains(&format!("cpus: {n}")), "{out:?}");
    for id in 1..n {
        assert_eq!(
            out.stdout.matches(&format!("AP {id} online")).count(),
            1,
            "AP {id}: {out:?}"
        );
    }
    assert!(
        out.stdout.contains(&format!("all {n} cpus online")),
        "{out:?}"
    );
}

#[test]
fn smp_one_cpu() {
    smp(1);
}

#[test]
fn smp_application_processors_wake_on_init_sipi() {
    smp(2);
    smp(4);
}

#[test]
fn smp_eight_cpus() {
    smp(8);
}

#[test]
fn i8042_reset_ends_manifold_with_status_0() {
    let out = run(&["run", "--kernel", &path("reset-pvh.elf")]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("resetting"), "{out:?}");
    assert!(!out.stdout.contains("reset failed"), "{out:?}");
}

#[test]
fn on_reboot_restart_boots_again_and_sigterm_stops_cleanly() {
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        &path("reset-pvh.elf"),
        "--on-reboot",
        "restart",
    ]);
    let mut vm = Running::start(&mut cmd);
    for _ in 0..3 {
        vm.wait_for("resetting");
    }
    vm.signal(libc::SIGTERM);
    let out = vm.finish();
    assert_eq!(out.code(), 128 + libc::SIGTERM, "{out:?}");
    assert!(out.stdout.matches("resetting").count() >= 3, "{out:?}");
}

#[test]
fn sigint_stops_an_idle_guest() {
    let mut cmd = manifold();
    cmd.args(["run", "--kernel", &path("idle-pvh.elf"), "--cpus", "boot=2"]);
    let mut vm = Running::start(&mut cmd);
    vm.wait_for("ready");
    vm.signal(libc::SIGINT);
    let out = vm.finish();
    assert_eq!(out.code(), 128 + libc::SIGINT, "{out:?}");
}

/// Parse `rtc: YYYY-MM-DD HH:MM:SS` into seconds since the epoch.
fn rtc_epoch(line: &str) -> i64 {
    let s = line.trim_start_matches("rtc: ").trim();
    let n: Vec<i64> = s
        .split(['-', ' ', ':'])
        .map(|p| p.parse().expect("rtc number"))
        .collect();
    let (y, m, d) = (n[0], n[1], n[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400 + n[3] * 3600 + n[4] * 60 + n[5]
}

fn cmos(mem: &str, above_16m: u64, above_4g: u64) {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let out = run(&[
        "run",
        "--kernel",
        &path("cmos-pvh.elf"),
        "--memory",
        &format!("size={mem}"),
    ]);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert_eq!(out.code(), 1, "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("rtc: "))
        .unwrap_or_else(|| panic!("no rtc line: {out:?}"));
    // The guest's clock is the host's: it reads a time within this run (whole seconds).
    let t = rtc_epoch(line);
    let (lo, hi) = (
        i64::try_from(before).expect("time fits i64"),
        i64::try_from(after).expect("time fits i64"),
    );
    assert!((lo..=hi + 1).contains(&t), "{line} not in {lo}..={hi}");
    assert!(out.stdout.contains("cmos ext mem: 65535 KiB"), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("cmos mem above 16M: {above_16m}\n")),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("cmos mem above 4G: {above_4g}")),
        "{out:?}"
    );
}

#[test]
fn cmos_clock_and_memory_size() {
    cmos("128M", (128 - 16) * 16, 0);
    // 3 GiB below the hole, 2 GiB above 4 GiB, in 64 KiB units.
    cmos("5G", (3 * 1024 - 16) * 16, 2 * 1024 * 16);
}

#[test]
fn serial_echo_with_interrupts() {
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        &path("echo-pvh.elf"),
        "--serial",
        "tty",
        "--log-level",
        "debug",
    ]);
    let mut vm = Running::start(&mut cmd);
    vm.wait_for("echo ready");
    vm.write(b"hello manifold\n");
    vm.wait_for("hello manifold");
    // Far more than the UART's 64-byte FIFO at once: flow control must lose nothing.
    let big: Vec<u8> = (0..2000u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i % 36) as usize])
        .collect();
    vm.write(&big);
    vm.write(b"\n\x04");
    let done = vm.wait_for("echo done");
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    let total = 15 + big.len() + 1 + 1;
    assert!(
        done.starts_with(&format!("echo done: {total} bytes, ")),
        "{done}"
    );
    let irqs: u64 = done
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(irqs > 0, "{done}");
    // Each interrupt returns with a 32-bit iret, which KVM's emulator hands back on these hosts
    // and Manifold completes; on hosts that run it natively no completion is logged.
    if out.stderr.contains("completed instructions") {
        assert!(out.stderr.contains("kind=\"iret\""), "{}", out.stderr);
    }
    assert!(
        out.stdout
            .contains(std::str::from_utf8(&big).expect("ascii")),
        "echoed bytes missing or reordered"
    );
}

#[test]
fn serial_to_a_file_and_off() {
    let log = TempFile::new("serial.log", b"");
    let out = run(&[
        "run",
        "--kernel",
        &path("hello-pvh.elf"),
        "--serial",
        &format!("file={}", log.path()),
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(!out.stdout.contains("Hello"), "{out:?}");
    let text = std::fs::read_to_string(&log.0).expect("serial log");
    assert!(text.contains("Hello from Manifold (pvh)"), "{text}");

    let out = run(&["run", "--kernel", &path("hello-pvh.elf"), "--serial", "off"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn config_file_with_flag_override() {
    let toml = format!(
        "[payload]\nkernel = \"{}\"\ncmdline = \"from-file\"\n[cpus]\nboot = 2\n[memory]\nsize = \"64M\"\n",
        path("smp-pvh.elf")
    );
    let cfg = TempFile::new("vm.toml", toml.as_bytes());
    let out = run(&["run", "--config", cfg.path(), "--cpus", "boot=3"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains("all 3 cpus online"), "{out:?}");
}

#[test]
fn kernel_in_an_unknown_format_is_bad_input() {
    let junk = TempFile::new("junk-kernel", &[0x5a; 8192]);
    let out = run(&["run", "--kernel", junk.path()]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(
        out.stderr.contains("neither an ELF nor a bzImage"),
        "{out:?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
}

#[test]
fn initramfs_larger_than_memory_is_bad_input() {
    let big = TempFile::new("big-initrd", &vec![0u8; 20 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("hello-pvh.elf"),
        "--initramfs",
        big.path(),
        "--memory",
        "size=16M",
    ]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("does not fit"), "{out:?}");
}

#[test]
fn triple_fault_ends_with_status_1_and_a_register_dump() {
    let out = run(&["run", "--kernel", &path("fault-pvh.elf")]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.contains("faulting"), "{out:?}");
    assert!(!out.stdout.contains("fault survived"), "{out:?}");
    let mut lines = out.stderr.lines();
    let headline = lines.next().unwrap_or_default();
    assert!(
        headline.starts_with("manifold: error: vCPU 0: triple fault"),
        "{out:?}"
    );
    // The guest put a marker in eax just before the faulting ud2 (0f 0b).
    assert!(out.stderr.contains("rax=0x00000000000fa017"), "{out:?}");
    assert!(out.stderr.contains("code at rip: 0f 0b"), "{out:?}");
    assert!(out.stderr.contains("cr0=0x"), "{out:?}");
}
