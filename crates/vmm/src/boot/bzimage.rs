//! Host-side decompression of a bzImage's payload.
//!
//! A bzImage is a setup part (real-mode code and the setup header), a small decompressor and the
//! compressed kernel (`vmlinux`, an ELF). Normally the decompressor runs in the guest. On hosts
//! whose KVM runs guest kernel code through its instruction emulator it cannot: the emulator
//! executes `lzcnt` as `bsr` without exiting and zstd then reports corrupt data; and elsewhere it
//! is guest time spent on work the host does faster. So Manifold finds the payload through the
//! setup header (`payload_offset`, `payload_length`, boot protocol 2.08+), decompresses it here,
//! and the caller loads the ELF and enters it through the same 64-bit boot protocol with the
//! bzImage's own setup header in the zero page.

use std::fmt;
use std::io::Read;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// Where the setup header starts in the image (and in the zero page).
const HEADER_OFFSET: usize = 0x1f1;
/// "HdrS".
const HEADER_MAGIC: u32 = 0x5372_6448;
/// `payload_offset` and `payload_length` appeared in boot protocol 2.08.
const MIN_VERSION: u16 = 0x0208;
/// Refuse to produce more than this (a corrupt or hostile image must not exhaust host memory).
const MAX_OUTPUT: usize = 1 << 30;
/// The kernel's lz4 is the legacy format: a magic, then blocks of at most 8 MiB of output.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    #[error("Setup header is truncated")]
    Truncated,
    #[error("Boot protocol {0:#x} gives no payload location (2.08 or later needed)")]
    OldProtocol(u16),
    #[error("Payload at {offset:#x}+{len:#x} lies outside the {file:#x}-byte image")]
    PayloadOutOfBounds { offset: u64, len: u64, file: usize },
    #[error("Payload compression not recognised (magic {0})")]
    UnknownCompression(String),
    #[error("Cannot decompress the {0} payload: {1}")]
    Corrupt(Compression, String),
    #[error("The {0} payload decompresses to {1} bytes, its trailer says {2}")]
    SizeMismatch(Compression, usize, u32),
    #[error("The {0} payload decompresses to more than {MAX_OUTPUT} bytes")]
    TooLarge(Compression),
    #[error("The decompressed payload is not an ELF")]
    NotElf,
}

/// The setup header of `image`, or `None` if it is not a bzImage (no "HdrS").
pub fn header(image: &[u8]) -> Option<setup_header> {
    let mut hdr = setup_header::default();
    let len = hdr.as_slice().len();
    let bytes = image.get(HEADER_OFFSET..HEADER_OFFSET + len)?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    (hdr.header == HEADER_MAGIC).then_some(hdr)
}

/// A decompressed kernel: the vmlinux ELF and the bzImage's setup header.
pub struct Decompressed {
    pub header: setup_header,
    pub compression: Compression,
    pub vmlinux: Vec<u8>,
}

/// The compressed payload of a bzImage and how it is compressed.
pub fn payload(image: &[u8]) -> Result<(setup_header, Compression, &[u8]), BzImageError> {
    let hdr = header(image).ok_or(BzImageError::Truncated)?;
    let version = hdr.version;
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol(version));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    // payload_offset counts from the start of the protected-mode code, after the setup sectors.
    let offset = (setup_sects + 1) * 512 + u64::from(hdr.payload_offset);
    let len = u64::from(hdr.payload_length);
    let out_of_bounds = || BzImageError::PayloadOutOfBounds {
        offset,
        len,
        file: image.len(),
    };
    let start = usize::try_from(offset).map_err(|_| out_of_bounds())?;
    let end = start
        .checked_add(usize::try_from(len).map_err(|_| out_of_bounds())?)
        .ok_or_else(out_of_bounds)?;
    let payload = image.get(start..end).ok_or_else(out_of_bounds)?;
    let compression = detect(payload)?;
    Ok((hdr, compression, payload))
}

