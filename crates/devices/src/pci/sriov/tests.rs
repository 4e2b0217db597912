use super::reg::*;
use super::*;
use crate::pci::testutil::{SriovPf as Pf, net_pf_ids};
use crate::pci::{PciDevice, PciDeviceExt};

/// A PF with the PCIe capability, ARI-sized routing (offset 1, stride 1), 7 VFs at most, a
/// 32-bit VF BAR 0 of 16 KiB (pages of 4, 8 and 16 KiB) and a 64-bit prefetchable VF BAR 2 of 1 MiB.
fn build_pf() -> Pf {
    build_pf_with(params()).unwrap()
}

fn build_pf_with(params: SriovParams) -> Result<Pf, SriovError> {
    Pf::new(&net_pf_ids(), params)
}

pub(crate) fn params() -> SriovParams {
    SriovParams {
        initial_vfs: 7,
        total_vfs: 7,
        first_vf_offset: 1,
        vf_stride: 1,
        vf_device_id: 0x10a5,
        supported_page_sizes: 0x7,
        vf_bars: vec![
            VfBar {
                index: 0,
                kind: BarKind::Mem32,
                size: 0x4000,
                prefetchable: false,
            },
            VfBar {
                index: 2,
                kind: BarKind::Mem64,
                size: 0x10_0000,
                prefetchable: true,
            },
        ],
    }
}

fn bytes(pf: &mut Pf, off: u16, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    pf.config_read(off, &mut b);
    b
}

#[test]
fn layout_byte_by_byte() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    assert_eq!(
        pf.config.find_extended_capability(ext_cap_id::SRIOV),
        Some(cap)
    );
    // The ARI capability at 0x100 links to SR-IOV, which ends the chain.
    assert_eq!(
        pf.config.find_extended_capability(ext_cap_id::ARI),
        Some(0x100)
    );
    assert_eq!(pf.config_read_u32(0x100) >> 20, u32::from(cap));
    let b = bytes(&mut pf, cap, LEN);
    assert_eq!(&b[0..4], &[0x10, 0x00, 0x01, 0x00]);
    assert_eq!(&b[0x04..0x08], &[0; 4], "capabilities");
    assert_eq!(&b[0x08..0x0c], &[0; 4], "control, status");
    assert_eq!(&b[0x0c..0x10], &[7, 0, 7, 0], "initial, total");
    assert_eq!(&b[0x10..0x14], &[0; 4], "NumVFs, dependency link");
    assert_eq!(&b[0x14..0x18], &[1, 0, 1, 0], "offset, stride");
    assert_eq!(&b[0x18..0x1c], &[0, 0, 0xa5, 0x10], "VF device id");
    assert_eq!(&b[0x1c..0x20], &[0x07, 0, 0, 0], "supported pages");
    assert_eq!(&b[0x20..0x24], &[1, 0, 0, 0], "system page size");
    assert_eq!(&b[0x24..0x28], &[0; 4], "VF BAR0 (32-bit)");
    assert_eq!(
        &b[0x2c..0x30],
        &[0x0c, 0, 0, 0],
        "VF BAR2 (64-bit prefetchable)"
    );
    assert_eq!(&b[0x3c..0x40], &[0; 4], "migration state");
}

#[test]
fn params_checked() {
    let mut p = params();
    p.initial_vfs = 8;
    assert!(matches!(
        build_pf_with(p),
        Err(SriovError::InitialVfs { .. })
    ));
    let mut p = params();
    p.supported_page_sizes = 2;
    assert_eq!(build_pf_with(p).err(), Some(SriovError::PageSizes(2)));
    let mut p = params();
    // 64 KiB is the largest supported page (bit 4): a 16 KiB BAR is too small.
    p.supported_page_sizes = 0x17;
    assert!(matches!(
        build_pf_with(p),
        Err(SriovError::VfBar { index: 0, .. })
    ));
    let mut p = params();
    p.vf_bars[1].index = 0;
    assert_eq!(build_pf_with(p).err(), Some(SriovError::VfBarIndex(0)));
    let mut p = params();
    p.vf_bars[1].index = 5;
    assert_eq!(build_pf_with(p).err(), Some(SriovError::VfBarIndex(5)));
    let mut p = params();
    p.vf_bars[0].kind = BarKind::Io;
    assert!(matches!(build_pf_with(p), Err(SriovError::VfBar { .. })));
    let mut p = params();
    p.vf_bars[0].size = 0x5000;
    assert!(matches!(build_pf_with(p), Err(SriovError::VfBar { .. })));
}

