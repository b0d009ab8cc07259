//! The rollout as a state machine: what to do next, given what each host did so far.
//!
//! 1. Stage the release on every host (nothing is activated anywhere yet).
//! 2. If more hosts failed than the threshold allows, stop: no host changes its live release.
//! 3. Otherwise split the staged hosts into waves and activate them one wave at a time. A wave
//!    in which any host fails stops the rollout: the hosts of that wave that did activate are
//!    rolled back to the release they ran before, and later waves are never activated. Earlier
//!    waves stay on the new release (they passed their own checks).
//!
//! The driver asks [`Rollout::next_action`] for an [`Action`], carries it out on every host it names,
//! reports each host's result, and asks again until [`Action::Done`]. Nothing here does I/O or
//! reads a clock; times and byte counts are data the driver passes in.

use serde::Serialize;
use sync_core::ReleaseId;

use super::wave::{MaxFailed, Waves};

/// A step of the rollout on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Stage,
    Activate,
    Rollback,
}

/// What the driver is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stage the release on these hosts (without activating it).
    Stage(Vec<usize>),
    /// Activate the staged release on the hosts of wave `wave` (numbered from 1).
    Activate {
        wave: usize,
        hosts: Vec<usize>,
    },
    /// Put these hosts of wave `wave` back on the release they ran before.
    Rollback {
        wave: usize,
        hosts: Vec<usize>,
    },
    Done,
}

/// What staging on one host found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Staged {
    /// The release that was current before the push (`None`: the app had none).
    pub previous: Option<ReleaseId>,
    /// Payload bytes the source sent to the host (0 when a relay fed it).
    pub sent_bytes: u64,
    pub millis: u64,
    /// The daemon's time per phase, as it reported them.
    pub phases: Vec<sync_core::wire::PhaseTime>,
    /// The daemon process's CPU time and peak memory, as it reported them.
    pub usage: sync_core::wire::Usage,
    /// The host that relayed the release to this one (`None`: the source sent it).
    pub relayed_by: Option<usize>,
}

/// Result of one step on one host: `Err` holds the message to report.
pub type StepResult = Result<(), String>;

/// Why the rollout ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ending {
    /// Every host activated the release (or staged it, without activation).
    Complete,
    /// Staging failed on more hosts than allowed; nothing was activated.
    TooManyFailed { failed: usize, allowed: usize },
    /// A wave failed; its hosts were rolled back and later waves were not activated.
    WaveFailed { wave: usize },
    /// Every wave activated, but some hosts had failed staging (within the threshold).
    Partial { failed: usize },
}

/// Everything known about one host at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostReport {
    pub stage: Option<StepResult>,
    pub staged: Option<Staged>,
    /// The wave the host was put in (numbered from 1), if it staged and activation was planned.
    pub wave: Option<usize>,
    pub activate: Option<StepResult>,
    pub rollback: Option<StepResult>,
    /// The release live on the host, as the daemon last said (`Some(None)`: none at all).
    /// `None` when unknown, e.g. after a host stopped answering mid-activation.
    pub current: Option<Option<ReleaseId>>,
}

impl HostReport {
    /// True when the host ended on the new release as asked: activated (or staged, with
    /// `activate` off) and not rolled back.
    pub fn succeeded(&self, activate: bool) -> bool {
        let staged = matches!(self.stage, Some(Ok(())));
        if !activate {
            return staged;
        }
        staged && matches!(self.activate, Some(Ok(()))) && self.rollback.is_none()
    }

    /// One short phrase for a table.
    pub fn summary(&self, activate: bool, ending: &Ending) -> String {
        match (&self.stage, &self.activate, &self.rollback) {
            (None, ..) => "not attempted".into(),
            (Some(Err(_)), ..) => "stage failed".into(),
            (Some(Ok(())), None, _) if !activate => "staged".into(),
            (Some(Ok(())), None, _) => match ending {
                Ending::TooManyFailed { .. } => "staged, not activated (too many failed)".into(),
                Ending::WaveFailed { wave } => {
                    format!("staged, not activated (wave {wave} failed)")
                }
                _ => "staged, not activated".into(),
            },
            (Some(Ok(())), Some(Ok(())), None) => "activated".into(),
            (Some(Ok(())), Some(Ok(())), Some(Ok(()))) => "rolled back".into(),
            (Some(Ok(())), Some(Ok(())), Some(Err(_))) => "rollback failed".into(),
            (Some(Ok(())), Some(Err(_)), _) => "activation failed".into(),
        }
    }

