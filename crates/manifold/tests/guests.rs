//! The real `manifold` binary booting the test guests of `tests/guests` on KVM, checked by what
//! the guests print on COM1 and by manifold's exit status. Needs /dev/kvm.

mod common;

use common::{Running, guest, manifold, run};

/// RAM the e820 map reports for `mem` bytes: everything but the 0x9FC00..0x100000 BIOS area.
fn e820_ram_kib(mem: u64) -> u64 {
    (mem - (0x10_0000 - 0x9_fc00)) / 1024
}

fn path(name: &str) -> String {
    guest(name).to_string_lossy().into_owned()
}

/// A scratch file removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("manifold-test-{}-{name}", std::process::id()));
        std::fs::write(&p, contents).expect("write temp file");
        Self(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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

/// Debian's SeaBIOS (package `seabios`, installed by scripts/setup), unmodified: from the reset
/// vector through fw_cfg (DMA, e820 map, vCPU counts, serial console) to its boot stage. There
/// is no disk yet, so it ends waiting with "No bootable device" until stopped.
#[test]
fn seabios_boots_through_fw_cfg_to_its_boot_stage() {
    // Both images Debian builds for QEMU: 128 KiB, and 256 KiB (QEMU's default), whose init code
    // lies below 0xE0000 and so needs the whole image copied below 1 MiB.
    for (image, cpus, memory, extra) in [
        ("bios.bin", 1, "512M", &[][..]),
        (
            "bios-256k.bin",
            2,
            "4G",
            &[
                // RAM above 4 GiB, from etc/e820.
                "qemu/e820: addr 0x0000000100000000 len 0x0000000040000000 [RAM]",
                // Only this build looks tables up: through the RSDP it placed (checksum
                // checked) and the XSDT it linked, it found the FADT ("FACP").
                "firmware: table(50434146)=",
            ][..],
        ),
    ] {
        let firmware = format!("/usr/share/seabios/{image}");
        let mut cmd = manifold();
        cmd.args([
            "run",
            "--firmware",
            &firmware,
            "--cpus",
            &format!("boot={cpus}"),
            "--memory",
            &format!("size={memory}"),
            "--serial",
            "tty",
            // Maps the debug console, where SeaBIOS writes its log.
            "--log-level",
            "debug",
        ]);
        let mut vm = Running::start(&mut cmd);
        // sercon draws SeaBIOS's screen on COM1.
        vm.wait_for("SeaBIOS (version ");
        vm.wait_for("Booting from ");
        vm.wait_for("No bootable device");
        vm.signal(libc::SIGTERM);
        let out = vm.finish();
        assert_eq!(out.code(), 143, "{image}: {out:?}");
        for needle in [
            "firmware: Found QEMU fw_cfg",
            "firmware: QEMU fw_cfg DMA interface supported",
            "firmware: sercon: using ioport 0x3f8",
            &format!("firmware: Found {cpus} cpu(s) max supported {cpus} cpu(s)"),
            // SeaBIOS found etc/table-loader (our ACPI tables) ...
            "firmware: Moving pm_base to 0x600",
        ]
        .iter()
        .chain(extra)
        {
            assert!(out.stderr.contains(needle), "{image}: {needle}: {out:?}");
        }
        // ... and ran it: a script it could not run, or no RSDP after it, is an internal error.
        assert!(!out.stderr.contains("internal error"), "{image}: {out:?}");
    }
}

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
        for line in [
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
        ] {
            assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
        }
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

/// A boot sector that prints "boot sector ok" on COM1 and writes 0x21 to the debug-exit port:
/// `cli; xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,msg; 1: lodsb; test al,al; jz 2f;
/// out dx,al; jmp 1b; 2: mov al,0x21; out 0xf4,al; hlt`, the message, the 0x55AA signature.
fn boot_sector() -> Vec<u8> {
    let mut s = vec![
        0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0xba, 0xf8, 0x03, 0xbe, 0x18, 0x7c, 0xac, 0x84, 0xc0, 0x74,
        0x03, 0xee, 0xeb, 0xf8, 0xb0, 0x21, 0xe6, 0xf4, 0xf4,
    ];
    s.extend_from_slice(b"boot sector ok\r\n\0");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xaa]);
    s
}

