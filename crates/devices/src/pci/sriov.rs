//! The SR-IOV extended capability (PCIe base spec, Single Root I/O Virtualization chapter, id
//! 0x0010): the registers a physical function (PF) exposes so that the guest can turn on its
//! virtual functions (VFs).
//!
//! The capability never creates or removes a function itself. [`ConfigSpace`] applies the guest's
//! write through its masks; [`SriovCap::config_written`] then looks at the result, puts back what
//! the spec says must be ignored, and reports what changed as [`ConfigEffects::vf_enable`] and
//! [`ConfigEffects::vf_bar_changes`]: actions for the builder (which owns the buses and the VF
//! factory), never a device reaching into the bus.
//!
//! Behaviour chosen where the spec leaves a choice:
//! - NumVFs above TotalVFs: the write is ignored (the old value stays).
//! - NumVFs, System Page Size and ARI Capable Hierarchy written while VF Enable is set: ignored.
//! - System Page Size with other than exactly one supported size bit: ignored.
//! - First VF Offset and VF Stride are fixed by the device (they do not depend on ARI Capable
//!   Hierarchy or NumVFs here): the device picks values that fit with or without ARI.
//! - VF BARs are plain registers, as in hardware: a write while VF MSE is set takes effect at
//!   once, and if the VFs are decoding, the move is reported as a [`VfBarChange`].
//! - Every VF BAR is at least the largest supported page size, so that its alignment holds
//!   whichever System Page Size the guest picks; its sizing mask is then fixed.
//! - VF Migration is not supported: its control bits, status and the migration state array
//!   offset read as zero.

use super::capability::Capability;
use super::config::touches;
use super::{AddressSpace, BarKind, Bdf, ConfigEffects, ConfigSpace, PciError, ext_cap_id};

/// Register offsets relative to the capability and bits (PCIe base spec, SR-IOV 9.3.3).
pub mod reg {
    pub const CAPABILITIES: u16 = 0x04;
    pub const CONTROL: u16 = 0x08;
    pub const STATUS: u16 = 0x0a;
    pub const INITIAL_VFS: u16 = 0x0c;
    pub const TOTAL_VFS: u16 = 0x0e;
    pub const NUM_VFS: u16 = 0x10;
    pub const FUNCTION_DEPENDENCY_LINK: u16 = 0x12;
    pub const FIRST_VF_OFFSET: u16 = 0x14;
    pub const VF_STRIDE: u16 = 0x16;
    pub const VF_DEVICE_ID: u16 = 0x1a;
    pub const SUPPORTED_PAGE_SIZES: u16 = 0x1c;
    pub const SYSTEM_PAGE_SIZE: u16 = 0x20;
    pub const VF_BAR0: u16 = 0x24;
    pub const VF_MIGRATION_STATE: u16 = 0x3c;
    /// Bytes of the capability, header included.
    pub const LEN: usize = 0x40;

    pub const CTRL_VF_ENABLE: u16 = 1 << 0;
    pub const CTRL_VF_MIGRATION_ENABLE: u16 = 1 << 1;
    pub const CTRL_VF_MIGRATION_INTERRUPT: u16 = 1 << 2;
    pub const CTRL_VF_MSE: u16 = 1 << 3;
    pub const CTRL_ARI_CAPABLE: u16 = 1 << 4;
    /// What the guest may write in Control (no migration support).
    pub const CTRL_WRITABLE: u16 = CTRL_VF_ENABLE | CTRL_VF_MSE | CTRL_ARI_CAPABLE;
    /// Supported/System Page Size bit 0: 4 KiB; bit n: 4 KiB << n.
    pub const PAGE_4K: u32 = 1;
}

/// A VF BAR as the PF declares it: `size` is what each VF gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfBar {
    pub index: u8,
    /// Memory only: VFs have no I/O BARs.
    pub kind: BarKind,
    /// A power of two, at least the largest supported page size.
    pub size: u64,
    pub prefetchable: bool,
}

