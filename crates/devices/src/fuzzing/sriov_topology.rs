//! SR-IOV through the whole PCI path: a root port at 00:01.0, a PF behind it, VFs made and
//! removed by an [`SriovHandler`] as the builder's is, all reached through ECAM on a real bus
//! with guest writes to the port (bus numbers, ARI Forwarding, windows), to the PF's SR-IOV
//! capability (NumVFs, VF Enable, VF MSE, VF BAR), to random functions and config offsets, and
//! MMIO probes over the VF BAR aperture.
//!
//! Shadow model, checked after every step: the VFs alive are exactly NumVFs when the PF's VF
//! Enable is set, none otherwise; a config read at (bus, devfn) finds the port on bus 0, the PF
//! at function 0 of the port's secondary bus, VF i at function 1 + i of that bus (past function
//! 7 only with ARI Forwarding), and all-ones everywhere else; an MMIO probe that answers in the
//! aperture answers from the VF whose slice it is, at that offset.

use std::sync::{Arc, Mutex};

use super::{Input, le};
use crate::bus::{Bus, lock};
use crate::pci::sriov::{reg, vf_routing_id};
use crate::pci::testutil::SriovPf;
use crate::pci::{
    AddressSpace, BarInfo, BarKind, Bdf, ConfigEffects, ConfigSpace, PciDevice, PciEcam, PciIds,
    PciRoot, RootPort, SriovHandler, SriovParams, VfBar, VfBarChange, VfEnableChange,
};

const ECAM: u64 = 0xe000_0000;
const TOTAL: u16 = 20;
const VF_BAR: u64 = 0x1000;
const PORT: Bdf = Bdf::new(0, 1, 0);
/// The PCIe capability of the port (the first standard one).
const PORT_DEVCTL2: u16 = 0x40 + 0x28;

/// A VF: its config space, and a BAR 0 that reads `index << 16 | offset`.
struct Vf {
    config: ConfigSpace,
    index: u16,
}

impl PciDevice for Vf {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        self.config.write(offset, data)
    }

    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let v = (u32::from(self.index) << 16) | (offset as u32 & 0xffff);
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.to_le_bytes()[i % 4];
        }
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }
}

/// Makes and removes VFs as the VMM's VfManager does (add, map BAR 0 per VF BAR change,
/// remove), counting the live ones.
struct Handler {
    live: Mutex<u16>,
}

impl SriovHandler for Handler {
    fn carry_out(
        &self,
        root: &mut PciRoot,
        pf: Bdf,
        enable: Option<VfEnableChange>,
        bars: &[VfBarChange],
    ) {
        let mut live = lock(&self.live);
        let rid = |i| vf_routing_id(pf, 1, 1, i);
        if let Some(e) = enable.filter(|e| e.enabled) {
            assert_eq!(*live, 0, "VFs enabled twice");
            for i in 0..e.num_vfs {
                let Ok(bdf) = rid(i) else { break };
                let mut config = ConfigSpace::endpoint(&ids(0x1042));
                if config.add_bar(0, BarKind::Mem64, VF_BAR, false).is_err() {
                    break;
                }
                config.make_virtual_function();
                let vf = Arc::new(Mutex::new(Vf { config, index: i }));
                if root.add_device(bdf, vf).is_err() {
                    break;
                }
                *live += 1;
            }
        }
        for b in bars {
            for i in 0..*live {
                let at = b
                    .new
                    .and_then(|base| base.checked_add(b.size * u64::from(i)));
                if let Ok(bdf) = rid(i) {
                    root.map_bar(bdf, b.bar, AddressSpace::Memory, VF_BAR, at);
                }
            }
        }
        if enable.is_some_and(|e| !e.enabled) {
            for i in 0..*live {
                if let Ok(bdf) = rid(i) {
                    assert!(root.remove_device(bdf).is_some(), "VF {i} missing");
                }
            }
            *live = 0;
        }
    }
}

fn ids(device_id: u16) -> PciIds {
    PciIds {
        vendor_id: 0x1af4,
        device_id,
        revision: 1,
        class_code: 0x01_8000,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x40,
    }
}

fn pf() -> Option<SriovPf> {
    let params = SriovParams {
        initial_vfs: TOTAL,
        total_vfs: TOTAL,
        first_vf_offset: 1,
        vf_stride: 1,
        vf_device_id: 0x1042,
        supported_page_sizes: reg::PAGE_4K,
        vf_bars: vec![VfBar {
            index: 0,
            kind: BarKind::Mem64,
            size: VF_BAR,
            prefetchable: false,
        }],
    };
    SriovPf::new(&ids(0x1042), params).ok()
}

fn ecam(bdf: Bdf, reg: u16) -> u64 {
    ECAM + (u64::from(bdf.raw()) << 12) + u64::from(reg & 0xfff)
}

