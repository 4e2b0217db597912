//! MSI delivery through KVM: one GSI, one MSI route and one irqfd per MSI-X vector, so that a
//! device raising a vector is one eventfd write and KVM injects it without us.
//!
//! KVM_SET_GSI_ROUTING replaces the VM's whole routing table, so one [`GsiRouting`] per VM
//! keeps the table: KVM's default routes for the I/O APIC and PIC pins (which the first call
//! would otherwise wipe out) plus every programmed MSI route.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::{MsiInterrupts, MsiMessage};
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::MSI_GSI_START;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("No GSI left for MSI routes")]
    GsiExhausted,
    #[error("Cannot build a GSI routing table of {0} entries")]
    TableSize(usize),
    #[error("Cannot set the GSI routing table")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("Cannot create an interrupt eventfd")]
    EventFd(#[source] io::Error),
    #[error("Cannot register irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
}

/// Pins of KVM's in-kernel I/O APIC; GSIs below this are its pins.
const IOAPIC_PINS: u32 = 24;
/// ISA IRQs, which also reach the 8259 pair.
const PIC_IRQS: u32 = 16;
/// KVM refuses GSIs at or above its routing table limit.
const GSI_END: u32 = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32;

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The full table: KVM's defaults (what `KVM_CREATE_IRQCHIP` installs, as crosvm and the
/// kernel's `default_routing` lay it out: GSI n goes to I/O APIC pin n for n < 24, and GSIs
/// 0-15 also to the master (0-7) or slave (8-15) PIC; our MP table relies on ISA IRQ n being
/// pin n) followed by the MSI routes.
pub fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Result<KvmIrqRouting, InterruptError> {
    let mut entries = Vec::with_capacity((IOAPIC_PINS + PIC_IRQS) as usize + msi.len());
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 8 {
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < PIC_IRQS {
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
    }
    entries.extend(msi.iter().map(|(&gsi, &m)| msi_route(gsi, m)));
    KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::TableSize(entries.len()))
}

struct RoutingState {
    /// Next never-used GSI; `free` holds released ones below it.
    next: u32,
    free: BTreeSet<u32>,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The VM's GSI routing table and MSI GSI allocator. Make one per VM and share it.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<RoutingState>,
}

impl std::fmt::Debug for GsiRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("GsiRouting")
            .field("next", &st.next)
            .field("msi_routes", &st.msi.len())
            .finish_non_exhaustive()
    }
}

impl GsiRouting {
    /// Needs the VM's in-kernel irqchip. Changes nothing in KVM until the first MSI route.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            state: Mutex::new(RoutingState {
                next: MSI_GSI_START,
                free: BTreeSet::new(),
                msi: BTreeMap::new(),
            }),
        })
    }

    /// A GSI for an MSI vector, lowest free first (released GSIs are reused, so VFs coming and
    /// going do not run the numbers out).
    pub fn allocate(&self) -> Result<u32, InterruptError> {
        let mut st = lock(&self.state);
        if let Some(gsi) = st.free.pop_first() {
            return Ok(gsi);
        }
        if st.next >= GSI_END {
            return Err(InterruptError::GsiExhausted);
        }
        st.next += 1;
        Ok(st.next - 1)
    }

    /// Route `gsi` to `msg`. The table goes to KVM only if the route changed.
    pub fn set_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), InterruptError> {
        let mut st = lock(&self.state);
        let old = st.msi.insert(gsi, msg);
        if old == Some(msg) {
            return Ok(());
        }
        // The lock stays held over the ioctl, so tables reach KVM in the order they were made.
        let result = self.commit(&st.msi);
        if result.is_err() {
            match old {
                Some(m) => st.msi.insert(gsi, m),
                None => st.msi.remove(&gsi),
            };
        }
        result
    }

    /// Drop the routes of `gsis` and free them.
    pub fn release(&self, gsis: &[u32]) -> Result<(), InterruptError> {
        let mut st = lock(&self.state);
        let mut routed = false;
        for gsi in gsis {
            routed |= st.msi.remove(gsi).is_some();
            if *gsi >= MSI_GSI_START && *gsi < st.next {
                st.free.insert(*gsi);
            }
        }
        if routed {
            self.commit(&st.msi)?;
        }
        Ok(())
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), InterruptError> {
        let table = routing_table(msi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), InterruptError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(|e| InterruptError::Irqfd(gsi, e))
    }
}

struct Vector {
    gsi: u32,
    evt: EventFd,
}

/// The MSI-X vectors of one PCI function: a GSI and a registered irqfd each, made up front so
/// that a trigger takes no lock; routes are set when the guest programs a message.
pub struct MsiVectors {
    routing: Arc<GsiRouting>,
    vectors: Vec<Vector>,
}

impl std::fmt::Debug for MsiVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gsis: Vec<u32> = self.vectors.iter().map(|v| v.gsi).collect();
        f.debug_struct("MsiVectors").field("gsis", &gsis).finish()
    }
}

