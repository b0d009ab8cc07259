//! Plans release a: which paths exist, what kind of file each is, its mode and its size.
//!
//! The plan is a sorted map built from one seeded random stream, so the same options give the same
//! tree on any machine. Sizes are drawn as relative weights (log-normal, so most PHP files land in
//! 1–20 KB with a long tail) and then scaled so that the corpus adds up to the byte budget.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::content::{Kind, NOUNS, PREFIXES};

/// One regular file of a plan. `id` names the content: a file keeps it when it is renamed or
/// chmodded in release b, so both copies render to the same bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FileSpec {
    pub id: u32,
    pub kind: Kind,
    pub seed: u64,
    pub size: u64,
    pub mode: u32,
    /// Seed of the small edit applied on top of the rendered content, for files edited in b.
    pub edit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    File(FileSpec),
    /// A relative symlink target, always resolving inside the tree.
    Symlink(String),
}

/// A release tree keyed by relative path with `/` separators; directories are implied by paths.
pub(crate) type Tree = BTreeMap<String, Entry>;

/// Directories implied by a tree's paths, without the root.
pub(crate) fn dirs(tree: &Tree) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in tree.keys() {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if !out.insert(parent.to_string()) {
                break;
            }
            p = parent;
        }
    }
    out
}

const MIN_TEXT: f64 = 150.0;
const MAX_TEXT: f64 = 400_000.0;
const BINARY_SHARE: f64 = 0.25;
const BLOB_SHARE: f64 = 0.6;

/// Smallest corpus the layout can be laid out in: the fixed skeleton plus a little of each section.
pub(crate) const MIN_FILES: usize = 100;

const VENDOR_SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ra", "ven", "tor", "zel", "qua", "brix", "nox", "fen", "dal", "sor", "pix",
    "tal", "mer", "gor", "lyn", "vex", "dor", "sil", "ban", "cor", "tis",
];

const APP_DIRS: &[(&str, &str)] = &[
    ("app/Http/Controllers", "Controller"),
    ("app/Http/Middleware", ""),
    ("app/Http/Requests", "Request"),
    ("app/Models", ""),
    ("app/Providers", "ServiceProvider"),
    ("app/Services", "Service"),
    ("app/Jobs", "Job"),
    ("app/Events", ""),
    ("app/Listeners", "Listener"),
    ("app/Console/Commands", "Command"),
    ("app/Policies", "Policy"),
];

const VIEW_NAMES: &[&str] = &[
    "index", "show", "edit", "create", "form", "list", "card", "modal", "table", "partial",
    "empty", "header", "footer", "sidebar",
];

const BLOB_PATHS: &[&str] = &[
    "storage/app/geoip-city.mmdb",
    "resources/data/postcodes.sqlite",
    "public/video/intro.mp4",
    "storage/app/seed-dump.sql.gz",
    "public/downloads/catalogue.pdf",
    "resources/data/search-index.bin",
];

const CONFIGS: &[&str] = &[
    "app",
    "auth",
    "cache",
    "database",
    "filesystems",
    "logging",
    "mail",
    "queue",
    "services",
    "session",
    "view",
];

struct Planner<'r> {
    rng: &'r mut ChaCha8Rng,
    tree: Tree,
    next_id: u32,
    text: Vec<(String, f64)>,
    small_binary: Vec<(String, f64)>,
    blobs: Vec<(String, f64)>,
}

/// Standard log-normal variate with a clamped tail so no single file eats the budget.
pub(crate) fn lognormal(rng: &mut ChaCha8Rng, sigma: f64) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(1e-12);
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (sigma * z.clamp(-3.0, 3.5)).exp()
}

impl Planner<'_> {
    fn file(&mut self, path: String, kind: Kind, mode: u32, weight: f64) {
        debug_assert!(!self.tree.contains_key(&path), "{path} planned twice");
        let w = weight * lognormal(self.rng, if kind.is_binary() { 0.5 } else { 1.0 });
        match kind {
            Kind::Blob => self.blobs.push((path.clone(), w)),
            k if k.is_binary() => self.small_binary.push((path.clone(), w)),
            _ => self.text.push((path.clone(), w)),
        }
        let spec = FileSpec {
            id: self.next_id,
            kind,
            seed: self.rng.gen(),
            size: 0,
            mode,
            edit: None,
        };
        self.next_id += 1;
        self.tree.insert(path, Entry::File(spec));
    }

    /// A path under `dir` built by `name`, retried until it is new to the tree.
    fn unique(
        &mut self,
        dir: &str,
        mut name: impl FnMut(&mut ChaCha8Rng) -> String,
        ext: &str,
    ) -> String {
        for attempt in 0u32.. {
            let base = name(self.rng);
            let path = if attempt < 16 {
                format!("{dir}/{base}{ext}")
            } else {
                format!("{dir}/{base}{attempt}{ext}")
            };
            if !self.tree.contains_key(&path) {
                return path;
            }
        }
        unreachable!("an unbounded attempt counter always finds a free name")
    }

    fn assign_sizes(&mut self, text_budget: f64, small_budget: f64, blob_budget: f64) {
        let mut sizes: Vec<(String, u64)> = Vec::new();
        for (list, budget, min, max) in [
            (&self.text, text_budget, MIN_TEXT, MAX_TEXT),
            (&self.small_binary, small_budget, 64.0, f64::MAX),
            (&self.blobs, blob_budget, 4096.0, f64::MAX),
        ] {
            let total: f64 = list.iter().map(|(_, w)| w).sum();
            for (path, w) in list {
                let size = (w / total * budget).clamp(min, max);
                sizes.push((path.clone(), size as u64));
            }
        }
        for (path, size) in sizes {
            if let Some(Entry::File(spec)) = self.tree.get_mut(&path) {
                spec.size = size;
            }
        }
    }
}

