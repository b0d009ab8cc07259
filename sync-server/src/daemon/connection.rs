//! One connection: a [`DaemonSession`] driven by tokio.
//!
//! The driver owns the session and feeds it everything that happens: control-stream bytes, file
//! headers from the stream readers, finished work and the clock. After every input it writes the
//! frames the session produced and starts the work it asked for, never waiting on that work
//! itself, so a slow build never stops the driver from noticing a timeout or a vanished client.
//! The app's (or export's) lock lives in the [`Held`] context that work items share: it is
//! released when the session is over and the last of its work has finished, however the
//! connection ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use sync_core::delta::DeltaFormat;
use sync_core::manifest::Policy;
use sync_core::proto::daemon::{Event, FileFailure, FileJob, Outcome, Request};
use sync_core::proto::DaemonSession;
use sync_core::relay::{RelayPlan, Relayed};
use sync_core::wire::{self, AppName, Command, ErrorKind, FileHeader, Usage};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tracing::{Instrument as _, Span};

use super::export::{self, Destination};
use super::store;
use super::stream::{self, Early, Payload, Pieces, ReadInto, ReadPlan};
use super::work::{self, Basis, Opened};
use super::{relay, App, Shared};
use crate::client::PayloadMemo;
use crate::net::peer_fingerprint;
use crate::tls::{ticket, Fingerprint};

/// Largest control-stream read at once.
const CONTROL_CHUNK: usize = 64 * 1024;
/// Payloads larger than this go to a temporary file rather than memory even when admitted, or
/// straight into the job that rebuilds them. Each weighs this much in the bytes-in-flight
/// budget, so the default budget (64 MiB) lets four large files arrive side by side, one per
/// stream of a two-core client.
const MEMORY_PAYLOAD_MAX: u64 = 16 << 20;
/// Longest wait for the client to acknowledge the last frames before the connection is closed.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The connection's clock: milliseconds since it was accepted, and when payload bytes last
/// arrived (file streams are read by other tasks, which only touch this).
#[derive(Debug)]
pub(super) struct Clock {
    epoch: Instant,
    last_payload: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            last_payload: AtomicU64::new(0),
        }
    }

    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Payload bytes arrived just now.
    pub(super) fn touch(&self) {
        self.last_payload.fetch_max(self.now(), Ordering::Relaxed);
    }

    fn last_payload(&self) -> u64 {
        self.last_payload.load(Ordering::Relaxed)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_millis(ms))
            .unwrap_or_else(|| self.epoch + Duration::from_secs(86_400 * 365))
    }
}

/// What a session opened: an app (push and commands) or a sync's destination in an export.
#[derive(Clone)]
pub(super) enum Held {
    App(Arc<Opened>),
    Export(Arc<Destination>),
}

impl Held {
    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            Held::App(o) => Some(o.spool_dir()),
            Held::Export(d) => d.spool_dir(),
        }
    }
}

/// Something that happened off the driver's task.
pub(super) enum Work {
    /// Answer to [`Request::Open`].
    Opened(Result<Held, Event>),
    /// Answer to [`Request::ComputeNeed`] and [`Request::ComputeMirrorNeed`], with where the
    /// bases are.
    Need(Result<work::Needed, Event>),
    /// Answers to any other request.
    Events(Vec<Event>),
    /// A [`Request::Receive`] ended.
    File {
        file: u32,
        result: Result<(), FileFailure>,
    },
    /// [`Request::Receive`]s the store workers finished.
    Files(Vec<(u32, Result<(), FileFailure>)>),
    /// A file stream delivered a header; the reader waits for how to read the payload.
    Header {
        frame: Vec<u8>,
        reply: oneshot::Sender<Option<ReadPlan>>,
    },
    /// A file stream delivered a small file's header and payload together, read before the
    /// session admitted the file into `room`.
    Whole {
        header: FileHeader,
        frame: Vec<u8>,
        payload: Result<Payload, FileFailure>,
        room: OwnedSemaphorePermit,
    },
    /// The payload after a [`Work::Header`] was read whole, or failed.
    Payload {
        file: u32,
        result: Result<Payload, FileFailure>,
    },
    /// A file stream broke inside a header.
    StreamError(wire::WireError),
}

impl Work {
    /// How many of the work items the driver counted as pending this completes.
    fn completes(&self) -> usize {
        match self {
            Work::Header { .. }
            | Work::Whole { .. }
            | Work::Payload { .. }
            | Work::StreamError(_) => 0,
            Work::Files(files) => files.len(),
            _ => 1,
        }
    }
}

/// Where a file announced on a file stream stands until its store job is queued.
enum Incoming {
    /// Its header went to the driver; the payload is being read.
    Announced,
    /// Its payload was read (or failed) before the session asked for the file; `room` is the
    /// early allowance it holds until then.
    Arrived {
        payload: Result<Payload, FileFailure>,
        room: Option<OwnedSemaphorePermit>,
    },
    /// The session asked for the file; its payload is being read.
    Wanted(FileJob),
    /// The session asked for the file and its payload goes straight to the job rebuilding it
    /// (`ReadInto::Direct`), which reports the result.
    Streaming,
}

