//! The relay tree of a fleet push: which host receives the release from which.
//!
//! Hosts are laid out breadth-first: the source sends to the first `r` hosts (the roots; `r` is
//! the source's fan-out, by default the relays' fan-out `k`), host `i` of the order relays to
//! hosts `r + i·k … r + i·k + k − 1`. So the source sends `r` copies whatever the fleet's size
//! (one, with `r = 1`: its uplink carries one share), every relay sends at most `k`, and the
//! depth is the smallest `d` with `r·(1 + k + … + k^(d−1)) ≥ n`, about `log_k (n / r)`. A host whose relay failed, or
//! that its relay did not report as staged, is re-parented to the source ([`orphans`]), which
//! pushes to it directly. Pure: hosts are indices, no I/O.

use std::collections::{HashMap, HashSet};

/// A relay tree over hosts (indices into the fleet selection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// Hosts in breadth-first order.
    order: Vec<usize>,
    /// Each host's place in `order`.
    place: HashMap<usize, usize>,
    /// Hosts the source sends to.
    roots: usize,
    /// Hosts each relay sends to.
    fanout: usize,
}

impl Tree {
    /// Arranges `hosts`, in the order given, breadth-first with fan-out `fanout` (at least 1).
    /// A host listed twice keeps its first place.
    pub fn new(hosts: Vec<usize>, fanout: usize) -> Tree {
        Tree::with_roots(hosts, fanout, fanout)
    }

    /// As [`Tree::new`], but the source sends to `roots` hosts (at least 1) and each relay to
    /// `fanout`.
    pub fn with_roots(hosts: Vec<usize>, roots: usize, fanout: usize) -> Tree {
        let mut seen = HashSet::new();
        let order: Vec<usize> = hosts.into_iter().filter(|h| seen.insert(*h)).collect();
        let place = order.iter().enumerate().map(|(p, &h)| (h, p)).collect();
        Tree {
            order,
            place,
            roots: roots.max(1),
            fanout: fanout.max(1),
        }
    }

    fn position(&self, host: usize) -> Option<usize> {
        self.place.get(&host).copied()
    }

    fn parent_position(&self, p: usize) -> Option<usize> {
        (p >= self.roots).then(|| (p - self.roots) / self.fanout)
    }

    /// The hosts the source sends to.
    pub fn roots(&self) -> &[usize] {
        &self.order[..self.roots.min(self.order.len())]
    }

    /// The host `host` receives the release from (`None`: the source, or not in the tree).
    pub fn parent(&self, host: usize) -> Option<usize> {
        let p = self.position(host)?;
        self.parent_position(p).map(|q| self.order[q])
    }

    /// The hosts `host` relays to.
    pub fn children(&self, host: usize) -> Vec<usize> {
        let Some(p) = self.position(host) else {
            return Vec::new();
        };
        let first = self.roots.saturating_add(p.saturating_mul(self.fanout));
        (first..first.saturating_add(self.fanout))
            .filter_map(|q| self.order.get(q).copied())
            .collect()
    }

    /// Levels below the source (0 for an empty tree).
    pub fn depth(&self) -> usize {
        let mut depth = 0;
        let (mut covered, mut level) = (0usize, self.roots);
        while covered < self.order.len() {
            covered = covered.saturating_add(level);
            level = level.saturating_mul(self.fanout);
            depth += 1;
        }
        depth
    }

    /// Every host below `root` (not `root` itself) with its parent, parents first: the shape of
    /// the relay plan `root` receives. A parent of `None` is `root`.
    pub fn below(&self, root: usize) -> Vec<(usize, Option<usize>)> {
        let mut out = Vec::new();
        let mut queue = std::collections::VecDeque::from([root]);
        while let Some(h) = queue.pop_front() {
            for c in self.children(h) {
                out.push((c, (h != root).then_some(h)));
                queue.push_back(c);
            }
        }
        out
    }
}

