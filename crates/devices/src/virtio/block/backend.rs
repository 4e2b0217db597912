//! The backend of virtio-blk: a raw image file (or host block device) and the host calls that
//! serve each request. Offsets and lengths arrive validated against the disk size.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::virtio::dma::{DmaError, DmaSnapshot, SgList};

/// Bytes per virtio-blk sector, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID string.
pub const SERIAL_LEN: usize = 20;
/// O_DIRECT buffers, offsets and lengths must be multiples of this (the logical block size of
/// common host disks; a 4 KiB-sector host disk refuses 512-byte I/O with EINVAL -> IOERR).
const DIRECT_ALIGN: usize = 512;
/// Largest bounce buffer for O_DIRECT requests whose guest buffers are not aligned.
const BOUNCE_CHUNK: u64 = 1 << 20;

/// How to open a disk image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// GET_ID string, at most [`SERIAL_LEN`] bytes. Default: derived from the file's device and
    /// inode numbers, so stable for one image on one host.
    pub serial: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot inspect disk image")]
    Inspect(#[source] std::io::Error),
    #[error("Disk serial is {0} bytes long; at most 20 fit")]
    SerialTooLong(usize),
}

/// Why a request failed on the host side.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Guest buffer")]
    Dma(#[from] DmaError),
    #[error("Host I/O failed")]
    Io(#[from] std::io::Error),
}

/// Regions of a split image start at multiples of this (a host page: no region shares a
/// page-cache page or an O_DIRECT block with its neighbour).
pub const REGION_ALIGN: u64 = 4096;

#[derive(Debug)]
pub struct BlockBackend {
    /// Shared by the regions of one image (SR-IOV VFs): one open file serves every disk.
    file: Arc<File>,
    /// Where this disk starts in the file: 0, or a region's start.
    base: u64,
    /// Usable size in bytes: whole sectors only.
    size: u64,
    read_only: bool,
    direct: bool,
    serial: [u8; SERIAL_LEN],
}

impl BlockBackend {
    pub fn open(path: &Path, opts: &BlockOptions) -> Result<Self, BlockError> {
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, opts)
    }

    /// Use an already open file; `opts.direct` must say whether it was opened with O_DIRECT.
    pub fn from_file(mut file: File, opts: &BlockOptions) -> Result<Self, BlockError> {
        // Seeking to the end also sizes host block devices, whose metadata length is 0.
        let len = file.seek(SeekFrom::End(0)).map_err(BlockError::Inspect)?;
        let serial = match &opts.serial {
            Some(s) if s.len() > SERIAL_LEN => return Err(BlockError::SerialTooLong(s.len())),
            Some(s) => s.clone(),
            None => {
                let m = file.metadata().map_err(BlockError::Inspect)?;
                let mut s = format!("{:x}{:x}", m.dev(), m.ino());
                s.truncate(SERIAL_LEN);
                s
            }
        };
        let mut id = [0u8; SERIAL_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        Ok(Self {
            file: Arc::new(file),
            base: 0,
            size: len - len % SECTOR_SIZE,
            read_only: opts.read_only,
            direct: opts.direct,
            serial: id,
        })
    }

    /// Region `index` of `count` equal parts of the image, a whole disk of its own: each part
    /// is the image size divided by `count`, rounded down to [`REGION_ALIGN`]; the remainder at
    /// the end belongs to no region. Shares the open file; `serial` is the region's GET_ID.
    /// `None` if `index >= count` or the parts would be empty.
    pub fn region(&self, index: u16, count: u16, serial: &str) -> Option<Self> {
        let part = Self::region_size(self.size, count)?;
        if index >= count || serial.len() > SERIAL_LEN {
            return None;
        }
        let mut id = [0u8; SERIAL_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        Some(Self {
            file: self.file.clone(),
            base: self.base + u64::from(index) * part,
            size: part,
            read_only: self.read_only,
            direct: self.direct,
            serial: id,
        })
    }

    /// Bytes per region when a disk of `size` bytes is split in `count` (see [`Self::region`]).
    pub fn region_size(size: u64, count: u16) -> Option<u64> {
        let part = size.checked_div(u64::from(count))? / REGION_ALIGN * REGION_ALIGN;
        (part > 0).then_some(part)
    }

    /// Where this disk starts in the image file.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Usable size in bytes (a trailing partial sector is not part of the disk).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The GET_ID answer: the serial, NUL-padded.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// File offset of `[sector, sector + len/512)` if it lies inside the disk (a region's
    /// base added: every host call below takes file offsets).
    pub fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.size).then_some(self.base + offset)
    }

    fn align(&self) -> usize {
        if self.direct { DIRECT_ALIGN } else { 1 }
    }

    /// Disk -> guest buffers.
    pub fn read(&self, dma: &DmaSnapshot, offset: u64, sg: &SgList) -> Result<(), BackendError> {
        match dma.read_file(&self.file, offset, sg, self.align()) {
            Err(DmaError::Misaligned { .. }) => self.bounce(dma, offset, sg, true),
            r => Ok(r?),
        }
    }

    /// Guest buffers -> disk.
    pub fn write(&self, dma: &DmaSnapshot, offset: u64, sg: &SgList) -> Result<(), BackendError> {
        match dma.write_file(&self.file, offset, sg, self.align()) {
            Err(DmaError::Misaligned { .. }) => self.bounce(dma, offset, sg, false),
            r => Ok(r?),
        }
    }

    /// O_DIRECT with guest buffers that are not aligned: copy through an aligned buffer, a
    /// chunk at a time so that a huge request cannot make us allocate its size.
    fn bounce(
        &self,
        dma: &DmaSnapshot,
        mut offset: u64,
        sg: &SgList,
        read: bool,
    ) -> Result<(), BackendError> {
        let mut bounce = AlignedBuf::new(BOUNCE_CHUNK.min(sg.len()));
        let mut rest = sg.clone();
        while !rest.is_empty() {
            let tail = rest.split_off(BOUNCE_CHUNK);
            // rest.len() <= BOUNCE_CHUNK: the buffer holds it.
            let buf = bounce.prefix_mut(rest.len());
            if read {
                self.file.read_exact_at(buf, offset)?;
                dma.write_sg(&rest, buf)?;
            } else {
                dma.read_sg(&rest, buf)?;
                self.file.write_all_at(buf, offset)?;
            }
            offset += rest.len();
            rest = tail;
        }
        Ok(())
    }

    /// Make written data durable (fdatasync).
    pub fn flush(&self) -> Result<(), BackendError> {
        Ok(self.file.sync_data()?)
    }

    /// Deallocate a range; it reads back as zeros. Returns false if the host file cannot.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, BackendError> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Make a range read as zeros. With `unmap` it may be deallocated (punch a hole);
    /// without, it stays allocated (zero range). Falls back to writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        if unmap && self.punch_hole(offset, len)? {
            return Ok(());
        }
        if self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )? {
            return Ok(());
        }
        let mut zeros = AlignedBuf::new(BOUNCE_CHUNK.min(len));
        let mut done = 0;
        while done < len {
            let buf = zeros.prefix_mut(len - done);
            self.file.write_all_at(buf, offset + done)?;
            done += buf.len() as u64;
        }
        Ok(())
    }

    /// `fallocate(mode)`; Ok(false) when the host file does not support the mode.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<bool, BackendError> {
        // fallocate refuses an empty range with EINVAL; there is nothing to do.
        if len == 0 {
            return Ok(true);
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput).into());
        };
        loop {
            // SAFETY: fallocate on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if rc == 0 {
                return Ok(true);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS) => return Ok(false),
                _ => return Err(e.into()),
            }
        }
    }
}

/// A zero-filled buffer aligned for O_DIRECT, without `unsafe`: over-allocate, then start at
/// the first aligned byte.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: u64) -> Self {
        let len = usize::try_from(len).unwrap_or(0);
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    /// The first `n` bytes (at most the whole buffer).
    fn prefix_mut(&mut self, n: u64) -> &mut [u8] {
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(self.len);
        &mut self.storage[self.start..self.start + n]
    }
}