/// Serves one incoming connection until its session is over.
pub(super) async fn run(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(host = %remote, "handshake failed: {e}");
            return;
        }
    };
    let Some(peer) = peer_fingerprint(&conn) else {
        // The verifier demands a key, so this does not happen; refuse rather than guess.
        conn.close(1u32.into(), b"no client key");
        return;
    };
    let span = tracing::info_span!(
        "conn",
        host = %remote,
        peer = %peer,
        app = tracing::field::Empty,
        release = tracing::field::Empty
    );
    Driver::new(shared, conn, peer, stop)
        .run()
        .instrument(span)
        .await;
}

struct Driver {
    shared: Arc<Shared>,
    conn: Connection,
    peer: Fingerprint,
    stop: watch::Receiver<bool>,
    session: DaemonSession,
    clock: Arc<Clock>,
    send: Option<SendStream>,
    recv: Option<RecvStream>,
    control_seen: bool,
    opened: Option<Held>,
    /// The peer is a relay admitted by its ticket, not an authorized key: it may stage only.
    relayed_peer: bool,
    /// The process's CPU time (µs) when the session opened its app: `Staged` reports the
    /// difference.
    cpu_at_open: u64,
    /// Where to forward the release, and for which app, once the manifest is known.
    relay: Option<(AppName, RelayPlan)>,
    /// The forwarding started for this push, if any.
    forwarding: Option<Forwarding>,
    basis: Option<Arc<Basis>>,
    /// Files announced on a file stream whose store job is not queued yet.
    incoming: HashMap<u32, Incoming>,
    /// Memory for small payloads the file streams read before asking.
    early: Arc<Early>,
    /// Store jobs to hand to the workers at once.
    to_store: Vec<store::Job>,
    /// Shared by this connection's store jobs; dropped with `opened`.
    store: Option<Arc<store::Context>>,
    tx: mpsc::UnboundedSender<Work>,
    rx: mpsc::UnboundedReceiver<Work>,
    /// Work items started and not yet reported back.
    pending: usize,
    /// The push whose need is being computed: its build starts once the need is known.
    pushing: Option<(Arc<Opened>, sync_core::ReleaseId, Arc<sync_core::Manifest>)>,
    /// The release build, started once the need is known.
    building: Option<Building>,
}

/// A release build running while the push's files arrive ([`work::stage`] with an arrival).
struct Building {
    /// Told (and dropped) once the client goes on with the push: the build may change the
    /// disk. Dropped untold when the push ends at its need (a dry run).
    proceed: Option<std::sync::mpsc::Sender<()>>,
    /// Told once every needed file is stored; dropped to cancel the build.
    stored: std::sync::mpsc::Sender<()>,
    /// Stops the build where it is (with `stored` dropped) when the push ends first.
    cancel: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Event>,
}

impl Driver {
    fn new(
        shared: Arc<Shared>,
        conn: Connection,
        peer: Fingerprint,
        stop: watch::Receiver<bool>,
    ) -> Driver {
        let clock = Arc::new(Clock::new());
        let mut session = DaemonSession::new(shared.limits, clock.now());
        session.set_spool_above(MEMORY_PAYLOAD_MAX);
        let (tx, rx) = mpsc::unbounded_channel();
        let early = Arc::new(Early::new(shared.limits.max_bytes_in_flight));
        Driver {
            shared,
            conn,
            peer,
            stop,
            session,
            clock,
            send: None,
            recv: None,
            control_seen: false,
            opened: None,
            relayed_peer: false,
            cpu_at_open: 0,
            relay: None,
            forwarding: None,
            basis: None,
            incoming: HashMap::new(),
            early,
            to_store: Vec::new(),
            store: None,
            tx,
            rx,
            pending: 0,
            pushing: None,
            building: None,
        }
    }

    async fn run(mut self) {
        tracing::debug!("connection accepted");
        loop {
            self.start_requests();
            if self.session.is_finished() && self.pending == 0 {
                // Nothing runs any more: let the next command in before the client hears back.
                self.opened = None;
                self.store = None;
            }
            self.flush().await;
            if self.session.is_finished() {
                break;
            }
            let deadline = self.session.poll_timeout().map_or_else(
                || self.clock.instant(u64::MAX / 2),
                |t| self.clock.instant(t),
            );
            tokio::select! {
                Some(work) = self.rx.recv() => self.on_work(work),
                bi = self.conn.accept_bi(), if !self.control_seen => match bi {
                    Ok((send, recv)) => {
                        self.control_seen = true;
                        self.send = Some(send);
                        self.recv = Some(recv);
                    }
                    Err(e) => self.on_connection_lost(&e),
                },
                chunk = read_control(self.recv.as_mut()) => self.on_control(chunk),
                uni = self.conn.accept_uni() => match uni {
                    Ok(s) => {
                        // Readers log nothing: they run outside the connection's span rather
                        // than enter it on every poll of every file stream.
                        tokio::spawn(stream::read(
                            s,
                            self.tx.clone(),
                            self.clock.clone(),
                            self.early.clone(),
                        ));
                    }
                    Err(e) => self.on_connection_lost(&e),
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    // Payload bytes arrive on other tasks; they count as signs of life too.
                    self.session.handle_progress(self.clock.last_payload());
                    self.session.handle_timeout(self.clock.now());
                }
                () = shutting_down(&mut self.stop) => {
                    self.session.handle_event(
                        Event::Failed {
                            kind: ErrorKind::Internal,
                            message: "relsyncd is shutting down; run the command again once it is back".into(),
                        },
                        self.clock.now(),
                    );
                }
            }
        }
        self.finish().await;
    }