/// The hosts of `tree` that are not roots and did not stage through their relay: the source
/// pushes to them directly, in tree order (so hosts nearer the top come first).
pub fn orphans(tree: &Tree, staged: &HashSet<usize>) -> Vec<usize> {
    let roots: HashSet<usize> = tree.roots().iter().copied().collect();
    tree.order
        .iter()
        .copied()
        .filter(|h| !roots.contains(h) && !staged.contains(h))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breadth_first_layout() {
        // (hosts, fanout, roots, parent of each host in order, depth)
        type Row = (
            usize,
            usize,
            &'static [usize],
            &'static [Option<usize>],
            usize,
        );
        let cases: &[Row] = &[
            (0, 2, &[], &[], 0),
            (1, 4, &[0], &[None], 1),
            (4, 4, &[0, 1, 2, 3], &[None, None, None, None], 1),
            (
                6,
                2,
                &[0, 1],
                &[None, None, Some(0), Some(0), Some(1), Some(1)],
                2,
            ),
            (
                7,
                2,
                &[0, 1],
                &[None, None, Some(0), Some(0), Some(1), Some(1), Some(2)],
                3,
            ),
            (5, 1, &[0], &[None, Some(0), Some(1), Some(2), Some(3)], 5),
            (
                8,
                3,
                &[0, 1, 2],
                &[
                    None,
                    None,
                    None,
                    Some(0),
                    Some(0),
                    Some(0),
                    Some(1),
                    Some(1),
                ],
                2,
            ),
        ];
        for &(n, k, roots, parents, depth) in cases {
            let t = Tree::new((0..n).collect(), k);
            assert_eq!(t.roots(), roots, "n={n} k={k}");
            let got: Vec<Option<usize>> = (0..n).map(|h| t.parent(h)).collect();
            assert_eq!(got, parents, "n={n} k={k}");
            assert_eq!(t.depth(), depth, "n={n} k={k}");
            for h in 0..n {
                assert!(t.children(h).len() <= k, "n={n} k={k} host {h}");
                for c in t.children(h) {
                    assert_eq!(t.parent(c), Some(h), "n={n} k={k}");
                }
            }
        }
    }

    #[test]
    fn one_root_feeds_a_tree_of_the_relays_fanout() {
        // (hosts, roots, fanout, parent of each host in order, depth)
        type Row = (usize, usize, usize, &'static [Option<usize>], usize);
        let cases: &[Row] = &[
            (1, 1, 2, &[None], 1),
            (3, 1, 2, &[None, Some(0), Some(0)], 2),
            (
                7,
                1,
                2,
                &[None, Some(0), Some(0), Some(1), Some(1), Some(2), Some(2)],
                3,
            ),
            (
                8,
                1,
                2,
                &[
                    None,
                    Some(0),
                    Some(0),
                    Some(1),
                    Some(1),
                    Some(2),
                    Some(2),
                    Some(3),
                ],
                4,
            ),
            (5, 2, 3, &[None, None, Some(0), Some(0), Some(0)], 2),
            (4, 3, 1, &[None, None, None, Some(0)], 2),
        ];
        for &(n, r, k, parents, depth) in cases {
            let t = Tree::with_roots((0..n).collect(), r, k);
            assert_eq!(
                t.roots(),
                &(0..r.min(n)).collect::<Vec<_>>()[..],
                "n={n} r={r} k={k}"
            );
            let got: Vec<Option<usize>> = (0..n).map(|h| t.parent(h)).collect();
            assert_eq!(got, parents, "n={n} r={r} k={k}");
            assert_eq!(t.depth(), depth, "n={n} r={r} k={k}");
            for h in 0..n {
                assert!(t.children(h).len() <= k, "n={n} r={r} k={k} host {h}");
                for c in t.children(h) {
                    assert_eq!(t.parent(c), Some(h), "n={n} r={r} k={k}");
                }
            }
        }
        assert_eq!(Tree::with_roots((0..1000).collect(), 1, 4).depth(), 6);
    }

    #[test]
    fn depth_follows_log_k_for_large_fleets() {
        for (n, k, depth) in [(1000, 4, 5), (1000, 8, 4), (1000, 32, 2), (1000, 1000, 1)] {
            assert_eq!(Tree::new((0..n).collect(), k).depth(), depth, "n={n} k={k}");
        }
    }

    #[test]
    fn hosts_keep_their_identity_not_their_position() {
        let t = Tree::new(vec![9, 4, 7, 1, 3], 2);
        assert_eq!(t.roots(), [9, 4]);
        assert_eq!(t.children(9), [7, 1]);
        assert_eq!(t.children(4), [3]);
        assert_eq!(t.parent(3), Some(4));
        assert_eq!(t.parent(5), None);
        assert_eq!(t.children(5), Vec::<usize>::new());
        let twice = Tree::new(vec![3, 3, 1], 1);
        assert_eq!(twice.roots(), [3]);
        assert_eq!(twice.children(3), [1]);
    }

    #[test]
    fn below_lists_a_subtree_parents_first() {
        let t = Tree::new((0..10).collect(), 2);
        // 0 -> 2, 3; 2 -> 6, 7; 3 -> 8, 9
        assert_eq!(
            t.below(0),
            [
                (2, None),
                (3, None),
                (6, Some(2)),
                (7, Some(2)),
                (8, Some(3)),
                (9, Some(3))
            ]
        );
        assert_eq!(t.below(1), [(4, None), (5, None)]);
        assert_eq!(t.below(9), []);
    }

    #[test]
    fn orphans_are_the_non_roots_that_did_not_stage() {
        let t = Tree::new((0..6).collect(), 2);
        let cases: &[(&[usize], &[usize])] = &[
            (&[0, 1, 2, 3, 4, 5], &[]),
            // Relay 0 died: it and its children did not stage; 0 is a root, pushed directly
            // already, so only its children are re-parented.
            (&[1, 4, 5], &[2, 3]),
            (&[], &[2, 3, 4, 5]),
            (&[0, 1, 3], &[2, 4, 5]),
        ];
        for &(staged, want) in cases {
            let staged: HashSet<usize> = staged.iter().copied().collect();
            assert_eq!(orphans(&t, &staged), want, "staged {staged:?}");
        }
    }
}
