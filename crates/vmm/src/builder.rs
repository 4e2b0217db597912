//! `VmConfig` -> a VM ready to run. The only place that knows addresses, ports, GSIs and which
//! device goes where; devices are handed their resources and never grab them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use devices::VmEvents;
use devices::interrupt::IrqLine;
use devices::legacy;
use devices::virtio::DmaSpace;
use vmm_sys_util::eventfd::EventFd;

use devices::bus::{Bus, BusDevice};
use event_manager::MutEventSubscriber;

use crate::control::Control;
use crate::cpu;
use crate::interrupts::GsiRouting;
use crate::iommu::IommuTopology;
use crate::layout;
use crate::serial_input::SerialInput;
use crate::vcpu::Vcpu;
use crate::virtio_devices::Backends;
use crate::virtio_pci::{BarAllocator, VirtioPci};
use crate::vm::Vm;
use crate::{Error, acpi, boot, firmware, mptable};

/// A VM whose vCPUs are ready to be started.
pub struct BuiltVm {
    pub vm: Vm,
    pub vcpus: Vec<Vcpu>,
    /// Event sources of the devices (stdin for the UART, ...) for the main event loop.
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

fn insert(bus: &Bus, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), Error> {
    bus.insert(dev, base, len).map_err(Error::from)
}

pub fn build(config: &api::VmConfig, control: Arc<Control>) -> Result<BuiltVm, Error> {
    let mem_size = config.memory.size;
    // Read the image first: a bad one is the user's mistake, reported before KVM is touched.
    let firmware = config
        .payload
        .firmware
        .as_deref()
        .map(firmware::read_image)
        .transpose()?;
    // Taps, the vsock socket, output files: also the user's to get right, also before KVM.
    let backends = Backends::open(config)?;
    let mut vm = Vm::new(mem_size)?;
    let ncpus = config.cpus.boot;
    if usize::from(ncpus) > vm.max_vcpus() {
        return Err(Error::Config(format!(
            "{ncpus} vCPUs asked for, this host allows at most {}",
            vm.max_vcpus()
        )));
    }
    let mem = vm.memory().clone();
    let pio = Bus::new();
    // A firmware starts at the reset vector, where KVM leaves a new vCPU, builds its own MP table
    // (ours would land on its code at 0xF0000) and places our ACPI tables itself (fw_cfg).
    // The ACPI tables come after the PCI devices: the VIOT names their addresses.
    let payload = match &firmware {
        Some(image) => {
            firmware::install(&mut vm, image)?;
            None
        }
        None => {
            let payload = boot::load(&mem, mem_size, &config.payload)?;
            mptable::setup(&mem, ncpus)?;
            Some(payload)
        }
    };

    let mmio = Bus::new();
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    add_legacy_devices(&vm, config, &control, &pio, &mut subscribers)?;

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    // Devices go on it with `add_device`; it lives as long as the buses.
    let pci = add_pci_root(&vm, &pio, &mmio)?;
    // One routing table per VM: every MSI-X vector of every function gets a GSI from it.
    let routing = GsiRouting::new(vm.shared_fd());
    let mut bars = BarAllocator::new(mem_size);
    let mut virtio = VirtioPci {
        root: &pci,
        routing: &routing,
        mem: &mem,
        bars: &mut bars,
        iommu: None,
        sriov: Default::default(),
    };
    // First, so that it exists when the devices behind it are added.
    if config.iommu {
        let (_, notifier, faults) = virtio.add_iommu()?;
        subscribers.push(Arc::new(Mutex::new(notifier)));
        subscribers.push(Arc::new(Mutex::new(faults)));
    }
    for notifier in virtio.add_disks(&config.disks)? {
        subscribers.push(Arc::new(Mutex::new(notifier)));
    }
    subscribers.extend(virtio.add_devices(backends)?);
    // SR-IOV PFs' VFs: their queue (and backend) fds, added and removed at run time.
    if let Some(events) = &virtio.sriov.events {
        subscribers.push(Arc::new(Mutex::new(crate::sriov::DynamicEventsWatcher(
            events.clone(),
        ))));
    }
    let iommu = virtio.iommu_topology();
    match &firmware {
        Some(image) => {
            add_firmware_devices(&mem, config, image.len() as u64, &pio, iommu.as_ref())?
        }
        None => acpi::setup(&mem, ncpus, mem_size, iommu.as_ref())?,
    }
    let base_cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(usize::from(ncpus));
    for id in 0..ncpus {
        let fd = vm.create_vcpu(id)?;
        cpu::setup_common(&fd, &cpu::cpuid_for(&base_cpuid, id, ncpus))?;
        if let (0, Some(payload)) = (id, &payload) {
            cpu::setup_boot_regs(&fd, &mem, payload.entry)?;
        }
        vcpus.push(Vcpu {
            id,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
        });
    }
    Ok(BuiltVm {
        vm,
        vcpus,
        subscribers,
    })
}

/// Where COM1's output goes.
fn serial_output(config: &api::SerialConfig) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match config {
        // Unbuffered, so that a prompt without a newline shows at once; the UART flushes.
        api::SerialConfig::Tty => {
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Host("stdout", e))?;
            Box::new(File::from(fd))
        }
        api::SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::SerialFile(path.clone(), e))?,
        ),
        api::SerialConfig::Off => Box::new(std::io::sink()),
    })
}