    fn on_control(&mut self, chunk: Result<Option<quinn::Chunk>, quinn::ReadError>) {
        let now = self.clock.now();
        match chunk {
            Ok(Some(c)) => self.session.handle_control(&c.bytes, now),
            Ok(None) => {
                self.recv = None;
                self.session.handle_control_end(now);
            }
            Err(e) => {
                tracing::debug!("control stream broke: {e}");
                self.recv = None;
                self.session.handle_control_end(now);
            }
        }
    }

    /// The connection is gone: for the session that is the end of the control stream (which
    /// leaves a staged release staged, and fails anything else).
    fn on_connection_lost(&mut self, e: &ConnectionError) {
        tracing::debug!("connection ended: {e}");
        self.recv = None;
        self.send = None;
        self.control_seen = true;
        self.session.handle_control_end(self.clock.now());
    }

    fn on_work(&mut self, work: Work) {
        self.pending -= work.completes();
        let now = self.clock.now();
        match work {
            Work::Opened(Ok(opened)) => {
                let manifest_basis = match &opened {
                    Held::App(o) => o.manifest_basis.clone(),
                    Held::Export(_) => None,
                };
                self.opened = Some(opened);
                self.session.handle_event(
                    Event::Opened {
                        policy: Policy::default(),
                        manifest_basis,
                    },
                    now,
                );
            }
            Work::Opened(Err(event)) | Work::Need(Err(event)) => {
                self.session.handle_event(event, now);
            }
            Work::Need(Ok(work::Needed {
                event,
                basis,
                checked,
            })) => {
                let arrival = match (&event, self.pushing.take()) {
                    (Event::Need(need), Some((opened, release, manifest))) => {
                        let objects = work::arriving_objects(&manifest, need);
                        Some((opened, release, manifest, objects))
                    }
                    _ => None,
                };
                self.basis = basis;
                self.session.handle_event(event, now);
                if let Some((opened, release, manifest, objects)) = arrival {
                    self.start_building(opened, release, manifest, objects, checked);
                }
            }
            Work::Events(events) => {
                for e in events {
                    if matches!(e, Event::Staged { .. }) {
                        let mut usage = process_usage();
                        usage.cpu_micros = usage.cpu_micros.saturating_sub(self.cpu_at_open);
                        self.session.set_usage(usage);
                    }
                    self.session.handle_event(e, now);
                }
            }
            Work::File { file, result } => self.file_finished(file, result, now),
            Work::Files(files) => {
                for (file, result) in files {
                    self.file_finished(file, result, now);
                }
            }
            Work::Header { frame, reply } => self.on_header(frame, reply),
            Work::Whole {
                header,
                frame,
                payload,
                room,
            } => self.on_whole(&header, &frame, payload, room),
            Work::Payload { file, result } => self.on_payload(file, result),
            Work::StreamError(e) => self.session.handle_stream_error(e, now),
        }
        self.submit_stores();
    }

    fn file_finished(&mut self, file: u32, result: Result<(), FileFailure>, now: u64) {
        if let Err(failure) = &result {
            tracing::warn!(file, ?failure, "file not stored");
        }
        self.session.file_finished(file, result, now);
    }

    fn on_header(&mut self, frame: Vec<u8>, reply: oneshot::Sender<Option<ReadPlan>>) {
        // The session validates the header; decoding it here only tells the reader how much to
        // read and lets the receive job find the payload.
        let header = wire::decode::<FileHeader>(&frame).ok();
        let fresh = header
            .as_ref()
            .is_some_and(|h| !self.incoming.contains_key(&h.file));
        if let (true, Some(h)) = (fresh, &header) {
            self.incoming.insert(h.file, Incoming::Announced);
        }
        self.session.accept_file(&frame, self.clock.now());
        self.start_requests();
        let plan = match header {
            Some(h) if !self.session.is_finished() => {
                let admitted = matches!(self.incoming.get(&h.file), Some(Incoming::Wanted(_)));
                let large = h.payload_len > MEMORY_PAYLOAD_MAX;
                // A header the budget does not admit yet is spooled to disk rather than left
                // unread: unread stream data holds the connection's flow-control window, and
                // with enough of it the admitted files could not arrive either.
                let into = match (admitted && large).then(|| self.start_direct(h.file)) {
                    Some(Some(to)) => ReadInto::Direct(to),
                    _ => (!admitted || large)
                        .then(|| self.opened.as_ref().and_then(Held::spool_dir))
                        .flatten()
                        .map_or(ReadInto::Memory, ReadInto::Spool),
                };
                Some(ReadPlan {
                    file: h.file,
                    payload_len: h.payload_len,
                    into,
                })
            }
            Some(h) => {
                if fresh {
                    self.incoming.remove(&h.file);
                }
                None
            }
            None => None,
        };
        let _ = reply.send(plan);
    }