    /// The first error, with the step it happened in.
    pub fn error(&self) -> Option<(Step, &str)> {
        fn step(s: Step, r: &Option<StepResult>) -> Option<(Step, &str)> {
            match r {
                Some(Err(e)) => Some((s, e.as_str())),
                _ => None,
            }
        }
        step(Step::Stage, &self.stage)
            .or_else(|| step(Step::Activate, &self.activate))
            .or_else(|| step(Step::Rollback, &self.rollback))
    }
}

/// The end of a rollout, for the final table and the JSON report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutReport {
    pub release: ReleaseId,
    pub activate: bool,
    pub hosts: Vec<HostReport>,
    /// Host indices per wave, in activation order (the waves planned, whether run or not).
    pub waves: Vec<Vec<usize>>,
    pub ending: Ending,
    /// Failures staging may have before nothing is activated.
    pub allowed_failures: usize,
}

impl RolloutReport {
    /// True only when every host ended on the new release as asked.
    pub fn success(&self) -> bool {
        self.hosts.iter().all(|h| h.succeeded(self.activate))
    }

    /// Indices of hosts that did not end as asked.
    pub fn failed(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| !self.hosts[i].succeeded(self.activate))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Start,
    Staging,
    Wave(usize),
    RollingBack(usize),
    Done,
}

/// The rollout of one release to `n` hosts.
#[derive(Debug, Clone)]
pub struct Rollout {
    release: ReleaseId,
    activate: bool,
    waves_spec: Waves,
    max_failed: MaxFailed,
    hosts: Vec<HostReport>,
    waves: Vec<Vec<usize>>,
    phase: Phase,
    ending: Option<Ending>,
}

impl Rollout {
    /// A rollout of `release` to `n` hosts; without `activate` it ends after staging.
    pub fn new(
        release: ReleaseId,
        n: usize,
        waves: Waves,
        max_failed: MaxFailed,
        activate: bool,
    ) -> Rollout {
        Rollout {
            release,
            activate,
            waves_spec: waves,
            max_failed,
            hosts: vec![HostReport::default(); n],
            waves: Vec::new(),
            phase: Phase::Start,
            ending: None,
        }
    }

    /// Staging on `host` ended. A success carries what the host ran before.
    pub fn staged(&mut self, host: usize, result: Result<Staged, String>) {
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        match result {
            Ok(s) => {
                h.current = Some(s.previous.clone());
                h.staged = Some(s);
                h.stage = Some(Ok(()));
            }
            Err(e) => h.stage = Some(Err(e)),
        }
    }

    /// Activation on `host` ended. `current` is what the host runs now, when known (after a
    /// failed activation the daemon puts the previous release back; a lost connection leaves
    /// it unknown).
    pub fn activated(
        &mut self,
        host: usize,
        result: StepResult,
        current: Option<Option<ReleaseId>>,
    ) {
        let release = self.release.clone();
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        h.current = match &result {
            Ok(()) => Some(Some(release)),
            Err(_) => current,
        };
        h.activate = Some(result);
    }

    /// Rolling `host` back ended.
    pub fn rolled_back(&mut self, host: usize, result: StepResult) {
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        h.current = match &result {
            Ok(()) => h.staged.as_ref().map(|s| s.previous.clone()),
            Err(_) => None,
        };
        h.rollback = Some(result);
    }