fn vendor_name(rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(2..=3);
    (0..n)
        .map(|_| *VENDOR_SYLLABLES.choose(rng).expect("non-empty list"))
        .collect()
}

fn lower_noun(rng: &mut ChaCha8Rng) -> String {
    pick_noun(rng).to_lowercase()
}

fn pick_noun(rng: &mut ChaCha8Rng) -> &'static str {
    NOUNS[rng.gen_range(0..NOUNS.len())]
}

pub(crate) fn class_name(rng: &mut ChaCha8Rng, suffix: &str) -> String {
    let mut s = String::new();
    if rng.gen_bool(0.3) {
        s.push_str(PREFIXES[rng.gen_range(0..PREFIXES.len())]);
    }
    s.push_str(pick_noun(rng));
    if suffix.is_empty() && rng.gen_bool(0.3) {
        s.push_str(pick_noun(rng));
    }
    s.push_str(suffix);
    s
}

/// Splits `total` into `weights.len()` parts of at least `min` each, proportional to the weights.
fn apportion(rng: &mut ChaCha8Rng, total: usize, parts: usize, min: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..parts).map(|_| lognormal(rng, 0.9)).collect();
    let extra = total - min * parts;
    let sum: f64 = weights.iter().sum();
    let mut out: Vec<usize> = weights
        .iter()
        .map(|w| min + (w / sum * extra as f64) as usize)
        .collect();
    let mut left = total - out.iter().sum::<usize>();
    while left > 0 {
        let i = rng.gen_range(0..parts);
        out[i] += 1;
        left -= 1;
    }
    out
}