    /// A small file read whole before the session saw its header.
    fn on_whole(
        &mut self,
        header: &FileHeader,
        frame: &[u8],
        payload: Result<Payload, FileFailure>,
        room: OwnedSemaphorePermit,
    ) {
        let now = self.clock.now();
        let file = header.file;
        // A second header for a file is refused by the session; the first one's state stays.
        let fresh = !self.incoming.contains_key(&file);
        let arrived = payload.is_ok();
        if fresh {
            self.incoming.insert(
                file,
                Incoming::Arrived {
                    payload,
                    room: Some(room),
                },
            );
        }
        self.session.accept_file(frame, now);
        if fresh && arrived {
            self.session.payload_arrived(file, now);
        }
        self.start_requests();
    }

    /// Starts the job that rebuilds the admitted file `file` from its payload as the payload
    /// arrives, when it is a plain one and a direct slot is free; the sender is where the
    /// stream hands the bytes. Other payloads (deltas need their basis mapped whole) are
    /// spooled as before.
    fn start_direct(&mut self, file: u32) -> Option<tokio::sync::mpsc::Sender<stream::Piece>> {
        match self.incoming.get(&file) {
            Some(Incoming::Wanted(job)) if job.format == DeltaFormat::Full => {}
            _ => return None,
        }
        let slot = Arc::clone(&self.shared.direct).try_acquire_owned().ok()?;
        let context = self.store_context()?;
        let Some(Incoming::Wanted(job)) = self.incoming.insert(file, Incoming::Streaming) else {
            unreachable!("checked above")
        };
        let (to, pieces) = Pieces::channel();
        tokio::task::spawn_blocking(move || store::run_direct(context, job, pieces, slot));
        Some(to)
    }

    /// The payload after a header the driver planned was read, or failed.
    fn on_payload(&mut self, file: u32, result: Result<Payload, FileFailure>) {
        if result.is_ok() {
            self.session.payload_arrived(file, self.clock.now());
        }
        match self.incoming.remove(&file) {
            Some(Incoming::Wanted(job)) => self.store(job, result),
            // Its job reports the file, failed or not.
            Some(Incoming::Streaming) => {}
            Some(Incoming::Announced) => {
                self.incoming.insert(
                    file,
                    Incoming::Arrived {
                        payload: result,
                        room: None,
                    },
                );
            }
            // Not from a header this session planned (it ended since): nothing waits for it.
            Some(Incoming::Arrived { .. }) | None => {}
        }
    }

    fn start_requests(&mut self) {
        while let Some(request) = self.session.poll_request() {
            self.start(request);
        }
        self.submit_stores();
    }

    fn fail_now(&mut self, kind: ErrorKind, message: String) {
        self.session
            .handle_event(Event::Failed { kind, message }, self.clock.now());
    }

