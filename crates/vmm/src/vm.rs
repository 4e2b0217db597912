//! The KVM virtual machine: guest memory slots, in-kernel irqchip and PIT, irqfds, vCPU fds.

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{self, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("Cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("Cannot set up the VM: {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("Cannot allocate {0} bytes of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("Cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    #[error("Cannot read supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("Cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot register irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("Cannot fill the read-only mapping at {0:#x}")]
    Rom(u64, #[source] vm_memory::GuestMemoryError),
}

/// A VM with its memory registered and its interrupt controllers created.
pub struct Vm {
    kvm: Kvm,
    /// Shared with what issues VM ioctls from other threads (GSI routing, ioeventfds).
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// Read-only mappings (firmware), each in its own slot after the RAM slots.
    roms: Vec<GuestMemoryMmap>,
}

impl Vm {
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "irqchip"),
            (kvm_ioctls::Cap::Irqfd, "irqfd"),
            (kvm_ioctls::Cap::UserMemory, "user memory"),
            (kvm_ioctls::Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(|e| VmError::Setup("TSS address", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Setup("identity map address", e))?;

        let ranges: Vec<_> = layout::ram_ranges(mem_size)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let mem =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(mem_size, e))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which this Vm keeps for as
            // long as the VM fd (and so the slot) exists; slots do not overlap.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::Setup("memory slot", e))?;
        }
        // After the memory slots: on nested hosts the first slot registered after
        // KVM_CREATE_IRQCHIP costs 5-9 ms (measured by the start-up benchmark), before it 0.1 ms.
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("irqchip", e))?;
        // The PIT's speaker port is a dummy: Linux probes it and must not fault.
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|e| VmError::Setup("PIT", e))?;
        Ok(Self {
            kvm,
            fd,
            mem,
            roms: Vec::new(),
        })
    }

    /// Map a copy of `image` read-only at `addr`: the guest reads and runs it, and its writes
    /// become MMIO exits (dropped, nothing being mapped there on the MMIO bus).
    pub fn map_rom(&mut self, addr: u64, image: &[u8]) -> Result<(), VmError> {
        if !self.kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            return Err(VmError::MissingCap("read-only memory"));
        }
        let len = image.len() as u64;
        let rom = GuestMemoryMmap::from_ranges(&[(GuestAddress(addr), image.len())])
            .map_err(|e| VmError::Memory(len, e))?;
        rom.write_slice(image, GuestAddress(addr))
            .map_err(|e| VmError::Rom(addr, e))?;
        // One range, so one region.
        for region in rom.iter() {
            let region_desc = kvm_userspace_memory_region {
                slot: (self.mem.num_regions() + self.roms.len()) as u32,
                guest_phys_addr: addr,
                memory_size: len,
                userspace_addr: region.as_ptr() as u64,
                flags: kvm_bindings::KVM_MEM_READONLY,
            };
            // SAFETY: the mapping is owned by `rom`, which this Vm keeps for as long as the VM
            // fd (and so the slot) exists; the slot number is unused and the caller places ROMs
            // outside RAM.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::Setup("read-only memory slot", e))?;
        }
        self.roms.push(rom);
        Ok(())
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::Cpuid)
    }

    /// The most vCPUs this host's KVM allows, capped by what our tables can describe.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus().min(254)
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::CreateVcpu(id, e))
    }

    /// The VM fd, for objects that issue VM ioctls from vCPU threads: the one
    /// [`crate::interrupts::GsiRouting`] of this VM and [`crate::ioevents::KvmIoEvents`].
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// An eventfd that raises `gsi` when written.
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| VmError::Irqfd(gsi, e))?;
        Ok(evt)
    }
}
