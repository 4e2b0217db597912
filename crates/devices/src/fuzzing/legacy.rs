//! Legacy port devices: random register accesses of every size, with a shadow of the plain
//! storage registers (the UART's scratch and line control registers, CMOS RAM, the fw_cfg
//! read position).

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Input, le};
use crate::bus::BusDevice;
use crate::interrupt::CountingIrq;
use crate::legacy::fw_cfg::{DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_SKIP, key};
use crate::legacy::{Cmos, FwCfg, SERIAL_FIFO_SIZE, Serial};

/// An access at `offset` (mostly within `span`), read or written, of a fuzz-chosen size.
fn access(dev: &mut dyn BusDevice, input: &mut Input, span: u64) {
    let offset = if input.u8() % 16 == 0 {
        input.u64()
    } else {
        u64::from(input.u8()) % span
    };
    let len = input.access_len(true);
    if input.bool() {
        let v = input.u64();
        dev.write(offset, &le(v, len));
    } else {
        let mut b = [0u8; 8];
        dev.read(offset, &mut b[..len]);
    }
}

fn read1(dev: &mut dyn BusDevice, offset: u64) -> u8 {
    let mut b = [0u8];
    dev.read(offset, &mut b);
    b[0]
}

/// The 16550A UART: register accesses and host input. Scratch (7) and line control (3)
/// registers read back what was written; the receive FIFO never holds more than its size.
pub fn serial(data: &[u8]) {
    let mut input = Input::new(data);
    let mut uart = Serial::new(
        CountingIrq::new(),
        Box::new(std::io::sink()),
        Some(CountingIrq::new()),
    );
    // Reset values, whatever the UART model starts with.
    let (mut scratch, mut lcr) = (read1(&mut uart, 7), read1(&mut uart, 3));
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => {
                let bytes = input.bytes(24);
                let room = uart.fifo_room();
                let taken = uart.enqueue(bytes);
                assert!(taken <= room.min(bytes.len()), "took {taken} of {room}");
            }
            1 => {
                let v = input.u8();
                uart.write(7, &[v]);
                scratch = v;
            }
            2 => {
                let v = input.u8();
                uart.write(3, &[v]);
                lcr = v;
            }
            _ => {
                access(&mut uart, &mut input, 8);
                // An access that reached 3 or 7 changed them: read back what the model cannot
                // know and go on from there.
                scratch = read1(&mut uart, 7);
                lcr = read1(&mut uart, 3);
            }
        }
        assert_eq!(read1(&mut uart, 7), scratch, "scratch register");
        assert_eq!(read1(&mut uart, 3), lcr, "line control register");
        assert!(uart.fifo_room() <= SERIAL_FIFO_SIZE);
        let _ = uart.flush_output();
    }
}

/// CMOS RTC and NVRAM through the index and data ports. RAM registers (0x0e..0x7f but the
/// century) read back what was written.
pub fn cmos(data: &[u8]) {
    let mut input = Input::new(data);
    let secs = input.u64() % (200 * 365 * 86_400);
    let nanos = input.u32() % 1_000_000_000;
    let clock = Box::new(move || Duration::new(secs, nanos));
    let low = input.u64() % (4 << 30);
    let high = input.u64() >> input.u8().min(63);
    let mut dev = Cmos::with_clock(low, high, clock);
    let mut ram = [None::<u8>; 128];
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let index = input.u8();
                let v = input.u8();
                dev.write(0, &[index]);
                dev.write(1, &[v]);
                let reg = usize::from(index & 0x7f);
                // RAM from 0x0e, but for the century register (0x32): a clock register.
                if reg >= 0x0e && reg != 0x32 {
                    ram[reg] = Some(v);
                }
                assert_eq!(dev.nmi_masked(), index & 0x80 != 0);
            }
            1 => {
                let index = input.u8() & 0x7f;
                dev.write(0, &[index]);
                let v = read1(&mut dev, 1);
                if let Some(want) = ram[usize::from(index)] {
                    assert_eq!(v, want, "CMOS {index:#x}");
                }
            }
            _ => {
                // Anything else: the model forgets what an access could have changed.
                access(&mut dev, &mut input, 2);
                ram = [None; 128];
            }
        }
    }
}

