//! The model thread: a bounded queue per model, dynamic batching, a oneshot reply each.
//!
//! Handlers never run the model. They ask for a permit (admission: when all
//! `queue_capacity` permits are out the request is refused at once, never queued without
//! bound), send a job, and await the reply. One thread per model takes whatever is
//! waiting, up to `max_batch`, and runs it as one batch: batches grow while the model is
//! busy, with no waiting timer. Jobs whose client has gone are skipped.

use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::detector::{Detector, NetworkOutput, Prepared};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model's queue is full")]
    Overloaded,
    #[error("the model thread has stopped")]
    Stopped,
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What the model thread sends back.
#[derive(Debug)]
pub struct Reply {
    /// The network's output; the request assembles its maps ([`Detector::assemble`]).
    pub output: NetworkOutput,
    pub queue_time: Duration,
    pub inference_time: Duration,
    pub batch_size: usize,
}

struct Job {
    /// Held until the model thread is done with the job, so admission bounds the work in
    /// progress even when the client stops waiting.
    _permit: OwnedSemaphorePermit,
    prepared: Arc<Prepared>,
    detector: Arc<Detector>,
    reply: oneshot::Sender<Result<Reply, EngineError>>,
    enqueued: Instant,
    span: tracing::Span,
}

/// A model with its queue and thread.
pub struct Engine {
    pub name: String,
    /// The detector new requests use, with its artifact version: swapped together.
    current: RwLock<(Arc<Detector>, String)>,
    tx: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl Engine {
    /// Starts the model thread.
    pub fn start(name: &str, detector: Detector, version: &str, max_batch: usize, queue_capacity: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_name = format!("model-{name}");
        let model = name.to_string();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || model_thread(&model, rx, max_batch.max(1)))
            .expect("spawning the model thread");
        Arc::new(Self {
            name: name.to_string(),
            current: RwLock::new((Arc::new(detector), version.to_string())),
            tx,
            permits: Arc::new(Semaphore::new(queue_capacity.max(1))),
            capacity: queue_capacity.max(1),
        })
    }

    /// The detector new requests use and its version, read together.
    pub fn current(&self) -> (Arc<Detector>, String) {
        self.current.read().expect("detector lock").clone()
    }

    /// The detector new requests use.
    pub fn detector(&self) -> Arc<Detector> {
        self.current().0
    }

    /// Swaps in a new detector with its version; requests already queued finish with the
    /// one they started with.
    pub fn replace(&self, detector: Detector, version: String) {
        *self.current.write().expect("detector lock") = (Arc::new(detector), version);
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// Resolves once no request holds a queue slot: every admitted job has been answered
    /// or dropped by the model thread (slots are released only then, even when the client
    /// stopped waiting).
    pub async fn drained(&self) {
        let n = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring cannot fail.
        let _all = self.permits.acquire_many(n).await;
    }

    /// True when every queue slot is taken: a request arriving now would be refused.
    pub fn is_full(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Takes a queue slot, or refuses at once when none is free.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded)
    }

    /// Queues `prepared` (made with `detector`) and waits for the network's output. The
    /// permit travels with the job and is released when the model thread is done with it.
    pub async fn run(
        &self,
        permit: OwnedSemaphorePermit,
        prepared: Arc<Prepared>,
        detector: Arc<Detector>,
    ) -> Result<Reply, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                _permit: permit,
                prepared,
                detector,
                reply,
                enqueued: Instant::now(),
                span: tracing::Span::current(),
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

fn model_thread(model: &str, rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut pending: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    loop {
        // Block for the first job, then take whatever else is waiting.
        if pending.is_empty() {
            match rx.recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => return, // every sender dropped: the engine is gone
            }
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(_) => break,
            }
        }
        pending.retain(|j| !j.reply.is_closed());
        let Some(first) = pending.front() else { continue };
        // One batch shares one detector (a reload may leave two generations queued).
        let detector = first.detector.clone();
        let mut batch = Vec::new();
        let mut rest = std::collections::VecDeque::new();
        while let Some(job) = pending.pop_front() {
            if batch.len() < max_batch && Arc::ptr_eq(&job.detector, &detector) {
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        pending = rest;
        let started = Instant::now();
        let inputs: Vec<&crate::image_io::Planar> = batch.iter().map(|j| &j.prepared.working).collect();
        let result = {
            let _span = batch[0].span.enter();
            // A panic in the model must not end the thread: the batch gets an error instead.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| detector.network(&inputs)))
                .unwrap_or_else(|_| Err(candle_core::Error::Msg("the model panicked".into())))
        };
        let inference_time = started.elapsed();
        let n = batch.len();
        metrics::histogram!(crate::metrics::BATCH_SIZE, "model" => model.to_string()).record(n as f64);
        metrics::histogram!(crate::metrics::INFERENCE_SECONDS, "model" => model.to_string())
            .record(inference_time.as_secs_f64());
        match result {
            Ok(outputs) => {
                for (job, output) in batch.into_iter().zip(outputs) {
                    let _ = job.reply.send(Ok(Reply {
                        output,
                        queue_time: started.duration_since(job.enqueued),
                        inference_time,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(model, error = %e, "inference failed");
                for job in batch {
                    let _ = job.reply.send(Err(EngineError::Inference(e.to_string())));
                }
            }
        }
    }
}