impl MsiVectors {
    pub fn new(routing: &Arc<GsiRouting>, count: u16) -> Result<Self, InterruptError> {
        // Built in place, so that a failure half-way releases what was made (Drop).
        let mut this = Self {
            routing: routing.clone(),
            vectors: Vec::with_capacity(usize::from(count)),
        };
        for _ in 0..count {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            let gsi = routing.allocate()?;
            if let Err(e) = routing.register_irqfd(&evt, gsi) {
                // Not in `vectors` yet: give the GSI back here.
                let _ = routing.release(&[gsi]);
                return Err(e);
            }
            this.vectors.push(Vector { gsi, evt });
        }
        Ok(this)
    }

    /// The GSI behind `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.gsi)
    }

    fn vector(&self, vector: u16) -> io::Result<&Vector> {
        self.vectors.get(usize::from(vector)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no MSI vector {vector}"),
            )
        })
    }
}

impl MsiInterrupts for MsiVectors {
    fn update(&self, vector: u16, msg: Option<MsiMessage>) -> io::Result<()> {
        let v = self.vector(vector)?;
        // A vector that cannot be delivered (masked, MSI-X off) keeps its route: the device
        // never triggers it (it sets the pending bit instead), so the stale route is never used,
        // while removing it would cost a KVM_SET_GSI_ROUTING (an RCU grace period in the kernel)
        // on every mask and unmask, which Linux does around each affinity change. Unmasking
        // with the same message then costs nothing at all.
        let Some(msg) = msg else {
            return Ok(());
        };
        self.routing.set_msi(v.gsi, msg).map_err(io::Error::other)
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.vector(vector)?.evt.write(1)
    }
}

impl Drop for MsiVectors {
    fn drop(&mut self) {
        for v in &self.vectors {
            if let Err(e) = self.routing.vm.unregister_irqfd(&v.evt, v.gsi) {
                tracing::warn!(gsi = v.gsi, "cannot unregister irqfd: {e}");
            }
        }
        let gsis: Vec<u32> = self.vectors.iter().map(|v| v.gsi).collect();
        if let Err(e) = self.routing.release(&gsis) {
            tracing::warn!("cannot release MSI routes: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

    use super::*;

    fn msg(data: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data,
        }
    }

    #[test]
    fn default_routes_then_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(30, msg(0x41));
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x40,
            },
        );
        let table = routing_table(&msi).unwrap();
        let e = table.as_slice();
        assert_eq!(e.len(), 24 + 16 + 2);
        let chips: Vec<(u32, u32, u32)> = e[..40]
            .iter()
            .map(|r| {
                assert_eq!(r.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: irqchip entries, as just checked.
                let c = unsafe { r.u.irqchip };
                (r.gsi, c.irqchip, c.pin)
            })
            .collect();
        assert_eq!(chips[0], (0, KVM_IRQCHIP_IOAPIC, 0));
        assert_eq!(chips[1], (0, KVM_IRQCHIP_PIC_MASTER, 0));
        assert_eq!(chips[18], (9, KVM_IRQCHIP_IOAPIC, 9));
        assert_eq!(chips[19], (9, KVM_IRQCHIP_PIC_SLAVE, 1));
        assert_eq!(chips[32], (16, KVM_IRQCHIP_IOAPIC, 16));
        assert_eq!(chips[39], (23, KVM_IRQCHIP_IOAPIC, 23));
        assert_eq!((e[40].gsi, e[40].type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry, as just checked.
        let m = unsafe { e[40].u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x40));
        assert_eq!(e[41].gsi, 30);
    }

    fn vm() -> Arc<VmFd> {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        Arc::new(vm)
    }

    #[test]
    fn vectors_on_kvm() {
        let routing = GsiRouting::new(vm());
        let a = MsiVectors::new(&routing, 3).unwrap();
        assert_eq!((a.gsi(0), a.gsi(2), a.gsi(3)), (Some(24), Some(26), None));
        a.update(1, Some(msg(0x31))).unwrap();
        a.update(1, None).unwrap();
        a.update(1, Some(msg(0x31))).unwrap();
        a.update(2, Some(msg(0x32))).unwrap();
        assert_eq!(lock(&routing.state).msi.len(), 2);
        // KVM takes the write: the irqfd consumed the count.
        a.trigger(1).unwrap();
        assert!(a.vectors[1].evt.read().is_err());
        assert!(a.trigger(3).is_err());
        assert!(a.update(3, Some(msg(1))).is_err());

        let b = MsiVectors::new(&routing, 1).unwrap();
        assert_eq!(b.gsi(0), Some(27));
        drop(a);
        assert!(lock(&routing.state).msi.is_empty());
        // Released GSIs come back, lowest first.
        let c = MsiVectors::new(&routing, 2).unwrap();
        assert_eq!((c.gsi(0), c.gsi(1)), (Some(24), Some(25)));
        c.update(0, Some(msg(0x50))).unwrap();
        b.update(0, Some(msg(0x51))).unwrap();
        assert_eq!(lock(&routing.state).msi.len(), 2);
    }

    #[test]
    fn bad_route_is_refused_and_forgotten() {
        let routing = GsiRouting::new(vm());
        // A GSI KVM cannot take: the table is refused and the route not kept.
        assert!(routing.set_msi(GSI_END, msg(1)).is_err());
        assert!(lock(&routing.state).msi.is_empty());
        routing.set_msi(MSI_GSI_START, msg(1)).unwrap();
    }
}