    /// The daemon said what `host` runs now (asked after a failure, when it was in doubt).
    pub fn observed(&mut self, host: usize, current: Option<ReleaseId>) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.current = Some(current);
        }
    }

    /// What to do next. Hosts of the previous action with no reported result count as failed.
    pub fn next_action(&mut self) -> Action {
        match self.phase.clone() {
            Phase::Start => {
                self.phase = Phase::Staging;
                if self.hosts.is_empty() {
                    return self.finish(Ending::Complete);
                }
                Action::Stage((0..self.hosts.len()).collect())
            }
            Phase::Staging => {
                for h in &mut self.hosts {
                    h.stage
                        .get_or_insert_with(|| Err("staging reported no result".into()));
                }
                let ok: Vec<usize> = (0..self.hosts.len())
                    .filter(|&i| matches!(self.hosts[i].stage, Some(Ok(()))))
                    .collect();
                let failed = self.hosts.len() - ok.len();
                if !self.activate {
                    return self.finish(if failed == 0 {
                        Ending::Complete
                    } else {
                        Ending::Partial { failed }
                    });
                }
                let allowed = self.max_failed.allowed(self.hosts.len());
                if failed > allowed {
                    return self.finish(Ending::TooManyFailed { failed, allowed });
                }
                let mut rest = ok.into_iter();
                self.waves = self
                    .waves_spec
                    .sizes(rest.len())
                    .into_iter()
                    .map(|size| rest.by_ref().take(size).collect())
                    .collect();
                for (w, hosts) in self.waves.iter().enumerate() {
                    for &i in hosts {
                        self.hosts[i].wave = Some(w + 1);
                    }
                }
                self.start_wave(0)
            }
            Phase::Wave(w) => {
                let hosts = self.waves[w].clone();
                for &i in &hosts {
                    if self.hosts[i].activate.is_none() {
                        self.hosts[i].activate = Some(Err("activation reported no result".into()));
                        self.hosts[i].current = None;
                    }
                }
                let activated: Vec<usize> = hosts
                    .iter()
                    .copied()
                    .filter(|&i| matches!(self.hosts[i].activate, Some(Ok(()))))
                    .collect();
                if activated.len() == hosts.len() {
                    return self.start_wave(w + 1);
                }
                if activated.is_empty() {
                    return self.finish(Ending::WaveFailed { wave: w + 1 });
                }
                self.phase = Phase::RollingBack(w);
                Action::Rollback {
                    wave: w + 1,
                    hosts: activated,
                }
            }
            Phase::RollingBack(w) => {
                for &i in &self.waves[w] {
                    let h = &mut self.hosts[i];
                    if matches!(h.activate, Some(Ok(()))) && h.rollback.is_none() {
                        h.rollback = Some(Err("rollback reported no result".into()));
                        h.current = None;
                    }
                }
                self.finish(Ending::WaveFailed { wave: w + 1 })
            }
            Phase::Done => Action::Done,
        }
    }

    fn start_wave(&mut self, w: usize) -> Action {
        match self.waves.get(w) {
            Some(hosts) => {
                self.phase = Phase::Wave(w);
                Action::Activate {
                    wave: w + 1,
                    hosts: hosts.clone(),
                }
            }
            None => {
                let failed = self
                    .hosts
                    .iter()
                    .filter(|h| !matches!(h.stage, Some(Ok(()))))
                    .count();
                self.finish(if failed == 0 {
                    Ending::Complete
                } else {
                    Ending::Partial { failed }
                })
            }
        }
    }

    fn finish(&mut self, ending: Ending) -> Action {
        self.phase = Phase::Done;
        self.ending = Some(ending);
        Action::Done
    }

    /// The previous release of `host`, the one a rollback returns to (`None` when it had none
    /// or did not stage).
    pub fn previous(&self, host: usize) -> Option<&ReleaseId> {
        self.hosts
            .get(host)?
            .staged
            .as_ref()
            .and_then(|s| s.previous.as_ref())
    }

    pub fn host(&self, host: usize) -> Option<&HostReport> {
        self.hosts.get(host)
    }

    /// The report; complete once [`Rollout::next_action`] returned [`Action::Done`].
    pub fn report(&self) -> RolloutReport {
        RolloutReport {
            release: self.release.clone(),
            activate: self.activate,
            hosts: self.hosts.clone(),
            waves: self.waves.clone(),
            ending: self.ending.clone().unwrap_or(Ending::Complete),
            allowed_failures: self.max_failed.allowed(self.hosts.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    /// How a scripted host behaves: `s` stages, `S` fails staging; `a`/`A` activation,
    /// `r`/`R` rollback.
    struct Script<'a> {
        hosts: &'a [&'a str],
    }

    impl Script<'_> {
        fn ok(&self, host: usize, step: char) -> bool {
            !self.hosts[host].contains(step.to_ascii_uppercase())
        }
    }

    /// Runs a rollout against a script; returns the actions in order and the report.
    fn run(
        hosts: &[&str],
        waves: &str,
        max_failed: &str,
        activate: bool,
    ) -> (Vec<Action>, RolloutReport) {
        let script = Script { hosts };
        let mut r = Rollout::new(
            rid("new"),
            hosts.len(),
            waves.parse().unwrap(),
            max_failed.parse().unwrap(),
            activate,
        );
        let mut actions = Vec::new();
        loop {
            let a = r.next_action();
            actions.push(a.clone());
            match a {
                Action::Stage(hs) => {
                    for h in hs {
                        let res = if script.ok(h, 's') {
                            Ok(Staged {
                                previous: Some(rid("old")),
                                sent_bytes: 10,
                                millis: 5,
                                phases: vec![],
                                usage: Default::default(),
                                relayed_by: None,
                            })
                        } else {
                            Err(format!("host {h} unreachable"))
                        };
                        r.staged(h, res);
                    }
                }
                Action::Activate { hosts: hs, .. } => {
                    for h in hs {
                        if script.ok(h, 'a') {
                            r.activated(h, Ok(()), None);
                        } else {
                            r.activated(
                                h,
                                Err("health check failed".into()),
                                Some(Some(rid("old"))),
                            );
                        }
                    }
                }
                Action::Rollback { hosts: hs, .. } => {
                    for h in hs {
                        let res = if script.ok(h, 'r') {
                            Ok(())
                        } else {
                            Err("rollback refused".into())
                        };
                        r.rolled_back(h, res);
                    }
                }
                Action::Done => break,
            }
        }
        assert_eq!(r.next_action(), Action::Done, "done stays done");
        (actions, r.report())
    }

    fn current(r: &RolloutReport) -> Vec<String> {
        r.hosts
            .iter()
            .map(|h| match &h.current {
                None => "?".into(),
                Some(None) => "-".into(),
                Some(Some(id)) => id.to_string(),
            })
            .collect()
    }

    #[test]
    fn rollouts_stage_everywhere_then_activate_wave_by_wave() {
        type Row = (
            &'static [&'static str],
            &'static str,
            &'static str,
            &'static [&'static str],
            &'static [&'static str],
            Ending,
        );
        // hosts, waves, max_failed, actions (S = stage all, A1 = activate wave 1 with its
        // host list, R2 = roll back in wave 2), current release per host, ending.
        let table: Vec<Row> = vec![
            (
                &["", "", "", "", "", ""],
                "1,10%,100%",
                "0",
                &["S", "A1[0]", "A2[1, 2, 3, 4, 5]"],
                &["new", "new", "new", "new", "new", "new"],
                Ending::Complete,
            ),
            (
                &["", "S", "", ""],
                "1,100%",
                "0",
                &["S"],
                &["old", "?", "old", "old"],
                Ending::TooManyFailed {
                    failed: 1,
                    allowed: 0,
                },
            ),
            (
                &["", "S", "", ""],
                "1,100%",
                "1",
                &["S", "A1[0]", "A2[2, 3]"],
                &["new", "?", "new", "new"],
                Ending::Partial { failed: 1 },
            ),
            (
                &["S", "S", "", ""],
                "100%",
                "50%",
                &["S", "A1[2, 3]"],
                &["?", "?", "new", "new"],
                Ending::Partial { failed: 2 },
            ),
            // Wave 2 fails on one host: the other host of wave 2 goes back, wave 3 never runs.
            (
                &["", "", "A", "", "", ""],
                "1,3,100%",
                "0",
                &["S", "A1[0]", "A2[1, 2]", "R2[1]"],
                &["new", "old", "old", "old", "old", "old"],
                Ending::WaveFailed { wave: 2 },
            ),
            // The canary fails alone: nothing to roll back.
            (
                &["A", "", ""],
                "1,100%",
                "0",
                &["S", "A1[0]"],
                &["old", "old", "old"],
                Ending::WaveFailed { wave: 1 },
            ),
            // A rollback that fails leaves that host's release unknown.
            (
                &["", "R", "A"],
                "100%",
                "0",
                &["S", "A1[0, 1, 2]", "R1[0, 1]"],
                &["old", "?", "old"],
                Ending::WaveFailed { wave: 1 },
            ),
            (&[], "1,100%", "0", &[], &[], Ending::Complete),
        ];
        for (hosts, waves, max_failed, want_actions, want_current, ending) in table {
            let (actions, report) = run(hosts, waves, max_failed, true);
            let shown: Vec<String> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Stage(_) => Some("S".to_string()),
                    Action::Activate { wave, hosts } => Some(format!("A{wave}{hosts:?}")),
                    Action::Rollback { wave, hosts } => Some(format!("R{wave}{hosts:?}")),
                    Action::Done => None,
                })
                .collect();
            assert_eq!(shown, *want_actions, "{hosts:?} {waves}");
            assert_eq!(current(&report), *want_current, "{hosts:?} {waves}");
            assert_eq!(report.ending, ending, "{hosts:?} {waves}");
            let all_ok = hosts.iter().all(|h| h.is_empty());
            assert_eq!(report.success(), all_ok, "{hosts:?} {waves}");
        }
    }

    #[test]
    fn without_activation_staging_is_the_whole_rollout() {
        let (actions, report) = run(&["", "", ""], "1,100%", "0", false);
        assert_eq!(actions, [Action::Stage(vec![0, 1, 2]), Action::Done]);
        assert!(report.success());
        assert_eq!(report.ending, Ending::Complete);
        assert!(report
            .hosts
            .iter()
            .all(|h| h.summary(false, &report.ending) == "staged"));
        let (_, report) = run(&["", "S"], "1,100%", "5", false);
        assert!(!report.success());
        assert_eq!(report.failed(), [1]);
        assert_eq!(report.ending, Ending::Partial { failed: 1 });
    }

    #[test]
    fn summaries_and_errors_name_what_happened() {
        let (_, r) = run(&["", "", "A", "", "S"], "1,3,100%", "1", true);
        let rows: Vec<String> = r.hosts.iter().map(|h| h.summary(true, &r.ending)).collect();
        assert_eq!(
            rows,
            [
                "activated",
                "rolled back",
                "activation failed",
                "staged, not activated (wave 2 failed)",
                "stage failed"
            ]
        );
        assert_eq!(r.waves, [vec![0], vec![1, 2], vec![3]]);
        assert_eq!(r.hosts[3].wave, Some(3));
        assert_eq!(r.failed(), [1, 2, 3, 4]);
        assert_eq!(
            r.hosts[2].error(),
            Some((Step::Activate, "health check failed"))
        );
        assert_eq!(
            r.hosts[4].error(),
            Some((Step::Stage, "host 4 unreachable"))
        );
        assert_eq!(r.hosts[0].error(), None);
    }

    #[test]
    fn missing_results_count_as_failures() {
        let mut r = Rollout::new(rid("new"), 2, Waves::all_at_once(), MaxFailed::None, true);
        assert_eq!(r.next_action(), Action::Stage(vec![0, 1]));
        r.staged(0, Ok(Staged::default()));
        // Host 1 never reported: too many failures, nothing activated.
        assert_eq!(r.next_action(), Action::Done);
        let rep = r.report();
        assert_eq!(
            rep.ending,
            Ending::TooManyFailed {
                failed: 1,
                allowed: 0
            }
        );
        assert!(matches!(rep.hosts[1].stage, Some(Err(_))));
        // Out-of-range reports are ignored rather than trusted.
        r.staged(7, Ok(Staged::default()));
        r.observed(9, None);
        assert_eq!(r.report().hosts.len(), 2);
    }
}
