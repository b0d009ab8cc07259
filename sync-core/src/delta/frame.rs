//! zstd framing of payloads, and the checks that keep decoding a peer's frame bounded.
//!
//! Every payload is exactly one zstd frame whose header declares its content size. The decoder
//! checks that size against the manifest before it starts, which bounds both the output and the
//! buffer zstd allocates for its window (zstd sizes it as the smaller of window and content), so
//! a frame claiming a huge window or expanding far beyond its size ("zstd bomb") is refused up
//! front.
//!
//! A large file that samples as incompressible (media, archives, encrypted data) is not given to
//! zstd at all: it is written as a frame of Raw blocks (RFC 8878 §3.1.1), the data copied
//! straight to the writer between 3-byte block headers. zstd would end up storing such blocks
//! raw anyway, but only after copying all input into its window and trying each block, which
//! cost about a tenth of the client's CPU when pushing random data. The frame looks to decoders
//! like any other plain payload: same declared content size, same 2 MiB window, no checksum.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::ops::Range;

use zstd::stream::{read, write};
use zstd::zstd_safe;

use super::{DeltaError, DeltaFormat};

/// Compression level for every compressed payload: a good ratio at ~250 MB/s on one core.
const LEVEL: i32 = 3;
/// Files smaller than this are compressed at [`LEVEL`] without looking first; larger ones that
/// look incompressible are stored in Raw blocks instead (see [`write_raw`]).
const SAMPLE_FROM: usize = 1 << 20;
/// Bytes sampled at each of three places of a large file.
const SAMPLE: usize = 32 << 10;

/// Whether `data` looks incompressible: three samples (start, middle, end) together shrink by
/// less than 3% at level 1. Only files of [`SAMPLE_FROM`] bytes or more are sampled.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < SAMPLE_FROM {
        return false;
    }
    let mut sampled = 0usize;
    let mut compressed = 0usize;
    for start in [0, data.len() / 2 - SAMPLE / 2, data.len() - SAMPLE] {
        let part = &data[start..start + SAMPLE];
        match zstd::bulk::compress(part, 1) {
            Ok(c) => compressed += c.len(),
            Err(_) => return false,
        }
        sampled += part.len();
    }
    compressed * 100 >= sampled * 97
}

/// The zstd frame magic number, little endian. Skippable and legacy frames are refused.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

#[cfg(target_pointer_width = "64")]
const WINDOW_LOG_MAX: u32 = zstd_safe::WINDOWLOG_MAX_64;
#[cfg(not(target_pointer_width = "64"))]
const WINDOW_LOG_MAX: u32 = zstd_safe::WINDOWLOG_MAX_32;

/// Window for frames without a prefix: what zstd picks for level 3 on large inputs anyway, set
/// explicitly so the decoder can hold peers to it and its buffer stays at 2 MiB plus two blocks.
const PLAIN_WINDOW_LOG: u32 = 21;

/// Frames against a basis declaring at most this much content are decoded in one call
/// ([`Frame::decode_small_with`]).
const ONE_SHOT_MAX: u64 = 1 << 20;

/// The magic number of a formatted zstd dictionary, little endian. A basis starting with it would
/// be read as such a dictionary, not as raw content, by the one-call decoder: it goes through
/// the streaming one.
const DICT_MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];

/// Decoded bytes handed to the sink per step.
const CHUNK: usize = 128 * 1024;

/// Largest block content a frame may carry: RFC 8878's Block_Maximum_Size, the smaller of the
/// window and 128 KiB.
const MAX_BLOCK: usize = 128 << 10;

// The Window_Descriptor below encodes the window log as an exponent from 10 with no mantissa,
// and the blocks assume a window of at least one maximal block.
const _: () = assert!(PLAIN_WINDOW_LOG >= 17 && PLAIN_WINDOW_LOG <= 41);

/// Whether one zstd window can span a basis of `basis_len` followed by `target_len` bytes.
pub(super) fn window_covers(basis_len: usize, target_len: usize) -> bool {
    (basis_len as u64).saturating_add(target_len as u64) <= 1u64 << WINDOW_LOG_MAX
}

fn ceil_log2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// The window log that lets references from the end of the target reach the start of the basis.
fn window_log_for(total: u64) -> u32 {
    ceil_log2(total).clamp(zstd_safe::WINDOWLOG_MIN, WINDOW_LOG_MAX)
}

