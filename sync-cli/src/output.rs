//! Human and JSON output of the `relsync` commands.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use sync_core::edge::deploy::DeployReport;
use sync_core::edge::mirror::MirrorStats;
use sync_core::edge::root::AppRoot;
use sync_core::edge::scan::ScanStats;
use sync_core::manifest::Manifest;
use sync_core::plan::{MirrorOp, MirrorPlan, Op, Plan};
use sync_core::release::format_utc;
use sync_core::retention;

/// True when the error is stdout going away (`relsync releases | head`), which is not a failure.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, skipping a cause whose text the message already shows
/// (some library errors name their cause in their own message too).
pub fn render_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c);
    }
    text
}

fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())?;
    o.flush()?;
    Ok(())
}

pub fn line(text: &str) -> Result<()> {
    out(&format!("{text}\n"))
}

/// `12.3 MB` style sizes (decimal, like rsync's --human-readable).
pub fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub fn print_plan(
    plan: &Plan,
    previous: Option<&Manifest>,
    json: bool,
    verbose: bool,
) -> Result<()> {
    let planned: std::collections::HashSet<&sync_core::RelPath> = plan
        .ops
        .iter()
        .filter_map(|o| match o {
            Op::Link { path, .. }
            | Op::LinkObject { path, .. }
            | Op::WriteFull { path, .. }
            | Op::WriteDelta { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    let deleted: Vec<String> = previous
        .map(|prev| {
            prev.files()
                .filter(|(p, ..)| !planned.contains(p))
                .map(|(p, ..)| p.to_string())
                .collect()
        })
        .unwrap_or_default();
    if json {
        let v = json!({
            "release": plan.release,
            "dry_run": true,
            "summary": plan.summary,
            "ops": plan.ops,
            "deleted": deleted,
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = String::new();
    for op in &plan.ops {
        match op {
            Op::WriteFull { path, size, .. } => {
                text += &format!("full     {path} ({})\n", human(*size))
            }
            Op::WriteDelta { path, size, .. } => {
                text += &format!("delta    {path} ({})\n", human(*size))
            }
            Op::Link {
                path, from_path, ..
            } if path != from_path => text += &format!("moved    {path} (from {from_path})\n"),
            Op::Link { path, .. } if verbose => text += &format!("linked   {path}\n"),
            Op::Prune { release } => text += &format!("prune    release {release}\n"),
            _ => {}
        }
    }
    for d in &deleted {
        text += &format!("deleted  {d}\n");
    }
    let s = &plan.summary;
    text += &format!(
        "plan for release {}: {} files ({}): {} linked ({}), {} moved, {} written ({}), {} delta, {} deleted ({}) [dry run, nothing changed]\n",
        plan.release,
        s.files,
        human(s.bytes),
        s.linked_files,
        human(s.linked_bytes),
        s.moved_files,
        s.full_files,
        human(s.full_bytes),
        s.delta_files,
        s.deleted_files,
        human(s.deleted_bytes)
    );
    out(&text)
}

pub fn print_deploy(
    r: &DeployReport,
    scan: &ScanStats,
    root: &Path,
    elapsed: Duration,
    json: bool,
) -> Result<()> {
    if json {
        let v = json!({
            "release": r.release,
            "previous": r.previous,
            "root": root,
            "activated": r.activated,
            "summary": r.summary,
            "exec": r.exec,
            "pruned": r.pruned,
            "recovered": r.recovered,
            "manifest": r.manifest_digest,
            "scan": {
                "files": scan.files, "bytes": scan.bytes,
                "hashed_files": scan.hashed_files, "cached_files": scan.cached_files,
            },
            "seconds": elapsed.as_secs_f64(),
            "activation": r.activation,
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let s = &r.summary;
    let state = if r.activated {
        "activated"
    } else {
        "staged, not activated"
    };
    let mut text = format!(
        "release {} {state} in {}: {} files ({}): {} linked ({} moved), {} written ({}), {} deleted; {:.2}s\n",
        r.release,
        root.display(),
        s.files,
        human(s.bytes),
        s.linked_files,
        s.moved_files,
        s.full_files + s.delta_files + r.exec.link_fallbacks,
        human(r.exec.bytes_written),
        s.deleted_files,
        elapsed.as_secs_f64()
    );
    if r.exec.link_fallbacks > 0 {
        text += &format!(
            "warning: {} files of earlier releases had been modified and were written in full\n",
            r.exec.link_fallbacks
        );
    }
    if !r.pruned.is_empty() {
        let ids: Vec<&str> = r.pruned.iter().map(|i| i.as_str()).collect();
        text += &format!("pruned {}\n", ids.join(", "));
    }
    out(&text)
}

pub fn print_releases(app: &AppRoot, json: bool) -> Result<()> {
    let records = app.records()?;
    let states = app.states(&records)?;
    let current = app.current()?;
    let rollback = retention::rollback_target(&states, current.as_ref());
    let rows: Vec<_> = records
        .iter()
        .zip(&states)
        .map(|(r, st)| {
            let state = if Some(&r.id) == current.as_ref() {
                "current"
            } else if st.bad {
                "bad"
            } else if Some(&r.id) == rollback.as_ref() {
                "rollback"
            } else {
                "good"
            };
            (r, state)
        })
        .collect();
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, state)| {
                json!({
                    "id": r.id, "state": state, "created_unix": r.created_unix,
                    "files": r.manifest.file_count(), "bytes": r.manifest.total_file_bytes(),
                    "manifest": r.digest().to_hex(),
                })
            })
            .collect();
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = format!(
        "{:<24} {:<9} {:<20} {:>8} {:>10}\n",
        "RELEASE", "STATE", "CREATED (UTC)", "FILES", "SIZE"
    );
    for (r, state) in rows.iter().rev() {
        text += &format!(
            "{:<24} {:<9} {:<20} {:>8} {:>10}\n",
            r.id.as_str(),
            state,
            format_utc(r.created_unix),
            r.manifest.file_count(),
            human(r.manifest.total_file_bytes())
        );
    }
    out(&text)
}

pub fn mirror_line(op: &MirrorOp) -> String {
    match op {
        MirrorOp::Remove { path, dir } => {
            format!("deleting {path}{}", if *dir { "/" } else { "" })
        }
        MirrorOp::CreateDir { path, .. } => format!("mkdir    {path}/"),
        MirrorOp::SetDirMode { path, mode } => format!("chmod    {path}/ {mode:o}"),
        MirrorOp::Write { path, size, .. } => format!("write    {path} ({})", human(*size)),
        MirrorOp::Symlink { path, target } => format!("symlink  {path} -> {target}"),
    }
}

pub fn print_mirror_plan(plan: &MirrorPlan, json: bool, verbose: bool) -> Result<()> {
    if json {
        let v = json!({ "dry_run": true, "summary": plan.summary, "ops": plan.ops });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    let mut text = String::new();
    for op in &plan.ops {
        text += &mirror_line(op);
        text.push('\n');
    }
    if !verbose {
        let s = &plan.summary;
        text += &format!(
            "would write {} files ({}), remove {}, create {} directories; {} unchanged [dry run]\n",
            s.written_files,
            human(s.written_bytes),
            s.removed,
            s.dirs_created,
            s.unchanged_files
        );
    }
    out(&text)
}

pub fn print_mirror(
    plan: &MirrorPlan,
    stats: &MirrorStats,
    dest: &Path,
    elapsed: Duration,
    json: bool,
) -> Result<()> {
    if json {
        let v = json!({
            "destination": dest, "summary": plan.summary, "applied": stats,
            "seconds": elapsed.as_secs_f64(),
        });
        return line(&serde_json::to_string_pretty(&v)?);
    }
    line(&format!(
        "synced {}: {} files ({}) written, {} removed, {} directories created, {} unchanged; {:.2}s",
        dest.display(),
        stats.written_files,
        human(stats.written_bytes),
        stats.removed,
        stats.dirs,
        plan.summary.unchanged_files,
        elapsed.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_print_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(io)
            .context("cannot write x: disk on fire")
            .context("deploying");
        assert_eq!(render_chain(&e), "deploying: cannot write x: disk on fire");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render_chain(&e), "outer: inner");
    }

    #[test]
    fn human_sizes() {
        let table = [
            (0, "0 B"),
            (999, "999 B"),
            (1_000, "1.0 kB"),
            (112_021_387, "112.0 MB"),
        ];
        for (n, want) in table {
            assert_eq!(human(n), want);
        }
    }
}
