//! A whole file's bytes in memory: read when small, mapped when large.
//!
//! Both sides read whole files to hash and encode them (the client the files it sends, relsyncd
//! the bases it applies deltas to). Mapping a small file costs more than copying it: the `mmap`,
//! a page fault per page and, at `munmap` in a process with several threads, a TLB shootdown on
//! every core. Large files are mapped, populated up front since every page is read right away.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Deref;

use memmap2::{Mmap, MmapOptions};

/// Files below this size are read into memory; mapping them costs more than copying.
pub const MAP_THRESHOLD: u64 = 256 * 1024;

/// A file's bytes, mapped or read.
pub enum Content {
    Mapped(Mmap),
    Read(Vec<u8>),
}

impl Content {
    /// The bytes of `file` (from its current position when read), expected to be `size` long:
    /// read below [`MAP_THRESHOLD`], mapped whole at or above it. A read file that grew comes
    /// back one byte longer than `size`, and a shorter one as it is, so the caller sees a change
    /// of length; a mapping is `size` long, and only the caller's hash check sees a change.
    ///
    /// # Safety
    ///
    /// At or above [`MAP_THRESHOLD`] the file is mapped: the caller must ensure, or accept the
    /// risk, that nothing truncates it while the returned value lives (reading a page a
    /// truncation removed faults the process) and must check the bytes (by hash) before trusting
    /// them, since a writer may change them under the mapping.
    pub unsafe fn load(file: &File, size: u64) -> io::Result<Content> {
        if size >= MAP_THRESHOLD {
            let len = usize::try_from(size)
                .map_err(|_| io::Error::other("file too large for this machine's address space"))?;
            // SAFETY: the caller's contract above.
            let map = unsafe { MmapOptions::new().len(len).populate().map(file) }?;
            return Ok(Content::Mapped(map));
        }
        let mut buf = Vec::with_capacity(size as usize + 1);
        file.take(size + 1).read_to_end(&mut buf)?;
        Ok(Content::Read(buf))
    }
}

impl Deref for Content {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Content::Mapped(m) => m,
            Content::Read(v) => v,
        }
    }
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Content({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        f
    }

    #[test]
    fn small_files_are_read_and_large_ones_mapped_with_the_same_bytes() {
        for len in [
            0,
            1,
            4096,
            MAP_THRESHOLD as usize - 1,
            MAP_THRESHOLD as usize,
            1 << 20,
        ] {
            let f = file_of(len);
            let c = unsafe { Content::load(&f, len as u64) }.unwrap();
            let want: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert_eq!(&*c, &want[..], "len {len}");
            assert_eq!(
                matches!(c, Content::Mapped(_)),
                len as u64 >= MAP_THRESHOLD,
                "len {len}: {c:?}"
            );
        }
    }

    #[test]
    fn a_change_of_length_shows_in_the_bytes() {
        // Grown since it was sized: one byte more than expected comes back.
        let f = file_of(100);
        assert_eq!(unsafe { Content::load(&f, 50) }.unwrap().len(), 51);
        // Shrunk: what is there.
        let f = file_of(10);
        assert_eq!(unsafe { Content::load(&f, 50) }.unwrap().len(), 10);
    }
}
