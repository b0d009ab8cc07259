//! `relsync bench --fleet FILE`: release B pushed to every selected host of a fleet at once,
//! stage everywhere then activate in the fleet file's waves, as `relsync push --fleet` does.
//!
//! Every host's app must hold no release. Each run starts from "every host holds A, current";
//! afterwards A is activated again and B pruned on every host. Besides the end-to-end time the
//! log has when the last host staged, the fastest and slowest host, and per daemon phase the
//! slowest host's time (the one the fleet waits for).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use sync_core::manifest::Manifest;
use sync_core::proto::client::Outcome;
use sync_core::wire::Command as WireCommand;
use sync_core::ReleaseId;
use sync_server::client::{Cache, PushRequest};
use sync_server::fleet::driver::{self, Event, FleetOptions, FleetReport};
use sync_server::fleet::{MaxFailed, Selection, Step};
use sync_server::tls::Identity;

use super::phase::{self, RunLog, RELEASE_A, RELEASE_B};
use super::progress;
use super::report::Sample;
use crate::fleet::FleetArgs;
use crate::remote::KeyArgs;
use crate::UsageError;

/// The selected hosts of a fleet file, set aside for benchmarking.
pub struct FleetNode {
    sel: Selection,
    names: Vec<String>,
    file: String,
    identity: Arc<Identity>,
    opts: FleetOptions,
    cache: Arc<Cache>,
    rt: tokio::runtime::Runtime,
}

impl FleetNode {
    /// Checks that every selected host answers and that its app holds no release.
    pub fn connect(keys: &KeyArgs, a: &FleetArgs, relay: bool, work: &Path) -> Result<FleetNode> {
        // Every host must stage: a bench over a partial fleet would measure something else.
        let sel = crate::fleet::selection(a, None, Some(MaxFailed::None))?;
        let opts = FleetOptions {
            relay,
            ..crate::fleet::options(keys, a)?
        };
        let cache_dir = work.join("client-cache");
        std::fs::create_dir_all(&cache_dir)
            .with_context(|| format!("creating {}", cache_dir.display()))?;
        let node = FleetNode {
            names: crate::fleet::host_names(&sel),
            file: a
                .fleet
                .as_ref()
                .map_or_else(String::new, |p| p.display().to_string()),
            sel,
            identity: Arc::new(keys.identity()?),
            opts,
            cache: Arc::new(Cache::open(&cache_dir)?),
            rt: crate::remote::runtime()?,
        };
        let lists = node.rt.block_on(driver::releases(
            &node.sel,
            Arc::clone(&node.identity),
            &node.opts,
        ));
        let mut busy = Vec::new();
        for (name, list) in node.names.iter().zip(lists) {
            match list {
                Ok(l) if l.is_empty() => {}
                Ok(l) => busy.push(format!("{name} ({} release(s))", l.len())),
                Err(e) => anyhow::bail!("{name}: {e}"),
            }
        }
        if !busy.is_empty() {
            return Err(UsageError(format!(
                "{} already hold releases: relsync bench activates and prunes releases, so give it apps set aside for benchmarking (empty app roots in relsyncd's config)",
                busy.join(", ")
            ))
            .into());
        }
        Ok(node)
    }

    pub fn describe(&self) -> String {
        format!(
            "fleet {} ({} hosts: {})",
            self.file,
            self.names.len(),
            self.names.join(", ")
        )
    }

    fn push(&self, req: &PushRequest, on_event: driver::OnEvent) -> Result<FleetReport> {
        let report = self.rt.block_on(driver::push(
            &self.sel,
            Arc::clone(&self.identity),
            req,
            Some(Arc::clone(&self.cache)),
            &self.opts,
            on_event,
        ));
        let failed = report.rollout.failed();
        if !failed.is_empty() {
            let which: Vec<String> = failed
                .iter()
                .map(|&h| {
                    let why = report.rollout.hosts[h]
                        .summary(report.rollout.activate, &report.rollout.ending);
                    format!("{}: {why}", self.names[h])
                })
                .collect();
            anyhow::bail!(
                "pushing release {} failed on {}",
                req.release,
                which.join("; ")
            );
        }
        Ok(report)
    }

    /// Pushes release A to every host and makes it current.
    pub fn push_a(&self, a_dir: &Path, a: Manifest) -> Result<()> {
        progress(&format!("pushing release A to {}", self.describe()));
        let req = PushRequest {
            release: ReleaseId::new(RELEASE_A)?,
            manifest: Arc::new(a),
            source: a_dir.to_owned(),
            activate: true,
        };
        self.push(&req, Arc::new(|_| {}))?;
        Ok(())
    }

