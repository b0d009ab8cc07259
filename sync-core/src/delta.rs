//! Delta engines: turn a target file into the smallest payload the receiver can rebuild it from.
//!
//! Three payload formats share one interface. [`DeltaFormat::Full`] is plain zstd and needs no
//! basis. [`DeltaFormat::ZstdRef`] is zstd with the basis file as reference prefix (like
//! `zstd --patch-from`); the sender needs the basis bytes. [`DeltaFormat::Rsync`] is a
//! fast_rsync delta against a [`BasisSignature`] the receiver computed, compressed with zstd; the
//! sender only needs the signature. [`encode`] picks the engine, probing cheaply first so that a
//! new or rewritten file is never diffed, and falls back to plain zstd when a delta does not pay.
//! [`apply`] rebuilds the target from peer data: it never writes more than the declared size,
//! allocates no more than about that size plus a few MiB, and checks blake3 at the end.
//!
//! Pure code: bytes in, bytes out, no file I/O and no clock. Large files are expected to be
//! memory-mapped by the caller.

mod frame;
pub mod fuzz;
mod probe;
mod signature;

use std::fmt;
use std::io::{self, Write};

use crate::manifest::Hash;
use serde::{Deserialize, Serialize};

use frame::Frame;
pub use frame::RawFrame;
use probe::Relatedness;
pub use signature::{
    block_size_for, BasisSignature, SignatureError, MAX_BLOCK_LEN, MAX_SIGNATURE_BLOCKS,
    MAX_STRONG_LEN, MIN_BLOCK_LEN, MIN_STRONG_LEN, STRONG_LEN,
};

/// Targets up to this size are encoded both ways (delta and plain) and the smaller payload wins;
/// larger ones are decided by the probes alone so the payload can stream straight to the writer.
pub const EXACT_CHOICE_LIMIT: usize = 1 << 20;

/// How a payload encodes its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeltaFormat {
    /// Plain zstd of the whole target; needs no basis.
    Full,
    /// zstd with the basis file as reference prefix.
    ZstdRef,
    /// fast_rsync delta against the basis, compressed with zstd.
    Rsync,
}

impl DeltaFormat {
    /// All formats, in code order.
    pub const ALL: [DeltaFormat; 3] = [DeltaFormat::Full, DeltaFormat::ZstdRef, DeltaFormat::Rsync];

    /// The one-byte wire code of this format.
    pub fn code(self) -> u8 {
        match self {
            DeltaFormat::Full => 0,
            DeltaFormat::ZstdRef => 1,
            DeltaFormat::Rsync => 2,
        }
    }

    /// The format with wire code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<DeltaFormat> {
        DeltaFormat::ALL.into_iter().find(|f| f.code() == code)
    }

    /// Whether [`apply`] needs the basis bytes for this format.
    pub fn needs_basis(self) -> bool {
        self != DeltaFormat::Full
    }
}

impl fmt::Display for DeltaFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeltaFormat::Full => "full",
            DeltaFormat::ZstdRef => "zstd-ref",
            DeltaFormat::Rsync => "rsync",
        })
    }
}

/// What the sender knows about the receiver's copy of the file.
#[derive(Clone, Copy)]
pub enum Basis<'a> {
    /// The receiver has no basis: the file is new to it.
    None,
    /// The sender holds the same basis bytes as the receiver.
    Bytes(&'a [u8]),
    /// The receiver sent a signature of its basis.
    Signature(&'a BasisSignature),
}

impl fmt::Debug for Basis<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::None => f.write_str("Basis::None"),
            Basis::Bytes(b) => write!(f, "Basis::Bytes({} bytes)", b.len()),
            Basis::Signature(s) => write!(f, "Basis::Signature({} blocks)", s.block_count()),
        }
    }
}

/// What an encoder wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// The format the receiver must pass to [`apply`].
    pub format: DeltaFormat,
    /// Bytes written to the payload writer.
    pub payload_len: u64,
}