/// Unmodified SeaBIOS, a client of the PCI and virtio-blk code that nobody here wrote: it
/// enumerates PCI, assigns BAR 0 itself, drives the disk through the modern transport and boots
/// its first sector, whose message must appear on COM1.
#[test]
fn seabios_boots_a_virtio_blk_disk() {
    let mut image = boot_sector();
    image.resize(1 << 20, 0);
    let disk = TempFile::new("seabios-boot.img", &image);
    for (firmware, memory) in [("bios.bin", "128M"), ("bios-256k.bin", "4G")] {
        let out = run(&[
            "run",
            "--firmware",
            &format!("/usr/share/seabios/{firmware}"),
            "--memory",
            &format!("size={memory}"),
            "--disk",
            &format!("path={}", disk.path()),
            "--serial",
            "tty",
            "--log-level",
            "debug",
        ]);
        assert_eq!(out.code(), (0x21 << 1) | 1, "{firmware}: {out:?}");
        assert!(out.stdout.contains("boot sector ok"), "{firmware}: {out:?}");
        for needle in [
            "firmware: found virtio-blk at 00:01.0",
            "firmware: pci dev 00:01.0 using modern (1.0) virtio mode",
        ] {
            assert!(out.stderr.contains(needle), "{firmware}: {needle}: {out:?}");
        }
    }
}