/// What the PF declares about its VFs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovParams {
    pub initial_vfs: u16,
    pub total_vfs: u16,
    /// Routing id of VF 0 relative to the PF's.
    pub first_vf_offset: u16,
    /// Routing id distance between consecutive VFs.
    pub vf_stride: u16,
    pub vf_device_id: u16,
    /// Bit n set: pages of 4 KiB << n are supported. Bit 0 (4 KiB) is required.
    pub supported_page_sizes: u32,
    pub vf_bars: Vec<VfBar>,
}

/// VF Enable flipped: the builder creates (or removes) `num_vfs` functions, VF i at
/// [`vf_routing_id`]`(pf, first_offset, stride, i)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfEnableChange {
    pub enabled: bool,
    pub num_vfs: u16,
    pub first_offset: u16,
    pub stride: u16,
}

/// Where the VFs' BAR `bar` decodes changed. `old`/`new` are the base of the whole aperture (VF
/// i's BAR is at `base + i * size`), `None` when not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfBarChange {
    pub bar: u8,
    pub space: AddressSpace,
    /// Per VF.
    pub size: u64,
    pub num_vfs: u16,
    pub old: Option<u64>,
    pub new: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SriovError {
    #[error("InitialVFs {initial} above TotalVFs {total}")]
    InitialVfs { initial: u16, total: u16 },
    #[error("Supported page sizes {0:#x} lack 4 KiB")]
    PageSizes(u32),
    #[error("VF BAR {index} cannot be {size:#x} bytes of that kind")]
    VfBar { index: u8, size: u64 },
    #[error("VF BAR {0} does not exist or is taken")]
    VfBarIndex(u8),
    #[error("VF {vf} has no routing id (offset {offset}, stride {stride})")]
    RoutingId { vf: u16, offset: u16, stride: u16 },
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// VF `vf`'s (0-based) routing id: the PF's plus First VF Offset plus `vf` x VF Stride. The sum
/// carries from the function number into the bus number, as the spec intends; beyond bus 255 it
/// is an error.
pub fn vf_routing_id(pf: Bdf, first_offset: u16, stride: u16, vf: u16) -> Result<Bdf, SriovError> {
    let err = || SriovError::RoutingId {
        vf,
        offset: first_offset,
        stride,
    };
    let rid = u32::from(vf)
        .checked_mul(u32::from(stride))
        .and_then(|d| d.checked_add(u32::from(pf.raw())))
        .and_then(|r| r.checked_add(u32::from(first_offset)))
        .ok_or_else(err)?;
    u16::try_from(rid).map(Bdf::from_raw).map_err(|_| err())
}

/// The state the capability last accepted: what a guest write is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shadow {
    control: u16,
    num_vfs: u16,
    page_size: u32,
    mappings: [Option<u64>; 6],
}

/// The SR-IOV capability of one PF.
#[derive(Debug)]
pub struct SriovCap {
    offset: u16,
    params: SriovParams,
    /// Index by VF BAR register; `None` for empty slots and upper halves.
    bars: [Option<VfBar>; 6],
    shadow: Shadow,
}

