//! Validated relative paths and symlink targets.
//!
//! Every path that names something inside a release (from a local scan or from a peer's manifest) is a
//! [`RelPath`]. Constructing one is the only way in, and construction rejects everything in fault case
//! 12 (absolute paths, `.`/`..`, empty components, control characters, over-long names, names reserved by
//! the layout) before any file-system call can see it. The ordering of `RelPath` is component-wise, so a
//! sorted list puts every directory before its contents.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest accepted path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;
/// Components starting with this prefix belong to relsync's own layout (metadata, temp files).
pub const RESERVED_PREFIX: &str = ".relsync";

/// Why a path or symlink target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} is absolute; paths must be relative to the release root")]
    Absolute(String),
    #[error("path {0:?} has an empty component (`//` or a trailing `/`)")]
    EmptyComponent(String),
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("path {0:?} contains a NUL or control character")]
    ControlChar(String),
    #[error("path is {len} bytes long, over the {MAX_PATH_LEN}-byte limit")]
    TooLong { len: usize },
    #[error("a component of path {0:?} is over the {MAX_COMPONENT_LEN}-byte limit")]
    ComponentTooLong(String),
    #[error("path {0:?} uses a name reserved by relsync (components starting with `.relsync`)")]
    Reserved(String),
    #[error("path {0:?} is not valid UTF-8; rename it or exclude it")]
    NotUtf8(String),
    #[error("symlink {link} has an empty target")]
    EmptyTarget { link: String },
    #[error("symlink {link} points to absolute path {target:?}; use a relative target inside the release")]
    AbsoluteTarget { link: String, target: String },
    #[error("symlink {link} points to {target:?}, outside the release")]
    TargetEscapes { link: String, target: String },
    #[error("symlink {link} has target {target:?} with a NUL or control character")]
    TargetControlChar { link: String, target: String },
}

/// A normalized, validated path relative to a release root: `a/b/c`, never empty.
///
/// Shared (`Arc<str>`): plans, records and sessions hold the same path many times over, and a
/// clone is a reference count, not an allocation. Where the last component starts is kept with
/// it: the executor asks every path for its parent and name several times over.
#[derive(Clone)]
pub struct RelPath {
    path: Arc<str>,
    /// Byte offset of the last component (0 for a top-level entry).
    name_at: u32,
}

impl PartialEq for RelPath {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl Eq for RelPath {}

impl std::hash::Hash for RelPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.path.hash(state);
    }
}

impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.path)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RelPath;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a release-relative path")
            }
            // A manifest decodes one path per entry: validate the encoded text where it lies and
            // copy it once, into the path's own allocation.
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RelPath, E> {
                RelPath::new(s).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

fn has_control(s: &str) -> bool {
    // ASCII text, nearly every path, needs no decoding: its control characters are the bytes
    // below 0x20 and 0x7f. Other text is checked by character (C1 controls, U+0080 to U+009F).
    if s.is_ascii() {
        s.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        s.chars().any(|c| c.is_control())
    }
}

impl RelPath {
    /// Validates `s` as a release-relative path.
    pub fn new(s: impl AsRef<str>) -> Result<RelPath, PathError> {
        let s = s.as_ref();
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong { len: s.len() });
        }
        if has_control(s) {
            return Err(PathError::ControlChar(s.to_owned()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        let (mut at, mut name_at) = (0, 0);
        for comp in s.as_bytes().split(|&b| b == b'/') {
            match comp {
                b"" => return Err(PathError::EmptyComponent(s.to_owned())),
                b"." | b".." => return Err(PathError::DotComponent(s.to_owned())),
                c if c.len() > MAX_COMPONENT_LEN => {
                    return Err(PathError::ComponentTooLong(s.to_owned()))
                }
                c if c.starts_with(RESERVED_PREFIX.as_bytes()) => {
                    return Err(PathError::Reserved(s.to_owned()))
                }
                _ => {}
            }
            name_at = at;
            at += comp.len() + 1;
        }
        Ok(RelPath {
            path: Arc::from(s),
            // Paths are at most MAX_PATH_LEN bytes, so the offset fits.
            name_at: name_at as u32,
        })
    }

    /// A path already known to be valid.
    fn trusted(path: Arc<str>) -> RelPath {
        // Paths are at most MAX_PATH_LEN bytes, so the offset fits.
        let name_at = path.rfind('/').map_or(0, |i| i + 1) as u32;
        RelPath { path, name_at }
    }

    /// Builds a path from OS components (as produced by a directory walk).
    pub fn from_os(path: &std::path::Path) -> Result<RelPath, PathError> {
        let s = path
            .to_str()
            .ok_or_else(|| PathError::NotUtf8(path.to_string_lossy().into_owned()))?;
        RelPath::new(s)
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }

    pub fn components(&self) -> std::str::Split<'_, char> {
        self.path.split('/')
    }

    /// Number of components (`a/b` → 2).
    pub fn depth(&self) -> usize {
        self.path.bytes().filter(|&b| b == b'/').count() + 1
    }

    /// The containing directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.parent_str().map(|p| RelPath::trusted(Arc::from(p)))
    }

    /// [`RelPath::parent`] as text, without allocating.
    pub fn parent_str(&self) -> Option<&str> {
        match self.name_at as usize {
            0 => None,
            i => Some(&self.path[..i - 1]),
        }
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        &self.path[self.name_at as usize..]
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.path, name))
    }

    /// True when `self` is `other` or lies below it (component-wise, so `ab` is not under `a`).
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.path == other.path
            || (self.path.len() > other.path.len()
                && self.path.starts_with(&*other.path)
                && self.path.as_bytes()[other.path.len()] == b'/')
    }
}

impl Ord for RelPath {
    /// Component-wise order: `/` sorts before every other byte, so `a/b` < `a.b` and a directory
    /// always precedes its contents. Computed eight bytes at a time: sorting a scan and merging
    /// two manifests compare paths on the critical path.
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.path.as_bytes(), other.path.as_bytes());
        let n = a.len().min(b.len());
        let mut i = 0;
        while i + 8 <= n {
            let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
            let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
            if x != y {
                i += ((x ^ y).trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        while i < n && a[i] == b[i] {
            i += 1;
        }
        let key = |c: Option<&u8>| c.map(|&c| if c == b'/' { 0 } else { u16::from(c) + 1 });
        key(a.get(i)).cmp(&key(b.get(i)))
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RelPath::new(s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.path.to_string()
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.path, f)
    }
}

/// Where a symlink target leads, resolved lexically from the release root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Inside the release, at these components (empty: the release root itself).
    Inside(Vec<String>),
    /// Into `ROOT/shared/<rest>` via the `../../shared/` route that relsync's own shared links use.
    Shared(Vec<String>),
}

/// Policy for symlink targets (fault case 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymlinkPolicy {
    /// Allow targets that leave the release only to land in the app's `shared/` directory.
    pub allow_shared: bool,
}

impl Default for SymlinkPolicy {
    fn default() -> Self {
        SymlinkPolicy { allow_shared: true }
    }
}