    fn start(&mut self, request: Request) {
        if matches!(
            request,
            Request::Receive(_) | Request::Signatures { .. } | Request::Stage { .. }
        ) {
            // The client goes on with the push: the build may stage what needs none of its
            // files meanwhile.
            if let Some(proceed) = self.building.as_mut().and_then(|b| b.proceed.take()) {
                let _ = proceed.send(());
            }
        }
        if let Request::Open { app, command } = request {
            self.cpu_at_open = process_usage().cpu_micros;
            return self.open(app.as_str(), command);
        }
        let Some(held) = self.opened.clone() else {
            return self.fail_now(
                ErrorKind::Internal,
                "the session asked for work before the app was opened".into(),
            );
        };
        match (request, held) {
            (Request::Open { .. }, _) => unreachable!("handled above"),
            (Request::ComputeNeed { release, manifest }, Held::App(opened)) => {
                if let Some((app, plan)) = self.relay.take().filter(|(_, p)| !p.nodes.is_empty()) {
                    self.start_forwarding(&opened, &release, &manifest, app, plan);
                }
                tracing::info!(
                    files = manifest.file_count(),
                    bytes = manifest.total_file_bytes(),
                    "manifest received"
                );
                self.pushing = Some((Arc::clone(&opened), release.clone(), Arc::clone(&manifest)));
                self.spawn_work(
                    move || Work::Need(work::compute_need(&opened, &release, &manifest)),
                    Work::Need(Err(panicked("computing the need"))),
                );
            }
            (Request::ComputeMirrorNeed { manifest, .. }, Held::Export(dest)) => {
                tracing::info!(
                    files = manifest.file_count(),
                    bytes = manifest.total_file_bytes(),
                    "manifest received"
                );
                self.spawn_work(
                    move || {
                        Work::Need(
                            export::compute_need(&dest, &manifest).map(|(event, basis)| {
                                work::Needed {
                                    event,
                                    basis,
                                    checked: Default::default(),
                                }
                            }),
                        )
                    },
                    Work::Need(Err(panicked("scanning the destination"))),
                );
            }
            (Request::Signatures { files }, _) => {
                let basis = self.basis.clone();
                let count = files.len();
                self.spawn_work(
                    move || {
                        Work::Events(
                            files
                                .iter()
                                .map(|job| Event::Signature {
                                    file: job.file,
                                    data: work::signature(basis.as_deref(), job),
                                })
                                .collect(),
                        )
                    },
                    Work::Events(vec![panicked("computing signatures")]),
                );
                tracing::debug!(count, "signatures requested");
            }
            (Request::Receive(job), _) => self.receive(job),
            (Request::Stage { release, manifest }, Held::App(opened)) => {
                let built = match self.building.take() {
                    Some(building) => {
                        // Every needed file is stored: the build goes on with them.
                        let _ = building.stored.send(());
                        building.task
                    }
                    None => {
                        let span = Span::current();
                        tokio::task::spawn_blocking(move || {
                            let _entered = span.enter();
                            work::stage(&opened, &release, &manifest, None)
                        })
                    }
                };
                let forwarding = self.forwarding.take();
                self.stage_and_join(built, forwarding);
            }
            (Request::Activate { .. }, Held::App(_)) if self.relayed_peer => self.fail_now(
                ErrorKind::Unauthorized,
                format!(
                    "key {} relays pushes only; activation is the originating client's",
                    self.peer
                ),
            ),
            (
                Request::Mirror {
                    manifest,
                    delete,
                    dry_run,
                },
                Held::Export(dest),
            ) => self.spawn_work(
                move || {
                    let event = export::mirror(&dest, &manifest, delete, dry_run);
                    Work::Events(vec![event.unwrap_or_else(|e| e)])
                },
                Work::Events(vec![panicked("applying the sync")]),
            ),
            (Request::Activate { release, prune }, Held::App(opened)) => {
                self.spawn_work(
                    move || Work::Events(vec![work::activate(&opened, &release, prune)]),
                    Work::Events(vec![panicked("activating the release")]),
                );
            }
            (Request::ListReleases, Held::App(opened)) => self.spawn_work(
                move || Work::Events(vec![work::list(&opened)]),
                Work::Events(vec![panicked("listing releases")]),
            ),
            (Request::Rollback { to }, Held::App(opened)) => self.spawn_work(
                move || Work::Events(vec![work::rollback(&opened, to.as_ref())]),
                Work::Events(vec![panicked("rolling back")]),
            ),
            (Request::Prune { keep }, Held::App(opened)) => self.spawn_work(
                move || Work::Events(vec![work::prune(&opened, keep)]),
                Work::Events(vec![panicked("pruning")]),
            ),
            (Request::Clear, Held::App(opened)) => self.spawn_work(
                move || Work::Events(vec![work::clear(&opened)]),
                Work::Events(vec![panicked("clearing the app")]),
            ),
            (request, _) => self.fail_now(
                ErrorKind::Internal,
                format!(
                    "the session asked for {}, which does not apply to what it opened",
                    request_name(&request)
                ),
            ),
        }
    }

    /// Stores a file once its payload has arrived.
    fn receive(&mut self, job: FileJob) {
        self.pending += 1;
        match self.incoming.remove(&job.file) {
            Some(Incoming::Arrived { payload, room }) => {
                // Admitted: the session's budget counts the payload from here on.
                drop(room);
                self.store(job, payload);
            }
            Some(Incoming::Announced) => {
                self.incoming.insert(job.file, Incoming::Wanted(job));
            }
            other => {
                // A job already waiting for its payload stays (and is counted) as it was.
                if let Some(kept @ (Incoming::Wanted(_) | Incoming::Streaming)) = other {
                    self.incoming.insert(job.file, kept);
                }
                self.store(
                    job,
                    Err(FileFailure::Local {
                        kind: ErrorKind::Internal,
                        message: "no file stream announced this file".into(),
                    }),
                );
            }
        }
    }

    /// Queues the store job of a file whose payload is here, or reports why it cannot be.
    fn store(&mut self, job: FileJob, payload: Result<Payload, FileFailure>) {
        let payload = payload.and_then(|p| match self.store_context() {
            Some(context) => Ok((context, p)),
            None => Err(FileFailure::Local {
                kind: ErrorKind::Internal,
                message: "the session asked for work before the app was opened".into(),
            }),
        });
        match payload {
            Ok((context, payload)) => self.to_store.push(store::Job {
                context,
                file: job,
                payload,
            }),
            Err(failure) => {
                let _ = self.tx.send(Work::File {
                    file: job.file,
                    result: Err(failure),
                });
            }
        }
    }