impl SriovCap {
    /// Check `params`, add the capability to `config` and return it.
    pub fn new(config: &mut ConfigSpace, params: SriovParams) -> Result<Self, SriovError> {
        if params.initial_vfs > params.total_vfs {
            return Err(SriovError::InitialVfs {
                initial: params.initial_vfs,
                total: params.total_vfs,
            });
        }
        if params.supported_page_sizes & reg::PAGE_4K == 0 {
            return Err(SriovError::PageSizes(params.supported_page_sizes));
        }
        // 4 KiB << the highest supported bit, at most 4 KiB << 31.
        let max_page = 0x1000u64 << (31 - params.supported_page_sizes.leading_zeros());

        let mut c = Capability::extended(ext_cap_id::SRIOV, 1, reg::LEN);
        let r = |o: u16| usize::from(o);
        c.set_u16(r(reg::INITIAL_VFS), params.initial_vfs);
        c.set_u16(r(reg::TOTAL_VFS), params.total_vfs);
        c.set_u16(r(reg::FIRST_VF_OFFSET), params.first_vf_offset);
        c.set_u16(r(reg::VF_STRIDE), params.vf_stride);
        c.set_u16(r(reg::VF_DEVICE_ID), params.vf_device_id);
        c.set_u32(r(reg::SUPPORTED_PAGE_SIZES), params.supported_page_sizes);
        c.set_u32(r(reg::SYSTEM_PAGE_SIZE), reg::PAGE_4K);
        c.writable(r(reg::CONTROL), 2, reg::CTRL_WRITABLE.into());
        c.writable(r(reg::NUM_VFS), 2, 0xffff);
        c.writable(r(reg::SYSTEM_PAGE_SIZE), 4, u32::MAX);

        let mut bars = [None; 6];
        let mut taken = [false; 6];
        for bar in &params.vf_bars {
            let i = usize::from(bar.index);
            let regs = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
            if i + regs > 6 || taken[i..i + regs].iter().any(|&t| t) {
                return Err(SriovError::VfBarIndex(bar.index));
            }
            let max = match bar.kind {
                BarKind::Mem32 => 1 << 31,
                BarKind::Mem64 => 1 << 63,
                BarKind::Io => 0,
            };
            if !bar.size.is_power_of_two() || bar.size < max_page || bar.size > max {
                return Err(SriovError::VfBar {
                    index: bar.index,
                    size: bar.size,
                });
            }
            taken[i..i + regs].fill(true);
            let off = r(reg::VF_BAR0) + 4 * i;
            let mask = !(bar.size - 1);
            let flags = if bar.kind == BarKind::Mem64 { 0x4 } else { 0 }
                | if bar.prefetchable { 0x8 } else { 0 };
            c.set_u32(off, flags);
            c.writable(off, 4, (mask & !0xf) as u32);
            if bar.kind == BarKind::Mem64 {
                c.writable(off + 4, 4, (mask >> 32) as u32);
            }
            bars[i] = Some(*bar);
        }

        let offset = config.add_capability(&c)?;
        let mut cap = Self {
            offset,
            params,
            bars,
            shadow: Shadow {
                control: 0,
                num_vfs: 0,
                page_size: reg::PAGE_4K,
                mappings: [None; 6],
            },
        };
        cap.shadow = cap.state(config);
        Ok(cap)
    }

