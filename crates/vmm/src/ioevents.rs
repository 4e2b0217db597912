//! ioeventfds through KVM: a guest write at a registered address signals an eventfd in the
//! kernel and the vCPU goes on without an exit. The PCI root registers a device's ioeventfds
//! wherever its BAR is mapped and moves them with it.

use std::io;
use std::sync::Arc;

use devices::pci::{AddressSpace, Datamatch, IoEventRegistry};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// [`IoEventRegistry`] on a KVM VM.
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl std::fmt::Debug for KvmIoEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmIoEvents").finish_non_exhaustive()
    }
}

impl KvmIoEvents {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }

    fn apply(
        &self,
        register: bool,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()> {
        let addr = match space {
            AddressSpace::Io => IoEventAddress::Pio(addr),
            AddressSpace::Memory => IoEventAddress::Mmio(addr),
        };
        // kvm-ioctls takes the access width from the datamatch type (none: any width).
        macro_rules! call {
            ($v:expr) => {
                if register {
                    self.vm.register_ioevent(fd, &addr, $v)
                } else {
                    self.vm.unregister_ioevent(fd, &addr, $v)
                }
            };
        }
        let result = match datamatch {
            Datamatch::Any => call!(NoDatamatch),
            Datamatch::U8(v) => call!(v),
            Datamatch::U16(v) => call!(v),
            Datamatch::U32(v) => call!(v),
            Datamatch::U64(v) => call!(v),
        };
        result.map_err(io::Error::from)
    }
}

impl IoEventRegistry for KvmIoEvents {
    fn register(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()> {
        self.apply(true, space, addr, datamatch, fd)
    }

    fn unregister(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()> {
        self.apply(false, space, addr, datamatch, fd)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

    use super::*;

    #[test]
    fn register_move_unregister() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let io = KvmIoEvents::new(vm);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mem = AddressSpace::Memory;
        io.register(mem, 0xc000_3000, Datamatch::Any, &fd).unwrap();
        io.register(mem, 0xc000_3004, Datamatch::U16(2), &fd)
            .unwrap();
        io.register(AddressSpace::Io, 0xc010, Datamatch::U32(7), &fd)
            .unwrap();
        // KVM refuses a duplicate and an unregister of what is not there.
        assert!(io.register(mem, 0xc000_3000, Datamatch::Any, &fd).is_err());
        assert!(
            io.unregister(mem, 0xc000_3004, Datamatch::U16(3), &fd)
                .is_err()
        );
        io.unregister(mem, 0xc000_3000, Datamatch::Any, &fd)
            .unwrap();
        io.unregister(mem, 0xc000_3004, Datamatch::U16(2), &fd)
            .unwrap();
        io.unregister(AddressSpace::Io, 0xc010, Datamatch::U32(7), &fd)
            .unwrap();
    }
}