/// Compress `data` into one frame that declares its content size, with `prefix` as reference
/// prefix if given, streaming to `w`. Without a prefix, data that [`looks_incompressible`] is
/// stored in Raw blocks rather than compressed.
pub(super) fn compress(
    data: &[u8],
    prefix: Option<&[u8]>,
    w: &mut (impl Write + ?Sized),
) -> io::Result<()> {
    if prefix.is_none() && data.len() < SAMPLE_FROM {
        return compress_small(data, w);
    }
    let mut enc = match prefix {
        Some(prefix) => write::Encoder::with_ref_prefix(&mut *w, LEVEL, prefix)?,
        None if looks_incompressible(data) => return write_raw(data, w),
        None => write::Encoder::new(&mut *w, LEVEL)?,
    };
    enc.include_contentsize(true)?;
    enc.include_checksum(false)?;
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    match prefix {
        None => enc.window_log(PLAIN_WINDOW_LOG)?,
        Some(prefix) => {
            let total = prefix.len() as u64 + data.len() as u64;
            enc.window_log(window_log_for(total))?;
            // The ordinary match finder's tables stop reaching back across the basis from about
            // 32 KiB on (zstd's `--patch-from` turns long mode on from there too); measured on 4 MiB
            // of PHP-like text with 30 small edits, long mode makes the payload 884 bytes instead of
            // 627 KB, and at 64 KiB 234 instead of 1222.
            enc.long_distance_matching(true)?;
        }
    }
    enc.write_all(data)?;
    enc.finish()?;
    Ok(())
}

/// [`compress`] of `data` with `prefix` as reference prefix, in one call through `cctx`, into
/// `out` (cleared first). The same frame parameters as the streaming encoder; reusing the context
/// across files spares allocating and clearing its tables (long-distance matching's among them)
/// for every one, which cost more than encoding a small edited file.
pub(super) fn compress_ref_with<'b>(
    cctx: &mut zstd_safe::CCtx<'b>,
    data: &[u8],
    prefix: &'b [u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let total = prefix.len() as u64 + data.len() as u64;
    compress_once(cctx, window_log_for(total), Some(prefix), data, out)
}

/// One frame of `data` into `out` (cleared first) through the reused `cctx`: the streaming
/// encoder's frame parameters with `window_log`, and with `prefix` as reference prefix (and
/// long-distance matching, as [`compress`] uses with one) if given.
fn compress_once<'b>(
    cctx: &mut zstd_safe::CCtx<'b>,
    window_log: u32,
    prefix: Option<&'b [u8]>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use zstd_safe::CParameter;
    let zstd_err = |code: zstd_safe::ErrorCode| io::Error::other(zstd_safe::get_error_name(code));
    cctx.reset(zstd_safe::ResetDirective::SessionAndParameters)
        .map_err(zstd_err)?;
    for p in [
        CParameter::CompressionLevel(LEVEL),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
        CParameter::WindowLog(window_log),
        CParameter::EnableLongDistanceMatching(prefix.is_some()),
    ] {
        cctx.set_parameter(p).map_err(zstd_err)?;
    }
    if let Some(prefix) = prefix {
        cctx.ref_prefix(prefix).map_err(zstd_err)?;
    }
    out.clear();
    out.reserve(zstd_safe::compress_bound(data.len()));
    cctx.compress2(out, data).map_err(zstd_err)?;
    Ok(())
}

/// Whether `a` and `b` share memory.
pub(super) fn overlap(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (a.as_ptr_range(), b.as_ptr_range());
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// Write `data` as one zstd frame of Raw blocks, with the frame parameters of every plain
/// payload: content size declared, [`PLAIN_WINDOW_LOG`] as window (not single-segment, so the
/// decoder's window bound holds), no checksum, no dictionary. Empty data is one empty last block.
pub(super) fn write_raw(data: &[u8], w: &mut (impl Write + ?Sized)) -> io::Result<()> {
    let frame = RawFrame::new(data.len());
    w.write_all(frame.header())?;
    for (block_header, range) in frame.blocks() {
        w.write_all(&block_header)?;
        w.write_all(&data[range])?;
    }
    Ok(())
}

/// The layout of a `Full` payload that stores its content in zstd Raw blocks, as
/// [`super::encode_full`] does for content that does not compress: the frame header, then for
/// each block of at most 128 KiB its 3-byte header and that range of the content. A sender that
/// holds the content can send it from where it lies, the headers between its pieces, instead of
/// copying it into a payload buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame {
    header: [u8; 14],
    header_len: usize,
    len: usize,
}

