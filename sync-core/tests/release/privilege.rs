//! CI runs as root, which hides what an ordinary deploy user runs into (read-only directories in a
//! release, for one: their entries cannot be unlinked without first opening the directory up). As
//! root, this test runs the rest of the binary again as `nobody` through setpriv(1); as any other
//! user the whole binary already runs unprivileged.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::harness::*;

const NOBODY: &str = "65534";

#[test]
fn the_suite_passes_as_an_unprivileged_user() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the suite already runs unprivileged");
        return;
    }
    let t = scratch();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // A copy nobody can reach, wherever the target directory lives.
    let exe = t.path().join("release-tests");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = t.path().join("tmp");
    mkdir(&tmp, "", 0o777);
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(&exe)
        .args(["--skip", "privilege::", "--test-threads", "2"])
        .env("TMPDIR", &tmp)
        .env("HOME", &tmp)
        .env("USER", "nobody")
        .output()
        .expect("setpriv(1) from util-linux is needed to run the suite unprivileged");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the suite failed as uid {NOBODY}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("test result: ok"), "{stdout}");
}
