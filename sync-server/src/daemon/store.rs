//! The store workers: a fixed set of threads, shared by every connection, that rebuild received
//! files into verified objects (`work::store`).
//!
//! Their number bounds how many files are rebuilt at once (zstd and rsync work is CPU-bound), as
//! a semaphore would, without a task, a permit and a blocking-pool hand-off per file: a worker
//! takes the oldest queued job, and while more are queued behind it, it holds the results back
//! and sends them to their connection in one message, so a busy connection's driver wakes once
//! per batch rather than once per file. Jobs run in the order they were queued, whichever
//! connection queued them. A job is always run and reported, even for a connection whose session
//! ended: its driver waits for every job it queued before it lets the app's lock go.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use sync_core::edge::object::ObjectStore;
use sync_core::proto::daemon::{FileFailure, FileJob};
use sync_core::wire::ErrorKind;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Span;

use super::connection::{Held, Work};
use super::stream::{Payload, Pieces};
use super::work::{self, Basis};
use crate::client::PayloadMemo;

/// Results held back for one connection before they are sent anyway.
const BATCH_MAX: usize = 32;
/// Bytes of rebuilt files whose results may be held back at once: a connection whose budget is
/// taken by large files hears about them promptly and admits the next ones.
const BATCH_BYTES_MAX: u64 = 1 << 20;

/// What the jobs of one connection share: where to store, the bases, the children's payload memo
/// of a relay, the connection's span for the log, and where to report.
pub(super) struct Context {
    pub held: Held,
    pub basis: Option<Arc<Basis>>,
    /// A relay's: every payload stored from memory is offered to it, so a child on the same basis
    /// gets those bytes as they came.
    pub forward: Option<Arc<PayloadMemo>>,
    pub span: Span,
    pub reply: mpsc::UnboundedSender<Work>,
}

/// A file whose payload arrived whole, to be stored.
pub(super) struct Job {
    pub context: Arc<Context>,
    pub file: FileJob,
    pub payload: Payload,
}

/// The workers; dropping this lets them finish the queue and exit.
#[derive(Debug)]
pub(super) struct Workers {
    queue: Arc<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    closed: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("jobs", &self.jobs.len())
            .field("idle", &self.idle)
            .field("closed", &self.closed)
            .finish()
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never panics while the lock is held (jobs run outside it).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub(super) fn start(count: usize) -> std::io::Result<Workers> {
        // Made first, so that workers already started exit if a later one cannot be.
        let workers = Workers {
            queue: Arc::new(Queue::default()),
        };
        for i in 0..count.max(1) {
            let queue = Arc::clone(&workers.queue);
            std::thread::Builder::new()
                .name(format!("relsyncd-store-{i}"))
                .spawn(move || run(&queue))?;
        }
        Ok(workers)
    }