/// fw_cfg with the ACPI tables, and the debug console when debug logs are shown (SeaBIOS only
/// writes its log when the port answers, and each byte costs an exit).
fn add_firmware_devices(
    mem: &vm_memory::GuestMemoryMmap,
    config: &api::VmConfig,
    image_len: u64,
    pio: &Bus,
    iommu: Option<&IommuTopology>,
) -> Result<(), Error> {
    // fw_cfg DMA addresses are guest physical: no IOMMU sits in front of a platform device.
    let mut fw_cfg = firmware::fw_cfg(DmaSpace::identity(mem.clone()), config, image_len)?;
    let tables = acpi::build(config.cpus.boot, config.memory.size, iommu)?;
    let tables: Vec<_> = tables
        .iter()
        .map(|t| (t.name, t.addr, t.bytes.as_slice()))
        .collect();
    firmware::add_acpi_tables(&mut fw_cfg, &tables)?;
    insert(
        pio,
        Arc::new(Mutex::new(fw_cfg)),
        layout::FW_CFG_PORT,
        layout::FW_CFG_LEN,
    )?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        insert(
            pio,
            Arc::new(Mutex::new(legacy::DebugCon::new())),
            layout::DEBUGCON_PORT,
            1,
        )?;
    }
    Ok(())
}

/// COM1, i8042, CMOS, POST, the ACPI sleep and reset registers and debug-exit on the port
/// I/O bus.
fn add_legacy_devices(
    vm: &Vm,
    config: &api::VmConfig,
    control: &Arc<Control>,
    pio: &Bus,
    subscribers: &mut Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
) -> Result<(), Error> {
    let events: Arc<dyn VmEvents> = control.clone();

    let irq: Arc<dyn IrqLine> = Arc::new(vm.irq_line(layout::COM1_IRQ)?);
    let room = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Host("eventfd", e))?);
    let serial = Arc::new(Mutex::new(legacy::Serial::new(
        irq,
        serial_output(&config.serial)?,
        Some(room.clone()),
    )));
    insert(pio, serial.clone(), layout::COM1_PORT, layout::COM1_LEN)?;
    // With `--console tty` stdin goes to the virtio-console: two readers would split keystrokes.
    if config.serial == api::SerialConfig::Tty && config.console != api::ConsoleConfig::Tty {
        subscribers.push(Arc::new(Mutex::new(SerialInput::new(
            serial,
            libc::STDIN_FILENO,
            room,
        ))));
    }

    let i8042 = legacy::I8042::new(events.clone());
    let data = Arc::new(Mutex::new(i8042.port(legacy::I8042Port::Data)));
    let cmd = Arc::new(Mutex::new(i8042.port(legacy::I8042Port::Command)));
    insert(pio, data, layout::I8042_DATA_PORT, 1)?;
    insert(pio, cmd, layout::I8042_CMD_PORT, 1)?;

    let ram = layout::ram_ranges(config.memory.size);
    let low = ram[0].1;
    let high = ram.get(1).map_or(0, |r| r.1);
    insert(
        pio,
        Arc::new(Mutex::new(legacy::Cmos::new(low, high))),
        layout::CMOS_PORT,
        2,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(legacy::PostCode::default())),
        layout::POST_PORT,
        1,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(legacy::AcpiSleep::new(events.clone()))),
        layout::ACPI_SLEEP_PORT,
        legacy::AcpiSleep::LEN,
    )?;
    insert(
        pio,
        Arc::new(Mutex::new(legacy::DebugExit::new(events))),
        layout::DEBUG_EXIT_PORT,
        1,
    )?;
    Ok(())
}

/// The PCI root complex (host bridge at 00:00.0): configuration mechanism #1 at 0xCF8 and ECAM,
/// with BARs mapped on these buses and ioeventfds registered with KVM.
fn add_pci_root(
    vm: &Vm,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
) -> Result<Arc<Mutex<devices::pci::PciRoot>>, Error> {
    use devices::pci::{PciConfigIo, PciEcam, PciRoot};
    let mut root = PciRoot::new(mmio, pio);
    root.set_ioevent_registry(Arc::new(crate::ioevents::KvmIoEvents::new(vm.shared_fd())));
    let root = Arc::new(Mutex::new(root));
    insert(
        pio,
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        layout::PCI_CONFIG_IO_PORT,
        layout::PCI_CONFIG_IO_LEN,
    )?;
    insert(
        mmio,
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
    )?;
    Ok(root)
}