    /// Where the capability sits in config space.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn params(&self) -> &SriovParams {
        &self.params
    }

    fn at(&self, reg: u16) -> u16 {
        self.offset + reg
    }

    pub fn control(&self, config: &ConfigSpace) -> u16 {
        config.read_u16(self.at(reg::CONTROL))
    }

    pub fn vf_enabled(&self, config: &ConfigSpace) -> bool {
        self.control(config) & reg::CTRL_VF_ENABLE != 0
    }

    pub fn num_vfs(&self, config: &ConfigSpace) -> u16 {
        config.read_u16(self.at(reg::NUM_VFS))
    }

    /// System Page Size in bytes.
    pub fn page_size(&self, config: &ConfigSpace) -> u64 {
        let v = config.read_u32(self.at(reg::SYSTEM_PAGE_SIZE));
        0x1000u64 << v.trailing_zeros().min(31)
    }

    /// VF `vf`'s routing id given the PF's.
    pub fn routing_id(&self, pf: Bdf, vf: u16) -> Result<Bdf, SriovError> {
        vf_routing_id(pf, self.params.first_vf_offset, self.params.vf_stride, vf)
    }

    /// The VF BAR declared at register `index`.
    pub fn vf_bar(&self, index: u8) -> Option<VfBar> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// The base programmed in VF BAR `index` (VF 0's BAR), decoding or not.
    pub fn vf_bar_base(&self, config: &ConfigSpace, index: u8) -> Option<u64> {
        let bar = self.vf_bar(index)?;
        let off = self.at(reg::VF_BAR0) + 4 * u16::from(index);
        let low = u64::from(config.read_u32(off) & !0xf);
        Some(match bar.kind {
            BarKind::Mem64 => low | (u64::from(config.read_u32(off + 4)) << 32),
            _ => low,
        })
    }

    /// VF `vf`'s BAR `index`: base + vf x size, if that VF exists and the sum fits.
    pub fn vf_bar_address(&self, config: &ConfigSpace, index: u8, vf: u16) -> Option<u64> {
        if vf >= self.num_vfs(config) {
            return None;
        }
        let bar = self.vf_bar(index)?;
        self.vf_bar_base(config, index)?
            .checked_add(bar.size.checked_mul(u64::from(vf))?)
    }

    /// Where VF BAR `index`'s aperture (NumVFs x size) decodes now: VF Enable and VF MSE set,
    /// NumVFs non-zero, an address assigned, and the aperture below the top of its space.
    pub fn vf_bar_mapping(&self, config: &ConfigSpace, index: u8) -> Option<u64> {
        let bar = self.vf_bar(index)?;
        let ctrl = self.control(config);
        let on = reg::CTRL_VF_ENABLE | reg::CTRL_VF_MSE;
        let n = self.num_vfs(config);
        if ctrl & on != on || n == 0 {
            return None;
        }
        let base = self.vf_bar_base(config, index).filter(|&b| b != 0)?;
        let last = bar
            .size
            .checked_mul(u64::from(n))
            .and_then(|len| base.checked_add(len - 1))?;
        let limit = match bar.kind {
            BarKind::Mem32 => u64::from(u32::MAX),
            _ => u64::MAX,
        };
        (last < limit).then_some(base)
    }

    fn state(&self, config: &ConfigSpace) -> Shadow {
        Shadow {
            control: self.control(config),
            num_vfs: self.num_vfs(config),
            page_size: config.read_u32(self.at(reg::SYSTEM_PAGE_SIZE)),
            mappings: std::array::from_fn(|i| self.vf_bar_mapping(config, i as u8)),
        }
    }

    /// Call after every guest write to `config` (`offset`, `len` as written): undoes what the
    /// spec says to ignore and adds what changed to `effects`.
    pub fn config_written(
        &mut self,
        config: &mut ConfigSpace,
        offset: u16,
        len: usize,
        effects: &mut ConfigEffects,
    ) {
        if !touches(offset, len, self.offset, reg::LEN) {
            return;
        }
        let old = self.shadow;
        let was_enabled = old.control & reg::CTRL_VF_ENABLE != 0;

        let num = self.num_vfs(config);
        if num != old.num_vfs && (was_enabled || num > self.params.total_vfs) {
            tracing::debug!(num, old = old.num_vfs, "SR-IOV NumVFs write ignored");
            config.set_u16(self.at(reg::NUM_VFS), old.num_vfs);
        }
        let page = config.read_u32(self.at(reg::SYSTEM_PAGE_SIZE));
        if page != old.page_size
            && (was_enabled
                || page.count_ones() != 1
                || page & self.params.supported_page_sizes == 0)
        {
            tracing::debug!(page, "SR-IOV System Page Size write ignored");
            config.set_u32(self.at(reg::SYSTEM_PAGE_SIZE), old.page_size);
        }
        let ctrl = self.control(config);
        if was_enabled && (ctrl ^ old.control) & reg::CTRL_ARI_CAPABLE != 0 {
            tracing::debug!("SR-IOV ARI Capable Hierarchy write ignored while VFs are enabled");
            let fixed = (ctrl & !reg::CTRL_ARI_CAPABLE) | (old.control & reg::CTRL_ARI_CAPABLE);
            config.set_u16(self.at(reg::CONTROL), fixed);
        }

        let new = self.state(config);
        let enabled = new.control & reg::CTRL_VF_ENABLE != 0;
        if enabled != was_enabled {
            effects.vf_enable = Some(VfEnableChange {
                enabled,
                // NumVFs cannot change while enabled, so this is the count either way.
                num_vfs: new.num_vfs,
                first_offset: self.params.first_vf_offset,
                stride: self.params.vf_stride,
            });
        }
        for (i, (o, n)) in old.mappings.iter().zip(new.mappings).enumerate() {
            if *o == n {
                continue;
            }
            if let Some(bar) = self.bars[i] {
                effects.vf_bar_changes.push(VfBarChange {
                    bar: bar.index,
                    space: AddressSpace::Memory,
                    size: bar.size,
                    num_vfs: new.num_vfs,
                    old: *o,
                    new: n,
                });
            }
        }
        self.shadow = new;
    }
}

#[cfg(test)]
mod tests;
