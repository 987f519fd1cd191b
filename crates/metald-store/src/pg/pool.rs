//! The threads that own [`super::PgStore`]'s connections.
//!
//! rust-postgres's synchronous `Client` drives its connection with a tokio runtime of its own
//! and panics when called from inside another runtime, which is where the store's callers run.
//! So each connection lives on a plain thread of ours; a call sends that thread a job and
//! blocks on the answer. (The async client would need an async store interface, which the
//! daemon's synchronous store calls do not have.)

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::StoreError;

/// Connection attempts per call before the call fails, with doubling pauses from
/// [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]: about 3 s in all, the time a restart takes.
const CONNECT_ATTEMPTS: u32 = 9;
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// Times a job is run again after its connection broke.
const LOST_CONNECTION_RETRIES: u32 = 3;
/// Times a job is run again after a serialization failure or a deadlock.
const CONFLICT_RETRIES: u32 = 20;

/// What a job knows about the attempts before it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Attempt {
    /// An earlier attempt lost its connection, maybe while its COMMIT was under way: what it
    /// wrote may have committed. An insert then takes its own identical row as done.
    pub lost_connection: bool,
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A fixed set of worker threads, each with one connection, taking jobs from one queue.
pub(super) struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `size` workers for the database `config` names. They connect on their first job.
    pub(super) fn start(
        config: postgres::Config,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
        size: usize,
    ) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut workers = Vec::with_capacity(size);
        for n in 0..size {
            let queue = Arc::clone(&queue);
            let mut worker = Worker {
                config: config.clone(),
                tls: tls.clone(),
                client: None,
            };
            let handle = std::thread::Builder::new()
                .name(format!("metald-pg-{n}"))
                .spawn(move || loop {
                    // Held only while waiting: the job runs with the queue free for others. A
                    // panic elsewhere cannot leave a receiver half-used, so poison is harmless.
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(&mut worker),
                        // The store is gone.
                        Err(mpsc::RecvError) => break,
                    }
                })
                .map_err(|source| StoreError::PgWorker { source })?;
            workers.push(handle);
        }
        Ok(Self {
            jobs: Some(jobs),
            workers,
        })
    }

    /// Runs `job` on a worker's connection and waits for its result. The job runs again (with
    /// what [`Attempt`] says) after a serialization failure or deadlock, and after its
    /// connection broke, on a new connection; a bounded number of times each.
    pub(super) fn run<R, F>(&self, job: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&mut Client, Attempt) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |worker: &mut Worker| {
            // The caller waits on `answer` until it gets this; if it is gone (it cannot be
            // while it waits), nobody needs the result.
            if let Err(mpsc::SendError(unwanted)) = reply.send(worker.run(job)) {
                drop(unwanted);
            }
        });
        self.jobs
            .as_ref()
            .ok_or(StoreError::PgWorkersGone)?
            .send(job)
            .map_err(|_| StoreError::PgWorkersGone)?;
        // No answer means the worker died running the job (a panic).
        answer.recv().map_err(|_| StoreError::PgWorkersGone)?
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the queue ends each worker after its current job; joined, their connections
        // are closed before the store is reported dropped.
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            if let Err(panic) = w.join() {
                // Its job's caller got `PgWorkersGone`; nothing is left to clean up.
                drop(panic);
            }
        }
    }
}

/// One worker's connection, made again when it breaks.
struct Worker {
    config: postgres::Config,
    /// TLS to the server, when the operator gave the CA its certificate chains to.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    client: Option<Client>,
}

impl Worker {
    fn run<R>(
        &mut self,
        mut job: impl FnMut(&mut Client, Attempt) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut attempt = Attempt::default();
        let (mut lost, mut conflicts) = (0, 0);
        loop {
            let client = self.connected()?;
            let err = match job(client, attempt) {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if client.is_closed() || lost_connection(&err) {
                self.client = None;
                if lost >= LOST_CONNECTION_RETRIES {
                    return Err(err);
                }
                lost += 1;
                attempt.lost_connection = true;
            } else if conflict(&err) && conflicts < CONFLICT_RETRIES {
                conflicts += 1;
                // Short and staggered by attempt, so the conflicting transactions part ways.
                std::thread::sleep(Duration::from_millis(1 + (u64::from(conflicts) * 7) % 23));
            } else {
                return Err(err);
            }
        }
    }

    /// The worker's connection, made (again) if there is none, with a few paced attempts: a
    /// server that is restarting refuses connections for a moment.
    fn connected(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut pause = FIRST_BACKOFF;
            let mut tries = 0;
            let client = loop {
                let connected = match &self.tls {
                    Some(tls) => self.config.connect(tls.clone()),
                    None => self.config.connect(NoTls),
                };
                match connected {
                    Ok(c) => break c,
                    Err(source) => {
                        tries += 1;
                        if tries >= CONNECT_ATTEMPTS {
                            return Err(StoreError::Postgres {
                                op: "connect",
                                source,
                            });
                        }
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(MAX_BACKOFF);
                    }
                }
            };
            self.client = Some(client);
        }
        self.client.as_mut().ok_or(StoreError::PgWorkersGone)
    }
}

/// The error's SQLSTATE, if PostgreSQL sent one.
fn sqlstate(err: &StoreError) -> Option<&str> {
    match err {
        StoreError::Postgres { source, .. } => source.code().map(|c| c.code()),
        _ => None,
    }
}

/// Whether the connection broke under the job: closed, an I/O error, or the server shutting
/// down or starting up (SQLSTATE class 08, 57P01 to 57P03).
fn lost_connection(err: &StoreError) -> bool {
    let StoreError::Postgres { source, .. } = err else {
        return false;
    };
    if source.is_closed() {
        return true;
    }
    if let Some(code) = sqlstate(err) {
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>())
}

/// Whether the job lost a race it may win when run again: a serialization failure (40001) or
/// a deadlock (40P01).
fn conflict(err: &StoreError) -> bool {
    matches!(sqlstate(err), Some("40001" | "40P01"))
}
