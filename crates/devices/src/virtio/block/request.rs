//! One virtio-blk request: parse and check a descriptor chain, run it on the backend, report.
//!
//! Framing follows the spec's "no assumptions about framing" rule: the 16-byte header is the
//! first 16 readable bytes wherever the descriptors split them, the status is the last writable
//! byte, and the data is what lies between. Directions are checked per request type: data a
//! device must write has to be in writable descriptors and vice versa.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::backend::{BackendError, BlockBackend, SECTOR_SIZE};
use super::{MAX_DISCARD_SECTORS, MAX_DWZ_SEGMENTS, MAX_WRITE_ZEROES_SECTORS, SEG_MAX};
use crate::virtio::dma::{DmaSnapshot, SgList};
use crate::virtio::queue::{Chain, ChainBuffers, parse_chain_into};

/// Header: type (le32), reserved/ioprio (le32), sector (le64).
const HEADER_LEN: u64 = 16;
/// One DISCARD / WRITE_ZEROES segment: sector (le64), num_sectors (le32), flags (le32).
const SEGMENT_LEN: u64 = 16;
/// Most descriptors a chain may have: data segments plus header and status, with room for
/// drivers that split those.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        // The VIRTIO_BLK_S_* values are 0, 1, 2.
        let v = match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        };
        u8::try_from(v).unwrap_or(u8::MAX)
    }
}

/// A request refused or failed: its status and why (for the debug log).
struct Failure(Status, String);

fn ioerr(why: impl Into<String>) -> Failure {
    Failure(Status::IoErr, why.into())
}

fn unsupp(why: impl Into<String>) -> Failure {
    Failure(Status::Unsupp, why.into())
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        match &e {
            // A host failure is not the guest's doing: say it louder.
            BackendError::Io(_) => tracing::warn!("virtio-blk: host I/O error: {e}"),
            BackendError::Dma(_) => {}
        }
        ioerr(format!("{e}: {}", source_chain(&e)))
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&c.to_string());
        cur = c.source();
        if cur.is_some() {
            s.push_str(": ");
        }
    }
    s
}

/// What a device knows when it serves a request.
pub(super) struct Context<'a> {
    pub backend: &'a BlockBackend,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// Serve one chain; returns the used length (bytes written into the chain). A chain without a
/// reachable status byte is returned unanswered (length 0) with a debug log.
pub(super) fn handle_chain(ctx: &Context<'_>, dma: &DmaSnapshot, chain: Chain<'_>) -> u32 {
    let head = chain.head_index();
    // Parsed in place: the lists are not moved around on the per-request path.
    let mut bufs = ChainBuffers::default();
    match parse_chain_into(chain, MAX_DESCRIPTORS, &mut bufs) {
        Ok(()) => {}
        Err(fault) => {
            tracing::debug!(head, "virtio-blk: {}", fault.error);
            return match fault.status {
                Some(addr) if dma.write_obj(addr, Status::IoErr.byte()).is_ok() => 1,
                _ => 0,
            };
        }
    };
    if bufs.writable.is_empty() {
        tracing::debug!(head, "virtio-blk: request has no status byte");
        return 0;
    }
    // The last writable byte (virtio-queue keeps a chain's buffers under 4 GiB, so it does
    // not wrap; if it did, there would be no status byte to write).
    let Some(status_addr) = bufs.writable.take_last_byte() else {
        return 0;
    };
    // Checked now, written after the request: one translation for both.
    let status_byte = match dma.byte(status_addr) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(head, "virtio-blk: status byte: {e}");
            return 0;
        }
    };
    let (status, written) = match execute(ctx, dma, &mut bufs.readable, &bufs.writable) {
        Ok(written) => (Status::Ok, written),
        Err(Failure(status, why)) => {
            tracing::debug!(head, ?status, "virtio-blk: {why}");
            (status, 0)
        }
    };
    status_byte.write(status.byte());
    // written <= the writable length, which virtio-queue keeps under 4 GiB.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Run a request whose status byte is known to be reachable; returns the number of data bytes