/// Every queue kick of a run was caught by an ioeventfd (needs `--log-level debug`).
fn assert_kicks_stayed_in_the_kernel(out: &common::Output) {
    assert!(
        !out.stderr.contains("queue notify through an MMIO exit"),
        "a kick left the guest: {out:?}"
    );
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
    for line in [
        "bad chain, beyond RAM: 0 bytes: ok",
        "bad chain, on a BAR: 0 bytes: ok",
        "bad chain, loop: 0 bytes: ok",
        "bad chain, readable only: 0 bytes: ok",
        "bad chain, next out of range: 0 bytes: ok",
        "bad chain, second buffer beyond RAM: 16 bytes: ok",
        "after the bad chains: 64 bytes: ok",
        "rng ok",
    ] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
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
    for line in [
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
    ] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
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
    let mut image = b"multi-disk-0".to_vec();
    image.resize(1 << 20, 0);
    let disk = TempFile::new("multi.img", &image);
    let console = TempFile::new("multi-console.out", b"");
    let dir = TempDir::new("multi");
    let out = run(&[
        "run",
        "--kernel",
        &path("multi-pvh.elf"),
        "--cmdline",
        "multi-disk-0",
        "--memory",
        "size=64M",
        "--disk",
        &format!("path={}", disk.path()),
        "--rng",
        "--console",
        &format!("file={}", console.path()),
        "--vsock",
        &format!("cid=7,socket={}", dir.join("vsock.sock")),
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    for line in [
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
    ] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
    assert_kicks_stayed_in_the_kernel(&out);
    let written = std::fs::read_to_string(console.path()).expect("read console file");
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

/// A scratch directory removed (with what is in it) on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("manifold-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).expect("create temp dir");
        Self(p)
    }
    fn join(&self, name: &str) -> String {
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

/// A network namespace of the test's own, deleted on drop (also when the test panics).
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Self {
        let name = format!("manifold-{tag}-{}", std::process::id());
        if std::path::Path::new("/run/netns").join(&name).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        Self(name)
    }

    /// Run `ip` inside the namespace.
    fn ip(&self, args: &[&str]) -> bool {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Run a thread that enters the namespace, call `f` there, return its result. What `f`
    /// creates there (sockets) stays in the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
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

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Frames the net tests send the guest.
const NET_REPLIES: u8 = 32;

/// The local-experimental ethertype the net guest sends and listens for.
const ETH_P_TEST: u16 = 0x88b5;

/// An AF_PACKET socket bound to `ifname` for frames of [`ETH_P_TEST`], made in the current
/// thread's network namespace.
fn packet_socket(ifname: &str) -> (std::os::fd::OwnedFd, i32) {
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
fn recv_frame(fd: &std::os::fd::OwnedFd) -> Option<Vec<u8>> {
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
/// the namespace (`ip netns exec`), so it opens the tap there. Needs root and /dev/net/tun.
#[test]
fn virtio_net_frames_both_ways_through_a_tap() {
    net_round_trip(true);
}

/// The same with a tap that does not exist yet: manifold creates it in its namespace; the test
/// brings it up while the guest waits, then tells the guest to go on.
#[test]
fn virtio_net_creates_its_tap_in_the_namespace() {
    net_round_trip(false);
}

/// Whether this host can run the tap tests; if not, they are skipped, except on CI.
fn can_make_taps() -> bool {
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

fn net_round_trip(precreate: bool) {
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
                "replies={NET_REPLIES}{}",
                if precreate { "" } else { " wait=1" }
            ),
            "--memory",
            "size=64M",
            "--net",
            &format!("tap={TAP},mac=52:54:00:12:34:56"),
            "--log-level",
            "debug",
        ]);
    let mut vm = Running::start(&mut cmd);
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
            started.elapsed() < common::HANG_LIMIT,
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
}

/// The acpi-off guest finds the RSDP both from the boot parameters and by scanning the BIOS area,
/// checksums every table, reads the MADT, MCFG and the DSDT's `\_S5_`, then powers off through
/// the FADT's sleep control register: manifold ends with status 0 on a shutdown, not a reset.
fn acpi_poweroff(guest_name: &str, cpus: u8) {
    let out = run(&[
        "run",
        "--kernel",
        &path(guest_name),
        "--cpus",
        &format!("boot={cpus}"),
        "--memory",
        "size=64M",
        "--log-level",
        "info",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    let ecam = format!(
        "acpi ecam: {:x} segment 0 buses 0-255",
        vmm::layout::PCI_ECAM_START
    );
    for line in [
        &format!("acpi: rsdp at {:x}", vmm::layout::ACPI_START),
        "acpi: XSDT FACP APIC MCFG DSDT",
        &format!("acpi cpus: {cpus}"),
        &format!(
            "acpi ioapic: id {} at {:x}",
            vmm::mptable::ioapic_id(cpus),
            vmm::layout::IOAPIC_ADDR
        ),
        &ecam,
        // Whatever SLP_TYP the DSDT gives: the guest powered off with it.
        "acpi s5: slp_typ ",
        "acpi: poweroff",
    ] {
        assert!(out.stdout.contains(line), "no {line:?}: {out:?}");
    }
    assert!(!out.stdout.contains("poweroff failed"), "{out:?}");
    assert!(out.stderr.contains("outcome=Shutdown"), "{out:?}");
}

#[test]
fn acpi_poweroff_pvh_rsdp_from_start_info() {
    acpi_poweroff("acpi-off-pvh.elf", 3);
}

#[test]
fn acpi_poweroff_elf64_rsdp_from_zero_page() {
    acpi_poweroff("acpi-off64.elf", 1);
}

/// `--iommu` with both disks behind it: a guest without an IOMMU driver still reaches them (the
/// virtio-iommu's `bypass` bit is set at reset, so unattached endpoints are identity-mapped),
/// the IOMMU takes a PCI function of its own and each disk is registered as an endpoint.
#[test]
fn virtio_blk_behind_the_iommu_in_bypass() {
    const SECTOR: u64 = 5;
    let rw = TempFile::new("iommu-rw.img", &vec![0u8; 1 << 20]);
    let ro = TempFile::new("iommu-ro.img", &vec![0xa5u8; 1 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("blk-pvh.elf"),
        "--cmdline",
        "blk-serial-0",
        "--memory",
        "size=64M",
        "--iommu",
        "--disk",
        &format!("path={},serial=blk-serial-0,iommu=on", rw.path()),
        "--disk",
        &format!("path={},readonly=on,iommu=on", ro.path()),
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    for line in ["virtio-blk functions: 2", "compare: ok", "blk passed"] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
    assert!(out.stderr.contains("virtio-iommu"), "{out:?}");
    assert_eq!(
        out.stderr.matches("behind the virtio-iommu").count(),
        2,
        "{out:?}"
    );
    let image = std::fs::read(rw.path()).expect("read image");
    let at = (SECTOR * 512) as usize;
    let expect: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(&image[at..at + 512], &expect[..]);
    let untouched = std::fs::read(ro.path()).expect("read image");
    assert!(untouched.iter().all(|&b| b == 0xa5));
}

/// The iommu guest programs the virtio-iommu as Linux does (VIOT, config, PROBE, ATTACH, MAP)
/// and drives two disks with rings and buffers at IOVAs of their own domains: the pattern
/// written through IOVAs is in image A; an unmapped buffer, a read-only mapping and disk B
/// pointed at disk A's buffer IOVA are refused with IOERR and a fault event each, and nothing
/// reaches image B.
#[test]
fn virtio_iommu_translates_and_isolates() {
    let a = TempFile::new("iommu-a.img", &vec![0u8; 1 << 20]);
    let b = TempFile::new("iommu-b.img", &vec![0u8; 1 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("iommu-pvh.elf"),
        "--memory",
        "size=64M",
        "--iommu",
        "--disk",
        &format!("path={},iommu=on", a.path()),
        "--disk",
        &format!("path={},iommu=on", b.path()),
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    for line in [
        "iommu: page_size_mask fffffffffffff000 input 0-ffffffffffff domains 0-4294967295 \
         probe_size 512",
        "iommu at 8, disks at 10 and 18",
        "viot: virtio-pci iommu at 8 (found)",
        "viot: endpoints 10-18 id 10 -> node 48",
        "probe: reserved subtype 1 fee00000-feefffff",
        "attach: ok",
        "map: ok",
        "write through iova: ok",
        "read through iova: ok",
        "unmap: ok",
        "read into unmapped refused: ok",
        "fault: reason 2 flags 102 endpoint 10 address 40801000",
        "read into read-only refused: ok",
        "fault: reason 2 flags 102 endpoint 10 address 40802000",
        "cross-domain write refused: ok",
        "fault: reason 2 flags 101 endpoint 18 address 40800000",
        "iommu passed",
    ] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
    assert!(!out.stdout.contains("FAILED"), "{out:?}");
    let image = std::fs::read(a.path()).expect("read image A");
    let at = 5 * 512;
    let expect: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
    assert_eq!(&image[at..at + 512], &expect[..]);
    assert!(image[..at].iter().all(|&b| b == 0));
    assert!(image[at + 512..].iter().all(|&b| b == 0));
    let untouched = std::fs::read(b.path()).expect("read image B");
    assert!(untouched.iter().all(|&b| b == 0), "disk B was written");
}

/// Every kind of device with `iommu=on` (blk, rng, console, vsock) behind one `--iommu`: a guest
/// without an IOMMU driver reaches them all through the bypass, and each is an endpoint.
#[test]
fn virtio_devices_side_by_side_behind_the_iommu() {
    let mut image = b"multi-disk-0".to_vec();
    image.resize(1 << 20, 0);
    let disk = TempFile::new("multi-iommu.img", &image);
    let console = TempFile::new("multi-iommu-console.out", b"");
    let dir = TempDir::new("multi-iommu");
    let out = run(&[
        "run",
        "--kernel",
        &path("multi-pvh.elf"),
        "--cmdline",
        "multi-disk-0",
        "--memory",
        "size=64M",
        "--iommu",
        "--disk",
        &format!("path={},iommu=on", disk.path()),
        "--rng",
        "iommu=on",
        "--console",
        &format!("file={},iommu=on", console.path()),
        "--vsock",
        &format!("cid=7,socket={},iommu=on", dir.join("vsock.sock")),
        "--log-level",
        "debug",
    ]);
    assert_eq!(out.code(), 1, "{out:?}");
    for line in [
        "blk sector 0 read: ok",
        "rng 16 bytes: ok",
        "console line sent: ok",
        "vsock cid 7",
        "multi ok",
    ] {
        assert!(out.stdout.contains(line), "missing `{line}`: {out:?}");
    }
    assert_eq!(
        out.stderr.matches("behind the virtio-iommu").count(),
        4,
        "{out:?}"
    );
    let written = std::fs::read_to_string(console.path()).expect("read console file");
    assert_eq!(written, "multi hvc0\n");
}