#[test]
fn read_only_fields_stay() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let before = bytes(&mut pf, cap, LEN);
    for off in [
        0u16,
        CAPABILITIES,
        STATUS,
        INITIAL_VFS,
        TOTAL_VFS,
        FUNCTION_DEPENDENCY_LINK,
        FIRST_VF_OFFSET,
        VF_STRIDE,
        VF_DEVICE_ID,
        SUPPORTED_PAGE_SIZES,
        VF_MIGRATION_STATE,
    ] {
        let e = pf.config_write_u16(cap + off, 0xffff);
        assert!(e.is_empty());
    }
    // Migration bits of Control are not writable.
    let _ = pf.config_write_u16(
        cap + CONTROL,
        CTRL_VF_MIGRATION_ENABLE | CTRL_VF_MIGRATION_INTERRUPT,
    );
    assert_eq!(bytes(&mut pf, cap, LEN), before);
}

#[test]
fn num_vfs_rules() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    assert!(pf.config_write_u16(cap + NUM_VFS, 4).is_empty());
    assert_eq!(pf.config_read_u16(cap + NUM_VFS), 4);
    // Above TotalVFs: ignored, the old value stays.
    let _ = pf.config_write_u16(cap + NUM_VFS, 8);
    assert_eq!(pf.config_read_u16(cap + NUM_VFS), 4);
    let _ = pf.config_write_u8(cap + NUM_VFS + 1, 1);
    assert_eq!(pf.config_read_u16(cap + NUM_VFS), 4);
    let _ = pf.config_write_u16(cap + NUM_VFS, 7);
    assert_eq!(pf.config_read_u16(cap + NUM_VFS), 7);
    // While enabled: ignored.
    let e = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE);
    assert_eq!(e.vf_enable.map(|v| v.num_vfs), Some(7));
    let _ = pf.config_write_u16(cap + NUM_VFS, 2);
    assert_eq!(pf.config_read_u16(cap + NUM_VFS), 7);
    let _ = pf.config_write_u16(cap + CONTROL, 0);
    let _ = pf.config_write_u16(cap + NUM_VFS, 2);
    assert_eq!(pf.sriov.num_vfs(&pf.config), 2);
}

#[test]
fn vf_enable_and_disable() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let _ = pf.config_write_u16(cap + NUM_VFS, 3);
    let e = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE | CTRL_ARI_CAPABLE);
    assert_eq!(
        e.vf_enable,
        Some(VfEnableChange {
            enabled: true,
            num_vfs: 3,
            first_offset: 1,
            stride: 1
        })
    );
    assert!(e.vf_bar_changes.is_empty(), "VF MSE is off");
    // Writing the same value again changes nothing.
    assert!(
        pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE | CTRL_ARI_CAPABLE)
            .is_empty()
    );
    // ARI Capable Hierarchy cannot change under enabled VFs.
    let _ = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE);
    assert_eq!(
        pf.config_read_u16(cap + CONTROL),
        CTRL_VF_ENABLE | CTRL_ARI_CAPABLE
    );
    let e = pf.config_write_u16(cap + CONTROL, CTRL_ARI_CAPABLE);
    assert_eq!(
        e.vf_enable,
        Some(VfEnableChange {
            enabled: false,
            num_vfs: 3,
            first_offset: 1,
            stride: 1
        })
    );
    assert!(!pf.sriov.vf_enabled(&pf.config));
}

