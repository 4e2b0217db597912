//! MC146818 real-time clock and its 128 bytes of CMOS RAM, at ports 0x70 (index; bit 7 masks NMI)
//! and 0x71 (data). Insert at 0x70 with length 2.
//!
//! The clock is the host's UTC time, read at every access, in BCD or binary and 24 or 12 hour format
//! as register B says. Guest writes to the clock registers are dropped: the guest always sees host
//! time. The memory size bytes that firmware reads (SeaBIOS, like QEMU's `pc_cmos_init`) are set
//! at construction. No RTC interrupts (IRQ 8): register C always reads 0.

use std::time::{Duration, SystemTime};

use tracing::debug;

use super::{read_bytes, write_bytes};
use crate::bus::BusDevice;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
/// Divider bits 6-4; 0b11x holds the divider chain in reset, which stops updates.
const A_DIVIDER_RESET: u8 = 0x60;
/// 32.768 kHz time base, 1024 Hz periodic rate: what a BIOS leaves.
const A_DEFAULT: u8 = 0x26;
/// Updates halted so the guest can set the clock.
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// Valid RAM and time: the battery is fine.
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// The update-in-progress bit rises this long before each second ticks over.
const UIP_LEAD: Duration = Duration::from_micros(244);

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Wall-clock time as a duration since the Unix epoch; injectable for tests.
pub type Clock = Box<dyn Fn() -> Duration + Send>;

/// The RTC and CMOS RAM.
pub struct Cmos {
    index: u8,
    nmi_masked: bool,
    ram: [u8; 128],
    clock: Clock,
}

impl Cmos {
    /// `low_ram_bytes` is RAM below the 32-bit hole (starting at 0), `high_ram_bytes` RAM from
    /// 4 GiB up; the clock is the host's.
    pub fn new(low_ram_bytes: u64, high_ram_bytes: u64) -> Self {
        Self::with_clock(
            low_ram_bytes,
            high_ram_bytes,
            Box::new(|| {
                // A host clock before 1970 reads as the epoch.
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
            }),
        )
    }

    /// As [`new`](Self::new), with the time taken from `clock`.
    pub fn with_clock(low_ram_bytes: u64, high_ram_bytes: u64, clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = A_DEFAULT;
        ram[REG_B] = B_24H;
        let mut put = |at: usize, val: u64, bytes: usize| {
            for i in 0..bytes {
                ram[at + i] = (val >> (8 * i)) as u8;
            }
        };
        // Base memory in KiB, at most 640.
        put(0x15, (low_ram_bytes / KIB).min(640), 2);
        // Extended memory from 1 MiB, in KiB, saturating at 64 MiB - 1 KiB.
        let ext = (low_ram_bytes.saturating_sub(MIB) / KIB).min(0xffff);
        put(0x17, ext, 2);
        put(0x30, ext, 2);
        // Memory from 16 MiB to the end of low RAM, in 64 KiB units.
        put(
            0x34,
            (low_ram_bytes.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff),
            2,
        );
        // Memory above 4 GiB, in 64 KiB units; 24 bits hold 1 TiB, saturate rather than wrap.
        put(0x5b, (high_ram_bytes / (64 * KIB)).min(0xff_ffff), 3);
        Self {
            index: 0,
            nmi_masked: false,
            ram,
            clock,
        }
    }

