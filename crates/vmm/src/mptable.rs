//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its processors,
//! its I/O APIC and the ISA interrupt routing. No maintained crate writes them; they are small.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("Too many vCPUs for an MP table: {0}")]
    TooManyCpus(u8),
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The I/O APIC's id: the first one after the processors'.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Build the floating pointer and configuration table for `num_cpus` processors, laid out from
/// `base` (a 16-byte aligned guest physical address).
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus == 0xff {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        // Signature (family 6) and feature flags (FPU, APIC) as a BIOS reports them.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(num_cpus);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // KVM's default routing sends ISA IRQ n to I/O APIC pin n, conforming polarity/trigger.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the 8259), LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const FPS_LEN: usize = 16;
    const HDR_LEN: usize = 44;
    let table_addr = base + FPS_LEN as u64;
    let table_len = HDR_LEN + entries.len();

    let mut hdr = Vec::with_capacity(table_len);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    hdr.push(4); // spec revision 1.4
    hdr.push(0); // checksum, below
    hdr.extend_from_slice(b"MANIFOLD");
    hdr.extend_from_slice(b"000000000000");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    hdr.extend_from_slice(&0u16.to_le_bytes()); // extended table
    hdr.extend_from_slice(&[0, 0]);
    hdr.extend_from_slice(&entries);
    hdr[7] = checksum(&hdr);

    let mut fps = Vec::with_capacity(FPS_LEN + table_len);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fps.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fps[10] = checksum(&fps[..FPS_LEN]);
    fps.extend_from_slice(&hdr);
    Ok(fps)
}

/// Write the MP table for `num_cpus` processors at its fixed place in guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn table_is_well_formed() {
        let t = build(4, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u64::from(u32::from_le_bytes(t[4..8].try_into().unwrap()));
        assert_eq!(ptr, MPTABLE_START + 16);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        // 4 CPUs, bus, I/O APIC, 16 IRQs, 2 LINTs.
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Processor entries: ids 0..4, only the first is the BSP.
        for id in 0..4usize {
            let e = &cfg[44 + id * 20..];
            assert_eq!(e[0], MP_PROCESSOR);
            assert_eq!(e[1] as usize, id);
            assert_eq!(e[3], if id == 0 { 3 } else { 1 });
        }
    }

    #[test]
    fn cpu_count_bounds() {
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
        assert!(build(254, MPTABLE_START).is_ok());
    }
}
