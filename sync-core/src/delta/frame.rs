//! zstd framing of payloads, and the checks that keep decoding a peer's frame bounded.
//!
//! Every payload is exactly one zstd frame whose header declares its content size. The decoder
//! checks that size against the manifest before it starts, which bounds both the output and the
//! buffer zstd allocates for its window (zstd sizes it as the smaller of window and content), so
//! a frame claiming a huge window or expanding far beyond its size ("zstd bomb") is refused up
//! front.

use std::cell::RefCell;
use std::io::{self, Read, Write};

use zstd::stream::{read, write};
use zstd::zstd_safe;

use super::{DeltaError, DeltaFormat};

/// Compression level for every payload: a good ratio at ~250 MB/s on one core.
const LEVEL: i32 = 3;
/// Level for content that does not compress (media, archives, encrypted data): zstd stores such
/// blocks raw at any level, and a fast level finds that out at ~1 GB/s instead of ~600 MB/s.
const INCOMPRESSIBLE_LEVEL: i32 = -1;
/// Files smaller than this are compressed at [`LEVEL`] without looking first.
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

/// Decoded bytes handed to the sink per step.
const CHUNK: usize = 128 * 1024;

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
/// prefix if given, streaming to `w`.
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
        None if looks_incompressible(data) => write::Encoder::new(&mut *w, INCOMPRESSIBLE_LEVEL)?,
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

/// [`compress`] of a small file with no prefix, in one call through this thread's reused
/// compression context: creating one costs more than compressing a typical source file, and an
/// initial push is mostly such files. Same frame parameters as the streaming encoder.
fn compress_small(data: &[u8], w: &mut (impl Write + ?Sized)) -> io::Result<()> {
    thread_local! {
        static SMALL: RefCell<Option<(zstd_safe::CCtx<'static>, Vec<u8>)>> =
            const { RefCell::new(None) };
    }
    let zstd_err = |code: zstd_safe::ErrorCode| io::Error::other(zstd_safe::get_error_name(code));
    let (mut cctx, mut out) = SMALL
        .with(|cell| cell.borrow_mut().take())
        .unwrap_or_else(|| (zstd_safe::CCtx::create(), Vec::new()));
    let result = (|| {
        use zstd_safe::CParameter;
        cctx.reset(zstd_safe::ResetDirective::SessionAndParameters)
            .map_err(zstd_err)?;
        for p in [
            CParameter::CompressionLevel(LEVEL),
            CParameter::ContentSizeFlag(true),
            CParameter::ChecksumFlag(false),
            CParameter::WindowLog(PLAIN_WINDOW_LOG),
        ] {
            cctx.set_parameter(p).map_err(zstd_err)?;
        }
        out.clear();
        out.reserve(zstd_safe::compress_bound(data.len()));
        cctx.compress2(&mut out, data).map_err(zstd_err)?;
        w.write_all(&out)
    })();
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
        if prefix.is_none() {
            return self.decode_plain(sink);
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

    #[test]
    fn only_large_incompressible_data_takes_the_fast_level() {
        let text: Vec<u8> = b"<?php echo $x; // relsync\n"
            .iter()
            .copied()
            .cycle()
            .take(2 << 20)
            .collect();
        let mut mixed = noise(2 << 20);
        mixed[..SAMPLE].copy_from_slice(&text[..SAMPLE]);
        let cases: [(&str, Vec<u8>, bool); 4] = [
            ("small noise", noise(SAMPLE_FROM - 1), false),
            ("large noise", noise(2 << 20), true),
            ("large text", text, false),
            ("noise with a compressible head", mixed, false),
        ];
        for (name, data, want) in cases {
            assert_eq!(looks_incompressible(&data), want, "{name}");
            // Whatever the level, the frame round-trips through the same checks.
            let mut out = Vec::new();
            compress(&data, None, &mut out).unwrap();
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
}