    /// Whether the guest has masked NMIs (bit 7 of its last index write).
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                self.clock_reg(reg)
            }
            REG_A => {
                let a = self.ram[REG_A];
                if self.updating() { a | A_UIP } else { a }
            }
            // No interrupt sources, so no flags to report (reading clears them).
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.ram[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, val: u8) {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                debug!("cmos: write of {val:#04x} to clock register {reg:#04x} dropped");
            }
            // UIP is read-only.
            REG_A => self.ram[REG_A] = val & !A_UIP,
            REG_C | REG_D => debug!("cmos: write of {val:#04x} to read-only register {reg:#04x}"),
            _ => self.ram[reg] = val,
        }
    }

    /// UIP: an update is due within the next 244 us, unless updates are halted.
    fn updating(&self) -> bool {
        let running =
            self.ram[REG_B] & B_SET == 0 && self.ram[REG_A] & A_DIVIDER_RESET != A_DIVIDER_RESET;
        let into_second = Duration::from_nanos(u64::from((self.clock)().subsec_nanos()));
        running && into_second >= Duration::from_secs(1) - UIP_LEAD
    }

    fn clock_reg(&self, reg: usize) -> u8 {
        let secs = (self.clock)().as_secs();
        let days = secs / 86_400;
        let in_day = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        let b = self.ram[REG_B];
        let enc = |v: u64| -> u8 {
            let v = v % 100;
            if b & B_BINARY != 0 {
                v as u8
            } else {
                (((v / 10) << 4) | (v % 10)) as u8
            }
        };
        match reg {
            SECONDS => enc(in_day % 60),
            MINUTES => enc(in_day / 60 % 60),
            HOURS => {
                let h = in_day / 3600;
                if b & B_24H != 0 {
                    enc(h)
                } else {
                    // 12 hour clock: 12 AM, 1 AM, ..., 12 PM, 1 PM, ...; bit 7 = PM.
                    let pm = if h >= 12 { HOUR_PM } else { 0 };
                    enc((h + 11) % 12 + 1) | pm
                }
            }
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            WEEKDAY => enc((days + 4) % 7 + 1),
            DAY => enc(day),
            MONTH => enc(month),
            YEAR => enc(year),
            _ => enc(year / 100),
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, after Howard Hinnant's
/// `civil_from_days`, restricted to dates from 1970 so everything stays unsigned.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        read_bytes(offset, 2, data, |p| {
            if p == 0 {
                // The index port is write-only.
                0xff
            } else {
                self.read_reg(usize::from(self.index))
            }
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        write_bytes(offset, 2, data, |p, b| {
            if p == 0 {
                self.index = b & 0x7f;
                self.nmi_masked = b & 0x80 != 0;
            } else {
                self.write_reg(usize::from(self.index), b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::legacy::testutil::{fuzz, read1};

    const GIB: u64 = 1024 * MIB;

    /// 2024-02-29 13:07:09 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_212_029;

    fn at(nanos: Arc<AtomicU64>, low: u64, high: u64) -> Cmos {
        Cmos::with_clock(
            low,
            high,
            Box::new(move || Duration::from_nanos(nanos.load(Ordering::SeqCst))),
        )
    }

    fn fixed(secs: u64) -> Cmos {
        at(Arc::new(AtomicU64::new(secs * 1_000_000_000)), 128 * MIB, 0)
    }

    fn reg(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r]);
        read1(c, 1)
    }

    fn set(c: &mut Cmos, r: u8, v: u8) {
        c.write(0, &[r]);
        c.write(1, &[v]);
    }

    fn clock(c: &mut Cmos) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| reg(c, r))
    }

    #[test]
    fn bcd_and_binary() {
        let mut c = fixed(LEAP_DAY);
        assert_eq!(reg(&mut c, 0x0b), 0x02);
        assert_eq!(
            clock(&mut c),
            [0x09, 0x07, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        set(&mut c, 0x0b, 0x06);
        assert_eq!(clock(&mut c), [9, 7, 13, 5, 29, 2, 24, 20]);
        // 12 hour clock: 1 PM.
        set(&mut c, 0x0b, 0x04);
        assert_eq!(reg(&mut c, 0x04), 0x81);
        set(&mut c, 0x0b, 0x00);
        assert_eq!(reg(&mut c, 0x04), 0x81);
    }

    #[test]
    fn twelve_hour_edges() {
        // Midnight is 12 AM, noon 12 PM.
        let mut c = fixed(0);
        set(&mut c, 0x0b, 0x00);
        assert_eq!(reg(&mut c, 0x04), 0x12);
        let mut c = fixed(12 * 3600);
        set(&mut c, 0x0b, 0x00);
        assert_eq!(reg(&mut c, 0x04), 0x92);
    }

    #[test]
    fn epoch_and_far_dates() {
        let mut c = fixed(0);
        // 1970-01-01 00:00:00, Thursday.
        assert_eq!(clock(&mut c), [0, 0, 0, 0x05, 0x01, 0x01, 0x70, 0x19]);
        // 2000-03-01 (after a 400-year leap day), Wednesday.
        let mut c = fixed(951_868_800);
        assert_eq!(clock(&mut c), [0, 0, 0, 0x04, 0x01, 0x03, 0x00, 0x20]);
        // 2100-12-31 23:59:59, Friday.
        let mut c = fixed(4_133_980_799);
        assert_eq!(
            clock(&mut c),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x00, 0x21]
        );
        // Absurd clocks do not panic.
        let mut c = fixed(u64::MAX / 1_000_000_000);
        clock(&mut c);
        let mut c = Cmos::with_clock(0, 0, Box::new(|| Duration::MAX));
        clock(&mut c);
        reg(&mut c, 0x0a);
    }

    #[test]
    fn update_in_progress() {
        let nanos = Arc::new(AtomicU64::new(LEAP_DAY * 1_000_000_000 + 500_000_000));
        let mut c = at(nanos.clone(), 0, 0);
        assert_eq!(reg(&mut c, 0x0a), 0x26);
        nanos.store(LEAP_DAY * 1_000_000_000 + 999_800_000, Ordering::SeqCst);
        assert_eq!(reg(&mut c, 0x0a), 0xa6);
        // Halted updates (SET) or a divider in reset: never in progress.
        set(&mut c, 0x0b, 0x82);
        assert_eq!(reg(&mut c, 0x0a), 0x26);
        set(&mut c, 0x0b, 0x02);
        set(&mut c, 0x0a, 0xe6);
        assert_eq!(reg(&mut c, 0x0a), 0x66);
        // UIP is read-only.
        set(&mut c, 0x0a, 0xa6);
        assert_eq!(reg(&mut c, 0x0a), 0xa6);
        nanos.store(LEAP_DAY * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(reg(&mut c, 0x0a), 0x26);
    }

    #[test]
    fn registers_c_d_and_read_only_clock() {
        let mut c = fixed(LEAP_DAY);
        assert_eq!(reg(&mut c, 0x0c), 0);
        assert_eq!(reg(&mut c, 0x0d), 0x80);
        set(&mut c, 0x0d, 0);
        set(&mut c, 0x0c, 0xff);
        assert_eq!(reg(&mut c, 0x0d), 0x80);
        assert_eq!(reg(&mut c, 0x0c), 0);
        let before = clock(&mut c);
        for r in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32] {
            set(&mut c, r, 0x11);
        }
        assert_eq!(clock(&mut c), before);
        // Alarm registers are plain storage.
        set(&mut c, 0x01, 0x30);
        assert_eq!(reg(&mut c, 0x01), 0x30);
    }

    #[test]
    fn nvram_and_index_port() {
        let mut c = fixed(0);
        for r in 0x0e..0x80u8 {
            if r != 0x32 {
                set(&mut c, r, r ^ 0xa5);
            }
        }
        for r in 0x0e..0x80u8 {
            if r != 0x32 {
                assert_eq!(reg(&mut c, r), r ^ 0xa5);
            }
        }
        // Bit 7 of the index masks NMI and is not part of the index.
        c.write(0, &[0x80 | 0x40]);
        assert!(c.nmi_masked());
        assert_eq!(read1(&mut c, 1), 0x40 ^ 0xa5);
        c.write(0, &[0x40]);
        assert!(!c.nmi_masked());
        assert_eq!(read1(&mut c, 0), 0xff);
        // outw 0x70 writes index then data; inw 0x70 reads 0xff then data.
        c.write(0, &[0x50, 0x77]);
        let mut w = [0u8; 2];
        c.read(0, &mut w);
        assert_eq!(w, [0xff, 0x77]);
        let mut w = [0u8; 4];
        c.read(1, &mut w);
        assert_eq!(w, [0x77, 0xff, 0xff, 0xff]);
    }

    fn memory_bytes(low: u64, high: u64) -> Vec<u8> {
        let mut c = at(Arc::new(AtomicU64::new(0)), low, high);
        [
            0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
        ]
        .into_iter()
        .map(|r| reg(&mut c, r))
        .collect()
    }

    #[test]
    fn memory_sizes() {
        // 128 MiB: 640 KiB base, extended saturated, 112 MiB above 16 MiB = 0x700 x 64 KiB.
        assert_eq!(
            memory_bytes(128 * MIB, 0),
            [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0x07, 0, 0, 0]
        );
        // 3 GiB: (3 GiB - 16 MiB) / 64 KiB = 0xBF00.
        assert_eq!(
            memory_bytes(3 * GIB, 0),
            [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0, 0, 0]
        );
        // 5 GiB: 3 GiB low, 2 GiB from 4 GiB = 0x8000 x 64 KiB.
        assert_eq!(
            memory_bytes(3 * GIB, 2 * GIB),
            [
                0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0x00, 0x80, 0x00
            ]
        );
        // 8 MiB: 7 MiB extended = 0x1C00 KiB, nothing above 16 MiB.
        assert_eq!(
            memory_bytes(8 * MIB, 0),
            [0x80, 0x02, 0x00, 0x1c, 0x00, 0x1c, 0, 0, 0, 0, 0]
        );
        // Tiny and huge: base below 640 KiB; above-4G saturates at 24 bits.
        assert_eq!(memory_bytes(512 * KIB, 0)[..4], [0x00, 0x02, 0, 0]);
        assert_eq!(memory_bytes(0, 2048 * GIB)[8..], [0xff, 0xff, 0xff]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let mut c = Cmos::new(3 * GIB, 2 * GIB);
        fuzz(&mut c, 0x70, 3, 50_000);
    }
}
