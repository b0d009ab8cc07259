//! Names of the on-disk layout of an app root, as pure data.
//!
//! ```text
//! ROOT/releases/<id>/          complete releases (hard links + changed files)
//! ROOT/releases/<id>.staging/  a release being built (removed by recovery)
//! ROOT/releases/<id>.trash/    a release being pruned (removed by recovery)
//! ROOT/current -> releases/<id>
//! ROOT/shared/                 files and directories linked into every release
//! ROOT/.relsync/               lock, journal.jsonl, config.toml, releases/<id>.rec,
//!                              objects/<blake3>.<mode> (verified content received by a push)
//! ROOT/.relsync/next/<id>/     the prestaged tree of release <id>: its directories, its files
//!                              hard-linked from their own paths and its symlinks, which the next
//!                              build on top of <id> starts from (`<id>.partial` while it is made)
//! ```

use crate::path::RelPath;
use crate::release::ReleaseId;

pub const RELEASES: &str = "releases";
pub const CURRENT: &str = "current";
pub const CURRENT_TMP: &str = "current.tmp";
pub const SHARED: &str = "shared";
pub const META: &str = ".relsync";
pub const LOCK: &str = "lock";
pub const JOURNAL: &str = "journal.jsonl";
pub const CONFIG: &str = "config.toml";
pub const RECORDS: &str = "releases";
pub const RECORD_SUFFIX: &str = ".rec";
pub const OBJECTS: &str = "objects";
pub const NEXT: &str = "next";
pub const PARTIAL_SUFFIX: &str = ".partial";

/// File name of the received object holding `hash` with permission bits `mode`.
pub fn object_name(hash: &crate::manifest::Hash, mode: u32) -> String {
    format!("{}.{mode:o}", hash.to_hex())
}

/// The (content, mode) an object file name stands for.
pub fn parse_object_name(name: &str) -> Option<(crate::manifest::Hash, u32)> {
    let (hex, mode) = name.split_once('.')?;
    let mode = u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| m & !0o777 == 0)?;
    Some((crate::manifest::Hash::from_hex(hex)?, mode))
}

/// What `current` points to for release `id`.
pub fn current_target(id: &ReleaseId) -> String {
    format!("{RELEASES}/{id}")
}

/// The release a `current` link target names, if it has relsync's shape.
pub fn parse_current_target(target: &str) -> Option<ReleaseId> {
    let rest = target.strip_prefix(RELEASES)?.strip_prefix('/')?;
    ReleaseId::new(rest.trim_end_matches('/')).ok()
}

/// File name of a release record inside `.relsync/releases/`.
pub fn record_name(id: &ReleaseId) -> String {
    format!("{id}{RECORD_SUFFIX}")
}

/// Relative target of the link at `path` inside a release that leads to `ROOT/shared/<path>`.
///
/// The link's directory is `depth - 1` levels below the release root, which is two levels below ROOT.
pub fn shared_link_target(path: &RelPath) -> String {
    format!("{}{SHARED}/{path}", "../".repeat(path.depth() + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::{resolve_symlink, Resolved, SymlinkPolicy};

    #[test]
    fn shared_targets_resolve_into_shared() {
        for p in [".env", "storage", "public/uploads", "a/b/c"] {
            let rp = RelPath::new(p).unwrap();
            let t = shared_link_target(&rp);
            let want: Vec<String> = p.split('/').map(str::to_owned).collect();
            assert_eq!(
                resolve_symlink(&rp, &t, SymlinkPolicy::default()).unwrap(),
                Resolved::Shared(want),
                "{p} -> {t}"
            );
        }
    }

    #[test]
    fn object_names_round_trip() {
        let h = crate::manifest::Hash::of(b"x");
        assert_eq!(parse_object_name(&object_name(&h, 0o755)), Some((h, 0o755)));
        for bad in [
            "",
            "abc",
            "x.644",
            &format!("{}.4755", h.to_hex()),
            &format!("{}.9", h.to_hex()),
        ] {
            assert_eq!(parse_object_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn current_target_round_trip() {
        let id = ReleaseId::new("20260101T000000Z").unwrap();
        assert_eq!(parse_current_target(&current_target(&id)), Some(id));
        assert_eq!(parse_current_target("/etc"), None);
        assert_eq!(parse_current_target("releases/../x"), None);
    }
}
