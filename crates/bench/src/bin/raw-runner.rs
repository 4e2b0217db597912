//! `raw-runner`: the baseline of the foundation benchmarks. Nothing between the guest and KVM.
//!
//! Boots a PVH ELF on one vCPU with one memory slot, no irqchip, no devices, no threads, and
//! answers port I/O inline in the `KVM_RUN` loop:
//!
//! | exit                        | answer                                                     |
//! |-----------------------------|------------------------------------------------------------|
//! | out 0x3F8                   | the byte to stdout (one `write`, unbuffered), unless DLAB  |
//! | out 0x3FB (LCR)             | keep DLAB (bit 7), so divisor writes are not taken as data |
//! | out to other COM1 registers | nothing                                                    |
//! | out 0x80                    | nothing                                                    |
//! | out 0xF4                    | exit with status `(v << 1) \| 1`, as manifold's debug exit |
//! | in 0x3FD (LSR)              | 0x60 (transmitter empty)                                   |
//! | any other in                | all-ones                                                   |
//! | hlt                         | wait for a signal (no irqchip, so nothing can wake it)     |
//! | anything else               | exit 99 with a message on stderr                           |
//!
//! Usage: `raw-runner KERNEL MEMORY_MIB [CMDLINE]`. Guest memory is at most 3 GiB (one slot below
//! the MMIO hole, where the VMX TSS lives).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::exit;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Where `hvm_start_info`, its memory map and the command line go (as manifold places them).
const START_INFO: u64 = 0x7000;
const MEMMAP: u64 = 0x6000;
const CMDLINE: u64 = 0x2_0000;
const HIMEM: u64 = 0x10_0000;
const TSS: usize = 0xfffb_d000;
const MAX_MEMORY: u64 = 3 << 30;

const COM1: u16 = 0x3f8;
const COM1_LCR: u16 = 0x3fb;
const COM1_LSR: u16 = 0x3fd;
/// LCR bit 7: 0x3F8 and 0x3F9 are the divisor latch, not data.
const LCR_DLAB: u8 = 0x80;
const LSR_THR_EMPTY: u8 = 0x60;
const POST: u16 = 0x80;
const DEBUG_EXIT: u16 = 0xf4;

fn die(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("raw-runner: {what}: {err}");
    exit(99)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 || args.len() > 4 {
        eprintln!("usage: raw-runner KERNEL MEMORY_MIB [CMDLINE]");
        exit(2);
    }
    let mem_size = args[2]
        .parse::<u64>()
        .ok()
        .and_then(|mib| mib.checked_mul(1 << 20))
        .filter(|s| (2 << 20..=MAX_MEMORY).contains(s))
        .unwrap_or_else(|| die("memory", "want MiB in 2..=3072"));
    let cmdline = args.get(3).map_or("", String::as_str);

    let kvm = Kvm::new().unwrap_or_else(|e| die("open /dev/kvm", e));
    let vm = kvm.create_vm().unwrap_or_else(|e| die("create VM", e));
    vm.set_tss_address(TSS)
        .unwrap_or_else(|e| die("TSS address", e));

    let len = usize::try_from(mem_size).unwrap_or_else(|e| die("memory", e));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
        .unwrap_or_else(|e| die("guest memory", e));
    let host = mem
        .get_host_address(GuestAddress(0))
        .unwrap_or_else(|e| die("guest memory", e));
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem_size,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `host` is the start of a live mapping of `mem_size` bytes owned by `mem`, which
    // outlives the VM (the process exits from inside the run loop).
    unsafe { vm.set_user_memory_region(region) }.unwrap_or_else(|e| die("memory slot", e));

    let mut kernel = File::open(&args[1]).unwrap_or_else(|e| die(&args[1], e));
    let loaded = Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM)))
        .unwrap_or_else(|e| die("load kernel", e));
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        die("load kernel", "no PVH entry note")
    };

    // Command line, NUL-terminated.
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE))
        .unwrap_or_else(|e| die("command line", e));
    // One e820 RAM entry: { addr, size, type = 1, reserved }.
    let w64 = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a));
    let w32 = |v: u32, a: u64| mem.write_obj(v, GuestAddress(a));
    // struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
    // rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    [
        w64(0, MEMMAP),
        w64(mem_size, MEMMAP + 8),
        w32(1, MEMMAP + 16),
        w32(0, MEMMAP + 20),
        w32(0x336e_c578, START_INFO),
        w32(1, START_INFO + 4),
        w64(CMDLINE, START_INFO + 0x18),
        w64(MEMMAP, START_INFO + 0x28),
        w32(1, START_INFO + 0x30),
    ]
    .into_iter()
    .collect::<Result<(), _>>()
    .unwrap_or_else(|e| die("hvm_start_info", e));

    let mut vcpu = vm.create_vcpu(0).unwrap_or_else(|e| die("create vCPU", e));
    let mut sregs = vcpu.get_sregs().unwrap_or_else(|e| die("get sregs", e));
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        // Flat 4 GiB, 32-bit, present, ring 0; type 0xb (code, execute/read, accessed) for CS and
        // 0x3 (data, read/write, accessed) for the rest.
        seg.base = 0;
        seg.limit = 0xffff_ffff;
        seg.type_ = 0x3;
        seg.present = 1;
        seg.dpl = 0;
        seg.db = 1;
        seg.s = 1;
        seg.l = 0;
        seg.g = 1;
        seg.selector = 0x10;
    }
    sregs.cs.type_ = 0xb;
    sregs.cs.selector = 0x08;
    sregs.cr0 = (sregs.cr0 & !(1 << 31)) | 1;
    vcpu.set_sregs(&sregs)
        .unwrap_or_else(|e| die("set sregs", e));
    let regs = kvm_bindings::kvm_regs {
        rip: entry.raw_value(),
        rbx: START_INFO,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap_or_else(|e| die("set regs", e));

    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .unwrap_or_else(|e| die("stdout", e));
    let mut out = File::from(fd);
    let mut dlab = false;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(POST, _)) => {}
            Ok(VcpuExit::IoOut(COM1, data)) if !dlab => {
                // A closed pipe must not end the guest early; the caller sees it in the output.
                let _ = out.write_all(&data[..1]);
            }
            Ok(VcpuExit::IoOut(DEBUG_EXIT, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let v = u32::from_le_bytes(v);
                exit(i32::from(((v << 1) | 1) as u8));
            }
            Ok(VcpuExit::IoOut(COM1_LCR, data)) => dlab = data[0] & LCR_DLAB != 0,
            Ok(VcpuExit::IoOut(port, _)) if (COM1..COM1 + 8).contains(&port) => {}
            Ok(VcpuExit::IoIn(COM1_LSR, data)) => data.fill(LSR_THR_EMPTY),
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(VcpuExit::Hlt) => loop {
                // Interrupts are off and there is no irqchip: only a signal ends this.
                std::thread::park();
            },
            Ok(other) => die("unexpected exit", format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => die("KVM_RUN", e),
        }
    }
}
