//! Firmware and platform tables on KVM with the real `manifold` binary: unmodified SeaBIOS
//! (through fw_cfg, and booting a virtio-blk disk) and the ACPI tables guests power off
//! through. Needs /dev/kvm.

mod common;

use common::{Running, TempFile, guest_path as path, manifold, run};

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
