//! `relsync push|releases|rollback --fleet FILE`: the fleet commands' arguments, progress display
//! and output. The rollout itself (what to stage, which waves to activate, what to roll back) is
//! decided in `sync_server::fleet`.
//!
//! Exit codes: 0 only when every selected host ended as asked (activated; staged with
//! `--no-activate`; answered, for queries), 1 otherwise (the table and the JSON report say which
//! hosts and why), 2 for a bad fleet file or arguments.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use sync_core::proto::client::ClientState;
use sync_core::wire::ReleaseInfo;
use sync_core::ReleaseId;
use sync_server::client::{Cache, NeedReport, Progress, PushRequest};
use sync_server::fleet::driver::{self, Event, FleetOptions, FleetReport};
use sync_server::fleet::rollout::{Ending, HostReport, StepResult};
use sync_server::fleet::{select, Inventory, MaxFailed, Selection, Step, Waves};

use crate::output::{human, line};
use crate::remote::{status_name, KeyArgs};
use crate::UsageError;

/// Which hosts of a fleet file a command addresses, and how many at once.
#[derive(Args, Debug, Clone, Default)]
pub struct FleetArgs {
    /// Address the hosts of this fleet file (see fleet.example.toml) instead of one target.
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,
    /// Only this group of the fleet file (repeatable) [default: every group].
    #[arg(long, value_name = "G", requires = "fleet")]
    pub group: Vec<String>,
    /// Only these hosts (names from the fleet file, comma-separated).
    #[arg(long, value_name = "H1,H2", value_delimiter = ',', requires = "fleet")]
    pub hosts: Vec<String>,
    /// Hosts worked on at once.
    #[arg(long, value_name = "K", default_value_t = 16, requires = "fleet")]
    pub fanout: usize,
    /// With --relay: hosts the source itself sends to (1 keeps its uplink to one share); each
    /// of them still relays to --fanout more [default: --fanout].
    #[arg(long, value_name = "R", requires = "fleet")]
    pub source_fanout: Option<usize>,
    /// Seconds one host may take for one step (staging, activating, rolling back); a host that
    /// takes longer is given up and reported, the others go on.
    #[arg(long, value_name = "SECS", default_value_t = 600, requires = "fleet")]
    pub host_timeout: u64,
}

/// What `relsync push --fleet` was asked to do.
pub struct PushArgs {
    pub src: PathBuf,
    pub fleet: FleetArgs,
    pub waves: Option<Waves>,
    pub max_failed: Option<MaxFailed>,
    /// Stage through a relay tree of fan-out `--fanout`.
    pub relay: bool,
    pub release_id: Option<String>,
    pub no_activate: bool,
    pub dry_run: bool,
    pub json: bool,
    /// Hash every file, ignoring the hash cache.
    pub checksum: bool,
    pub exclude: Vec<String>,
    /// Bytes per second of file data to all hosts together, at most.
    pub bwlimit: Option<u64>,
}

pub(crate) fn selection(
    a: &FleetArgs,
    waves: Option<Waves>,
    max_failed: Option<MaxFailed>,
) -> Result<Selection> {
    let path = a.fleet.as_ref().expect("callers check --fleet");
    let inv = Inventory::load(path).map_err(|e| UsageError(e.to_string()))?;
    select(&inv, &a.group, &a.hosts, waves, max_failed)
        .map_err(|e| UsageError(e.to_string()).into())
}

pub(crate) fn options(keys: &KeyArgs, a: &FleetArgs) -> Result<FleetOptions> {
    if a.fanout == 0 {
        return Err(UsageError("--fanout must be at least 1".into()).into());
    }
    if a.source_fanout == Some(0) {
        return Err(UsageError("--source-fanout must be at least 1".into()).into());
    }
    if a.host_timeout == 0 {
        return Err(UsageError("--host-timeout must be at least 1 second".into()).into());
    }
    Ok(FleetOptions {
        fanout: a.fanout,
        source_fanout: a.source_fanout,
        host_timeout: Duration::from_secs(a.host_timeout),
        connect_timeout: keys.connect_timeout(),
        ..FleetOptions::default()
    })
}