pub fn sriov_topology(data: &[u8]) {
    let mut input = Input::new(data);
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let mut root = PciRoot::new(&mmio, &pio);
    let (Some(pf_dev), Ok(port)) = (pf(), RootPort::new(1)) else {
        panic!("the topology's declaration is valid");
    };
    let cap = pf_dev.sriov.offset();
    let pf_dev = Arc::new(Mutex::new(pf_dev));
    let handler = Arc::new(Handler {
        live: Mutex::new(0),
    });
    let pf_key = Bdf::new(1, 0, 0);
    root.add_root_port(PORT, port, 1, None)
        .expect("port on bus 0");
    root.add_device(pf_key, pf_dev.clone()).expect("PF");
    root.set_sriov_handler(pf_key, handler.clone());
    let root = Arc::new(Mutex::new(root));
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(root.clone()))),
        ECAM,
        0x1000_0000,
    )
    .expect("ECAM");

    let read = |addr: u64, len: usize| {
        let mut b = [0u8; 8];
        mmio.read(addr, &mut b[..len]);
        crate::pci::le_value(&b[..len])
    };
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let secondary = (read(ecam(PORT, 0x18), 4) >> 8) as u8;
        let (target, off) = match input.u8() % 6 {
            0 => (
                PORT,
                input.pick(&[0x18, 0x19, 0x1a, PORT_DEVCTL2, 0x20, 0x04]),
            ),
            1 | 2 => (
                Bdf::new(secondary, 0, 0),
                cap + input.pick(&[reg::CONTROL, reg::CONTROL, reg::NUM_VFS, reg::VF_BAR0, 0x28]),
            ),
            3 => (Bdf::from_raw(input.u16()), input.u16() & 0xfff),
            _ => {
                // An MMIO probe in or near the aperture, or a config read anywhere.
                let base = {
                    let pf = lock(&pf_dev);
                    pf.sriov.vf_bar_base(&pf.config, 0).unwrap_or(0)
                };
                let addr = if input.bool() {
                    base.wrapping_add(u64::from(input.u16()) << 4)
                } else {
                    ecam(Bdf::from_raw(input.u16()), input.u16())
                };
                if (ECAM..ECAM + 0x1000_0000).contains(&addr) {
                    let _ = read(addr, 4);
                    continue;
                }
                let v = read(addr & !3, 4);
                if v != 0xffff_ffff && base != 0 && addr >= base {
                    // A VF answered: the one whose slice this is, at this offset.
                    let rel = (addr & !3) - base;
                    assert_eq!(v >> 16, rel / VF_BAR, "VF of the slice at {addr:#x}");
                    assert_eq!(v & 0xffff, rel % VF_BAR, "offset in the slice at {addr:#x}");
                }
                continue;
            }
        };
        let len = input.access_len(false);
        let value = match input.u8() % 4 {
            0 => u64::from(input.u8() % 24),
            1 => input.pick(&[
                0,
                1,
                0x9,
                0x19,
                0x0001_0100,
                0x0002_0200,
                1 << 5,
                0xc000_0004,
            ]),
            _ => input.u64(),
        };
        mmio.write(ecam(target, off), &le(value, len));

        // The VFs alive follow VF Enable and NumVFs.
        let (enabled, num) = {
            let pf = lock(&pf_dev);
            (
                pf.sriov.vf_enabled(&pf.config),
                pf.sriov.num_vfs(&pf.config),
            )
        };
        let live = *lock(&handler.live);
        assert_eq!(live, if enabled { num } else { 0 }, "live VFs");

        // Config reads land where the port's registers say.
        let route = read(ecam(PORT, 0x18), 4);
        let secondary = (route >> 8) as u8;
        let ari = read(ecam(PORT, PORT_DEVCTL2), 2) & (1 << 5) != 0;
        for _ in 0..4 {
            let bus = input.pick(&[0, secondary, secondary, secondary.wrapping_add(1), 1]);
            let any = input.u8();
            let devfn = input.pick(&[0u8, 1, 2, 7, 8, 9, 20, 21, any]);
            let bdf = Bdf::new(bus, devfn >> 3, devfn & 7);
            let class = read(ecam(bdf, 0x08), 4);
            let expect_present = if bus == 0 {
                None // bus 0: the host bridge and the port; not modelled here
            } else if bus != secondary {
                Some(false)
            } else if devfn == 0 {
                Some(true)
            } else {
                Some(u16::from(devfn) <= live && (ari || devfn < 8))
            };
            if let Some(p) = expect_present {
                assert_eq!(class != 0xffff_ffff, p, "function at {bdf} (ari {ari})");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(super::sriov_topology, 0x5a17_0f00_7090_0001, 1500, 400);
    }
}