    /// Hands the store jobs queued since the last call to the workers.
    fn submit_stores(&mut self) {
        if !self.to_store.is_empty() {
            self.shared.store.submit(self.to_store.drain(..));
        }
    }

    /// What the store jobs of this connection share, made once the need (and with it the
    /// bases) is known.
    fn store_context(&mut self) -> Option<Arc<store::Context>> {
        if let Some(c) = &self.store {
            return Some(Arc::clone(c));
        }
        let c = Arc::new(store::Context {
            held: self.opened.clone()?,
            basis: self.basis.clone(),
            forward: self.forwarding.as_ref().map(|f| Arc::clone(&f.memo)),
            span: Span::current(),
            reply: self.tx.clone(),
        });
        self.store = Some(Arc::clone(&c));
        Some(c)
    }

    /// Authorizes the peer for `app` before anything touches the disk, then takes the lock and
    /// recovers on the blocking pool.
    fn open(&mut self, name: &str, command: Command) {
        if matches!(command, Command::Sync { .. }) {
            return self.open_export(name, command);
        }
        let app: Option<Arc<App>> = self.shared.apps.get(name).cloned().filter(|a| {
            a.config.authorized.contains(&self.peer) || self.relay_admitted(a, name, &command)
        });
        let Some(app) = app else {
            tracing::warn!(
                app = name,
                command = command.name(),
                "refused: key not authorized for this app"
            );
            return self.fail_now(
                ErrorKind::Unauthorized,
                format!(
                    "key {} may not use app {name} on this daemon; add it to apps.{name}.authorized_keys in the daemon configuration",
                    self.peer
                ),
            );
        };
        let span = Span::current();
        span.record("app", name);
        if let Command::Push { release, relay, .. } = &command {
            span.record("release", release.as_str());
            if let (Some(plan), Ok(app)) = (relay, AppName::new(name)) {
                self.relay = Some((app, plan.clone()));
            }
        }
        tracing::info!(command = command.name(), "opening");
        self.spawn_work(
            move || Work::Opened(work::open(app, &command).map(|o| Held::App(Arc::new(o)))),
            Work::Opened(Err(panicked("opening the app"))),
        );
    }

    /// Whether a peer that `app` does not authorize may push anyway: the app takes relayed
    /// pushes and the push carries a ticket, signed by a key the app authorizes, for this very
    /// release, manifest and peer key. Checked from `Hello` alone, before any file-system work.
    fn relay_admitted(&mut self, app: &App, name: &str, command: &Command) -> bool {
        let Command::Push {
            release,
            manifest_digest,
            relay: Some(plan),
            ..
        } = command
        else {
            return false;
        };
        if !app.config.accept_relayed || plan.ticket.is_empty() {
            return false;
        }
        let Ok(app_name) = AppName::new(name) else {
            return false;
        };
        let expect = ticket::Expected {
            app: &app_name,
            release,
            manifest_digest,
            peer: self.peer,
            authorized: &app.config.authorized,
        };
        match ticket::verify(&plan.ticket, &expect) {
            Ok(_) => {
                tracing::info!(app = name, "relayed push admitted by its ticket");
                self.relayed_peer = true;
                true
            }
            Err(e) => {
                tracing::warn!(app = name, "refused a relayed push: {e}");
                false
            }
        }
    }

    /// Starts pushing the release to the children of `plan` as soon as the manifest is known;
    /// each file goes on once this daemon has it (see `relay`).
    fn start_forwarding(
        &mut self,
        opened: &Arc<Opened>,
        release: &sync_core::ReleaseId,
        manifest: &Arc<sync_core::Manifest>,
        app: AppName,
        plan: RelayPlan,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let memo = relay::memo();
        let relayer = Arc::clone(&self.shared.relayer);
        let (opened, release, manifest) =
            (Arc::clone(opened), release.clone(), Arc::clone(manifest));
        let given_up = Arc::clone(&stop);
        let span = Span::current();
        let offer_to = Arc::clone(&memo);
        let task = tokio::spawn(
            async move {
                let content = {
                    let (opened, release, manifest) =
                        (Arc::clone(&opened), release.clone(), Arc::clone(&manifest));
                    tokio::task::spawn_blocking(move || {
                        let _entered = span.enter();
                        relay::RelayContent::new(opened.root(), &release, &manifest, given_up)
                    })
                    .await
                    .unwrap_or_else(|_| Err("indexing kept content failed unexpectedly".into()))
                };
                match content {
                    Ok(content) => {
                        let f = relay::Forward {
                            app,
                            dir: opened.release_dir(&release),
                            release,
                            manifest,
                            plan,
                            content: Arc::new(content),
                            authorized: opened.authorized().clone(),
                            memo,
                        };
                        relay::forward(relayer, f).await
                    }
                    Err(e) => (0..plan.nodes.len())
                        .map(|i| {
                            Relayed::new(
                                u32::try_from(i).unwrap_or(u32::MAX),
                                Some(format!("the relay cannot read its own content: {e}")),
                            )
                        })
                        .collect(),
                }
            }
            .in_current_span(),
        );
        self.forwarding = Some(Forwarding {
            task,
            stop,
            memo: offer_to,
        });
    }

