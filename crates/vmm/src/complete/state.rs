//! The vCPU as an instruction completion sees it: registers read once, guest memory reached by
//! linear address through the guest's own page tables, descriptors read from the GDT, and every
//! change held back until [`State::commit`], so that a refusal leaves the vCPU untouched.

use kvm_bindings::{
    KVM_VCPUEVENT_VALID_PAYLOAD, KVM_VCPUEVENT_VALID_SHADOW, Msrs, kvm_fpu, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{CompleteError, Exception, Refusal};

pub(super) const CR0_PE: u64 = 1;
pub(super) const CR4_LA57: u64 = 1 << 12;
pub(super) const EFER_LMA: u64 = 1 << 10;

// RFLAGS bits.
pub(super) const RFLAGS_FIXED: u64 = 1 << 1;
pub(super) const RFLAGS_NT: u64 = 1 << 14;
pub(super) const RFLAGS_VM: u64 = 1 << 17;

/// Paging granule: a linear range is translated one 4 KiB page at a time, which is right for
/// every page size.
const PAGE: u64 = 4096;

/// The mode the vCPU executes in, as the SDM names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Real,
    Virtual8086,
    /// Legacy protected mode (EFER.LMA = 0).
    Protected,
    /// IA-32e mode running a 16/32-bit code segment (CS.L = 0).
    Compatibility,
    /// IA-32e mode running a 64-bit code segment.
    Long64,
}

/// A GDT entry as read from guest memory, with the linear address it came from (to set its
/// accessed bit).
#[derive(Clone, Copy, Debug)]
pub(super) struct Descriptor {
    raw: u64,
    linear: u64,
}

impl Descriptor {
    fn bit(&self, n: u32) -> bool {
        (self.raw >> n) & 1 == 1
    }
    /// The 4-bit type field (with the accessed bit as bit 0).
    pub fn type_(&self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }
    /// Code or data (S = 1) rather than a system descriptor.
    pub fn is_segment(&self) -> bool {
        self.bit(44)
    }
    pub fn is_code(&self) -> bool {
        self.is_segment() && self.type_() & 0x8 != 0
    }
    pub fn is_conforming_code(&self) -> bool {
        self.is_code() && self.type_() & 0x4 != 0
    }
    pub fn is_writable_data(&self) -> bool {
        self.is_segment() && self.type_() & 0xa == 0x2
    }
    pub fn dpl(&self) -> u16 {
        ((self.raw >> 45) & 0x3) as u16
    }
    pub fn present(&self) -> bool {
        self.bit(47)
    }
    pub fn l(&self) -> bool {
        self.bit(53)
    }
    pub fn db(&self) -> bool {
        self.bit(54)
    }

    /// The segment register contents after loading this descriptor with `selector`: what the
    /// processor puts in the hidden part (base, limit scaled by G, attributes), with the accessed
    /// bit set as the load sets it. `long` says whether the vCPU is in IA-32e mode: outside it
    /// the L bit is reserved and not part of the loaded attributes.
    pub fn load(&self, selector: u16, long: bool) -> kvm_segment {
        let g = u8::from(self.bit(55));
        let raw_limit = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        kvm_segment {
            base: ((self.raw >> 16) & 0xff_ffff) | ((self.raw >> 32) & 0xff00_0000),
            limit: if g == 1 {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            selector,
            type_: self.type_() | 1,
            present: u8::from(self.present()),
            dpl: self.dpl() as u8,
            db: u8::from(self.db()),
            s: u8::from(self.is_segment()),
            l: u8::from(long && self.l()),
            g,
            avl: u8::from(self.bit(52)),
            unusable: 0,
            padding: 0,
        }
    }
}

/// A guest physical write held back until commit.
struct PendingWrite {
    gpa: GuestAddress,
    bytes: Vec<u8>,
}

pub(super) struct State<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The segment registers as read, so that commit skips `KVM_SET_SREGS` when nothing changed.
    sregs_before: kvm_sregs,
    writes: Vec<PendingWrite>,
    /// MSR writes held back until commit.
    msr_writes: Vec<(u32, u64)>,
    /// The instruction ends NMI blocking (IRET does).
    pub unblock_nmi: bool,
}