#[test]
fn system_page_size_rules() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    for bad in [0u32, 3, 8, 0x800] {
        let _ = pf.config_write_u32(cap + SYSTEM_PAGE_SIZE, bad);
        assert_eq!(pf.config_read_u32(cap + SYSTEM_PAGE_SIZE), 1, "{bad:#x}");
    }
    let _ = pf.config_write_u32(cap + SYSTEM_PAGE_SIZE, 0x4);
    assert_eq!(pf.sriov.page_size(&pf.config), 0x4000);
    let _ = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE);
    let _ = pf.config_write_u32(cap + SYSTEM_PAGE_SIZE, 1);
    assert_eq!(pf.config_read_u32(cap + SYSTEM_PAGE_SIZE), 0x4);
}

#[test]
fn vf_bar_sizing() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let b0 = cap + VF_BAR0;
    let _ = pf.config_write_u32(b0, u32::MAX);
    assert_eq!(pf.config_read_u32(b0), 0xffff_c000);
    assert_eq!(bytes(&mut pf, b0, 4), [0x00, 0xc0, 0xff, 0xff]);
    let b2 = cap + VF_BAR0 + 8;
    let _ = pf.config_write_u32(b2, u32::MAX);
    let _ = pf.config_write_u32(b2 + 4, u32::MAX);
    assert_eq!(pf.config_read_u32(b2), 0xfff0_000c);
    assert_eq!(pf.config_read_u32(b2 + 4), u32::MAX);
    // Empty slots stay zero.
    for i in [1u16, 4, 5] {
        let _ = pf.config_write_u32(cap + VF_BAR0 + 4 * i, u32::MAX);
        assert_eq!(pf.config_read_u32(cap + VF_BAR0 + 4 * i), 0, "VF BAR {i}");
    }
}

#[test]
fn vf_bar_addressing_and_decoding() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let _ = pf.config_write_u32(cap + VF_BAR0, 0xc000_0000);
    let _ = pf.config_write_u32(cap + VF_BAR0 + 8, 0x0010_0000);
    let _ = pf.config_write_u32(cap + VF_BAR0 + 12, 0x1);
    let _ = pf.config_write_u16(cap + NUM_VFS, 4);
    let e = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE);
    assert!(e.vf_bar_changes.is_empty());
    let e = pf.config_write_u16(cap + CONTROL, CTRL_VF_ENABLE | CTRL_VF_MSE);
    assert_eq!(e.vf_enable, None);
    assert_eq!(
        e.vf_bar_changes,
        vec![
            VfBarChange {
                bar: 0,
                space: AddressSpace::Memory,
                size: 0x4000,
                num_vfs: 4,
                old: None,
                new: Some(0xc000_0000)
            },
            VfBarChange {
                bar: 2,
                space: AddressSpace::Memory,
                size: 0x10_0000,
                num_vfs: 4,
                old: None,
                new: Some(0x1_0010_0000)
            },
        ]
    );
    let s = &pf.sriov;
    assert_eq!(s.vf_bar_address(&pf.config, 0, 0), Some(0xc000_0000));
    assert_eq!(s.vf_bar_address(&pf.config, 0, 3), Some(0xc000_c000));
    assert_eq!(s.vf_bar_address(&pf.config, 2, 2), Some(0x1_0030_0000));
    assert_eq!(s.vf_bar_address(&pf.config, 0, 4), None, "no VF 4");
    assert_eq!(s.vf_bar_address(&pf.config, 1, 0), None, "upper half");
    // Moving a VF BAR while decoding takes effect, as in hardware, and is reported.
    let e = pf.config_write_u32(cap + VF_BAR0, 0xd000_0000);
    assert_eq!(e.vf_bar_changes.len(), 1);
    assert_eq!(e.vf_bar_changes[0].old, Some(0xc000_0000));
    assert_eq!(e.vf_bar_changes[0].new, Some(0xd000_0000));
    // An aperture reaching past 4 GiB does not decode (sizing leaves that behind).
    let e = pf.config_write_u32(cap + VF_BAR0, u32::MAX);
    assert_eq!(e.vf_bar_changes[0].new, None);
    let _ = pf.config_write_u32(cap + VF_BAR0, 0xd000_0000);
    // VF Enable off: both apertures go, with the enable change.
    let e = pf.config_write_u16(cap + CONTROL, CTRL_VF_MSE);
    assert_eq!(e.vf_enable.map(|v| v.enabled), Some(false));
    assert_eq!(e.vf_bar_changes.len(), 2);
    assert!(e.vf_bar_changes.iter().all(|c| c.new.is_none()));
}