impl RawFrame {
    /// The layout [`super::encode_full`] writes for `data`, if it stores it raw (`data` is large
    /// enough to be sampled and does not look compressible); `None` if it would compress it.
    pub fn of(data: &[u8]) -> Option<RawFrame> {
        looks_incompressible(data).then(|| RawFrame::new(data.len()))
    }

    fn new(len: usize) -> RawFrame {
        let size = len as u64;
        // Frame_Content_Size_Flag 2 is a 4-byte field, 3 an 8-byte one; flag 0 would mean no
        // field at all outside single-segment frames, and flag 1 cannot encode sizes below 256.
        let (fcs_flag, fcs_len) = if u32::try_from(size).is_ok() {
            (2u8, 4)
        } else {
            (3u8, 8)
        };
        let mut header = [0u8; 14];
        header[..4].copy_from_slice(&ZSTD_MAGIC);
        // Frame_Header_Descriptor: content size flag in bits 7-6; Single_Segment, checksum and
        // dictionary id flags all zero.
        header[4] = fcs_flag << 6;
        // Window_Descriptor: exponent (window log - 10) in bits 7-3, mantissa 0.
        header[5] = ((PLAIN_WINDOW_LOG - 10) as u8) << 3;
        header[6..6 + fcs_len].copy_from_slice(&size.to_le_bytes()[..fcs_len]);
        RawFrame {
            header,
            header_len: 6 + fcs_len,
            len,
        }
    }

    /// The frame header, first in the payload.
    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len]
    }

    /// Each block's header and the range of the content that follows it, in order.
    pub fn blocks(&self) -> impl Iterator<Item = ([u8; 3], Range<usize>)> + use<> {
        let len = self.len;
        let blocks = len.div_ceil(MAX_BLOCK).max(1);
        (0..blocks).map(move |i| {
            let range = i * MAX_BLOCK..((i + 1) * MAX_BLOCK).min(len);
            let last = u32::from(i + 1 == blocks);
            // Block_Header: Last_Block in bit 0, Block_Type 0 (Raw) in bits 1-2, Block_Size above.
            let block_header = ((range.len() as u32) << 3 | last).to_le_bytes();
            ([block_header[0], block_header[1], block_header[2]], range)
        })
    }

    /// The payload's length: headers and content.
    pub fn payload_len(&self) -> u64 {
        let blocks = self.len.div_ceil(MAX_BLOCK).max(1);
        (self.header_len + 3 * blocks + self.len) as u64
    }
}

/// [`compress`] of a small file with no prefix, in one call through this thread's reused
/// compression context: creating one costs more than compressing a typical source file, and an
/// initial push is mostly such files. Same frame parameters as the streaming encoder.
fn compress_small(data: &[u8], w: &mut (impl Write + ?Sized)) -> io::Result<()> {
    thread_local! {
        static SMALL: RefCell<Option<(zstd_safe::CCtx<'static>, Vec<u8>)>> =
            const { RefCell::new(None) };
    }
    let (mut cctx, mut out) = SMALL
        .with(|cell| cell.borrow_mut().take())
        .unwrap_or_else(|| (zstd_safe::CCtx::create(), Vec::new()));
    let result = compress_once(&mut cctx, PLAIN_WINDOW_LOG, None, data, &mut out)
        .and_then(|()| w.write_all(&out));
    // Large buffers are not kept: memory stays at one small file per thread.
    if out.capacity() > 2 * SAMPLE_FROM {
        out = Vec::new();
    }
    SMALL.with(|cell| *cell.borrow_mut() = Some((cctx, out)));
    result
}

/// A payload that passed the structural checks: one complete frame with an acceptable declared
/// content size.
pub(super) struct Frame<'a> {
    format: DeltaFormat,
    payload: &'a [u8],
    content_size: u64,
}

impl<'a> Frame<'a> {
    /// Accept `payload` only if it declares exactly `size` bytes of content.
    pub(super) fn exact(
        format: DeltaFormat,
        payload: &'a [u8],
        size: u64,
    ) -> Result<Self, DeltaError> {
        let declared = declared_size(format, payload)?;
        match declared {
            Some(content_size) if content_size == size => Ok(Frame {
                format,
                payload,
                content_size,
            }),
            _ => Err(DeltaError::DeclaredSize {
                format,
                declared,
                allowed: size,
            }),
        }
    }