/// Why a payload could not be produced or applied.
///
/// Every variant except [`DeltaError::Sink`] and [`DeltaError::Encode`] blames the payload (or
/// the signature) rather than the local machine: see [`DeltaError::wants_full_resend`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// A format that needs the basis was applied without one.
    #[error("a {format} payload needs the basis file but none was given; send the file in full")]
    MissingBasis {
        /// The payload format.
        format: DeltaFormat,
    },
    /// The payload is not exactly one well-formed zstd frame.
    #[error(
        "{format} payload is not a single well-formed zstd frame ({detail}); send the file in full"
    )]
    MalformedFrame {
        /// The payload format.
        format: DeltaFormat,
        /// What is wrong with the frame.
        detail: &'static str,
    },
    /// The zstd frame does not declare its content size, or declares more than allowed.
    #[error(
        "{format} payload declares {} of content where at most {allowed} bytes fit the declared file size; send the file in full",
        match declared { Some(n) => format!("{n} bytes"), None => "no size".to_string() }
    )]
    DeclaredSize {
        /// The payload format.
        format: DeltaFormat,
        /// The content size in the frame header, if any.
        declared: Option<u64>,
        /// The largest content size acceptable for the declared file size.
        allowed: u64,
    },
    /// zstd rejected the compressed data.
    #[error("{format} payload is corrupt; send the file in full")]
    Corrupt {
        /// The payload format.
        format: DeltaFormat,
        /// The decoder's complaint.
        #[source]
        source: io::Error,
    },
    /// The rsync delta inside the payload is invalid (bad command, copy outside the basis, ...).
    #[error("rsync delta is invalid; send the file in full")]
    RsyncDelta(#[source] fast_rsync::ApplyError),
    /// Applying the payload would write more than the declared size.
    #[error("payload expands beyond the declared size of {limit} bytes; send the file in full")]
    OutputTooLarge {
        /// The declared size.
        limit: u64,
    },
    /// The payload produced fewer bytes than declared.
    #[error("payload produced {actual} bytes but {expected} were declared; send the file in full")]
    OutputTooShort {
        /// Bytes produced.
        actual: u64,
        /// The declared size.
        expected: u64,
    },
    /// The rebuilt file does not have the declared blake3 hash.
    #[error("rebuilt file hashes to {actual} but {expected} was declared; send the file in full")]
    HashMismatch {
        /// The declared hash.
        expected: blake3::Hash,
        /// The hash of what was rebuilt.
        actual: blake3::Hash,
    },
    /// The receiver's signature is unusable.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The declared size does not fit this machine's address space.
    #[error("declared size of {size} bytes does not fit in memory on this machine")]
    SizeUnsupported {
        /// The declared size.
        size: u64,
    },
    /// Writing the rebuilt file failed (a local problem, not the payload's fault).
    #[error("writing the rebuilt file failed")]
    Sink(#[source] io::Error),
    /// Compressing or writing the payload failed (a local problem).
    #[error("writing the encoded payload failed")]
    Encode(#[source] io::Error),
}

impl DeltaError {
    /// Whether the error blames the payload or signature, so that sending the file in full (and
    /// without a basis) is the right recovery. False for local write failures.
    pub fn wants_full_resend(&self) -> bool {
        !matches!(
            self,
            DeltaError::Sink(_) | DeltaError::Encode(_) | DeltaError::SizeUnsupported { .. }
        )
    }
}

/// Encode `target` as plain zstd (no basis).
pub fn encode_full(target: &[u8], w: &mut (impl Write + ?Sized)) -> Result<Encoded, DeltaError> {
    let mut w = CountingWriter::new(w);
    frame::compress(target, None, &mut w).map_err(DeltaError::Encode)?;
    Ok(w.encoded(DeltaFormat::Full))
}

/// Encode `target` as zstd with `basis` as reference prefix, streaming to `w`.
///
/// Always uses [`DeltaFormat::ZstdRef`]; [`encode`] decides whether that is worth it. The zstd
/// window covers basis plus target up to zstd's maximum (2 GiB on 64-bit targets); beyond that,
/// distant parts of the basis are out of reach and [`encode`] prefers the rsync engine.
/// Long-distance matching is always on. The compressed output streams to `w`, but zstd's
/// streaming encoder keeps its own copy of up to one window of the target, so encoding a large
/// file costs about its size again in memory (the basis prefix is referenced, not copied).
pub fn encode_with_basis(
    basis: &[u8],
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<Encoded, DeltaError> {
    let mut w = CountingWriter::new(w);
    frame::compress(target, Some(basis), &mut w).map_err(DeltaError::Encode)?;
    Ok(w.encoded(DeltaFormat::ZstdRef))
}

/// Encode `target` as an rsync delta against the basis described by `signature`.
///
/// Always uses [`DeltaFormat::Rsync`]. The raw delta is built in memory (at most the target size
/// plus 1/64) before it is compressed to `w`, so the frame can declare its content size.
pub fn encode_with_signature(
    signature: &BasisSignature,
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<Encoded, DeltaError> {
    let delta = signature.diff(target)?;
    let mut w = CountingWriter::new(w);
    frame::compress(&delta, None, &mut w).map_err(DeltaError::Encode)?;
    Ok(w.encoded(DeltaFormat::Rsync))
}

/// Encode `target` for a receiver that holds `basis`, choosing the engine.
///
/// No basis, an empty basis, or a probe saying the target is unrelated to the basis gives plain
/// zstd without paying for a diff. Otherwise, targets up to [`EXACT_CHOICE_LIMIT`] are encoded
/// both ways and the smaller payload is written (plain zstd on a tie); larger targets stream the
/// delta directly. A basis too large for zstd's window is diffed with the rsync engine instead,
/// using a signature computed locally.
pub fn encode(
    basis: Basis<'_>,
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<Encoded, DeltaError> {
    encode_sparing_full(basis, target, w).map(|(encoded, _)| encoded)
}

/// [`encode`], also handing back a [`DeltaFormat::Full`] payload of `target` when the delta won
/// the choice between them: what [`encode_full`] would write, made to compare, or `target` in
/// raw blocks when the delta was so small that nothing was compared (see `write_smaller`). A
/// sender that keeps plain payloads of what it sent (the client's cache) stores it rather than
/// compressing the file a second time.
pub fn encode_sparing_full(
    basis: Basis<'_>,
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<(Encoded, Option<Vec<u8>>), DeltaError> {
    Encoder::new().encode_sparing_full(basis, target, w)
}

/// Encodes file after file the way [`encode_sparing_full`] does, with one zstd context for every
/// zstd-reference delta of a file up to [`EXACT_CHOICE_LIMIT`]: making a context per file (with
/// the tables long-distance matching needs) cost more than encoding a small edited file against
/// its basis. The context references each basis rather than copying it, so every basis handed
/// to one encoder must outlive it (`'b`).
pub struct Encoder<'b> {
    cctx: Option<zstd::zstd_safe::CCtx<'b>>,
}

impl Default for Encoder<'_> {
    fn default() -> Self {
        Encoder::new()
    }
}

impl<'b> Encoder<'b> {
    /// An encoder whose context is made on first use.
    pub fn new() -> Encoder<'b> {
        Encoder { cctx: None }
    }

    /// [`encode_sparing_full`] through this encoder's context.
    pub fn encode_sparing_full(
        &mut self,
        basis: Basis<'b>,
        target: &[u8],
        w: &mut (impl Write + ?Sized),
    ) -> Result<(Encoded, Option<Vec<u8>>), DeltaError> {
        match basis {
            Basis::None => alone(encode_full(target, w)),
            Basis::Bytes(basis) if basis.is_empty() || target.is_empty() => {
                alone(encode_full(target, w))
            }
            Basis::Bytes(basis) if !frame::window_covers(basis.len(), target.len()) => {
                let signature = BasisSignature::calculate(basis);
                encode_rsync_auto(&signature, target, w)
            }
            Basis::Bytes(basis) => match probe::resemblance(basis, target) {
                Relatedness::Unrelated => alone(encode_full(target, w)),
                Relatedness::Related | Relatedness::Unknown
                    if target.len() <= EXACT_CHOICE_LIMIT =>
                {
                    let mut delta = Vec::new();
                    // zstd's one-call mode drops a prefix that the input overlaps in memory (the
                    // streaming encoder copies its input first): such a target goes that way.
                    if frame::overlap(basis, target) {
                        encode_with_basis(basis, target, &mut delta)?;
                    } else {
                        let cctx = self.cctx.get_or_insert_with(zstd::zstd_safe::CCtx::create);
                        frame::compress_ref_with(cctx, target, basis, &mut delta)
                            .map_err(DeltaError::Encode)?;
                    }
                    write_smaller(DeltaFormat::ZstdRef, &delta, target, w)
                }
                Relatedness::Related | Relatedness::Unknown => {
                    alone(encode_with_basis(basis, target, w))
                }
            },
            Basis::Signature(signature) => encode_rsync_auto(signature, target, w),
        }
    }
}

fn encode_rsync_auto(
    signature: &BasisSignature,
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<(Encoded, Option<Vec<u8>>), DeltaError> {
    match probe::rsync_relatedness(signature, target) {
        Relatedness::Related if target.len() <= EXACT_CHOICE_LIMIT => {
            let mut delta = Vec::new();
            encode_with_signature(signature, target, &mut delta)?;
            write_smaller(DeltaFormat::Rsync, &delta, target, w)
        }
        Relatedness::Related => alone(encode_with_signature(signature, target, w)),
        Relatedness::Unrelated | Relatedness::Unknown => alone(encode_full(target, w)),
    }
}

/// An encoding that made no plain payload besides the one it wrote, if any.
fn alone(encoded: Result<Encoded, DeltaError>) -> Result<(Encoded, Option<Vec<u8>>), DeltaError> {
    encoded.map(|e| (e, None))
}

/// A delta at most this fraction of its target's size is written without compressing the target
/// to compare: zstd rarely makes source text that small, and compressing small files cost the
/// client more than diffing them (26 ms against 20 ms for the 525 edited files of the generated
/// pair).
const CLEAR_WIN: usize = 16;

/// Writes `delta` unless plain compression of `target` is at least as small; hands back a plain
/// payload of `target` when the delta won: the compressed one made to compare, or for a delta
/// that won without comparing ([`CLEAR_WIN`]) `target` stored in raw blocks, which costs a copy.
fn write_smaller(
    format: DeltaFormat,
    delta: &[u8],
    target: &[u8],
    w: &mut (impl Write + ?Sized),
) -> Result<(Encoded, Option<Vec<u8>>), DeltaError> {
    let mut full = Vec::new();
    let clear_win = delta.len().saturating_mul(CLEAR_WIN) <= target.len();
    if clear_win {
        frame::write_raw(target, &mut full).map_err(DeltaError::Encode)?;
    } else {
        frame::compress(target, None, &mut full).map_err(DeltaError::Encode)?;
    }
    let (format, payload, spare) = if !clear_win && full.len() <= delta.len() {
        (DeltaFormat::Full, &full[..], false)
    } else {
        (format, delta, true)
    };
    w.write_all(payload).map_err(DeltaError::Encode)?;
    let encoded = Encoded {
        format,
        payload_len: payload.len() as u64,
    };
    Ok((encoded, spare.then_some(full)))
}

/// Rebuild a file from `payload` and write it to `out`.
///
/// `expected_size` and `expected_hash` come from the manifest. At most `expected_size` bytes are
/// ever written to `out`. The zstd frame must declare its content size, which is checked before
/// decoding starts (equal to `expected_size`, or for rsync at most `expected_size` plus 1/64) and
/// also bounds the buffer zstd allocates for its window. So memory stays within about
/// `expected_size` plus a few MiB: zstd's window buffer for the zstd formats (a small file is
/// decoded in one pass with none), the raw delta plus at most 2.3 MiB of window for rsync.
/// `basis` is needed for [`DeltaFormat::ZstdRef`] and [`DeltaFormat::Rsync`] and ignored for
/// [`DeltaFormat::Full`].
///
/// On error, `out` may hold a partial or wrong file and must be discarded; the hash is only known
/// to match once this returns `Ok`, with a [`Verified`] that says so.
pub fn apply(
    format: DeltaFormat,
    basis: Option<&[u8]>,
    payload: &[u8],
    expected_size: u64,
    expected_hash: &blake3::Hash,
    out: &mut (impl Write + ?Sized),
) -> Result<Verified, DeltaError> {
    let mut sink = VerifyingSink::new(out, expected_size);
    match format {
        DeltaFormat::Full => {
            let frame = Frame::exact(format, payload, expected_size)?;
            frame.decode(None, &mut |chunk| sink.push(chunk))?;
        }
        DeltaFormat::ZstdRef => {
            let basis = basis.ok_or(DeltaError::MissingBasis { format })?;
            let frame = Frame::exact(format, payload, expected_size)?;
            frame.decode(Some(basis), &mut |chunk| sink.push(chunk))?;
        }
        DeltaFormat::Rsync => {
            let basis = basis.ok_or(DeltaError::MissingBasis { format })?;
            let frame = Frame::at_most(format, payload, signature::max_delta_len(expected_size))?;
            let delta = frame.decode_to_vec()?;
            let limit =
                usize::try_from(expected_size).map_err(|_| DeltaError::SizeUnsupported {
                    size: expected_size,
                })?;
            if let Err(e) = fast_rsync::apply_limited(basis, &delta, &mut sink, limit) {
                return Err(match e {
                    fast_rsync::ApplyError::OutputLimit { .. } => DeltaError::OutputTooLarge {
                        limit: expected_size,
                    },
                    fast_rsync::ApplyError::Io(e) => sink.classify(e),
                    other => DeltaError::RsyncDelta(other),
                });
            }
        }
    }
    sink.finish(expected_hash)
}

/// [`apply`] for a `Full` payload read from `payload` (a spooled file, say) rather than held in
/// memory: memory stays bounded by the decoder's window whatever the file's size. The same checks
/// apply: one frame declaring exactly `expected_size`, nothing after it, content verified.
pub fn apply_full_from(
    payload: &mut dyn std::io::Read,
    expected_size: u64,
    expected_hash: &blake3::Hash,
    out: &mut (impl Write + ?Sized),
) -> Result<Verified, DeltaError> {
    let mut sink = VerifyingSink::new(out, expected_size);
    frame::decode_plain_stream(payload, expected_size, &mut |chunk| sink.push(chunk))?;
    sink.finish(expected_hash)
}

/// Counts what goes to the payload writer.
struct CountingWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    written: u64,
}

impl<'a, W: Write + ?Sized> CountingWriter<'a, W> {
    fn new(inner: &'a mut W) -> Self {
        CountingWriter { inner, written: 0 }
    }

    fn encoded(&self, format: DeltaFormat) -> Encoded {
        Encoded {
            format,
            payload_len: self.written,
        }
    }
}

impl<W: Write + ?Sized> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes the rebuilt file to the caller's writer while hashing it and enforcing the size limit.
struct VerifyingSink<'a, W: Write + ?Sized> {
    out: &'a mut W,
    hasher: blake3::Hasher,
    written: u64,
    limit: u64,
    /// Set when a write was refused for exceeding `limit`, so the io::Error it caused can be told
    /// apart from a failure of `out`.
    overflowed: bool,
}

impl<'a, W: Write + ?Sized> VerifyingSink<'a, W> {
    fn new(out: &'a mut W, limit: u64) -> Self {
        VerifyingSink {
            out,
            hasher: blake3::Hasher::new(),
            written: 0,
            limit,
            overflowed: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) -> Result<(), DeltaError> {
        if chunk.len() as u64 > self.limit - self.written {
            self.overflowed = true;
            return Err(DeltaError::OutputTooLarge { limit: self.limit });
        }
        self.out.write_all(chunk).map_err(DeltaError::Sink)?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn classify(&self, e: io::Error) -> DeltaError {
        if self.overflowed {
            DeltaError::OutputTooLarge { limit: self.limit }
        } else {
            DeltaError::Sink(e)
        }
    }

    fn finish(self, expected_hash: &blake3::Hash) -> Result<Verified, DeltaError> {
        if self.written != self.limit {
            return Err(DeltaError::OutputTooShort {
                actual: self.written,
                expected: self.limit,
            });
        }
        let actual = self.hasher.finalize();
        if actual != *expected_hash {
            return Err(DeltaError::HashMismatch {
                expected: *expected_hash,
                actual,
            });
        }
        Ok(Verified {
            hash: actual.into(),
            size: self.written,
        })
    }
}

/// What [`apply`] wrote, hashed as it went: exactly `size` bytes hashing to `hash`, which equal
/// the expected ones. Only this module makes one, so a writer that receives it (the daemon's
/// object store) can rely on the check instead of hashing the same bytes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    hash: Hash,
    size: u64,
}

impl Verified {
    /// The content's hash.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The content's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<W: Write + ?Sized> Write for VerifyingSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.push(buf) {
            Ok(()) => Ok(buf.len()),
            Err(DeltaError::Sink(e)) => Err(e),
            Err(_) => Err(io::Error::other("output exceeds the declared size")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests;