impl<'a> State<'a> {
    pub fn read(vcpu: &'a VcpuFd, mem: &'a GuestMemoryMmap) -> Result<Self, CompleteError> {
        let regs = vcpu
            .get_regs()
            .map_err(|e| CompleteError::Vcpu("KVM_GET_REGS", e))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| CompleteError::Vcpu("KVM_GET_SREGS", e))?;
        Ok(State {
            vcpu,
            mem,
            regs,
            sregs,
            sregs_before: sregs,
            writes: Vec::new(),
            msr_writes: Vec::new(),
            unblock_nmi: false,
        })
    }

    pub fn mode(&self) -> Mode {
        if self.sregs.cr0 & CR0_PE == 0 {
            Mode::Real
        } else if self.sregs.efer & EFER_LMA != 0 {
            if self.sregs.cs.l != 0 {
                Mode::Long64
            } else {
                Mode::Compatibility
            }
        } else if self.regs.rflags & RFLAGS_VM != 0 {
            Mode::Virtual8086
        } else {
            Mode::Protected
        }
    }

    /// IA-32e mode (64-bit or compatibility).
    pub fn long(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0
    }

    /// Default operand size of the code being executed, for the decoder.
    pub fn code_bits(&self) -> u32 {
        match self.mode() {
            Mode::Real | Mode::Virtual8086 => 16,
            Mode::Long64 => 64,
            Mode::Protected | Mode::Compatibility if self.sregs.cs.db != 0 => 32,
            Mode::Protected | Mode::Compatibility => 16,
        }
    }

    /// Current privilege level. KVM keeps it in SS.DPL (which the architecture guarantees equal
    /// to CPL in protected mode), so this is the value KVM itself acts on.
    pub fn cpl(&self) -> u16 {
        match self.mode() {
            Mode::Real => 0,
            Mode::Virtual8086 => 3,
            _ => u16::from(self.sregs.ss.dpl & 3),
        }
    }

    pub fn iopl(&self) -> u16 {
        ((self.regs.rflags >> 12) & 3) as u16
    }

    /// Whether `addr` is canonical for the current paging mode (48 or 57 address bits).
    pub fn canonical(&self, addr: u64) -> bool {
        let bits = if self.sregs.cr4 & CR4_LA57 != 0 {
            57
        } else {
            48
        };
        // Bits from the top implemented one upwards must be all clear or all set.
        let upper = addr >> (bits - 1);
        upper == 0 || upper == u64::MAX >> (bits - 1)
    }

    /// Linear addresses wrap at 4 GiB outside IA-32e mode.
    fn linear_mask(&self) -> u64 {
        if self.long() { u64::MAX } else { 0xffff_ffff }
    }

    /// Guest physical address of `linear`, through the guest's page tables as the vCPU uses them.
    /// KVM_TRANSLATE walks them but checks no permission; an access that the guest's own page
    /// permissions forbid is therefore carried out (see the module notes).
    fn translate(&self, linear: u64) -> Result<GuestAddress, Refusal> {
        let t = self
            .vcpu
            .translate_gva(linear)
            .map_err(|e| Refusal::Vcpu("KVM_TRANSLATE", e))?;
        if t.valid == 0 {
            return Err(Refusal::Unmapped { linear });
        }
        Ok(GuestAddress(t.physical_address))
    }

    /// Split `[linear, linear + len)` into page-sized pieces, each translated and checked to be
    /// guest RAM: `(guest physical address, offset in the range, length)`.
    fn pieces(
        &self,
        linear: u64,
        len: usize,
    ) -> Result<Vec<(GuestAddress, usize, usize)>, Refusal> {
        let mut out = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < len {
            let lin = linear.wrapping_add(done as u64) & self.linear_mask();
            let room = (PAGE - (lin & (PAGE - 1))) as usize;
            let n = room.min(len - done);
            let gpa = self.translate(lin)?;
            // Bounds-check against guest RAM here so that a later write cannot fail half-way.
            if !self.mem.check_range(gpa, n) {
                return Err(Refusal::NotRam {
                    linear: lin,
                    gpa: gpa.0,
                });
            }
            out.push((gpa, done, n));
            done += n;
        }
        Ok(out)
    }

    /// Read guest memory at a linear address (a range that crosses pages is translated page by
    /// page).
    pub fn read_linear(&self, linear: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        for (gpa, off, n) in self.pieces(linear, buf.len())? {
            self.mem
                .read_slice(&mut buf[off..off + n], gpa)
                .map_err(|_| Refusal::NotRam {
                    linear: linear.wrapping_add(off as u64),
                    gpa: gpa.0,
                })?;
        }
        Ok(())
    }

    /// Queue a write of `bytes` at a linear address, translated now and done at commit.
    pub fn write_linear(&mut self, linear: u64, bytes: &[u8]) -> Result<(), Refusal> {
        for (gpa, off, n) in self.pieces(linear, bytes.len())? {
            self.writes.push(PendingWrite {
                gpa,
                bytes: bytes[off..off + n].to_vec(),
            });
        }
        Ok(())
    }

    /// The host address of `len` bytes of guest RAM at `linear`, which must not cross a page,
    /// for an access that must be atomic against other vCPUs (done at once, not at commit).
    pub fn host_ptr(&self, linear: u64, len: usize) -> Result<*mut u8, Refusal> {
        let pieces = self.pieces(linear, len)?;
        let [(gpa, _, n)] = pieces[..] else {
            return Err(Refusal::Unsupported(
                "an atomic access across a page boundary",
            ));
        };
        if n != len {
            return Err(Refusal::Unsupported(
                "an atomic access across a page boundary",
            ));
        }
        self.mem
            .get_host_address(gpa)
            .map_err(|_| Refusal::NotRam { linear, gpa: gpa.0 })
    }

    /// The values of `N` model-specific registers.
    pub fn msrs<const N: usize>(&self, indices: [u32; N]) -> Result<[u64; N], Refusal> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Refusal::Unsupported("this many MSRs"))?;
        let n = self
            .vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| Refusal::Vcpu("KVM_GET_MSRS", e))?;
        if n != N {
            return Err(Refusal::Unsupported("an MSR KVM does not report"));
        }
        let mut out = [0u64; N];
        for (o, e) in out.iter_mut().zip(msrs.as_slice()) {
            *o = e.data;
        }
        Ok(out)
    }

    /// Queue a write of an MSR, done at commit.
    pub fn set_msr(&mut self, index: u32, data: u64) {
        self.msr_writes.push((index, data));
    }

    /// The x87/SSE state (KVM_GET_FPU).
    pub fn fpu(&self) -> Result<kvm_fpu, Refusal> {
        self.vcpu
            .get_fpu()
            .map_err(|e| Refusal::Vcpu("KVM_GET_FPU", e))
    }

    /// Read up to 15 instruction bytes at CS:RIP; the second page may be unmapped (the
    /// instruction may end before it). Returns how many bytes were read.
    pub fn fetch(&self, buf: &mut [u8; 15]) -> Result<usize, (u64, Refusal)> {
        let linear = if self.mode() == Mode::Long64 {
            self.regs.rip
        } else {
            self.sregs.cs.base.wrapping_add(self.regs.rip) & self.linear_mask()
        };
        let first = ((PAGE - (linear & (PAGE - 1))) as usize).min(buf.len());
        self.read_linear(linear, &mut buf[..first])
            .map_err(|e| (linear, e))?;
        if first < buf.len() {
            let next = linear.wrapping_add(first as u64);
            if self.read_linear(next, &mut buf[first..]).is_err() {
                return Ok(first);
            }
        }
        Ok(buf.len())
    }

    /// Read the GDT entry for `selector`. Faults as the SDM prescribes for a selector beyond the
    /// table limit; LDT selectors are refused (no guest we run uses an LDT for CS or SS).
    pub fn descriptor(&self, selector: u16) -> Result<Descriptor, Refusal> {
        if selector & 0x4 != 0 {
            return Err(Refusal::Unsupported("a selector that points into the LDT"));
        }
        let index = u64::from(selector >> 3);
        if index * 8 + 7 > u64::from(self.sregs.gdt.limit) {
            return Err(Refusal::Fault(
                "selector beyond the GDT limit",
                Exception::Gp(selector & !3),
            ));
        }
        let linear = self.sregs.gdt.base.wrapping_add(index * 8) & self.linear_mask();
        let mut raw = [0u8; 8];
        self.read_linear(linear, &mut raw)?;
        Ok(Descriptor {
            raw: u64::from_le_bytes(raw),
            linear,
        })
    }

    /// Loading a segment register sets the descriptor's accessed bit in the GDT if it is clear.
    pub fn set_accessed(&mut self, desc: &Descriptor) -> Result<(), Refusal> {
        if desc.type_() & 1 == 0 {
            let access = ((desc.raw >> 40) & 0xff) as u8 | 1;
            self.write_linear(desc.linear.wrapping_add(5) & self.linear_mask(), &[access])?;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes of the stack at SP + `offset`, with the checks the processor makes
    /// on a pop: the SS limit (expand-up or expand-down) outside 64-bit mode, canonical addresses
    /// in it.
    pub fn read_stack(&self, offset: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        let len = buf.len() as u64;
        if self.mode() == Mode::Long64 {
            let start = self.regs.rsp.wrapping_add(offset);
            let end = start.wrapping_add(len - 1);
            if !self.canonical(start) || !self.canonical(end) || end < start {
                return Err(Refusal::Fault(
                    "non-canonical stack address",
                    Exception::Ss(0),
                ));
            }
            return self.read_linear(start, buf);
        }
        let ss = &self.sregs.ss;
        let top: u64 = if ss.db != 0 { 0xffff_ffff } else { 0xffff };
        let first = (self.regs.rsp & top).wrapping_add(offset) & top;
        let last = first + len - 1;
        if last > top {
            return Err(Refusal::Unsupported(
                "a stack access that wraps around the stack segment",
            ));
        }
        let limit = u64::from(ss.limit);
        let expand_down = ss.type_ & 0x4 != 0;
        let inside = if expand_down {
            first > limit
        } else {
            last <= limit
        };
        if !inside {
            return Err(Refusal::Fault(
                "stack access beyond the SS limit",
                Exception::Ss(0),
            ));
        }
        self.read_linear(ss.base.wrapping_add(first), buf)
    }

    /// SP after popping `n` bytes: the stack-address size (SS.B) decides how much of RSP moves.
    pub fn popped_sp(&self, n: u64) -> u64 {
        let rsp = self.regs.rsp;
        if self.mode() == Mode::Long64 {
            return rsp.wrapping_add(n);
        }
        let mask: u64 = if self.sregs.ss.db != 0 {
            0xffff_ffff
        } else {
            0xffff
        };
        (rsp & !mask) | (rsp.wrapping_add(n) & mask)
    }

    /// Write everything back: guest memory, registers, segment registers when they changed, and
    /// the event state the instruction affects.
    pub fn commit(self) -> Result<(), CompleteError> {
        for w in &self.writes {
            // Ranges were checked against guest RAM when queued.
            self.mem
                .write_slice(&w.bytes, w.gpa)
                .map_err(|_| CompleteError::Write(w.gpa.0))?;
        }
        if !self.msr_writes.is_empty() {
            let entries: Vec<kvm_msr_entry> = self
                .msr_writes
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| CompleteError::Msrs)?;
            let n = self
                .vcpu
                .set_msrs(&msrs)
                .map_err(|e| CompleteError::Vcpu("KVM_SET_MSRS", e))?;
            if n != entries.len() {
                return Err(CompleteError::Msrs);
            }
        }
        self.vcpu
            .set_regs(&self.regs)
            .map_err(|e| CompleteError::Vcpu("KVM_SET_REGS", e))?;
        if self.sregs != self.sregs_before {
            self.vcpu
                .set_sregs(&self.sregs)
                .map_err(|e| CompleteError::Vcpu("KVM_SET_SREGS", e))?;
        }
        self.retire_events()
    }

    /// The completed instruction has retired: an interrupt shadow (STI, MOV SS) that covered it
    /// ends, and IRET ends NMI blocking. KVM would otherwise keep the shadow for the next
    /// instruction, and a shadow left with IF clear makes VM entry fail on VMX.
    fn retire_events(&self) -> Result<(), CompleteError> {
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(|e| CompleteError::Vcpu("KVM_GET_VCPU_EVENTS", e))?;
        let shadow = events.flags & KVM_VCPUEVENT_VALID_SHADOW != 0 && events.interrupt.shadow != 0;
        let nmi = self.unblock_nmi && events.nmi.masked != 0;
        if !shadow && !nmi {
            return Ok(());
        }
        events.interrupt.shadow = 0;
        if nmi {
            events.nmi.masked = 0;
        }
        // Write back only what this changes: leaving NMI_PENDING, SIPI_VECTOR, SMM and
        // TRIPLE_FAULT out keeps KVM's own values (an NMI queued by another vCPU meanwhile is not
        // overwritten). PAYLOAD stays if KVM reported it, or a pending exception would be lost.
        events.flags &= KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_PAYLOAD;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(|e| CompleteError::Vcpu("KVM_SET_VCPU_EVENTS", e))
    }
}
