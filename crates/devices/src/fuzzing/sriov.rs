//! The SR-IOV capability of a PF, written and read anywhere in its config space.
//!
//! Shadow model: what a builder following the [`ConfigEffects`] would hold (VFs present, where
//! each VF BAR aperture decodes), checked after every step against the capability's own view;
//! plus the spec's rules (NumVFs at most TotalVFs and frozen while enabled, one supported System
//! Page Size, read-only registers unchanged, VF BAR bits below the size as declared) and the
//! routing ids of the VFs present (distinct, in order).

use super::{Input, le};
use crate::pci::sriov::reg;
use crate::pci::testutil::net_pf_ids;
use crate::pci::{
    BarKind, Bdf, Capability, ConfigSpace, PciExpressPort, SriovCap, SriovParams, VfBar,
};

const TOTAL: u16 = 16;
const PF: Bdf = Bdf::new(0xfe, 0x1f, 0);

fn pf() -> Option<(ConfigSpace, SriovCap)> {
    let mut config = ConfigSpace::endpoint(&net_pf_ids());
    config
        .add_capability(&Capability::pci_express(PciExpressPort::Endpoint))
        .ok()?;
    let bar = |index, kind, size| VfBar {
        index,
        kind,
        size,
        prefetchable: kind == BarKind::Mem64,
    };
    let params = SriovParams {
        initial_vfs: 8,
        total_vfs: TOTAL,
        first_vf_offset: 8,
        vf_stride: 2,
        vf_device_id: 0x10a5,
        supported_page_sizes: 0x3,
        vf_bars: vec![
            bar(0, BarKind::Mem32, 0x2000),
            bar(1, BarKind::Mem64, 0x1_0000),
            bar(4, BarKind::Mem32, 0x1_0000_0000 >> 4),
        ],
    };
    let sriov = SriovCap::new(&mut config, params).ok()?;
    Some((config, sriov))
}

/// Offsets in the capability: control, NumVFs, page size and the VF BARs mostly.
const REGS: [u16; 12] = [
    0x08, 0x08, 0x10, 0x10, 0x20, 0x24, 0x28, 0x2c, 0x30, 0x34, 0x0c, 0x14,
];

pub fn sriov(data: &[u8]) {
    let mut input = Input::new(data);
    let Some((mut config, mut cap)) = pf() else {
        panic!("the PF's declaration is valid");
    };
    let base = cap.offset();
    let mut initial = vec![0u8; reg::LEN];
    config.read(base, &mut initial);
    // Header, capabilities, status, InitialVFs, TotalVFs, dependency link, offset, stride,
    // device id, supported pages, migration state.
    let read_only = [0..8, 0x0a..0x10, 0x12..0x20, 0x3c..0x40];
    let mut vfs: u16 = 0;
    let mut enabled = false;
    let mut apertures: [Option<u64>; 6] = [None; 6];
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let off = match input.u8() % 4 {
            0 | 1 => base + input.pick(&REGS),
            2 => base + u16::from(input.u8() % 0x44),
            _ => input.u16() & 0xfff,
        };
        let len = input.access_len(true);
        let value = match input.u8() % 4 {
            0 => u64::from(input.u8() & 0x1f),
            1 => input.pick(&[0, 1, 2, 0xffff_ffff, 0xc000_0000, 0x8000_0000, TOTAL.into()]),
            _ => input.u64(),
        };
        let before = cap.num_vfs(&config);
        if input.u8() % 8 == 0 {
            let mut b = [0u8; 8];
            config.read(off, &mut b[..len]);
            continue;
        }
        let mut effects = config.write(off, &le(value, len));
        cap.config_written(&mut config, off, len, &mut effects);

        if let Some(c) = effects.vf_enable {
            assert_ne!(c.enabled, enabled, "VF Enable reported without a flip");
            enabled = c.enabled;
            vfs = if enabled { c.num_vfs } else { 0 };
            assert_eq!((c.first_offset, c.stride), (8, 2));
        }
        for c in &effects.vf_bar_changes {
            let slot = &mut apertures[usize::from(c.bar)];
            assert_eq!(*slot, c.old, "VF BAR {} old", c.bar);
            *slot = c.new;
        }
        assert_eq!(enabled, cap.vf_enabled(&config));
        let num = cap.num_vfs(&config);
        assert!(num <= TOTAL);
        if enabled {
            assert_eq!(num, vfs);
            if effects.vf_enable.is_none() {
                assert_eq!(num, before, "NumVFs changed while enabled");
            }
        }
        for i in 0..6u8 {
            assert_eq!(apertures[usize::from(i)], cap.vf_bar_mapping(&config, i));
        }
        let page = config.read_u32(base + reg::SYSTEM_PAGE_SIZE);
        assert!(page == 1 || page == 2, "page size {page:#x}");
        let mut now = vec![0u8; reg::LEN];
        config.read(base, &mut now);
        for r in &read_only {
            assert_eq!(now[r.clone()], initial[r.clone()], "read-only {r:?}");
        }
        for i in 0..6u8 {
            if let Some(bar) = cap.vf_bar(i) {
                let o = usize::from(reg::VF_BAR0) + 4 * usize::from(i);
                let low = |v: &[u8]| u32::from_le_bytes([v[o], v[o + 1], v[o + 2], v[o + 3]]);
                let mask = (bar.size - 1).min(0xffff_ffff) as u32;
                assert_eq!(low(&now) & mask, low(&initial) & mask, "VF BAR {i}");
            }
        }
        let mut last = None;
        for vf in 0..vfs {
            if let Ok(id) = cap.routing_id(PF, vf) {
                assert!(last < Some(id.raw()));
                last = Some(id.raw());
                let _ = cap.vf_bar_address(&config, 0, vf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(super::sriov, 0x5a17_0f00_dd1e_0001, 2000, 400);
    }
}