/// fw_cfg with a few items and files: selector and data ports, the DMA interface with
/// descriptors in guest memory, and anything else. The port interface reads an item byte by
/// byte and then zeros, from where the last select, read or DMA left it.
pub fn fw_cfg(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).expect("fuzz memory");
    let mut dev = FwCfg::new(crate::virtio::DmaSpace::identity(mem.clone()));
    let mut items: Vec<(u16, Vec<u8>)> = vec![(key::SIGNATURE, b"QEMU".to_vec())];
    for (k, len) in [(key::RAM_SIZE, 8usize), (key::NB_CPUS, 2)] {
        let v: Vec<u8> = (0..len).map(|i| i as u8 + 1).collect();
        // Legacy keys that are free on a new device.
        let _ = dev.set_item(k, v.clone());
        items.push((k, v));
    }
    for (name, len) in [("etc/a", 5usize), ("etc/b", 300)] {
        let v: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
        if let Ok(k) = dev.add_file(name, v.clone()) {
            items.push((k, v));
        }
    }
    // The model: the selected item's bytes and the read position, while known.
    let mut pos: Option<(usize, usize)> = Some((0, 0));
    while !input.is_empty() {
        match input.u8() % 6 {
            0 => {
                let i = usize::from(input.u8()) % items.len();
                dev.write(0, &items[i].0.to_le_bytes());
                pos = Some((i, 0));
            }
            1 | 2 => {
                let b = read1(&mut dev, u64::from(input.u8() & 1));
                if let Some((i, at)) = pos {
                    assert_eq!(b, items[i].1.get(at).copied().unwrap_or(0), "item byte");
                    pos = Some((i, (at + 1).min(items[i].1.len())));
                }
            }
            3 => {
                // A DMA request: descriptor and buffer in (or out of) guest memory.
                let desc = if input.u8() % 8 == 0 {
                    input.u64()
                } else {
                    u64::from(input.u16() % 0x4000)
                };
                let control = match input.u8() % 4 {
                    0 => DMA_CTL_READ,
                    1 => DMA_CTL_SKIP,
                    2 => DMA_CTL_SELECT | DMA_CTL_READ | (u32::from(input.u8() % 0x24) << 16),
                    _ => input.u32(),
                };
                let len = if input.bool() {
                    u32::from(input.u16() % 0x800)
                } else {
                    input.u32()
                };
                let addr = if input.u8() % 8 == 0 {
                    input.u64()
                } else {
                    u64::from(input.u16() % 0x4000)
                };
                let mut d = [0u8; 16];
                d[0..4].copy_from_slice(&control.to_be_bytes());
                d[4..8].copy_from_slice(&len.to_be_bytes());
                d[8..16].copy_from_slice(&addr.to_be_bytes());
                let _ = mem.write_slice(&d, GuestAddress(desc));
                if input.bool() {
                    dev.write(4, &desc.to_be_bytes());
                } else {
                    dev.write(4, &((desc >> 32) as u32).to_be_bytes());
                    dev.write(8, &(desc as u32).to_be_bytes());
                }
                pos = None;
            }
            _ => {
                access(&mut dev, &mut input, 12);
                pos = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::tests::run;

    #[test]
    fn serial_random_inputs() {
        run(serial, 0x5e71_a100_0000_0001, 3000, 300);
    }

    #[test]
    fn cmos_random_inputs() {
        run(cmos, 0xc305_0000_0000_0001, 3000, 300);
    }

    #[test]
    fn fw_cfg_random_inputs() {
        run(fw_cfg, 0xf3c6_0000_0000_0001, 3000, 300);
    }
}