/// Plans release a with exactly `files` regular files of about `bytes` bytes in all.
pub(crate) fn plan(rng: &mut ChaCha8Rng, files: usize, bytes: u64) -> Tree {
    let mut p = Planner {
        rng,
        tree: Tree::new(),
        next_id: 0,
        text: Vec::new(),
        small_binary: Vec::new(),
        blobs: Vec::new(),
    };

    // The skeleton every Laravel-style application has.
    let skeleton: &[(&str, Kind, u32, f64)] = &[
        ("artisan", Kind::PhpScript, 0o755, 0.3),
        ("composer.json", Kind::Json, 0o644, 0.5),
        ("composer.lock", Kind::Json, 0o644, 15.0),
        ("package.json", Kind::Json, 0o644, 0.3),
        ("README.md", Kind::Markdown, 0o644, 0.5),
        (".env.example", Kind::Text, 0o644, 0.2),
        ("phpunit.xml", Kind::Text, 0o644, 0.3),
        ("public/index.php", Kind::PhpScript, 0o644, 0.2),
        ("public/.htaccess", Kind::Text, 0o644, 0.1),
        ("public/robots.txt", Kind::Text, 0o644, 0.02),
        ("public/favicon.ico", Kind::Icon, 0o644, 0.05),
        ("bootstrap/app.php", Kind::PhpScript, 0o644, 0.3),
        ("bootstrap/cache/.gitignore", Kind::Text, 0o644, 0.01),
        ("storage/app/public/.gitignore", Kind::Text, 0o644, 0.01),
        ("vendor/autoload.php", Kind::PhpScript, 0o644, 0.1),
        (
            "vendor/composer/autoload_classmap.php",
            Kind::PhpConfig,
            0o644,
            20.0,
        ),
        (
            "vendor/composer/autoload_psr4.php",
            Kind::PhpConfig,
            0o644,
            2.0,
        ),
        (
            "vendor/composer/autoload_real.php",
            Kind::PhpScript,
            0o644,
            0.5,
        ),
        (
            "vendor/composer/autoload_static.php",
            Kind::PhpConfig,
            0o644,
            15.0,
        ),
        (
            "vendor/composer/ClassLoader.php",
            Kind::PhpClass,
            0o644,
            2.0,
        ),
        ("vendor/composer/installed.php", Kind::PhpConfig, 0o644, 3.0),
        ("vendor/composer/installed.json", Kind::Json, 0o644, 10.0),
    ];
    for &(path, kind, mode, w) in skeleton {
        p.file(path.to_string(), kind, mode, w);
    }
    for name in CONFIGS {
        p.file(format!("config/{name}.php"), Kind::PhpConfig, 0o644, 1.0);
    }
    for name in ["web", "api", "console", "channels"] {
        p.file(format!("routes/{name}.php"), Kind::PhpRoutes, 0o644, 0.5);
    }
    p.file(
        "resources/views/layouts/app.blade.php".to_string(),
        Kind::Blade,
        0o644,
        0.5,
    );
    p.tree.insert(
        "public/storage".to_string(),
        Entry::Symlink("../storage/app/public".to_string()),
    );

    // Binary assets: a few MB-sized blobs, fonts and images (the favicon is already in).
    let binaries = (files / 500).clamp(3, 40);
    let blob_count = (binaries / 10).clamp(1, BLOB_PATHS.len());
    for path in &BLOB_PATHS[..blob_count] {
        p.file(path.to_string(), Kind::Blob, 0o644, 1.0);
    }
    let fonts = (binaries / 4).max(1);
    for _ in 0..fonts {
        let path = p.unique(
            "public/fonts",
            |r| {
                let w = [300, 400, 500, 600, 700][r.gen_range(0..5)];
                format!("{}-{w}", lower_noun(r))
            },
            ".woff2",
        );
        p.file(path, Kind::Font, 0o644, 1.0);
    }
    for _ in 0..binaries.saturating_sub(blob_count + fonts + 1) {
        let dir = if p.rng.gen_bool(0.7) {
            "public/images"
        } else {
            "resources/images"
        };
        let path = p.unique(
            dir,
            |r| format!("{}-{}", lower_noun(r), lower_noun(r)),
            ".png",
        );
        p.file(path, Kind::Png, 0o644, 1.0);
    }

    let planned = p
        .tree
        .values()
        .filter(|e| matches!(e, Entry::File(_)))
        .count();
    let rest = files - planned;
    let app = (rest * 5 / 100).max(1);
    let views = (rest * 4 / 100).max(1);
    let front = (rest * 2 / 100).max(2);
    let migrations = (rest * 2 / 100).max(1);
    let tests = (rest * 3 / 100).max(1);
    let vendor = rest - app - views - front - migrations - tests;

    for _ in 0..app {
        let (dir, suffix) = APP_DIRS[p.rng.gen_range(0..APP_DIRS.len())];
        let path = p.unique(dir, |r| class_name(r, suffix), ".php");
        p.file(path, Kind::PhpClass, 0o644, 1.0);
    }
    for _ in 0..views {
        let section = lower_noun(p.rng);
        let path = p.unique(
            &format!("resources/views/{section}s"),
            |r| VIEW_NAMES[r.gen_range(0..VIEW_NAMES.len())].to_string(),
            ".blade.php",
        );
        p.file(path, Kind::Blade, 0o644, 0.8);
    }
    for i in 0..front {
        let (kind, ext) = if i % 2 == 0 {
            (Kind::Js, ".js")
        } else {
            (Kind::Css, ".css")
        };
        let dir = if p.rng.gen_bool(0.5) {
            format!("resources/{}", &ext[1..])
        } else {
            "public/build/assets".to_string()
        };
        let path = p.unique(
            &dir,
            |r| format!("{}-{:08x}", lower_noun(r), r.gen::<u32>()),
            ext,
        );
        p.file(path, kind, 0o644, 2.0);
    }
    for i in 0..migrations {
        let path = p.unique(
            "database/migrations",
            |r| {
                format!(
                    "2024_{:02}_{:02}_{:06}_create_{}_table",
                    1 + i % 12,
                    1 + i % 28,
                    i,
                    lower_noun(r)
                )
            },
            ".php",
        );
        p.file(path, Kind::Migration, 0o644, 0.5);
    }
    for _ in 0..tests {
        let dir = if p.rng.gen_bool(0.6) {
            "tests/Feature"
        } else {
            "tests/Unit"
        };
        let path = p.unique(dir, |r| class_name(r, "Test"), ".php");
        p.file(path, Kind::PhpClass, 0o644, 1.0);
    }

    plan_vendor(&mut p, vendor);

    let binary_budget = bytes as f64 * BINARY_SHARE;
    p.assign_sizes(
        bytes as f64 - binary_budget,
        binary_budget * (1.0 - BLOB_SHARE),
        binary_budget * BLOB_SHARE,
    );
    p.tree
}