    /// Starts building the release of the push whose need is known: it is planned at once, and
    /// once the client's first file or signature request shows the push goes on, what needs no
    /// file of the push is staged while they arrive (see [`work::stage`]).
    fn start_building(
        &mut self,
        opened: Arc<Opened>,
        release: sync_core::ReleaseId,
        manifest: Arc<sync_core::Manifest>,
        objects: std::collections::HashSet<(sync_core::manifest::Hash, u32)>,
        checked: sync_core::edge::exec::CheckedLinks,
    ) {
        let (proceed, going_on) = std::sync::mpsc::channel();
        let (stored, arrived) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let span = Span::current();
        let arrival = work::Arrival {
            objects,
            proceed: going_on,
            stored: arrived,
            checked,
            cancel: Arc::clone(&cancel),
        };
        let task = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            work::stage(&opened, &release, &manifest, Some(arrival))
        });
        self.building = Some(Building {
            proceed: Some(proceed),
            stored,
            cancel,
            task,
        });
    }

    /// Waits for the release build, then (for a relay) for the forwarding to end; the `Staged`
    /// event carries what became of every node of the plan. The app's lock is held until
    /// then, so the release directory and objects the children are fed from stay in place.
    fn stage_and_join(
        &mut self,
        built: tokio::task::JoinHandle<Event>,
        forwarding: Option<Forwarding>,
    ) {
        self.pending += 1;
        let tx = self.tx.clone();
        tokio::spawn(
            async move {
                let built = built
                    .await
                    .unwrap_or_else(|_| panicked("building the release"));
                let event = match (built, forwarding) {
                    (
                        Event::Staged {
                            linked,
                            phases,
                            previous,
                            ..
                        },
                        Some(forwarding),
                    ) => {
                        let relayed = forwarding.join().await;
                        Event::Staged {
                            linked,
                            relayed,
                            phases,
                            previous,
                        }
                    }
                    (other, forwarding) => {
                        if let Some(f) = forwarding {
                            f.cancel();
                        }
                        other
                    }
                };
                let _ = tx.send(Work::Events(vec![event]));
            }
            .in_current_span(),
        );
    }

    /// Authorizes the peer for export `name` before anything touches the disk, then locks the
    /// export and opens the destination on the blocking pool.
    fn open_export(&mut self, name: &str, command: Command) {
        let Some(export) = self.shared.exports.get(name).cloned() else {
            tracing::warn!(export = name, "refused: no such export");
            return self.fail_now(
                ErrorKind::NotFound,
                format!(
                    "this daemon has no export {name}; declare it as [exports.{name}] in relsyncd's configuration, or check the name"
                ),
            );
        };
        if !export.authorized.contains(&self.peer) {
            tracing::warn!(export = name, "refused: key not authorized for this export");
            return self.fail_now(
                ErrorKind::Unauthorized,
                format!(
                    "key {} may not sync into export {name} on this daemon; add it to exports.{name}.authorized_keys in the daemon configuration",
                    self.peer
                ),
            );
        }
        Span::current().record("app", name);
        tracing::info!(command = command.name(), "opening export");
        let limits = self.shared.limits;
        self.spawn_work(
            move || {
                Work::Opened(
                    export::open(&export, &command, &limits).map(|d| Held::Export(Arc::new(d))),
                )
            },
            Work::Opened(Err(panicked("opening the export"))),
        );
    }

    /// Runs `f` on the blocking pool and reports its result (or `on_panic`) back as work.
    fn spawn_work(&mut self, f: impl FnOnce() -> Work + Send + 'static, on_panic: Work) {
        self.pending += 1;
        let tx = self.tx.clone();
        let span = Span::current();
        tokio::spawn(async move {
            let work = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                f()
            })
            .await
            .unwrap_or(on_panic);
            let _ = tx.send(work);
        });
    }

    /// Writes what the session has to send. A client that does not take it within the message
    /// timeout is given up on.
    async fn flush(&mut self) {
        let timeout = Duration::from_millis(self.shared.limits.message_timeout_ms);
        while let Some(frame) = self.session.poll_transmit(self.clock.now()) {
            let Some(send) = self.send.as_mut() else {
                continue;
            };
            let written = tokio::time::timeout(timeout, send.write_all(&frame)).await;
            let problem = match written {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("cannot write to the client: {e}"),
                Err(_) => "the client stopped reading its replies".to_string(),
            };
            tracing::debug!("{problem}");
            self.send = None;
            self.fail_now(ErrorKind::Internal, problem);
        }
    }

    /// The session is over: log how, let the client read the last frames, close, and wait for the
    /// work still running before the lock goes.
    async fn finish(mut self) {
        if let Some(building) = &self.building {
            // The push ended before its files were all in: stop building its release now (it
            // is waited for below, before the lock goes).
            building.cancel.store(true, Ordering::Relaxed);
        }
        if let Some(f) = self.forwarding.take() {
            // This push failed before its release was built: the children are pushed to
            // directly by the source.
            f.cancel();
        }
        let outcome = self.session.outcome();
        match outcome {
            Some(Ok(Outcome::Pushed { staged, activated })) => tracing::info!(
                files = staged.files,
                bytes = staged.bytes,
                linked = staged.linked,
                received = staged.received,
                received_bytes = staged.received_bytes,
                activated,
                "push complete"
            ),
            Some(Ok(Outcome::Synced(s))) => tracing::info!(
                files = s.summary.files,
                written = s.summary.written_files,
                unchanged = s.summary.unchanged_files,
                removed = s.summary.removed,
                received = s.received,
                received_bytes = s.received_bytes,
                dry_run = s.applied.is_none(),
                "sync complete"
            ),
            Some(Ok(other)) => tracing::info!(outcome = ?other, "command complete"),
            Some(Err(e)) => tracing::warn!(kind = %e.kind(), "session failed: {e}"),
            None => {}
        }
        let ok = matches!(outcome, Some(Ok(_)));
        if let Some(mut send) = self.send.take() {
            let _ = send.finish();
            let wait = FLUSH_WAIT.min(Duration::from_millis(self.shared.limits.message_timeout_ms));
            let _ = tokio::time::timeout(wait, send.stopped()).await;
        }
        if ok {
            self.conn.close(0u32.into(), b"done");
        } else {
            self.conn.close(1u32.into(), b"session failed");
        }
        // Readers of a closed connection fail fast, so every started job reports back soon;
        // a file the session asked for is still stored if its payload came whole.
        self.incoming
            .retain(|_, i| matches!(i, Incoming::Wanted(_)));
        while self.pending > 0 {
            match self.rx.recv().await {
                Some(Work::Payload { file, result }) => {
                    if let Some(Incoming::Wanted(job)) = self.incoming.remove(&file) {
                        self.store(job, result);
                        self.submit_stores();
                    }
                }
                Some(work) => self.pending -= work.completes(),
                None => break,
            }
        }
        if let Some(building) = self.building.take() {
            // The build removes what it staged; the lock goes only after that.
            drop(building.proceed);
            drop(building.stored);
            if let Err(e) = building.task.await {
                tracing::warn!("the cancelled release build failed: {e}");
            }
        }
        self.opened = None;
        self.store = None;
        tracing::debug!("connection finished");
    }
}

