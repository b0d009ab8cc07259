//! The release engine against the real file system: crash recovery after every step of a deploy,
//! injected I/O errors, a full disk, corruption, concurrent deploys, hard-link identity, tampered
//! and hostile trees, prune races, rollback, the activation pipeline and the mirror. Every test
//! ends by checking I0 (see `harness::assert_i0`): `current` resolves to a complete verified
//! release, no release ever changed, nothing is left half-done. Run as root (as CI does), the
//! suite also runs itself again as an unprivileged user (`privilege`), and the disk-full tests
//! mount their own tmpfs.

#[path = "release/activation.rs"]
mod activation;
#[path = "release/crash.rs"]
mod crash;
#[path = "release/fault.rs"]
mod fault;
#[path = "release/harness.rs"]
mod harness;
#[path = "release/history.rs"]
mod history;
#[path = "release/hostile.rs"]
mod hostile;
#[path = "release/link.rs"]
mod link;
#[path = "release/lock.rs"]
mod lock;
#[path = "release/mirror.rs"]
mod mirror;
#[path = "release/object.rs"]
mod object;
#[path = "release/prestage.rs"]
mod prestage;
#[path = "release/privilege.rs"]
mod privilege;
#[path = "release/prune.rs"]
mod prune;
#[path = "release/space.rs"]
mod space;
#[path = "release/tamper.rs"]
mod tamper;