/// Composer packages under `vendor/<vendor>/<package>/`, a few of them shipping a command that
/// `vendor/bin/` links to, the way Composer installs binaries.
fn plan_vendor(p: &mut Planner<'_>, files: usize) {
    let packages = (files / 55).max(2);
    let counts = apportion(p.rng, files, packages, 3);
    let vendor_count = (packages / 3).max(1);
    let mut vendors = BTreeSet::new();
    while vendors.len() < vendor_count {
        vendors.insert(vendor_name(p.rng));
    }
    let vendors: Vec<String> = vendors.into_iter().collect();
    let mut package_dirs = BTreeSet::new();
    let mut order: Vec<usize> = (0..packages).collect();
    order.shuffle(p.rng);
    let bin_packages: BTreeSet<usize> = order
        .into_iter()
        .filter(|&i| counts[i] >= 4)
        .take((packages / 40).clamp(2, 5))
        .collect();

    for (i, &n) in counts.iter().enumerate() {
        let (vendor, package) = loop {
            let vendor = vendors[p.rng.gen_range(0..vendors.len())].clone();
            let package = if p.rng.gen_bool(0.6) {
                format!("{}-{}", lower_noun(p.rng), lower_noun(p.rng))
            } else {
                lower_noun(p.rng)
            };
            if package_dirs.insert(format!("{vendor}/{package}")) {
                break (vendor, package);
            }
        };
        let root = format!("vendor/{vendor}/{package}");
        p.file(format!("{root}/composer.json"), Kind::Json, 0o644, 0.4);
        p.file(format!("{root}/LICENSE"), Kind::Text, 0o644, 0.2);
        let mut left = n - 2;
        if n >= 5 {
            p.file(format!("{root}/README.md"), Kind::Markdown, 0o644, 0.8);
            left -= 1;
        }
        if bin_packages.contains(&i) {
            let bin = format!("{root}/bin/{package}");
            p.file(bin, Kind::PhpScript, 0o755, 0.3);
            let mut link = format!("vendor/bin/{package}");
            if p.tree.contains_key(&link) {
                link = format!("vendor/bin/{package}-{vendor}");
            }
            p.tree.insert(
                link,
                Entry::Symlink(format!("../{vendor}/{package}/bin/{package}")),
            );
            left -= 1;
        }
        let tests = if left >= 20 { left / 10 } else { 0 };
        let mut dirs = vec![format!("{root}/src")];
        let subdirs = ((left as f64).sqrt() / 1.3) as usize;
        for _ in 0..subdirs {
            let parent = dirs[p.rng.gen_range(0..dirs.len())].clone();
            if parent.matches('/').count() >= 7 {
                continue;
            }
            let dir = format!("{parent}/{}", pick_noun(p.rng));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        for k in 0..left {
            let dir = if k < tests {
                format!("{root}/tests/Unit")
            } else {
                dirs[p.rng.gen_range(0..dirs.len())].clone()
            };
            let suffix = if k < tests { "Test" } else { "" };
            let path = p.unique(&dir, |r| class_name(r, suffix), ".php");
            p.file(path, Kind::PhpClass, 0o644, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn apportion_hits_the_total_and_the_minimum() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (total, parts, min) in [(100, 10, 3), (30, 10, 3), (15_000, 250, 3), (7, 2, 3)] {
            let out = apportion(&mut rng, total, parts, min);
            assert_eq!(out.len(), parts);
            assert_eq!(out.iter().sum::<usize>(), total, "{total}/{parts}");
            assert!(out.iter().all(|&n| n >= min), "{out:?}");
        }
    }

    #[test]
    fn plan_has_exactly_the_requested_file_count() {
        for files in [MIN_FILES, 300, 2000] {
            let mut rng = ChaCha8Rng::seed_from_u64(files as u64);
            let tree = plan(&mut rng, files, files as u64 * 4000);
            let n = tree
                .values()
                .filter(|e| matches!(e, Entry::File(_)))
                .count();
            assert_eq!(n, files);
            let ids: BTreeSet<u32> = tree
                .values()
                .filter_map(|e| match e {
                    Entry::File(f) => Some(f.id),
                    Entry::Symlink(_) => None,
                })
                .collect();
            assert_eq!(ids.len(), files, "ids must be unique");
        }
    }

    #[test]
    fn dirs_lists_every_ancestor_once() {
        let mut tree = Tree::new();
        tree.insert("a/b/c.txt".into(), Entry::Symlink("x".into()));
        tree.insert("a/d.txt".into(), Entry::Symlink("x".into()));
        tree.insert("e.txt".into(), Entry::Symlink("x".into()));
        let got: Vec<String> = dirs(&tree).into_iter().collect();
        assert_eq!(got, ["a", "a/b"]);
    }
}