    /// `relsync push B --fleet FILE` end to end, then every host back to A.
    pub fn push_b(&self, log: &mut RunLog, b: &Path) -> Result<()> {
        let last_staged: Arc<Mutex<Option<Instant>>> = Arc::default();
        let on_event: driver::OnEvent = {
            let last = Arc::clone(&last_staged);
            Arc::new(move |e| {
                if let Event::End {
                    step: Step::Stage, ..
                } = e
                {
                    *last.lock().expect("not poisoned") = Some(Instant::now());
                }
            })
        };
        let started = Instant::now();
        let ((report, stats, scanned_at, ended_at), sample) = phase::measure(|| {
            let scanned = phase::scan_cold(b)?;
            let scanned_at = Instant::now();
            let req = PushRequest {
                release: ReleaseId::new(RELEASE_B)?,
                manifest: Arc::new(scanned.manifest),
                source: b.to_owned(),
                activate: true,
            };
            let report = self.push(&req, on_event)?;
            Ok((report, scanned.stats, scanned_at, Instant::now()))
        })?;
        let staged_at = last_staged
            .lock()
            .expect("not poisoned")
            .unwrap_or(ended_at);
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let hosts: Vec<_> = report
            .rollout
            .hosts
            .iter()
            .filter_map(|h| h.staged.as_ref())
            .collect();
        let sent: u64 = hosts.iter().map(|s| s.sent_bytes).sum();
        log.push_client_scan(&stats, secs(started, scanned_at));
        log.push_wall(
            "fleet: every host staged",
            "hosts hold A",
            0,
            sent,
            secs(scanned_at, staged_at),
        );
        log.push_wall(
            "fleet: activate in waves",
            "hosts hold A",
            0,
            0,
            secs(staged_at, ended_at),
        );
        let millis: Vec<u64> = hosts.iter().map(|s| s.millis).collect();
        if let (Some(min), Some(max)) = (millis.iter().min(), millis.iter().max()) {
            log.push_wall(
                "fleet: stage, fastest host",
                "hosts hold A",
                0,
                0,
                *min as f64 / 1e3,
            );
            log.push_wall(
                "fleet: stage, slowest host",
                "hosts hold A",
                0,
                0,
                *max as f64 / 1e3,
            );
        }
        // Per daemon phase, the slowest host's time, in the order the first host reported them.
        let mut slowest: Vec<(String, u64)> = Vec::new();
        for s in &hosts {
            for ph in &s.phases {
                match slowest.iter_mut().find(|(n, _)| *n == ph.name) {
                    Some((_, m)) => *m = (*m).max(ph.micros),
                    None => slowest.push((ph.name.clone(), ph.micros)),
                }
            }
        }
        for (name, micros) in slowest {
            log.push_wall(
                &format!("daemons (slowest): {name}"),
                "timed by the daemons",
                0,
                0,
                micros as f64 / 1e6,
            );
        }
        // The busiest daemon: most CPU time, and the largest peak memory of any.
        if let Some(busiest) = hosts.iter().max_by_key(|s| s.usage.cpu_micros) {
            let peak = hosts
                .iter()
                .map(|s| s.usage.peak_rss_kib)
                .max()
                .unwrap_or(0);
            log.push_out(
                "daemons (busiest): relsyncd process",
                "hello to staged",
                0,
                0,
                None,
                Sample {
                    secs: busiest.millis as f64 / 1e3,
                    cpu_secs: busiest.usage.cpu_micros as f64 / 1e6,
                    maxrss_kib: peak,
                },
            );
        }
        log.push_out(
            "end to end: fleet push",
            "no hash cache, hosts hold A",
            stats.files,
            stats.bytes,
            Some(sent),
            sample,
        );
        self.back_to_a()
    }

    fn on_every_host(&self, command: WireCommand) -> Result<()> {
        let what = command.name();
        let results = self.rt.block_on(driver::command(
            &self.sel,
            Arc::clone(&self.identity),
            command,
            &self.opts,
        ));
        let failed: Vec<String> = self
            .names
            .iter()
            .zip(results)
            .filter_map(|(name, r)| match r {
                Ok(Outcome::Activated { .. } | Outcome::Pruned { .. }) => None,
                Ok(o) => Some(format!("{name}: unexpected answer {o:?}")),
                Err(e) => Some(format!("{name}: {e}")),
            })
            .collect();
        if !failed.is_empty() {
            anyhow::bail!("{what} failed on {}", failed.join("; "));
        }
        Ok(())
    }

    /// Every host back to "holds A, current": activate A, prune the rest.
    pub fn back_to_a(&self) -> Result<()> {
        self.on_every_host(WireCommand::Activate {
            release: ReleaseId::new(RELEASE_A)?,
            prune: false,
        })?;
        self.on_every_host(WireCommand::Prune { keep: Some(1) })
    }

    /// Leaves every host's app as it was found, with no release (journals keep the record).
    pub fn finish(&self) -> Result<String> {
        self.on_every_host(WireCommand::Clear)?;
        Ok(format!(
            "cleared every host of {} afterwards: no release left, as before (journals keep the record)",
            self.file
        ))
    }
}