fn detect(payload: &[u8]) -> Result<Compression, BzImageError> {
    const MAGICS: [(&[u8], Compression); 4] = [
        (&[0x1f, 0x8b], Compression::Gzip),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
        (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        (&LZ4_LEGACY_MAGIC, Compression::Lz4),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            let shown = &payload[..payload.len().min(6)];
            BzImageError::UnknownCompression(
                shown
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
}

/// Decompress the payload of bzImage `image` into its vmlinux ELF.
pub fn decompress(image: &[u8]) -> Result<Decompressed, BzImageError> {
    let (header, compression, payload) = payload(image)?;
    let vmlinux = decompress_payload(compression, payload)?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf);
    }
    Ok(Decompressed {
        header,
        compression,
        vmlinux,
    })
}

/// Decompress one payload. Every format but gzip (whose own trailer has the size) carries the
/// uncompressed size as a 4-byte little-endian trailer (the kernel's `*_with_size` build rules):
/// it is split off before decoding and checked after.
pub fn decompress_payload(c: Compression, payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |e: &dyn fmt::Display| BzImageError::Corrupt(c, e.to_string());
    let (data, size) = match c {
        Compression::Gzip => (payload, None),
        _ => {
            let split = payload
                .len()
                .checked_sub(4)
                .ok_or_else(|| corrupt(&"shorter than its size trailer"))?;
            let (data, trailer) = payload.split_at(split);
            let mut le = [0u8; 4];
            le.copy_from_slice(trailer);
            (data, Some(u32::from_le_bytes(le)))
        }
    };
    let capacity = size.map_or(data.len() * 4, |s| s as usize).min(MAX_OUTPUT);
    let mut out = Vec::with_capacity(capacity);
    match c {
        Compression::Gzip => read_all(c, flate2::read::GzDecoder::new(data), &mut out)?,
        Compression::Xz => read_all(c, lzma_rust2::XzReader::new(data, false), &mut out)?,
        Compression::Zstd => {
            let mut src = data;
            let decoder =
                ruzstd::decoding::StreamingDecoder::new(&mut src).map_err(|e| corrupt(&e))?;
            read_all(c, decoder, &mut out)?;
        }
        Compression::Lz4 => lz4_legacy(data, &mut out)?,
    }
    if let Some(size) = size
        && out.len() != size as usize
    {
        return Err(BzImageError::SizeMismatch(c, out.len(), size));
    }
    Ok(out)
}

/// Read a decoder to its end, refusing output past `MAX_OUTPUT`.
fn read_all(c: Compression, reader: impl Read, out: &mut Vec<u8>) -> Result<(), BzImageError> {
    let limit = MAX_OUTPUT as u64 + 1;
    reader
        .take(limit)
        .read_to_end(out)
        .map_err(|e| BzImageError::Corrupt(c, e.to_string()))?;
    if out.len() > MAX_OUTPUT {
        return Err(BzImageError::TooLarge(c));
    }
    Ok(())
}

/// lz4's legacy frame: magic, then blocks as (u32 LE compressed length, block), each of which
/// decompresses to at most 8 MiB. The data ends at the end of the input (or at a zero length).
fn lz4_legacy(data: &[u8], out: &mut Vec<u8>) -> Result<(), BzImageError> {
    let c = Compression::Lz4;
    let corrupt = |why: String| BzImageError::Corrupt(c, why);
    let mut rest = data
        .strip_prefix(&LZ4_LEGACY_MAGIC[..])
        .ok_or_else(|| corrupt("no legacy magic".into()))?;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() >= 4 {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 {
            break;
        }
        // A new frame's magic may follow (concatenated frames): skip it.
        if len == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            rest = tail;
            continue;
        }
        let input = tail
            .get(..len)
            .ok_or_else(|| corrupt(format!("block of {len} bytes past the end")))?;
        let n = lz4_flex::block::decompress_into(input, &mut block)
            .map_err(|e| corrupt(e.to_string()))?;
        if out.len() + n > MAX_OUTPUT {
            return Err(BzImageError::TooLarge(c));
        }
        out.extend_from_slice(&block[..n]);
        rest = &tail[len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    /// Something that looks like a small vmlinux: an ELF magic and compressible bytes.
    fn fake_vmlinux() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        for i in 0..50_000u32 {
            v.extend_from_slice(&(i % 251).to_le_bytes());
        }
        v
    }

    fn with_size(mut data: Vec<u8>, size: usize) -> Vec<u8> {
        data.extend_from_slice(&(size as u32).to_le_bytes());
        data
    }

    fn compress(c: Compression, raw: &[u8]) -> Vec<u8> {
        match c {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(raw).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                // As the kernel's build does: the x86 BCJ filter before LZMA2.
                let mut opts = lzma_rust2::XzOptions::with_preset(1);
                opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
                let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
                w.write_all(raw).unwrap();
                with_size(w.finish().unwrap(), raw.len())
            }
            Compression::Zstd => with_size(
                ruzstd::encoding::compress_to_vec(raw, ruzstd::encoding::CompressionLevel::Fastest),
                raw.len(),
            ),
            Compression::Lz4 => {
                let mut v = LZ4_LEGACY_MAGIC.to_vec();
                for chunk in raw.chunks(LZ4_LEGACY_BLOCK) {
                    let b = lz4_flex::block::compress(chunk);
                    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    v.extend_from_slice(&b);
                }
                with_size(v, raw.len())
            }
        }
    }

    /// A minimal bzImage: one setup sector plus the boot sector, then the payload at
    /// payload_offset 0x10 into the protected-mode part.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512 + 0x10];
        let mut hdr = setup_header {
            setup_sects: 1,
            header: HEADER_MAGIC,
            version: 0x020f,
            payload_offset: 0x10,
            payload_length: payload.len() as u32,
            ..Default::default()
        };
        hdr.boot_flag = 0xaa55;
        let len = hdr.as_slice().len();
        img[HEADER_OFFSET..HEADER_OFFSET + len].copy_from_slice(hdr.as_slice());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn every_format_round_trips() {
        let raw = fake_vmlinux();
        for c in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Lz4,
        ] {
            let img = bzimage(&compress(c, &raw));
            let d = decompress(&img).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(d.compression, c);
            assert_eq!(d.vmlinux, raw, "{c}");
            assert_eq!({ d.header.version }, 0x020f);
        }
    }

    #[test]
    fn corrupt_payload_is_a_clear_error() {
        let raw = fake_vmlinux();
        for c in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Lz4,
        ] {
            let mut payload = compress(c, &raw);
            // Damage the middle of the compressed stream, keep the magic. The legacy lz4 format
            // has no checksum (damaged literals decode to other bytes): damage its first block
            // length instead.
            let at = if c == Compression::Lz4 {
                4
            } else {
                payload.len() / 2
            };
            for b in &mut payload[at..at + 16] {
                *b ^= 0x5a;
            }
            let err = decompress(&bzimage(&payload)).err();
            assert!(
                matches!(
                    err,
                    Some(BzImageError::Corrupt(..) | BzImageError::SizeMismatch(..))
                ),
                "{c}: {err:?}"
            );
            // Cut short.
            payload.truncate(payload.len() / 3);
            let err = decompress(&bzimage(&payload)).err();
            assert!(
                matches!(
                    err,
                    Some(BzImageError::Corrupt(..) | BzImageError::SizeMismatch(..))
                ),
                "{c} truncated: {err:?}"
            );
        }
    }

    #[test]
    fn header_problems() {
        assert!(header(&[0u8; 100]).is_none());
        let mut img = bzimage(&compress(Compression::Zstd, &fake_vmlinux()));
        // payload_length past the end of the file.
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&img),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        let img = bzimage(b"BZh91AY&SY");
        assert!(matches!(
            decompress(&img),
            Err(BzImageError::UnknownCompression(_))
        ));
        let mut img = bzimage(&compress(Compression::Gzip, b"not an elf"));
        assert!(matches!(decompress(&img), Err(BzImageError::NotElf)));
        img[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            decompress(&img),
            Err(BzImageError::OldProtocol(0x0206))
        ));
    }
}