/// written into the guest.
fn execute(
    ctx: &Context<'_>,
    dma: &DmaSnapshot,
    readable: &mut SgList,
    writable: &SgList,
) -> Result<u64, Failure> {
    if readable.len() < HEADER_LEN {
        return Err(ioerr(format!(
            "header is {} readable bytes, not {HEADER_LEN}",
            readable.len()
        )));
    }
    // The header is the first 16 readable bytes; the rest is the request's data.
    let mut header = [0u8; HEADER_LEN as usize];
    dma.read_sg(readable, &mut header)
        .map_err(|e| ioerr(format!("header: {e}")))?;
    // Most requests (IN, FLUSH, GET_ID) have no readable data: no list to split off then.
    let out = if readable.len() == HEADER_LEN {
        SgList::new()
    } else {
        readable.split_off(HEADER_LEN)
    };
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let backend = ctx.backend;

    let writes_disk = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if writes_disk && backend.read_only() {
        return Err(ioerr("write to a read-only disk"));
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            no_data("IN", "readable", &out)?;
            let offset = data_range(backend, sector, writable)?;
            backend.read(dma, offset, writable)?;
            Ok(writable.len())
        }
        VIRTIO_BLK_T_OUT => {
            no_data("OUT", "writable", writable)?;
            let offset = data_range(backend, sector, &out)?;
            backend.write(dma, offset, &out)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            no_data("FLUSH", "readable", &out)?;
            no_data("FLUSH", "writable", writable)?;
            backend.flush()?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            no_data("GET_ID", "readable", &out)?;
            if writable.is_empty() {
                return Err(ioerr("GET_ID without an ID buffer"));
            }
            let n = dma
                .write_sg(writable, backend.serial())
                .map_err(|e| ioerr(format!("ID buffer: {e}")))?;
            Ok(n as u64)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let name = if discard { "DISCARD" } else { "WRITE_ZEROES" };
            if (discard && !ctx.discard) || (!discard && !ctx.write_zeroes) {
                return Err(unsupp(format!("{name} was not negotiated")));
            }
            no_data(name, "writable", writable)?;
            let segments = read_segments(backend, dma, &out, discard)?;
            for s in &segments {
                if discard {
                    // Advisory: a host file that cannot punch holes just keeps the data.
                    if !backend.punch_hole(s.offset, s.len)? {
                        tracing::debug!("virtio-blk: host file cannot discard");
                    }
                } else {
                    backend.write_zeroes(s.offset, s.len, s.unmap)?;
                }
            }
            Ok(0)
        }
        other => Err(unsupp(format!("request type {other}"))),
    }
}

/// Refuse data in the wrong direction.
fn no_data(kind: &str, dir: &str, sg: &SgList) -> Result<(), Failure> {
    if sg.is_empty() {
        Ok(())
    } else {
        Err(ioerr(format!("{kind} with {} {dir} data bytes", sg.len())))
    }
}

/// Check an IN/OUT data buffer against the disk; returns the byte offset.
fn data_range(backend: &BlockBackend, sector: u64, data: &SgList) -> Result<u64, Failure> {
    let len = data.len();
    if len % SECTOR_SIZE != 0 {
        return Err(ioerr(format!("data length {len} is not whole sectors")));
    }
    if data.ranges().len() > SEG_MAX as usize {
        return Err(ioerr(format!(
            "{} data segments, more than {SEG_MAX}",
            data.ranges().len()
        )));
    }
    backend.range(sector, len).ok_or_else(|| {
        ioerr(format!(
            "sectors {sector}+{} outside a disk of {}",
            len / SECTOR_SIZE,
            backend.capacity_sectors()
        ))
    })
}

/// One checked DISCARD / WRITE_ZEROES range, in bytes.
struct Segment {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// Read and check every segment before any is carried out, so that a bad one changes nothing.
fn read_segments(
    backend: &BlockBackend,
    dma: &DmaSnapshot,
    data: &SgList,
    discard: bool,
) -> Result<Vec<Segment>, Failure> {
    let len = data.len();
    if len == 0 || len % SEGMENT_LEN != 0 {
        return Err(ioerr(format!("segment data is {len} bytes")));
    }
    let count = len / SEGMENT_LEN;
    if count > u64::from(MAX_DWZ_SEGMENTS) {
        return Err(ioerr(format!(
            "{count} segments, more than {MAX_DWZ_SEGMENTS}"
        )));
    }
    let mut raw = vec![0u8; usize::try_from(len).unwrap_or(0)];
    dma.read_sg(data, &mut raw)
        .map_err(|e| ioerr(format!("segments: {e}")))?;
    let max = if discard {
        MAX_DISCARD_SECTORS
    } else {
        MAX_WRITE_ZEROES_SECTORS
    };
    let mut out = Vec::with_capacity(raw.len() / 16);
    for seg in raw.chunks_exact(16) {
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(s8);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Spec 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            return Err(unsupp(format!("segment flags {flags:#x}")));
        }
        if num > max {
            return Err(ioerr(format!("{num} sectors, more than {max}")));
        }
        let seg_len = u64::from(num) * SECTOR_SIZE;
        let offset = backend.range(sector, seg_len).ok_or_else(|| {
            ioerr(format!(
                "sectors {sector}+{num} outside a disk of {}",
                backend.capacity_sectors()
            ))
        })?;
        out.push(Segment {
            offset,
            len: seg_len,
            unmap,
        });
    }
    Ok(out)
}