/// Pushes to the children of a relay plan, running alongside this daemon's own push.
struct Forwarding {
    task: tokio::task::JoinHandle<Vec<Relayed>>,
    /// Tells the readers waiting for content that it will not come.
    stop: Arc<AtomicBool>,
    /// The children's payloads: what arrives here is offered to it.
    memo: Arc<PayloadMemo>,
}

impl Forwarding {
    async fn join(self) -> Vec<Relayed> {
        match self.task.await {
            Ok(reports) => reports,
            Err(e) => {
                tracing::warn!("the relay task failed: {e}");
                Vec::new()
            }
        }
    }

    fn cancel(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// Resolves once the daemon ends the sessions still running after its grace period.
async fn shutting_down(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        // The daemon is gone without asking; the connection ends with the runtime.
        std::future::pending::<()>().await;
    }
}

async fn read_control(
    recv: Option<&mut RecvStream>,
) -> Result<Option<quinn::Chunk>, quinn::ReadError> {
    match recv {
        Some(r) => r.read_chunk(CONTROL_CHUNK, true).await,
        None => std::future::pending().await,
    }
}

/// A request's name for messages (its contents may be a whole manifest).
fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Open { .. } => "Open",
        Request::ComputeNeed { .. } => "ComputeNeed",
        Request::ComputeMirrorNeed { .. } => "ComputeMirrorNeed",
        Request::Signatures { .. } => "Signatures",
        Request::Receive(_) => "Receive",
        Request::Stage { .. } => "Stage",
        Request::Mirror { .. } => "Mirror",
        Request::Activate { .. } => "Activate",
        Request::ListReleases => "ListReleases",
        Request::Rollback { .. } => "Rollback",
        Request::Prune { .. } => "Prune",
        Request::Clear => "Clear",
    }
}

/// CPU time (user + system) and peak RSS of this process so far.
fn process_usage() -> Usage {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes the struct it is given, which lives on this stack and is
    // read only when the call succeeded.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } != 0 {
        return Usage::default();
    }
    // SAFETY: initialized by the successful call above (and zeroed before).
    let u = unsafe { u.assume_init() };
    let micros = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    Usage {
        cpu_micros: micros(u.ru_utime) + micros(u.ru_stime),
        peak_rss_kib: u64::try_from(u.ru_maxrss).unwrap_or(0),
    }
}

fn panicked(what: &str) -> Event {
    Event::Failed {
        kind: ErrorKind::Internal,
        message: format!("{what} failed unexpectedly; see the daemon log"),
    }
}