/// Resolves `target` of the symlink at `link` lexically and checks it against `policy`.
///
/// Releases live at `ROOT/releases/<id>/`, so climbing two levels above the release root and then into
/// `shared/` reaches the app's shared directory; anything else outside the release is refused.
pub fn resolve_symlink(
    link: &RelPath,
    target: &str,
    policy: SymlinkPolicy,
) -> Result<Resolved, PathError> {
    let err_escape = || PathError::TargetEscapes {
        link: link.to_string(),
        target: target.to_owned(),
    };
    if target.is_empty() {
        return Err(PathError::EmptyTarget {
            link: link.to_string(),
        });
    }
    if target.len() > MAX_PATH_LEN || has_control(target) {
        return Err(PathError::TargetControlChar {
            link: link.to_string(),
            target: target.to_owned(),
        });
    }
    if target.starts_with('/') {
        return Err(PathError::AbsoluteTarget {
            link: link.to_string(),
            target: target.to_owned(),
        });
    }
    let mut stack: Vec<String> = link
        .parent()
        .map(|p| p.components().map(str::to_owned).collect())
        .unwrap_or_default();
    // Components above the release root: 0 = inside, 1 = releases/, 2 = ROOT.
    let mut above = 0usize;
    let mut outside: Vec<String> = Vec::new();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if !outside.is_empty() {
                    outside.pop();
                } else if stack.pop().is_none() {
                    above += 1;
                    if above > 2 {
                        return Err(err_escape());
                    }
                }
            }
            c => {
                if above > 0 {
                    outside.push(c.to_owned());
                } else {
                    stack.push(c.to_owned());
                }
            }
        }
    }
    if above == 0 {
        return Ok(Resolved::Inside(stack));
    }
    if policy.allow_shared && above == 2 && outside.first().map(String::as_str) == Some("shared") {
        let rest = outside[1..].to_vec();
        if rest.iter().any(|c| c.starts_with(RESERVED_PREFIX)) {
            return Err(err_escape());
        }
        return Ok(Resolved::Shared(rest));
    }
    Err(err_escape())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths from few distinct bytes, so that they share long prefixes and differ around `/`,
    /// `.`, `-` and multi-byte characters, on both sides of an eight-byte boundary.
    fn components() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
        proptest::collection::vec("[ab.é-]{1,9}", 0..5)
    }

    proptest::proptest! {
        #[test]
        fn order_parent_and_name_agree_with_the_text(
            common in components(),
            x in components(),
            y in components(),
        ) {
            let make = |tail: &[String]| {
                let comps: Vec<&str> = common.iter().chain(tail).map(String::as_str).collect();
                RelPath::new(comps.join("/")).ok()
            };
            // The order by definition: byte by byte, with `/` before every other byte.
            let reference = |a: &RelPath, b: &RelPath| {
                let map = |c: u8| if c == b'/' { 0 } else { c };
                a.as_str().bytes().map(map).cmp(b.as_str().bytes().map(map))
            };
            if let (Some(a), Some(b)) = (make(&x), make(&y)) {
                proptest::prop_assert_eq!(a.cmp(&b), reference(&a, &b), "{} vs {}", a, b);
                proptest::prop_assert_eq!(b.cmp(&a), reference(&b, &a), "{} vs {}", b, a);
                for p in [&a, &b] {
                    let s = p.as_str();
                    let (parent, name) = match s.rfind('/') {
                        Some(i) => (Some(&s[..i]), &s[i + 1..]),
                        None => (None, s),
                    };
                    proptest::prop_assert_eq!(p.parent_str(), parent);
                    proptest::prop_assert_eq!(p.file_name(), name);
                    proptest::prop_assert_eq!(
                        p.parent().map(|q| q.file_name().to_owned()),
                        parent.map(|q| q.rsplit('/').next().unwrap().to_owned())
                    );
                }
            }
        }
    }

    #[test]
    fn hostile_paths_are_rejected_with_the_right_error() {
        let long_comp = "x".repeat(256);
        let long_path = vec!["abcdefgh"; 600].join("/");
        type Check = fn(&PathError) -> bool;
        let table: &[(&str, Check)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("../x", |e| matches!(e, PathError::DotComponent(_))),
            ("a/../../x", |e| matches!(e, PathError::DotComponent(_))),
            (".", |e| matches!(e, PathError::DotComponent(_))),
            ("..", |e| matches!(e, PathError::DotComponent(_))),
            ("a/./b", |e| matches!(e, PathError::DotComponent(_))),
            ("/etc/x", |e| matches!(e, PathError::Absolute(_))),
            ("a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a/", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a\0b", |e| matches!(e, PathError::ControlChar(_))),
            ("a\nb", |e| matches!(e, PathError::ControlChar(_))),
            ("a\x1b[31mb", |e| matches!(e, PathError::ControlChar(_))),
            ("a\u{7f}", |e| matches!(e, PathError::ControlChar(_))),
            ("a/\u{85}b", |e| matches!(e, PathError::ControlChar(_))),
            ("é\u{9f}", |e| matches!(e, PathError::ControlChar(_))),
            (&long_comp, |e| matches!(e, PathError::ComponentTooLong(_))),
            (&long_path, |e| matches!(e, PathError::TooLong { .. })),
            (".relsync", |e| matches!(e, PathError::Reserved(_))),
            ("a/.relsync-tmp.1", |e| matches!(e, PathError::Reserved(_))),
        ];
        for (input, check) in table {
            let err = RelPath::new(*input).expect_err(input);
            assert!(check(&err), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn ordinary_paths_are_accepted() {
        for ok in [
            "a",
            "a/b/c.php",
            ".env",
            "..a",
            "a..",
            "vendor/bin/phpunit",
            "ünïcode/名前.php",
            "with space/x",
            ".relsyn",
        ] {
            assert_eq!(RelPath::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn ordering_puts_directories_before_their_contents() {
        let mut v: Vec<RelPath> = ["a.b", "a/b", "a", "a-b", "a/b/c", "b", "a/a"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect();
        v.sort();
        let got: Vec<&str> = v.iter().map(RelPath::as_str).collect();
        assert_eq!(got, ["a", "a/a", "a/b", "a/b/c", "a-b", "a.b", "b"]);
    }

    #[test]
    fn parent_name_depth_and_prefix() {
        let p = RelPath::new("a/bc/d").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/bc");
        assert_eq!(p.file_name(), "d");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&RelPath::new("a/bc").unwrap()));
        assert!(!p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(RelPath::new("top").unwrap().parent().is_none());
    }

    #[test]
    fn deserializing_validates() {
        let bad: Result<RelPath, _> = serde_json::from_str("\"../etc/passwd\"");
        assert!(bad.is_err());
        let good: RelPath = serde_json::from_str("\"a/b\"").unwrap();
        assert_eq!(good.as_str(), "a/b");
        // The binary encoding hands the text over borrowed; it is validated all the same.
        for (text, ok) in [("a/b/c", true), ("a//b", false), (".relsync/x", false)] {
            let bytes = postcard::to_stdvec(text).unwrap();
            let got: Result<RelPath, _> = postcard::from_bytes(&bytes);
            match got {
                Ok(p) => {
                    assert!(ok, "{text:?} accepted");
                    assert_eq!((p.as_str(), p.file_name()), (text, "c"));
                }
                Err(_) => assert!(!ok, "{text:?} refused"),
            }
        }
    }

    #[test]
    fn symlink_targets() {
        let p = SymlinkPolicy::default();
        let strict = SymlinkPolicy {
            allow_shared: false,
        };
        let link = |s: &str| RelPath::new(s).unwrap();
        let inside = |v: &[&str]| Resolved::Inside(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            resolve_symlink(&link("vendor/bin/x"), "../pkg/bin/x", p).unwrap(),
            inside(&["vendor", "pkg", "bin", "x"])
        );
        assert_eq!(
            resolve_symlink(&link("a"), "./b", p).unwrap(),
            inside(&["b"])
        );
        assert_eq!(
            resolve_symlink(&link("public/storage"), "../../../shared/storage/app", p).unwrap(),
            Resolved::Shared(vec!["storage".into(), "app".into()])
        );
        for (l, t, pol) in [
            ("a", "/etc/passwd", p),
            ("a", "../x", p),
            ("a/b", "../../x", p),
            ("a", "../../../../x", p),
            ("a", "../../shared/x", strict),
            ("a", "../../other/x", p),
            ("a", "", p),
            ("a", "x\0y", p),
            ("a", "../../shared/.relsync/x", p),
        ] {
            assert!(
                resolve_symlink(&link(l), t, pol).is_err(),
                "{l} -> {t} was accepted"
            );
        }
    }
}
