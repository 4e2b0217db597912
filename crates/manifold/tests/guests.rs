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
    for (image, cpus, memory, high_ram) in [
        ("bios.bin", 1, "512M", None),
        (
            "bios-256k.bin",
            2,
            "4G",
            Some("addr 0x0000000100000000 len 0x0000000040000000"),
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
        ] {
            assert!(out.stderr.contains(needle), "{image}: {needle}: {out:?}");
        }
        if let Some(high) = high_ram {
            assert!(out.stderr.contains(high), "{image}: {out:?}");
        }
    }
}

/// The blk guest drives two virtio-blk functions through ECAM, BAR assignment, MSI-X and one
/// queue each: a pattern written to sector 5 of the first disk must be in the image file, the
/// second disk (readonly=on) must refuse a write, and no queue notification may reach
/// userspace through an MMIO exit (the ioeventfds followed the BARs the guest moved).
#[test]
fn virtio_blk_over_pci() {
    const SECTOR: u64 = 5;
    let rw = TempFile::new("blk-rw.img", &vec![0u8; 1 << 20]);
    let ro = TempFile::new("blk-ro.img", &vec![0xa5u8; 1 << 20]);
    let out = run(&[
        "run",
        "--kernel",
        &path("blk-pvh.elf"),
        "--cmdline",
        "blk-serial-0",
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
