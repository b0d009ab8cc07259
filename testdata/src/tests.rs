//! Checks generated corpora and the checked-in fixtures against what is on disk, not against the
//! generator's own bookkeeping.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File {
        mode: u32,
        hash: blake3::Hash,
        len: u64,
        mtime: SystemTime,
    },
    Link(PathBuf),
}

/// Every entry under `root`, keyed by relative path.
fn walk(root: &Path) -> BTreeMap<String, Node> {
    fn visit(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let meta = path.symlink_metadata().unwrap();
            let node = if meta.is_dir() {
                visit(root, &path, out);
                Node::Dir
            } else if meta.is_symlink() {
                Node::Link(fs::read_link(&path).unwrap())
            } else {
                let data = fs::read(&path).unwrap();
                Node::File {
                    mode: meta.permissions().mode() & 0o7777,
                    hash: blake3::hash(&data),
                    len: data.len() as u64,
                    mtime: meta.modified().unwrap(),
                }
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    visit(root, root, &mut out);
    out
}

/// One hash over paths, kinds, modes, link targets and contents of both releases.
fn tree_hash(out: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for side in ["a", "b"] {
        for (path, node) in walk(&out.join(side)) {
            h.update(side.as_bytes());
            h.update(path.as_bytes());
            match node {
                Node::Dir => h.update(b"d"),
                Node::File { mode, hash, .. } => {
                    h.update(&mode.to_le_bytes());
                    h.update(hash.as_bytes())
                }
                Node::Link(t) => h.update(t.to_str().unwrap().as_bytes()),
            };
        }
    }
    h.finalize()
}

fn files(tree: &BTreeMap<String, Node>) -> Files<'_> {
    tree.iter()
        .filter_map(|(p, n)| match n {
            Node::File { mode, hash, .. } => Some((p.as_str(), (*mode, *hash))),
            _ => None,
        })
        .collect()
}

type Files<'a> = BTreeMap<&'a str, (u32, blake3::Hash)>;

fn set(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

fn only<'a>(x: &Files<'a>, y: &Files<'_>) -> Vec<&'a str> {
    x.keys().filter(|p| !y.contains_key(*p)).copied().collect()
}

fn gen(options: &Options) -> (tempfile::TempDir, Summary) {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(dir.path(), options).unwrap();
    (dir, summary)
}

#[test]
fn same_seed_gives_identical_trees_and_different_seeds_differ() {
    let (one, s1) = gen(&Options::tiny(7));
    let (two, s2) = gen(&Options::tiny(7));
    let (three, s3) = gen(&Options::tiny(8));
    assert_eq!(tree_hash(one.path()), tree_hash(two.path()));
    assert_eq!(s1, s2);
    assert_ne!(tree_hash(one.path()), tree_hash(three.path()));
    assert_ne!(s1.edited, s3.edited);
}

/// The summary must describe exactly what differs on disk, whatever the corpus size.
#[test]
fn summary_matches_the_trees_on_disk() {
    for options in [Options::tiny(1), Options::tiny(2), {
        let mut o = Options::tiny(3);
        o.files = 1000;
        o.bytes = 5_000_000;
        o
    }] {
        let (dir, summary) = gen(&options);
        let ta = walk(&dir.path().join("a"));
        let tb = walk(&dir.path().join("b"));
        let (fa, fb) = (files(&ta), files(&tb));

        for (stats, tree, f) in [(summary.a, &ta, &fa), (summary.b, &tb, &fb)] {
            let bytes: u64 = tree
                .values()
                .map(|n| match n {
                    Node::File { len, .. } => *len,
                    _ => 0,
                })
                .sum();
            let count = |want: fn(&Node) -> bool| tree.values().filter(|n| want(n)).count() as u64;
            assert_eq!(stats.files, f.len() as u64);
            assert_eq!(stats.bytes, bytes);
            assert_eq!(stats.dirs, count(|n| matches!(n, Node::Dir)));
            assert_eq!(stats.symlinks, count(|n| matches!(n, Node::Link(_))));
        }
        assert_eq!(summary.a.files, options.files as u64);
        let ratio = summary.a.bytes as f64 / options.bytes as f64;
        assert!((0.8..1.25).contains(&ratio), "size ratio {ratio}");

        let only_a: BTreeSet<&str> = fa
            .keys()
            .filter(|p| !fb.contains_key(*p))
            .copied()
            .collect();
        let only_b: BTreeSet<&str> = fb
            .keys()
            .filter(|p| !fa.contains_key(*p))
            .copied()
            .collect();
        let both = fa.keys().filter(|p| fb.contains_key(*p));
        let edited: BTreeSet<&str> = both
            .clone()
            .filter(|p| fa[*p].1 != fb[*p].1)
            .copied()
            .collect();
        let chmodded: BTreeSet<&str> = both
            .filter(|p| fa[*p].1 == fb[*p].1 && fa[*p].0 != fb[*p].0)
            .copied()
            .collect();

        let froms = summary.renamed.iter().map(|r| r.from.as_str());
        let tos = summary.renamed.iter().map(|r| r.to.as_str());
        assert_eq!(edited, set(&summary.edited));
        assert_eq!(chmodded, set(&summary.mode_changed));
        assert_eq!(
            only_a,
            set(&summary.removed).into_iter().chain(froms).collect()
        );
        assert_eq!(only_b, set(&summary.added).into_iter().chain(tos).collect());

        for r in &summary.renamed {
            assert_eq!(
                fa[r.from.as_str()],
                fb[r.to.as_str()],
                "{} -> {}",
                r.from,
                r.to
            );
        }
        assert_eq!(summary.mode_changed.len(), 1);
        for p in &summary.mode_changed {
            assert_eq!((fa[p.as_str()].0, fb[p.as_str()].0), (0o644, 0o755));
        }
        assert_eq!(Summary::load(dir.path()).unwrap(), summary);
    }
}

#[test]
fn change_ratios_land_near_the_targets() {
    let mut options = Options::tiny(5);
    options.files = 2000;
    options.bytes = 8_000_000;
    let (_dir, s) = gen(&options);
    let n = s.a.files as f64;
    let cases = [
        ("edited", s.edited.len(), 0.035, 0.1),
        ("added", s.added.len(), 0.005, 0.2),
        ("removed", s.removed.len(), 0.003, 0.2),
    ];
    for (what, count, target, tolerance) in cases {
        let ratio = count as f64 / n;
        assert!(
            (ratio - target).abs() <= target * tolerance,
            "{what}: {ratio} vs {target}"
        );
    }
    assert!((5..=10).contains(&s.renamed.len()));
}

#[test]
fn modes_mtimes_and_layout_look_like_a_php_release() {
    let (dir, _s) = gen(&Options::tiny(11));
    let ta = walk(&dir.path().join("a"));
    let tb = walk(&dir.path().join("b"));
    for key in [
        "public/index.php",
        "composer.json",
        "config/app.php",
        "routes/web.php",
    ] {
        assert!(matches!(ta.get(key), Some(Node::File { .. })), "{key}");
    }
    assert!(ta
        .keys()
        .any(|p| p.starts_with("vendor/") && p.ends_with(".php")));
    assert!(ta.keys().any(|p| p.ends_with(".blade.php")));
    let exec = ta
        .values()
        .filter(|n| matches!(n, Node::File { mode: 0o755, .. }))
        .count();
    assert!(exec >= 2, "{exec} executables");
    let mtimes = |t: &BTreeMap<String, Node>| -> Vec<SystemTime> {
        t.values()
            .filter_map(|n| match n {
                Node::File { mtime, mode, .. } => {
                    assert!(*mode == 0o644 || *mode == 0o755, "mode {mode:o}");
                    Some(*mtime)
                }
                _ => None,
            })
            .collect()
    };
    let newest_a = mtimes(&ta).into_iter().max().unwrap();
    let oldest_b = mtimes(&tb).into_iter().min().unwrap();
    assert!(newest_a < oldest_b, "b must be newer than a");
    for (side, tree) in [("a", &ta), ("b", &tb)] {
        for path in tree.keys().filter(|p| matches!(tree[*p], Node::Dir)) {
            let full = dir.path().join(side).join(path);
            let mode = full.metadata().unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{side}/{path}");
        }
    }
}

/// Lexically resolves `target` relative to the link at `link` and checks it stays under the root.
fn resolve_inside(link: &str, target: &Path) -> Option<String> {
    if target.is_absolute() {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for c in target.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

#[test]
fn resolve_inside_rejects_escapes() {
    let cases = [
        ("vendor/bin/x", "../pkg/bin/x", Some("vendor/pkg/bin/x")),
        (
            "public/storage",
            "../storage/app/public",
            Some("storage/app/public"),
        ),
        ("x", "../y", None),
        ("a/x", "../../y", None),
        ("a/x", "/etc/passwd", None),
    ];
    for (link, target, want) in cases {
        assert_eq!(
            resolve_inside(link, Path::new(target)).as_deref(),
            want,
            "{link}"
        );
    }
}

#[test]
fn every_symlink_points_inside_the_tree() {
    let (dir, _s) = gen(&Options::tiny(13));
    for side in ["a", "b"] {
        let root = dir.path().join(side);
        let tree = walk(&root);
        let links: Vec<_> = tree
            .iter()
            .filter_map(|(p, n)| match n {
                Node::Link(t) => Some((p, t)),
                _ => None,
            })
            .collect();
        assert!(links.len() >= 3, "{side}: {} symlinks", links.len());
        for (path, target) in links {
            let resolved = resolve_inside(path, target)
                .unwrap_or_else(|| panic!("{side}/{path} -> {target:?} escapes the tree"));
            assert!(tree.contains_key(&resolved), "{side}/{path} dangles");
            assert!(root.join(path).metadata().is_ok(), "{side}/{path} dangles");
        }
    }
}

#[test]
fn big_file_pair_differs_by_small_edits() {
    let (dir, s) = gen(&Options::big(3, 1 << 20));
    let a = fs::read(dir.path().join("a").join(BIG_FILE_PATH)).unwrap();
    let b = fs::read(dir.path().join("b").join(BIG_FILE_PATH)).unwrap();
    assert_eq!(a.len(), 1 << 20);
    assert_eq!((s.a.bytes, s.b.bytes), (a.len() as u64, b.len() as u64));
    assert_eq!(s.edited, [BIG_FILE_PATH]);
    // Ten edits of at most 64 bytes each: the common prefix and suffix cover nearly everything.
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    assert!(
        prefix < a.len() / 10 && suffix < a.len() / 10,
        "edits are spread out"
    );
    assert!(a.len().abs_diff(b.len()) <= 10 * 64);
    let ma = dir.path().join("a").join(BIG_FILE_PATH).metadata().unwrap();
    let mb = dir.path().join("b").join(BIG_FILE_PATH).metadata().unwrap();
    assert!(ma.modified().unwrap() < mb.modified().unwrap());
}

#[test]
fn edited_share_sets_how_many_files_change() {
    for (share, tolerance) in [(0.0, 0.0), (0.01, 0.2), (0.10, 0.1), (0.25, 0.1)] {
        let mut options = Options::tiny(6);
        options.files = 2000;
        options.bytes = 8_000_000;
        options.edited_share = share;
        let (_dir, s) = gen(&options);
        let ratio = s.edited.len() as f64 / s.a.files as f64;
        assert!(
            (ratio - share).abs() <= share * tolerance,
            "share {share}: edited {ratio}"
        );
        assert!(
            !s.added.is_empty() && !s.removed.is_empty(),
            "share {share}"
        );
    }
}

#[test]
fn bad_options_and_used_output_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut few = Options::tiny(1);
    few.files = 10;
    let mut thin = Options::tiny(1);
    thin.bytes = 1000;
    let mut negative = Options::tiny(1);
    negative.edited_share = -0.1;
    let mut over = Options::tiny(1);
    over.edited_share = 1.5;
    for options in [few, thin, negative, over, Options::big(1, 100)] {
        let err = generate(dir.path(), &options).unwrap_err();
        assert!(matches!(err, GenerateError::InvalidOptions { .. }), "{err}");
    }
    fs::create_dir(dir.path().join("a")).unwrap();
    let err = generate(dir.path(), &Options::tiny(1)).unwrap_err();
    assert!(matches!(err, GenerateError::OutputNotEmpty { .. }), "{err}");
}

/// The checked-in fixtures differ exactly as `fixtures/README.md` says; other crates' tests rely on it.
#[test]
fn fixture_pair_differs_as_documented() {
    let ta = walk(&fixture_dir("php-app-v1"));
    let tb = walk(&fixture_dir("php-app-v2"));
    let (fa, fb) = (files(&ta), files(&tb));
    let both: Vec<&str> = fa.keys().filter(|p| fb.contains_key(*p)).copied().collect();
    let edited: Vec<&str> = both
        .iter()
        .filter(|p| fa[**p].1 != fb[**p].1)
        .copied()
        .collect();
    let chmodded: Vec<&str> = both
        .iter()
        .filter(|p| fa[**p].1 == fb[**p].1 && fa[**p].0 & 0o111 != fb[**p].0 & 0o111)
        .copied()
        .collect();
    assert_eq!(edited, ["src/Greeter.php"]);
    assert_eq!(chmodded, ["bin/migrate"]);
    assert_eq!(
        only(&fa, &fb),
        ["resources/views/legacy.php", "src/Http/Router.php"]
    );
    assert_eq!(
        only(&fb, &fa),
        ["src/Http/Middleware.php", "src/Routing/Router.php"]
    );
    assert_eq!(fa["src/Http/Router.php"].1, fb["src/Routing/Router.php"].1);
    assert_eq!(
        fa["bin/console"].0 & 0o111,
        0o111,
        "bin/console must be executable"
    );
    for (name, tree) in [("v1", &ta), ("v2", &tb)] {
        let link = &tree["public/assets"];
        assert_eq!(
            *link,
            Node::Link(PathBuf::from("../resources/assets")),
            "{name}"
        );
        assert!(tree.contains_key("storage/cache/.keep"), "{name}");
    }
}

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    let cases = [
        ("4096", Some(4096)),
        ("64K", Some(64 << 10)),
        ("512M", Some(512 << 20)),
        ("1G", Some(1 << 30)),
        ("1GiB", Some(1 << 30)),
        ("110MB", Some(110_000_000)),
        ("2gb", Some(2_000_000_000)),
        ("", None),
        ("12X", None),
        ("M", None),
        ("99999999999999999999G", None),
    ];
    for (input, want) in cases {
        assert_eq!(parse_size(input).ok(), want, "{input}");
    }
}