pub(crate) fn host_names(sel: &Selection) -> Vec<String> {
    let apps: std::collections::HashSet<_> = sel.hosts.iter().map(|h| &h.app).collect();
    sel.hosts
        .iter()
        .map(|h| {
            // A host addressed for two apps needs the app to tell its rows apart.
            if apps.len() > 1 {
                format!("{}/{}", h.host.name, h.app)
            } else {
                h.host.name.clone()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// push

pub fn push(keys: &KeyArgs, a: PushArgs) -> Result<()> {
    let started = Instant::now();
    let sel = selection(&a.fleet, a.waves.clone(), a.max_failed)?;
    let opts = FleetOptions {
        bwlimit: a.bwlimit,
        relay: a.relay,
        ..options(keys, &a.fleet)?
    };
    let release = match &a.release_id {
        Some(id) => crate::release_id(id)?,
        None => ReleaseId::from_unix_time(crate::now_unix()),
    };
    let identity = Arc::new(keys.identity()?);
    let show = !a.json && std::io::stderr().is_terminal();
    let scanned = crate::scan_release_source(&a.src, &a.exclude, show, a.checksum)?;
    let cache = match Cache::default_dir().map(|d| Cache::open(&d)) {
        Some(Ok(c)) => Some(Arc::new(c)),
        Some(Err(e)) => {
            tracing::warn!("{e}; pushing without the client cache");
            None
        }
        None => None,
    };
    let req = PushRequest {
        release,
        manifest: Arc::new(scanned.manifest),
        source: a.src.clone(),
        activate: !a.no_activate,
    };
    let rt = crate::remote::runtime()?;
    let names = host_names(&sel);
    if a.dry_run {
        let needs = rt.block_on(driver::dry_run(&sel, identity, &req, cache, &opts));
        return print_needs(&sel, &names, &req.release, &needs, a.json);
    }
    let display = Display::new(show, &names);
    let on_event: driver::OnEvent = {
        let display = Arc::clone(&display);
        Arc::new(move |e| display.event(e))
    };
    let report = rt.block_on(driver::push(&sel, identity, &req, cache, &opts, on_event));
    display.done();
    print_push(
        &sel,
        &names,
        &report,
        &scanned.stats,
        started.elapsed(),
        a.json,
    )?;
    let r = &report.rollout;
    if r.success() {
        return Ok(());
    }
    let failed: Vec<String> = r
        .failed()
        .into_iter()
        .map(|i| {
            format!(
                "{} ({})",
                names[i],
                r.hosts[i].summary(r.activate, &r.ending)
            )
        })
        .collect();
    Err(anyhow::anyhow!(
        "{} of {} hosts did not {} release {}: {}",
        failed.len(),
        r.hosts.len(),
        if r.activate { "activate" } else { "stage" },
        r.release,
        failed.join(", ")
    ))
}

/// Progress on a terminal: one bar per host being worked on, one for the whole fleet.
struct Display {
    multi: Option<MultiProgress>,
    total: ProgressBar,
    names: Vec<String>,
    bars: Mutex<HashMap<usize, ProgressBar>>,
    sent: std::sync::atomic::AtomicU64,
}

impl Display {
    fn new(show: bool, names: &[String]) -> Arc<Display> {
        let multi = show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let total = match &multi {
            Some(m) => m.add(ProgressBar::new(names.len() as u64)),
            None => ProgressBar::hidden(),
        };
        total.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} hosts {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        total.set_prefix("staging");
        Arc::new(Display {
            multi,
            total,
            names: names.to_vec(),
            bars: Mutex::default(),
            sent: Default::default(),
        })
    }

    fn bars(&self) -> std::sync::MutexGuard<'_, HashMap<usize, ProgressBar>> {
        self.bars.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, e: Event) {
        let Some(multi) = &self.multi else {
            return;
        };
        match e {
            Event::Begin { host, step } => {
                if step == Step::Rollback && !self.total.prefix().starts_with("rollback") {
                    self.total.set_prefix("rollback");
                    self.total.set_position(0);
                }
                let pb = multi.insert_before(&self.total, ProgressBar::new_spinner());
                pb.set_style(
                    ProgressStyle::with_template("{prefix:>12} {spinner} {msg}")
                        .expect("static template"),
                );
                pb.set_prefix(self.names[host].clone());
                pb.set_message(match step {
                    Step::Stage => "connecting",
                    Step::Activate => "activating",
                    Step::Rollback => "rolling back",
                });
                pb.enable_steady_tick(Duration::from_millis(120));
                self.bars().insert(host, pb);
            }
            Event::Push { host, progress } => {
                let Some(pb) = self.bars().get(&host).cloned() else {
                    return;
                };
                match progress {
                    Progress::State(s) => {
                        let msg = match s {
                            ClientState::Handshake => "handshake",
                            ClientState::Manifest => "manifest",
                            ClientState::Staging => "staging",
                            _ => return,
                        };
                        if s == ClientState::Staging {
                            pb.set_style(
                                ProgressStyle::with_template("{prefix:>12} {spinner} {msg}")
                                    .expect("static template"),
                            );
                        }
                        pb.set_message(msg);
                    }
                    Progress::Need { bytes, .. } => {
                        pb.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                            )
                            .expect("static template")
                            .progress_chars("=> "),
                        );
                        pb.set_length(bytes);
                        pb.set_position(0);
                    }
                    Progress::Sent { bytes, payload } => {
                        pb.inc(bytes);
                        let sent = self
                            .sent
                            .fetch_add(payload, std::sync::atomic::Ordering::Relaxed)
                            + payload;
                        self.total.set_message(format!("{} sent", human(sent)));
                    }
                }
            }
            Event::End { host, step, result } => {
                if let Some(pb) = self.bars().remove(&host) {
                    pb.finish_and_clear();
                    multi.remove(&pb);
                }
                if let Err(e) = &result {
                    let step = match step {
                        Step::Stage => "staging",
                        Step::Activate => "activation",
                        Step::Rollback => "rollback",
                    };
                    let _ = multi.println(format!("{}: {step} failed: {e}", self.names[host]));
                }
                self.total.inc(1);
            }
            Event::Wave { wave, waves, hosts } => {
                self.total.set_prefix(format!("wave {wave}/{waves}"));
                self.total.set_length(hosts as u64);
                self.total.set_position(0);
            }
        }
    }

    fn done(&self) {
        for pb in self.bars().values() {
            pb.finish_and_clear();
        }
        self.total.finish_and_clear();
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

fn step_json(r: &Option<StepResult>) -> Value {
    match r {
        None => Value::Null,
        Some(Ok(())) => json!({ "ok": true }),
        Some(Err(e)) => json!({ "ok": false, "error": e }),
    }
}

fn current_text(h: &HostReport) -> String {
    match &h.current {
        None => "?".into(),
        Some(None) => "-".into(),
        Some(Some(id)) => id.to_string(),
    }
}

fn print_push(
    sel: &Selection,
    names: &[String],
    report: &FleetReport,
    scan: &sync_core::edge::scan::ScanStats,
    elapsed: Duration,
    json: bool,
) -> Result<()> {
    let r = &report.rollout;
    let sent = |h: &HostReport| h.staged.as_ref().map_or(0, |s| s.sent_bytes);
    let total_sent: u64 = r.hosts.iter().map(sent).sum();
    let wave_names = |w: &Vec<usize>| w.iter().map(|&i| names[i].clone()).collect::<Vec<_>>();
    if json {
        let hosts: Vec<Value> = r
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let s = &sel.hosts[i];
                json!({
                    "host": s.host.name,
                    "address": s.host.address,
                    "app": s.app,
                    "group": s.group,
                    "wave": h.wave,
                    "stage": step_json(&h.stage),
                    "activate": step_json(&h.activate),
                    "rollback": step_json(&h.rollback),
                    "previous": h.staged.as_ref().map(|s| &s.previous),
                    "current": h.current.clone().flatten(),
                    "current_known": h.current.is_some(),
                    "sent_bytes": sent(h),
                    "relayed_by": h.staged.as_ref().and_then(|s| s.relayed_by).map(|r| &sel.hosts[r].host.name),
                    "seconds": report.millis[i] as f64 / 1000.0,
                    "result": h.summary(r.activate, &r.ending),
                    "ok": h.succeeded(r.activate),
                    "pruned": match &report.pruned[i] {
                        None => Value::Null,
                        Some(Ok(ids)) => json!(ids),
                        Some(Err(e)) => json!({ "error": e }),
                    },
                })
            })
            .collect();
        let cache = match &report.cache {
            Some(Ok(u)) => json!({
                "stored_files": u.stored_files, "stored_bytes": u.stored_bytes,
                "skipped_files": u.skipped_files, "pruned_files": u.pruned_files,
            }),
            Some(Err(e)) => json!({ "error": e }),
            None => Value::Null,
        };
        let v = json!({
            "release": r.release,
            "activate": r.activate,
            "success": r.success(),
            "ending": r.ending,
            "allowed_failures": r.allowed_failures,
            "waves": r.waves.iter().map(wave_names).collect::<Vec<_>>(),
            "hosts": hosts,
            "sent_bytes": total_sent,
            "encoded_payloads": report.memo.encodes,
            "shared_payloads": report.memo.hits,
            "cache": cache,
            "scan": {
                "files": scan.files, "bytes": scan.bytes,
                "hashed_files": scan.hashed_files, "cached_files": scan.cached_files,
            },
            "seconds": elapsed.as_secs_f64(),
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let width = names.iter().map(String::len).max().unwrap_or(4).max(4);
    let mut text = format!(
        "{:<width$} {:>4} {:<24} {:>10} {:>8}  RESULT\n",
        "HOST", "WAVE", "RELEASE", "SENT", "TIME"
    );
    for (i, h) in r.hosts.iter().enumerate() {
        let via = match h.staged.as_ref().and_then(|s| s.relayed_by) {
            Some(relay) => format!(" (via {})", names[relay]),
            None => String::new(),
        };
        text += &format!(
            "{:<width$} {:>4} {:<24} {:>10} {:>7.1}s  {}{via}\n",
            names[i],
            h.wave.map_or("-".into(), |w| w.to_string()),
            current_text(h),
            human(sent(h)),
            report.millis[i] as f64 / 1000.0,
            h.summary(r.activate, &r.ending),
        );
    }
    for (i, h) in r.hosts.iter().enumerate() {
        if let Some((step, e)) = h.error() {
            let step = match step {
                Step::Stage => "stage",
                Step::Activate => "activate",
                Step::Rollback => "rollback",
            };
            text += &format!("{}: {step}: {e}\n", names[i]);
        }
    }
    let ok = r.hosts.iter().filter(|h| h.succeeded(r.activate)).count();
    let verb = if r.activate { "activated" } else { "staged" };
    let ending = match &r.ending {
        Ending::Complete | Ending::Partial { .. } => String::new(),
        Ending::TooManyFailed { failed, allowed } => format!(
            "; staging failed on {failed} hosts (at most {allowed} allowed by --max-failed), so nothing was activated"
        ),
        Ending::WaveFailed { wave } => format!(
            "; wave {wave} failed: its activated hosts were rolled back and later waves were not activated"
        ),
    };
    text += &format!(
        "release {} {verb} on {ok} of {} hosts{ending}; {} sent, {} payloads encoded, {} shared; {:.2}s",
        r.release,
        r.hosts.len(),
        human(total_sent),
        report.memo.encodes,
        report.memo.hits,
        elapsed.as_secs_f64()
    );
    if let Some(Err(e)) = &report.cache {
        text += &format!(
            "\nwarning: the client cache was not updated ({e}); the next push may send more"
        );
    }
    line(&text)
}

fn print_needs(
    sel: &Selection,
    names: &[String],
    release: &ReleaseId,
    needs: &[Result<NeedReport, String>],
    json: bool,
) -> Result<()> {
    if json {
        let hosts: Vec<Value> = needs
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let s = &sel.hosts[i];
                let mut v = json!({ "host": s.host.name, "address": s.host.address, "app": s.app });
                match n {
                    Ok(n) => {
                        v["needed_files"] = json!(n.needed_files);
                        v["needed_bytes"] = json!(n.needed_bytes);
                        v["have_files"] = json!(n.have_files);
                        v["have_bytes"] = json!(n.have_bytes);
                        v["with_basis"] = json!(n.with_basis);
                    }
                    Err(e) => v["error"] = json!(e),
                }
                v
            })
            .collect();
        line(&serde_json::to_string_pretty(
            &json!({ "release": release, "dry_run": true, "hosts": hosts }),
        )?)?;
    } else {
        let width = names.iter().map(String::len).max().unwrap_or(4).max(4);
        let mut text = format!(
            "{:<width$} {:>8} {:>10} {:>8}\n",
            "HOST", "TO SEND", "SIZE", "HAVE"
        );
        for (i, n) in needs.iter().enumerate() {
            text += &match n {
                Ok(n) => format!(
                    "{:<width$} {:>8} {:>10} {:>8}\n",
                    names[i],
                    n.needed_files,
                    human(n.needed_bytes),
                    n.have_files
                ),
                Err(e) => format!("{:<width$} error: {e}\n", names[i]),
            };
        }
        text += &format!("release {release} [dry run: asked every host, nothing sent or changed]");
        line(&text)?;
    }
    answered(names, needs)
}

/// An error naming the hosts that did not answer, if any.
fn answered<T>(names: &[String], results: &[Result<T, String>]) -> Result<()> {
    let failed: Vec<&str> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| names[i].as_str())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(anyhow::anyhow!(
        "{} of {} hosts failed: {}",
        failed.len(),
        results.len(),
        failed.join(", ")
    ))
}

// ---------------------------------------------------------------------------------------------
// releases and rollback

pub fn releases(keys: &KeyArgs, a: &FleetArgs, json: bool) -> Result<()> {
    let sel = selection(a, Some(Waves::all_at_once()), Some(MaxFailed::None))?;
    let opts = options(keys, a)?;
    let identity = Arc::new(keys.identity()?);
    let names = host_names(&sel);
    let lists = crate::remote::runtime()?.block_on(driver::releases(&sel, identity, &opts));
    let newest_first = |l: &[ReleaseInfo]| {
        let mut l = l.to_vec();
        l.sort_by(|a, b| (b.created_unix, &b.id).cmp(&(a.created_unix, &a.id)));
        l
    };
    if json {
        let hosts: Vec<Value> = lists
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let s = &sel.hosts[i];
                let mut v = json!({ "host": s.host.name, "address": s.host.address, "app": s.app });
                match l {
                    Ok(list) => {
                        v["current"] = json!(driver::current_of(list));
                        v["releases"] = newest_first(list)
                            .iter()
                            .map(|r| {
                                json!({
                                    "id": r.id, "state": status_name(r.status),
                                    "created_unix": r.created_unix, "files": r.files,
                                    "bytes": r.bytes,
                                })
                            })
                            .collect();
                    }
                    Err(e) => v["error"] = json!(e),
                }
                v
            })
            .collect();
        line(&serde_json::to_string_pretty(&hosts)?)?;
    } else {
        let width = names.iter().map(String::len).max().unwrap_or(4).max(4);
        let mut text = format!(
            "{:<width$} {:<24} RELEASES (newest first)\n",
            "HOST", "CURRENT"
        );
        for (i, l) in lists.iter().enumerate() {
            text += &match l {
                Ok(list) => {
                    let ids: Vec<String> = newest_first(list)
                        .iter()
                        .map(|r| match status_name(r.status) {
                            "good" => r.id.to_string(),
                            s => format!("{} ({s})", r.id),
                        })
                        .collect();
                    let current = driver::current_of(list).map_or("-".into(), |c| c.to_string());
                    format!("{:<width$} {:<24} {}\n", names[i], current, ids.join(", "))
                }
                Err(e) => format!("{:<width$} error: {e}\n", names[i]),
            };
        }
        line(text.trim_end())?;
    }
    answered(&names, &lists)
}

pub fn rollback(keys: &KeyArgs, a: &FleetArgs, to: Option<ReleaseId>) -> Result<()> {
    let sel = selection(a, Some(Waves::all_at_once()), Some(MaxFailed::None))?;
    let opts = options(keys, a)?;
    let identity = Arc::new(keys.identity()?);
    let names = host_names(&sel);
    let results = crate::remote::runtime()?
        .block_on(driver::rollback(&sel, identity, to, &opts))
        .into_iter()
        .collect::<Vec<_>>();
    let mut text = String::new();
    for (i, r) in results.iter().enumerate() {
        text += &match r {
            Ok(id) => format!("rolled back {} to {id}\n", names[i]),
            Err(e) => format!("{}: rollback failed: {e}\n", names[i]),
        };
    }
    line(text.trim_end()).context("printing the result")?;
    answered(&names, &results)
}