    /// Queues jobs; never blocks on the work itself.
    pub(super) fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut state = self.queue.lock();
        let before = state.jobs.len();
        state.jobs.extend(jobs);
        let added = state.jobs.len() - before;
        let wake = added.min(state.idle);
        drop(state);
        for _ in 0..wake {
            self.queue.ready.notify_one();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// Results for one connection, not sent yet.
struct Batch {
    reply: mpsc::UnboundedSender<Work>,
    files: Vec<(u32, Result<(), FileFailure>)>,
    bytes: u64,
}

impl Batch {
    fn send(self) {
        // A connection that is gone no longer waits for anything.
        let _ = self.reply.send(Work::Files(self.files));
    }
}

fn run(queue: &Queue) {
    let mut batch: Option<Batch> = None;
    let mut state = queue.lock();
    loop {
        let Some(job) = state.jobs.pop_front() else {
            // Nothing queued behind the last job: whoever waits for its result hears now.
            if let Some(b) = batch.take() {
                drop(state);
                b.send();
                state = queue.lock();
                continue;
            }
            if state.closed {
                return;
            }
            state.idle += 1;
            state = queue
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
            continue;
        };
        drop(state);
        // A long job (a large file, however small its delta) does not keep the results before
        // it waiting.
        let bytes = job.file.size.max(job.file.payload_len);
        let long = bytes >= BATCH_BYTES_MAX;
        let mut b = match batch.take() {
            Some(b) if !long && b.reply.same_channel(&job.context.reply) => b,
            other => {
                if let Some(other) = other {
                    other.send();
                }
                Batch {
                    reply: job.context.reply.clone(),
                    files: Vec::new(),
                    bytes: 0,
                }
            }
        };
        let file = job.file.file;
        // The job (and with it the connection's handle on the app) is dropped before its result
        // goes out: a driver that hears of its last file may release the app's lock at once.
        b.files.push((file, run_job(job)));
        b.bytes = b.bytes.saturating_add(bytes);
        if b.files.len() >= BATCH_MAX || b.bytes >= BATCH_BYTES_MAX {
            b.send();
        } else {
            batch = Some(b);
        }
        state = queue.lock();
    }
}

/// Runs the job of a file whose payload a file stream hands over as it arrives
/// (`stream::ReadInto::Direct`), on a blocking thread of its own rather than a worker (it waits on
/// the network), holding `slot` (the daemon bounds how many run at once). Reports the result
/// as the workers do, the job dropped first.
pub(super) fn run_direct(
    context: Arc<Context>,
    file: FileJob,
    mut pieces: Pieces,
    slot: OwnedSemaphorePermit,
) {
    let id = file.file;
    let result = guarded(&context, |objects| {
        let stored = work::store_full_from(objects, &file, &mut pieces);
        // A payload cut short is reported as such, not as the undecodable frame it left.
        match pieces.failure() {
            Some(failure) => Err(failure),
            None => stored,
        }
    });
    // The stream stops handing over bytes it has no taker for.
    drop(pieces);
    drop(slot);
    let reply = context.reply.clone();
    drop(context);
    let _ = reply.send(Work::File { file: id, result });
}

fn run_job(job: Job) -> Result<(), FileFailure> {
    let Job {
        context,
        file,
        payload,
    } = job;
    guarded(&context, |objects| {
        let stored = work::store(objects, context.basis.as_deref(), &file, &payload);
        if let (Ok(()), Some(memo), Payload::Memory(bytes)) = (&stored, &context.forward, payload) {
            // Stored means checked against the manifest hash: the children may have these bytes.
            memo.offer(file.hash, file.format, file.basis.map(|b| b.hash), bytes);
        }
        stored
    })
}

/// Runs `store` with the connection's object store, in its span; a panic becomes an internal
/// failure of that one file.
fn guarded(
    context: &Context,
    store: impl FnOnce(Option<&ObjectStore>) -> Result<(), FileFailure>,
) -> Result<(), FileFailure> {
    panic::catch_unwind(AssertUnwindSafe(|| {
        let _entered = context.span.enter();
        let objects = match &context.held {
            Held::App(o) => o.objects(),
            Held::Export(d) => d.objects(),
        };
        store(objects)
    }))
    .unwrap_or_else(|_| {
        Err(FileFailure::Local {
            kind: ErrorKind::Internal,
            message: "storing the file failed unexpectedly".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use sync_core::delta::{self, DeltaFormat};
    use sync_core::edge::root::AppRoot;
    use sync_core::manifest::Hash;
    use sync_core::path::RelPath;
    use sync_core::release::ReleaseId;
    use sync_core::wire::Command;

    use super::*;
    use crate::config::AppConfig;
    use crate::daemon::App;

    /// An app opened for a push, as a connection holds it.
    fn opened(root: &std::path::Path) -> Held {
        let config = AppConfig {
            name: "shop".into(),
            root: root.to_owned(),
            keep: None,
            shared: Vec::new(),
            authorized: HashSet::new(),
            accept_relayed: false,
            prestage: true,
            activation: None,
        };
        let app = Arc::new(App {
            root: AppRoot::open_or_create(root).unwrap(),
            config,
            prestager: Default::default(),
        });
        let push = Command::Push {
            release: ReleaseId::new("r1").unwrap(),
            manifest_len: 0,
            manifest_digest: Hash::of(b""),
            manifest_basis: None,
            relay: None,
        };
        Held::App(Arc::new(work::open(app, &push).unwrap()))
    }

    fn context(held: Held) -> (Arc<Context>, mpsc::UnboundedReceiver<Work>) {
        let (reply, rx) = mpsc::unbounded_channel();
        let context = Arc::new(Context {
            held,
            basis: None,
            forward: None,
            span: Span::none(),
            reply,
        });
        (context, rx)
    }

    /// A job for file `file` holding `content`, sent as `sent` (a lie when they differ).
    fn job(context: &Arc<Context>, file: u32, content: &[u8], sent: &[u8]) -> Job {
        let mut payload = Vec::new();
        delta::encode_full(sent, &mut payload).unwrap();
        Job {
            context: Arc::clone(context),
            file: FileJob {
                file,
                path: RelPath::new(format!("f{file}")).unwrap(),
                size: content.len() as u64,
                mode: 0o644,
                hash: Hash::of(content),
                format: DeltaFormat::Full,
                basis: None,
                payload_len: payload.len() as u64,
            },
            payload: Payload::Memory(payload),
        }
    }

    fn content(app: u32, file: u32) -> Vec<u8> {
        format!("<?php // app {app} file {file}\n")
            .repeat(file as usize % 7 + 1)
            .into_bytes()
    }

    /// Every result `rx` receives until `n` files were reported.
    async fn results(
        rx: &mut mpsc::UnboundedReceiver<Work>,
        n: usize,
    ) -> BTreeMap<u32, Result<(), FileFailure>> {
        let mut got = BTreeMap::new();
        while got.len() < n {
            let work = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
                .await
                .expect("the workers report in time")
                .expect("the channel stays open");
            let Work::Files(files) = work else {
                panic!("the workers report files only");
            };
            for (file, result) in files {
                assert!(
                    got.insert(file, result).is_none(),
                    "file {file} reported twice"
                );
            }
        }
        got
    }

    #[tokio::test]
    async fn jobs_of_two_connections_are_stored_and_reported_to_their_own_connection() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, mut rx_a) = context(opened(&tmp.path().join("a")));
        let (b, mut rx_b) = context(opened(&tmp.path().join("b")));
        let workers = Workers::start(2).unwrap();
        let liar = 77;
        let mut jobs = Vec::new();
        for file in 0..150 {
            let c = content(0, file);
            let mut sent = c.clone();
            if file == liar {
                sent[0] ^= 1;
            }
            jobs.push(job(&a, file, &c, &sent));
            let c = content(1, file);
            jobs.push(job(&b, file + 1000, &c, &c));
        }
        // Queued in several batches, as a driver does as requests come.
        let mut jobs = jobs.into_iter();
        for _ in 0..10 {
            workers.submit(jobs.by_ref().take(30));
        }
        let got_a = results(&mut rx_a, 150).await;
        let got_b = results(&mut rx_b, 150).await;
        assert_eq!(
            got_a.keys().copied().collect::<Vec<_>>(),
            (0..150).collect::<Vec<_>>()
        );
        assert_eq!(
            got_b.keys().copied().collect::<Vec<_>>(),
            (1000..1150).collect::<Vec<_>>()
        );
        for (file, result) in &got_a {
            if *file == liar {
                assert!(
                    matches!(result, Err(FileFailure::HashMismatch { .. })),
                    "{result:?}"
                );
            } else {
                assert_eq!(result, &Ok(()), "file {file}");
            }
        }
        assert!(got_b.values().all(Result::is_ok));
        // What was stored is in each app's own object store, the lie nowhere.
        for (held, app, files) in [(&a.held, 0, 0..150), (&b.held, 1, 0..150)] {
            let Held::App(o) = held else { unreachable!() };
            let stored = o.objects().unwrap().list().unwrap();
            let want: HashSet<(Hash, u32)> = files
                .filter(|f| app == 1 || *f != liar)
                .map(|f| (Hash::of(&content(app, f)), 0o644))
                .collect();
            assert_eq!(stored, want, "app {app}");
        }
    }

    #[tokio::test]
    async fn queued_jobs_still_run_when_the_workers_are_let_go() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, mut rx) = context(opened(tmp.path()));
        let workers = Workers::start(1).unwrap();
        workers.submit((0..40).map(|f| {
            let c = content(0, f);
            job(&a, f, &c, &c)
        }));
        drop(workers);
        let got = results(&mut rx, 40).await;
        assert!(got.values().all(Result::is_ok), "{got:?}");
        // Once every job is done, the last handle on the app is the test's own.
        drop(a);
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("the channel closes")
                .is_none(),
            "nothing else is reported and no worker keeps the connection's context"
        );
    }
}