    /// Accept `payload` only if it declares at most `max` bytes of content.
    pub(super) fn at_most(
        format: DeltaFormat,
        payload: &'a [u8],
        max: u64,
    ) -> Result<Self, DeltaError> {
        let declared = declared_size(format, payload)?;
        match declared {
            Some(content_size) if content_size <= max => Ok(Frame {
                format,
                payload,
                content_size,
            }),
            _ => Err(DeltaError::DeclaredSize {
                format,
                declared,
                allowed: max,
            }),
        }
    }

    fn corrupt(&self, source: io::Error) -> DeltaError {
        DeltaError::Corrupt {
            format: self.format,
            source,
        }
    }

    fn decoder<'p>(
        &self,
        prefix: Option<&'p [u8]>,
    ) -> Result<read::Decoder<'p, &'a [u8]>, DeltaError>
    where
        'a: 'p,
    {
        let decoder = match prefix {
            Some(prefix) => read::Decoder::with_ref_prefix(self.payload, prefix),
            None => read::Decoder::with_buffer(self.payload),
        };
        let mut decoder = decoder.map_err(|e| self.corrupt(e))?.single_frame();
        // Exactly the window the encoder was told to use, so a frame asking for more is refused.
        let log = match prefix {
            None => PLAIN_WINDOW_LOG,
            Some(p) => window_log_for((p.len() as u64).saturating_add(self.content_size)),
        };
        decoder.window_log_max(log).map_err(|e| self.corrupt(e))?;
        Ok(decoder)
    }

    /// Decode the frame, handing the content to `sink` in chunks.
    pub(super) fn decode(
        &self,
        prefix: Option<&[u8]>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), DeltaError>,
    ) -> Result<(), DeltaError> {
        let Some(basis) = prefix else {
            return self.decode_plain(sink);
        };
        if self.content_size <= ONE_SHOT_MAX && !basis.starts_with(&DICT_MAGIC) {
            let log = window_log_for((basis.len() as u64).saturating_add(self.content_size));
            if self.window_size().is_none_or(|w| w <= 1u64 << log) {
                return self.decode_small_with(basis, sink);
            }
        }
        let mut decoder = self.decoder(prefix)?;
        let mut buf = vec![0u8; CHUNK.min(self.content_size as usize).max(1)];
        loop {
            let n = match decoder.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.corrupt(e)),
            };
            sink(&buf[..n])?;
        }
    }

    /// [`Frame::decode`] without a prefix, through this thread's reused decompression context:
    /// creating and freeing one costs about as much as decoding a small file, and an initial
    /// push is mostly small files.
    fn decode_plain(
        &self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), DeltaError>,
    ) -> Result<(), DeltaError> {
        thread_local! {
            static PLAIN: RefCell<Option<zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
        }
        let zstd_err = |code: zstd_safe::ErrorCode| {
            self.corrupt(io::Error::other(zstd_safe::get_error_name(code)))
        };
        PLAIN.with(|cell| {
            // Taken out while in use: a sink that decoded another frame would get its own.
            let mut dctx = cell
                .borrow_mut()
                .take()
                .unwrap_or_else(zstd_safe::DCtx::create);
            dctx.reset(zstd_safe::ResetDirective::SessionAndParameters)
                .map_err(zstd_err)?;
            // Exactly the window the encoder was told to use, as for the streaming decoder.
            dctx.set_parameter(zstd_safe::DParameter::WindowLogMax(PLAIN_WINDOW_LOG))
                .map_err(zstd_err)?;
            let mut buf = vec![0u8; CHUNK.min(self.content_size as usize).max(1)];
            let mut input = zstd_safe::InBuffer::around(self.payload);
            let result = loop {
                let mut out = zstd_safe::OutBuffer::around(&mut buf[..]);
                let left = match dctx.decompress_stream(&mut out, &mut input) {
                    Ok(left) => left,
                    Err(code) => break Err(zstd_err(code)),
                };
                let n = out.pos();
                if n > 0 {
                    if let Err(e) = sink(&buf[..n]) {
                        break Err(e);
                    }
                }
                if left == 0 {
                    break Ok(());
                }
                if n == 0 && input.pos() == self.payload.len() {
                    break Err(self.corrupt(io::Error::other("the frame ends early")));
                }
            };
            *cell.borrow_mut() = Some(dctx);
            result
        })
    }

    /// The window a frame that is not single-segment declares; `None` for a single-segment
    /// frame, whose window is its content size.
    fn window_size(&self) -> Option<u64> {
        let descriptor = *self.payload.get(4)?;
        if descriptor & 0x20 != 0 {
            return None;
        }
        // Window_Descriptor (RFC 8878, 3.1.1.1.2): exponent in bits 7-3, mantissa in bits 2-0.
        let wd = *self.payload.get(5)?;
        let base = 1u64 << (10 + u32::from(wd >> 3));
        Some(base + base / 8 * u64::from(wd & 7))
    }

    /// [`Frame::decode`] of a small frame against `basis`, in one call through this thread's
    /// reused context, with the basis as a raw-content dictionary: for one frame that is what a
    /// reference prefix is. Creating a context per file cost a third of relsyncd's time
    /// receiving a patch's files. The output is the declared size at most (it was bounded
    /// before), which is also all the memory decoding takes: no window buffer.
    fn decode_small_with(
        &self,
        basis: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<(), DeltaError>,
    ) -> Result<(), DeltaError> {
        thread_local! {
            static WITH_BASIS: RefCell<Option<zstd_safe::DCtx<'static>>> =
                const { RefCell::new(None) };
        }
        let zstd_err = |code: zstd_safe::ErrorCode| {
            self.corrupt(io::Error::other(zstd_safe::get_error_name(code)))
        };
        let mut out = Vec::with_capacity(self.content_size as usize);
        WITH_BASIS.with(|cell| {
            // Taken out while in use, as for plain frames.
            let mut dctx = cell
                .borrow_mut()
                .take()
                .unwrap_or_else(zstd_safe::DCtx::create);
            let decoded = dctx
                .reset(zstd_safe::ResetDirective::SessionAndParameters)
                .and_then(|_| dctx.decompress_using_dict(&mut out, self.payload, basis));
            *cell.borrow_mut() = Some(dctx);
            decoded.map_err(zstd_err)
        })?;
        if out.len() as u64 != self.content_size {
            return Err(self.corrupt(io::Error::other(format!(
                "the frame decodes to {} bytes but declares {}",
                out.len(),
                self.content_size
            ))));
        }
        sink(&out)
    }

    /// Decode the frame into memory (exactly its declared, already bounded, size).
    pub(super) fn decode_to_vec(&self) -> Result<Vec<u8>, DeltaError> {
        let size = usize::try_from(self.content_size).map_err(|_| DeltaError::SizeUnsupported {
            size: self.content_size,
        })?;
        let mut decoder = self.decoder(None)?;
        let mut content = Vec::with_capacity(size);
        (&mut decoder)
            .take(self.content_size)
            .read_to_end(&mut content)
            .map_err(|e| self.corrupt(e))?;
        // Reading on to the end of the frame is what makes zstd check the declared size.
        let mut extra = [0u8; 1];
        let more = decoder.read(&mut extra).map_err(|e| self.corrupt(e))?;
        if more != 0 || content.len() != size {
            return Err(self.corrupt(io::Error::other(
                "frame content differs from its declared size",
            )));
        }
        Ok(content)
    }
}

