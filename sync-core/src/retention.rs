//! Which releases to keep: pure decisions over release metadata.
//!
//! `current` and the rollback target are never pruned. Beyond those, the newest good releases are kept
//! up to `keep` in all; bad releases (failed activation) go first, except in the first
//! [`BAD_GRACE_SECS`] after they failed: they were live for a moment, and requests routed to them then
//! (nginx resolves `$realpath_root` before php-fpm opens the script) may still be running.

use crate::release::ReleaseId;

/// How long a release marked bad stays out of reach of pruning.
pub const BAD_GRACE_SECS: i64 = 60;

/// What retention needs to know about a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseState {
    pub id: ReleaseId,
    /// Creation order.
    pub seq: u64,
    /// Marked bad by a failed activation.
    pub bad: bool,
    /// Marked bad less than [`BAD_GRACE_SECS`] ago: not pruned yet, and not counted against `keep`.
    pub recently_bad: bool,
}

/// The release `rollback` goes to: the newest good release created before `current`.
pub fn rollback_target(
    releases: &[ReleaseState],
    current: Option<&ReleaseId>,
) -> Option<ReleaseId> {
    let cur = releases.iter().find(|r| Some(&r.id) == current)?;
    releases
        .iter()
        .filter(|r| !r.bad && r.seq < cur.seq)
        .max_by_key(|r| r.seq)
        .map(|r| r.id.clone())
}

/// Releases to remove so that at most `keep` remain (never fewer than the protected ones), oldest
/// first.
pub fn prune_candidates(
    releases: &[ReleaseState],
    current: Option<&ReleaseId>,
    keep: usize,
) -> Vec<ReleaseId> {
    let rollback = rollback_target(releases, current);
    let protected = |r: &ReleaseState| Some(&r.id) == current || Some(&r.id) == rollback.as_ref();
    let n_protected = releases.iter().filter(|r| protected(r)).count();
    let mut others: Vec<&ReleaseState> = releases
        .iter()
        .filter(|r| !protected(r) && !r.recently_bad)
        .collect();
    // Most worth keeping first: good before bad, then newest.
    others.sort_by_key(|r| (r.bad, std::cmp::Reverse(r.seq)));
    let budget = keep.saturating_sub(n_protected);
    let mut doomed: Vec<&ReleaseState> = others.into_iter().skip(budget).collect();
    doomed.sort_by_key(|r| r.seq);
    doomed.into_iter().map(|r| r.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(id: &str, seq: u64, bad: bool) -> ReleaseState {
        ReleaseState {
            id: ReleaseId::new(id).unwrap(),
            seq,
            bad,
            recently_bad: false,
        }
    }

    fn ids(v: &[ReleaseId]) -> Vec<&str> {
        v.iter().map(ReleaseId::as_str).collect()
    }

    #[test]
    fn table() {
        let r = |n: u64| rel(&format!("r{n}"), n, false);
        struct Case {
            name: &'static str,
            releases: Vec<ReleaseState>,
            current: Option<&'static str>,
            keep: usize,
            want_rollback: Option<&'static str>,
            want_pruned: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "under the limit",
                releases: vec![r(1), r(2)],
                current: Some("r2"),
                keep: 5,
                want_rollback: Some("r1"),
                want_pruned: vec![],
            },
            Case {
                name: "oldest go first",
                releases: (1..=7).map(r).collect(),
                current: Some("r7"),
                keep: 5,
                want_rollback: Some("r6"),
                want_pruned: vec!["r1", "r2"],
            },
            Case {
                name: "keep 1 still keeps the rollback target",
                releases: (1..=4).map(r).collect(),
                current: Some("r4"),
                keep: 1,
                want_rollback: Some("r3"),
                want_pruned: vec!["r1", "r2"],
            },
            Case {
                name: "after a rollback current is old and newer ones are candidates",
                releases: (1..=5).map(r).collect(),
                current: Some("r2"),
                keep: 3,
                want_rollback: Some("r1"),
                want_pruned: vec!["r3", "r4"],
            },
            Case {
                name: "bad releases are pruned first and never a rollback target",
                releases: vec![r(1), rel("r2", 2, true), r(3), rel("r4", 4, true), r(5)],
                current: Some("r5"),
                keep: 3,
                want_rollback: Some("r3"),
                want_pruned: vec!["r2", "r4"],
            },
            Case {
                name:
                    "a release marked bad moments ago stays, without costing a good one its place",
                releases: vec![
                    r(1),
                    r(2),
                    ReleaseState {
                        recently_bad: true,
                        ..rel("r3", 3, true)
                    },
                    r(4),
                ],
                current: Some("r4"),
                keep: 3,
                want_rollback: Some("r2"),
                want_pruned: vec![],
            },
            Case {
                name: "no current: keep the newest",
                releases: (1..=3).map(r).collect(),
                current: None,
                keep: 2,
                want_rollback: None,
                want_pruned: vec!["r1"],
            },
        ];
        for c in cases {
            let cur = c.current.map(|s| ReleaseId::new(s).unwrap());
            let rb = rollback_target(&c.releases, cur.as_ref());
            assert_eq!(
                rb.as_ref().map(ReleaseId::as_str),
                c.want_rollback,
                "{}",
                c.name
            );
            let pruned = prune_candidates(&c.releases, cur.as_ref(), c.keep);
            assert_eq!(ids(&pruned), c.want_pruned, "{}", c.name);
            if let Some(cur) = &cur {
                assert!(!pruned.contains(cur), "{}", c.name);
            }
            if let Some(rb) = &rb {
                assert!(!pruned.contains(rb), "{}", c.name);
            }
        }
    }
}
