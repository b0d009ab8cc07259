//! Fault case 9: unchanged and moved files are hard links to the previous release's inodes, while a
//! mode change on identical content gets a fresh inode and leaves the old one exactly as it was.

use std::collections::{BTreeMap, BTreeSet};

use relsync_testdata::{generate, Options};

use crate::harness::*;

#[test]
fn unchanged_and_moved_files_share_inodes_and_a_mode_change_does_not() {
    let w = with_a_deployed();
    let (path, src_b, app) = (&w.path, &w.src_b, &w.app);
    let a_before = snapshot(&in_release(path, "r1", ""));
    // File-system timestamps are coarser than a deploy: the pause makes even a rewrite of r1's files
    // with identical bytes show in their mtime.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let report = deploy_tree(app, src_b, &opts("r2", true)).unwrap();
    assert_eq!(
        report.summary.moved_files, 2,
        "new-name.php and dup.php come from other paths"
    );
    let a = |p: &str| node(&in_release(path, "r1", p));
    let b = |p: &str| node(&in_release(path, "r2", p));
    let same = |n: &Node| (n.dev, n.ino);

    for p in [
        "index.php",
        "app/same.php",
        "app/lib/util.php",
        "app/lib/deep/x.php",
        "bin/tool",
        "empty.txt",
    ] {
        assert_eq!(
            same(&b(p)),
            same(&a(p)),
            "{p} should be a hard link to r1's"
        );
    }
    assert_eq!(
        same(&b("app/moved/new-name.php")),
        same(&a("app/old-name.php"))
    );
    assert_eq!(same(&b("app/dup.php")), same(&a("app/same.php")));
    assert_eq!(a("app/same.php").nlink, 3, "r1, r2 and r2's duplicate");

    // Mode change on identical content: a new inode with the new mode; r1's keeps its own.
    let (ac, bc) = (a("app/chmod.sh"), b("app/chmod.sh"));
    assert_ne!(same(&bc), same(&ac));
    assert_eq!((ac.mode, bc.mode), (0o644, 0o755));
    assert_eq!(ac.hash, bc.hash);
    assert_eq!(ac.nlink, 1);
    assert_ne!(same(&b("app/edit.php")), same(&a("app/edit.php")));
    assert!(!inodes(&a_before).contains(&same(&b("app/added.php"))));

    // Nothing of r1 changed: inode, mode, size, mtime, content, targets.
    assert_eq!(
        unlinked(&snapshot(&in_release(path, "r1", ""))),
        unlinked(&a_before)
    );
    let state = assert_i0(path);
    assert_eq!(state.current.as_deref(), Some("r2"));
}

/// The same properties on the generated PHP-like pair, checked against the generator's own account
/// of the differences rather than against the plan.
#[test]
fn generated_pair_links_exactly_the_content_a_already_has() {
    let t = scratch();
    let corpus = t.path().join("corpus");
    let summary = generate(&corpus, &Options::tiny(7)).unwrap();
    assert!(!summary.renamed.is_empty() && !summary.mode_changed.is_empty());
    let path = t.path().join("app");
    // No shared paths: the generated application ships its own storage/.
    let app = sync_core::edge::root::AppRoot::open_or_create(&path).unwrap();
    deploy_tree(&app, &corpus.join("a"), &opts("a", true)).unwrap();
    let a_before = snapshot(&in_release(&path, "a", ""));
    deploy_tree(&app, &corpus.join("b"), &opts("b", true)).unwrap();
    let a_after = snapshot(&in_release(&path, "a", ""));
    let b = snapshot(&in_release(&path, "b", ""));
    assert_eq!(unlinked(&a_after), unlinked(&a_before));

    // Inodes of a by (content, mode).
    let mut by_content: BTreeMap<_, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for n in a_before.values().filter(|n| n.kind == Kind::File) {
        by_content
            .entry((n.hash, n.mode))
            .or_default()
            .insert((n.dev, n.ino));
    }
    let mut fresh = BTreeSet::new();
    let mut fresh_wanted = 0;
    for (p, n) in b.iter().filter(|(_, n)| n.kind == Kind::File) {
        let id = (n.dev, n.ino);
        match by_content.get(&(n.hash, n.mode)) {
            Some(ids) => assert!(
                ids.contains(&id),
                "{p}: not linked though a has its content"
            ),
            None => {
                fresh_wanted += 1;
                assert!(
                    !inodes(&a_before).contains(&id),
                    "{p}: shares an inode of a"
                );
                fresh.insert(id);
            }
        }
    }
    assert_eq!(fresh.len(), fresh_wanted, "new content shares inodes");
    for r in &summary.renamed {
        let (from, to) = (&a_before[&r.from], &b[&r.to]);
        assert!(
            by_content[&(from.hash, from.mode)].contains(&(to.dev, to.ino)),
            "{r:?}"
        );
    }
    for p in &summary.mode_changed {
        let (old, new) = (&a_before[p], &b[p]);
        assert_ne!((old.dev, old.ino), (new.dev, new.ino), "{p}");
        assert_eq!((old.mode, new.mode), (0o644, 0o755), "{p}");
    }
    for p in &summary.edited {
        assert_ne!(a_before[p].hash, b[p].hash, "{p}");
    }
    assert_eq!(assert_i0(&path).current.as_deref(), Some("b"));
}