/// Decodes a `Full` payload read from `payload` rather than held in memory, with the checks of
/// [`Frame::exact`]: one frame, declaring exactly `size` bytes, nothing after it. Memory stays at
/// the decoder's window plus a chunk, however large the file.
pub(super) fn decode_plain_stream(
    payload: &mut dyn Read,
    size: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), DeltaError>,
) -> Result<(), DeltaError> {
    let format = DeltaFormat::Full;
    let malformed = |detail| DeltaError::MalformedFrame { format, detail };
    let corrupt = |source| DeltaError::Corrupt { format, source };
    // The longest zstd frame header; a shorter payload is read whole.
    let mut head = [0u8; 18];
    let mut filled = 0;
    while filled < head.len() {
        match payload.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(corrupt(e)),
        }
    }
    let head = &head[..filled];
    if !head.starts_with(&ZSTD_MAGIC) {
        return Err(malformed("missing zstd magic"));
    }
    let declared = zstd_safe::get_frame_content_size(head)
        .map_err(|_| malformed("unreadable frame header"))?;
    if declared != Some(size) {
        return Err(DeltaError::DeclaredSize {
            format,
            declared,
            allowed: size,
        });
    }
    let reader = io::BufReader::with_capacity(CHUNK, head.chain(payload));
    let mut decoder = read::Decoder::with_buffer(reader)
        .map_err(corrupt)?
        .single_frame();
    decoder.window_log_max(PLAIN_WINDOW_LOG).map_err(corrupt)?;
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(size).unwrap_or(CHUNK)).max(1)];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        sink(&buf[..n])?;
    }
    let mut rest = decoder.finish();
    let mut extra = [0u8; 1];
    match rest.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(malformed("data after the end of the frame")),
        Err(e) => Err(corrupt(e)),
    }
}

