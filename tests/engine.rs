//! The model thread: dynamic batching and skipping jobs whose client has gone.
//! Synchronised by channels with a gated fake model, never by sleeps.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Waker};

use candle_core::{Device, Tensor};
use vigil::detector::Detector;
use vigil::engine::Engine;
use vigil::image_io::Planar;
use vigil::model::artifact::Fit;
use vigil::model::{AnomalyModel, ModelOutput};

/// Reports each batch as it starts, then waits for permission to finish it.
struct Gated {
    images: AtomicUsize,
    batches: Mutex<Vec<usize>>,
    started: Mutex<mpsc::Sender<()>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl AnomalyModel for Gated {
    fn infer(&self, batch: &Tensor) -> candle_core::Result<ModelOutput> {
        let n = batch.dim(0)?;
        self.images.fetch_add(n, Ordering::SeqCst);
        self.batches.lock().unwrap().push(n);
        self.started.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        Ok(ModelOutput {
            reconstruction: (batch.clone() * 1.0)?,
            learned_map: None,
            second_map: None,
        })
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

struct Rig {
    engine: Arc<Engine>,
    model: Arc<Gated>,
    detector: Arc<Detector>,
    started: mpsc::Receiver<()>,
    go: mpsc::Sender<()>,
}

fn setup() -> Rig {
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let model = Arc::new(Gated {
        images: AtomicUsize::new(0),
        batches: Mutex::new(Vec::new()),
        started: Mutex::new(started_tx),
        go: Mutex::new(go_rx),
    });
    let detector = Detector::new(common::test_card(Fit::Whole, 16, 16), model.clone());
    let engine = Engine::start("m", detector, "v", 8, 16);
    let detector = engine.detector();
    Rig {
        engine,
        model,
        detector,
        started,
        go,
    }
}

fn input() -> Arc<vigil::detector::Prepared> {
    Arc::new(vigil::detector::Prepared {
        original_width: 16,
        original_height: 16,
        original_colour: false,
        working: Planar::new(1, 16, 16),
    })
}

/// Polls a future once with a no-op waker: enough for `Engine::run` to queue its job.
fn poll_once<F: Future>(f: &mut Pin<Box<F>>) {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(f.as_mut().poll(&mut cx).is_pending());
}

#[tokio::test]
async fn waiting_jobs_form_one_batch_and_jobs_whose_client_left_are_skipped() {
    let Rig {
        engine,
        model,
        detector: d,
        started,
        go,
    } = setup();
    let run = || Box::pin(engine.run(engine.admit().unwrap(), input(), d.clone()));
    // A occupies the model thread.
    let mut a = run();
    poll_once(&mut a);
    started.recv().unwrap();
    // While A runs, B is queued and its client hangs up; C and D are queued and wait.
    let mut b = run();
    poll_once(&mut b);
    drop(b);
    let mut c = run();
    poll_once(&mut c);
    let mut dd = run();
    poll_once(&mut dd);
    assert_eq!(
        engine.in_flight(),
        4,
        "B's slot is held until the model thread drops its job"
    );
    go.send(()).unwrap(); // A finishes
    started.recv().unwrap(); // the next batch has started
    go.send(()).unwrap();
    let (ra, rc, rd) = (a.await.unwrap(), c.await.unwrap(), dd.await.unwrap());
    assert_eq!(ra.batch_size, 1);
    // C and D ran as one batch; B, whose client left, never ran.
    assert_eq!((rc.batch_size, rd.batch_size), (2, 2));
    assert_eq!(*model.batches.lock().unwrap(), vec![1, 2]);
    assert_eq!(model.images.load(Ordering::SeqCst), 3);
    // Slots come back when the model thread drops the jobs, just after replying.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.in_flight() > 0 {
        assert!(std::time::Instant::now() < deadline, "slots never came back");
        std::thread::yield_now();
    }
}