#[test]
fn routing_ids() {
    let pf = Bdf::new(1, 0, 0);
    assert_eq!(vf_routing_id(pf, 1, 1, 0), Ok(Bdf::new(1, 0, 1)));
    assert_eq!(vf_routing_id(pf, 1, 1, 7), Ok(Bdf::new(1, 1, 0)));
    // Carries into the bus number.
    assert_eq!(vf_routing_id(pf, 0x80, 2, 0x40), Ok(Bdf::new(2, 0, 0)));
    assert_eq!(
        vf_routing_id(Bdf::new(0xff, 0x1f, 0), 4, 1, 3),
        Ok(Bdf::new(0xff, 0x1f, 7))
    );
    assert_eq!(
        vf_routing_id(Bdf::new(0xff, 0x1f, 0), 4, 1, 4),
        Err(SriovError::RoutingId {
            vf: 4,
            offset: 4,
            stride: 1
        })
    );
    assert!(vf_routing_id(pf, u16::MAX, u16::MAX, u16::MAX).is_err());
    let p = build_pf();
    assert_eq!(
        p.sriov.routing_id(Bdf::new(3, 0, 0), 6),
        Ok(Bdf::new(3, 0, 7))
    );
}

#[test]
fn writes_outside_leave_it_alone() {
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let _ = pf.config_write_u16(cap + NUM_VFS, 2);
    // A write spanning the end of the capability and one before it.
    let e = pf.config_write_u32(0x04, 0x6);
    assert!(e.vf_enable.is_none() && e.vf_bar_changes.is_empty());
    let e = pf.config_write(cap - 2, &[0xff; 8]);
    assert!(e.is_empty());
    assert_eq!(pf.config_read_u32(cap) & 0xffff, 0x10);
}

/// Random writes anywhere in the capability, checked against the rules after each one.
#[test]
fn randomized() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut pf = build_pf();
    let cap = pf.sriov.offset();
    let fixed = bytes(&mut pf, cap, 0x08);
    let ro = bytes(&mut pf, cap + INITIAL_VFS, 4);
    let mut enabled = false;
    for _ in 0..20_000 {
        let r = next();
        let off = cap + (r % LEN as u64) as u16;
        let len = [1usize, 2, 4][(r >> 8) as usize % 3];
        let v = next();
        let v = if r >> 20 & 3 == 0 { v & 0x1f } else { v };
        let num = pf.sriov.num_vfs(&pf.config);
        let e = pf.config_write(off, &v.to_le_bytes()[..len]);
        if let Some(c) = e.vf_enable {
            assert_ne!(c.enabled, enabled);
            enabled = c.enabled;
            assert_eq!(c.num_vfs, pf.sriov.num_vfs(&pf.config));
        }
        assert_eq!(enabled, pf.sriov.vf_enabled(&pf.config));
        let now = pf.sriov.num_vfs(&pf.config);
        assert!(now <= 7);
        if enabled && e.vf_enable.is_none() {
            assert_eq!(now, num);
        }
        assert_eq!(bytes(&mut pf, cap, 0x08), fixed);
        assert_eq!(bytes(&mut pf, cap + INITIAL_VFS, 4), ro);
        assert_eq!(pf.config_read_u32(cap + SYSTEM_PAGE_SIZE).count_ones(), 1);
        for c in &e.vf_bar_changes {
            assert_eq!(pf.sriov.vf_bar_mapping(&pf.config, c.bar), c.new);
        }
    }
}