/// The content size `payload` declares, after checking that it is exactly one complete frame.
fn declared_size(format: DeltaFormat, payload: &[u8]) -> Result<Option<u64>, DeltaError> {
    let malformed = |detail| DeltaError::MalformedFrame { format, detail };
    if !payload.starts_with(&ZSTD_MAGIC) {
        return Err(malformed("missing zstd magic"));
    }
    let frame_len = zstd_safe::find_frame_compressed_size(payload)
        .map_err(|_| malformed("truncated or malformed frame"))?;
    if frame_len != payload.len() {
        return Err(malformed("data after the end of the frame"));
    }
    zstd_safe::get_frame_content_size(payload).map_err(|_| malformed("unreadable frame header"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Block types of the one frame in `payload` (0 Raw, 1 RLE, 2 Compressed), and whether it is
    /// single-segment, read by walking its headers as RFC 8878 lays them out; `None` unless the
    /// walk ends exactly at the end of `payload`.
    fn frame_shape(payload: &[u8]) -> Option<(bool, Vec<u8>)> {
        let descriptor = *payload.get(4)?;
        let single_segment = descriptor & 0x20 != 0;
        let fcs_len = match (descriptor >> 6, single_segment) {
            (0, false) => 0,
            (0, true) => 1,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let did_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
        let mut at = 4 + 1 + usize::from(!single_segment) + did_len + fcs_len;
        let mut types = Vec::new();
        loop {
            let h = payload.get(at..at + 3)?;
            let h = u32::from_le_bytes([h[0], h[1], h[2], 0]);
            let block_type = ((h >> 1) & 3) as u8;
            let size = (h >> 3) as usize;
            at += 3 + if block_type == 1 { 1 } else { size };
            types.push(block_type);
            if h & 1 == 1 {
                break;
            }
        }
        at += if descriptor & 4 != 0 { 4 } else { 0 };
        (at == payload.len()).then_some((single_segment, types))
    }

    fn raw_frame(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_raw(data, &mut out).unwrap();
        out
    }

    /// Content decoded by every path a plain payload takes in this crate, each with its checks:
    /// in memory and streamed as `Full`, and into memory as an rsync delta would be.
    fn decoded_by_every_path(payload: &[u8], len: usize, hash: &blake3::Hash) -> Vec<Vec<u8>> {
        let mut applied = Vec::new();
        crate::delta::apply(
            DeltaFormat::Full,
            None,
            payload,
            len as u64,
            hash,
            &mut applied,
        )
        .unwrap();
        let mut streamed = Vec::new();
        crate::delta::apply_full_from(&mut &payload[..], len as u64, hash, &mut streamed).unwrap();
        let to_vec = Frame::at_most(DeltaFormat::Rsync, payload, len as u64)
            .unwrap()
            .decode_to_vec()
            .unwrap();
        vec![applied, streamed, to_vec]
    }

    #[test]
    fn raw_frames_decode_to_their_input() {
        let sizes = [
            0,
            1,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            3 * MAX_BLOCK + 17,
            SAMPLE_FROM + 5,
            (1 << PLAIN_WINDOW_LOG) + MAX_BLOCK / 2,
        ];
        for len in sizes {
            let data = noise(len);
            let payload = raw_frame(&data);
            let blocks = len.div_ceil(MAX_BLOCK).max(1);
            // Magic, descriptor, window descriptor, 4-byte content size; 3 bytes per block.
            assert_eq!(payload.len(), 10 + len + 3 * blocks, "{len}: length");
            assert_eq!(
                frame_shape(&payload),
                Some((false, vec![0; blocks])),
                "{len}: shape"
            );
            assert_eq!(
                declared_size(DeltaFormat::Full, &payload).unwrap(),
                Some(len as u64),
                "{len}: declared size"
            );
            let bulk = zstd::bulk::decompress(&payload, len).unwrap();
            assert!(bulk == data, "{len}: zstd::bulk");
            let streamed = zstd::stream::decode_all(&payload[..]).unwrap();
            assert!(streamed == data, "{len}: zstd::stream");
            for (i, back) in decoded_by_every_path(&payload, len, &blake3::hash(&data))
                .into_iter()
                .enumerate()
            {
                assert!(back == data, "{len}: crate path {i}");
            }
        }
    }

    #[test]
    fn raw_frames_declare_the_plain_window() {
        // Not single-segment: even a small frame asks for the full window, so a decoder allowing
        // one less refuses it, while zstd's own single-segment frame of the same data (window =
        // content size) passes. Reading in small steps keeps zstd off its one-pass shortcut, which
        // needs no window and so skips the check.
        let data = noise(1000);
        let single_segment = frame_of(&data);
        let cases = [
            ("raw", raw_frame(&data), PLAIN_WINDOW_LOG - 1, false),
            ("raw", raw_frame(&data), PLAIN_WINDOW_LOG, true),
            ("single-segment", single_segment, PLAIN_WINDOW_LOG - 1, true),
        ];
        for (name, payload, log, ok) in cases {
            let mut dec = read::Decoder::with_buffer(&payload[..]).unwrap();
            dec.window_log_max(log).unwrap();
            let got = dec.read(&mut [0u8; 16]);
            assert_eq!(got.is_ok(), ok, "{name} at window log max {log}: {got:?}");
        }
    }

    #[test]
    fn raw_frames_keep_the_crate_checks() {
        let data = noise(MAX_BLOCK + 100);
        let hash = blake3::hash(&data);
        let payload = raw_frame(&data);
        let len = data.len() as u64;
        let apply = |payload: &[u8], size: u64, hash: &blake3::Hash| {
            crate::delta::apply(
                DeltaFormat::Full,
                None,
                payload,
                size,
                hash,
                &mut Vec::new(),
            )
        };
        let mut flipped = payload.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            apply(&payload, len - 1, &hash),
            Err(DeltaError::DeclaredSize { .. })
        ));
        assert!(matches!(
            apply(&payload[..payload.len() - 1], len, &hash),
            Err(DeltaError::MalformedFrame { .. })
        ));
        assert!(matches!(
            apply(&flipped, len, &hash),
            Err(DeltaError::HashMismatch { .. })
        ));
        let streamed =
            crate::delta::apply_full_from(&mut &flipped[..], len, &hash, &mut Vec::new());
        assert!(matches!(streamed, Err(DeltaError::HashMismatch { .. })));
    }

    #[test]
    fn only_large_incompressible_data_is_stored_raw() {
        let text: Vec<u8> = b"<?php echo $x; // relsync\n"
            .iter()
            .copied()
            .cycle()
            .take(2 << 20)
            .collect();
        let mut mixed = noise(2 << 20);
        mixed[..SAMPLE].copy_from_slice(&text[..SAMPLE]);
        // Noise up to the window size: zstd would store it in Raw blocks too, but in a
        // single-segment frame, so the shape tells the two paths apart.
        let large_noise = noise((3 << 19) + 5);
        let cases: [(&str, Vec<u8>, bool); 4] = [
            ("small noise", noise(SAMPLE_FROM - 1), false),
            ("large noise", large_noise, true),
            ("large text", text, false),
            ("noise with a compressible head", mixed, false),
        ];
        for (name, data, want) in cases {
            assert_eq!(looks_incompressible(&data), want, "{name}");
            let mut out = Vec::new();
            compress(&data, None, &mut out).unwrap();
            let (single_segment, types) = frame_shape(&out).unwrap();
            let raw = !single_segment && types.iter().all(|&t| t == 0);
            assert_eq!(raw, want, "{name}: frame kind");
            assert_eq!(out == raw_frame(&data), want, "{name}: raw writer's bytes");
            if want {
                assert_eq!(
                    out.len(),
                    10 + data.len() + 3 * types.len(),
                    "{name}: overhead"
                );
            } else if name != "small noise" {
                assert!(types.contains(&2), "{name}: compressed blocks {types:?}");
            }
            // Whatever the path, the frame round-trips through the same checks.
            let frame = Frame::exact(DeltaFormat::Full, &out, data.len() as u64).unwrap();
            let mut back = Vec::new();
            frame
                .decode(None, &mut |c| {
                    back.extend_from_slice(c);
                    Ok(())
                })
                .unwrap();
            assert!(back == data, "{name}: round trip");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn raw_frames_round_trip(
            len in prop_oneof![
                0..=4 * MAX_BLOCK,
                (0..=4usize, -2..=2isize)
                    .prop_map(|(k, d)| (k * MAX_BLOCK).saturating_add_signed(d)),
            ],
            seed in any::<u8>(),
        ) {
            let data: Vec<u8> = noise(len).iter().map(|b| b ^ seed).collect();
            let payload = raw_frame(&data);
            prop_assert_eq!(payload.len(), 10 + len + 3 * len.div_ceil(MAX_BLOCK).max(1));
            prop_assert!(zstd::stream::decode_all(&payload[..]).unwrap() == data);
            for back in decoded_by_every_path(&payload, len, &blake3::hash(&data)) {
                prop_assert!(back == data);
            }
        }
    }

    #[test]
    fn ceil_log2_table() {
        let cases: &[(u64, u32)] = &[
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (1 << 20, 20),
            ((1 << 20) + 1, 21),
            (u64::MAX, 64),
        ];
        for &(n, want) in cases {
            assert_eq!(ceil_log2(n), want, "ceil_log2({n})");
        }
    }

    #[test]
    fn window_log_is_clamped_to_zstd_limits() {
        let cases: &[(u64, u32)] = &[
            (0, zstd_safe::WINDOWLOG_MIN),
            (100, zstd_safe::WINDOWLOG_MIN),
            (3 << 20, 22),
            (1 << 40, WINDOW_LOG_MAX),
        ];
        for &(total, want) in cases {
            assert_eq!(window_log_for(total), want, "window_log_for({total})");
        }
    }

    #[test]
    fn window_covers_up_to_the_zstd_maximum() {
        let max = 1usize << WINDOW_LOG_MAX;
        assert!(window_covers(max / 2, max / 2));
        assert!(!window_covers(max / 2, max / 2 + 1));
        assert!(window_covers(0, 0));
    }

    fn frame_of(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        compress(data, None, &mut out).unwrap();
        out
    }

    #[test]
    fn declared_size_is_checked_before_decoding() {
        let payload = frame_of(&[7u8; 1000]);
        for (want, ok) in [(1000, true), (999, false), (1001, false), (0, false)] {
            let got = Frame::exact(DeltaFormat::Full, &payload, want);
            assert_eq!(got.is_ok(), ok, "exact({want})");
        }
        for (max, ok) in [(1000, true), (5000, true), (999, false)] {
            let got = Frame::at_most(DeltaFormat::Rsync, &payload, max);
            assert_eq!(got.is_ok(), ok, "at_most({max})");
        }
    }

    #[test]
    fn structural_faults_are_malformed() {
        let good = frame_of(b"hello hello hello hello");
        let mut two_frames = good.clone();
        two_frames.extend_from_slice(&good);
        let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0];
        skippable.extend_from_slice(&[0; 4]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("magic only", ZSTD_MAGIC.to_vec()),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("two frames", two_frames),
            ("skippable frame", skippable),
            ("garbage", b"not a zstd frame at all".to_vec()),
        ];
        for (name, payload) in cases {
            let got = declared_size(DeltaFormat::Full, &payload);
            assert!(
                matches!(got, Err(DeltaError::MalformedFrame { .. })),
                "{name}: {got:?}"
            );
        }
    }

    #[test]
    fn frame_without_content_size_is_refused() {
        let mut payload = Vec::new();
        let mut enc = write::Encoder::new(&mut payload, 1).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&[0u8; 4096]).unwrap();
        enc.finish().unwrap();
        let got = Frame::exact(DeltaFormat::Full, &payload, 4096);
        assert!(matches!(
            got,
            Err(DeltaError::DeclaredSize { declared: None, .. })
        ));
    }

    #[test]
    fn decode_to_vec_round_trips() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let payload = frame_of(&data);
        let frame = Frame::at_most(DeltaFormat::Rsync, &payload, 60_000).unwrap();
        assert_eq!(frame.decode_to_vec().unwrap(), data);
    }

    #[test]
    fn a_raw_frame_laid_out_in_pieces_is_what_encode_full_writes() {
        for len in [
            SAMPLE_FROM,
            SAMPLE_FROM + 17,
            3 * SAMPLE_FROM + MAX_BLOCK - 1,
        ] {
            let data = noise(len);
            let frame = RawFrame::of(&data).expect("noise does not compress");
            let mut pieces = frame.header().to_vec();
            for (header, range) in frame.blocks() {
                pieces.extend_from_slice(&header);
                pieces.extend_from_slice(&data[range]);
            }
            let mut full = Vec::new();
            crate::delta::encode_full(&data, &mut full).unwrap();
            assert_eq!(pieces, full, "len {len}");
            assert_eq!(frame.payload_len(), full.len() as u64, "len {len}");
        }
        // What encode_full compresses has no raw layout.
        assert_eq!(RawFrame::of(&vec![7u8; 1 << 20]), None);
        assert_eq!(RawFrame::of(&noise(SAMPLE_FROM - 1)), None);
    }
}
