//! Device request signatures, checked in batches by threads of their own.
//!
//! Checking an ed25519 signature is most of a check-in's cost. Requests that arrive together
//! queue here, and a verifier thread takes everything queued (up to [`MAX_BATCH`]) and checks it
//! with one multiscalar multiplication ([`outpost_protocol::verify_batch`]), about half the work
//! of checking each alone once eight or more wait. A lone request is checked alone, so a quiet hub
//! adds only a thread hop. A bad signature fails only its own request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use outpost_protocol::keys::SignatureBytes;
use outpost_protocol::{verify_batch, BatchItem, PreparedKey};
use tokio::sync::{mpsc, oneshot};

/// Most signatures checked together: past this the saving per signature stops growing, and a
/// batch's wait (about 40 µs a signature on a slow core) starts to show in latency.
pub const MAX_BATCH: usize = 64;
/// Most requests waiting for a verifier; past this a request waits to join the queue.
const QUEUE: usize = 4096;

struct Job {
    message: Vec<u8>,
    signature: SignatureBytes,
    key: PreparedKey,
    answer: oneshot::Sender<bool>,
}

/// The handle requests use; the threads stop once it is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct Verifier {
    jobs: mpsc::Sender<Job>,
    stats: Arc<Stats>,
}

/// What the verifier threads have done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Times a thread took what was queued: signatures per batch is the ratio.
    pub batches: AtomicU64,
    pub signatures: AtomicU64,
}

/// The verifier threads have stopped: only while the hub shuts down.
#[derive(Debug, thiserror::Error)]
#[error("the signature verifier has stopped")]
pub struct Stopped;

impl Verifier {
    /// Starts `threads` verifier threads.
    pub fn start(threads: usize) -> std::io::Result<Verifier> {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        let stats = Arc::new(Stats::default());
        for index in 0..threads.max(1) {
            let (queue, stats) = (queue.clone(), stats.clone());
            thread::Builder::new()
                .name(format!("outpost-verify-{index}"))
                .spawn(move || serve(&queue, &stats))?;
        }
        Ok(Verifier { jobs, stats })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// One verifier thread for every two cores: the other half parse, route and store requests.
    pub fn threads_for_this_machine() -> usize {
        thread::available_parallelism().map_or(1, |cores| cores.get().div_ceil(2))
    }

    /// Whether `signature` by `key` over `message` holds, checked with whatever else is queued.
    pub async fn verify(
        &self,
        message: Vec<u8>,
        signature: SignatureBytes,
        key: PreparedKey,
    ) -> Result<bool, Stopped> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            message,
            signature,
            key,
            answer,
        };
        self.jobs.send(job).await.map_err(|_| Stopped)?;
        answered.await.map_err(|_| Stopped)
    }
}

/// How long a verifier thread keeps looking for the next job, yielding its core to anything
/// else runnable, before it sleeps until one is sent.
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// The next job, or `None` once every handle is gone. Under load the next request arrives within
/// microseconds of a batch being answered; sleeping in between would let the core go idle and
/// cost a wake-up (an inter-processor interrupt, and in a virtual machine an exit) per batch.
fn wait_for_job(queue: &mut mpsc::Receiver<Job>) -> Option<Job> {
    let started = std::time::Instant::now();
    loop {
        match queue.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if started.elapsed() < LINGER => {
                thread::yield_now();
            }
            Err(mpsc::error::TryRecvError::Empty) => return queue.blocking_recv(),
        }
    }
}

fn serve(queue: &Mutex<mpsc::Receiver<Job>>, stats: &Stats) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            // A poisoned lock only means another verifier thread panicked; the queue is intact.
            let mut queue = queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match wait_for_job(&mut queue) {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let items: Vec<BatchItem<'_>> = batch
            .iter()
            .map(|job| BatchItem {
                message: &job.message,
                signature: &job.signature,
                key: &job.key,
            })
            .collect();
        let results = verify_batch(&items);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .signatures
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (job, holds) in batch.drain(..).zip(results) {
            // The request may have timed out and gone; nobody is left to tell.
            let _ = job.answer.send(holds);
        }
    }
}

#[cfg(test)]
mod tests {
    use outpost_protocol::SecretKey;

    use super::*;

    fn job(seed: u8, tamper: bool) -> (Vec<u8>, SignatureBytes, PreparedKey) {
        let key = SecretKey::from_seed([seed; 32]);
        let message = format!("GET /device/v1/artifacts/{seed}").into_bytes();
        let mut signature = key.sign(&message);
        if tamper {
            signature.0[0] ^= 0x40;
        }
        (message, signature, key.public().prepare().unwrap())
    }

    /// Many requests at once, some with bad signatures: each gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_each_get_their_own_answer() {
        let verifier = Verifier::start(2).unwrap();
        let mut tasks = Vec::new();
        for seed in 0..200u8 {
            let verifier = verifier.clone();
            let bad = seed % 7 == 3;
            tasks.push(tokio::spawn(async move {
                let (message, signature, key) = job(seed, bad);
                (bad, verifier.verify(message, signature, key).await.unwrap())
            }));
        }
        for task in tasks {
            let (bad, holds) = task.await.unwrap();
            assert_eq!(holds, !bad);
        }
        let stats = verifier.stats();
        assert_eq!(stats.signatures.load(Ordering::Relaxed), 200);
        assert!(stats.batches.load(Ordering::Relaxed) <= 200);
    }

    #[tokio::test]
    async fn a_lone_request_is_answered() {
        let verifier = Verifier::start(1).unwrap();
        let (message, signature, key) = job(1, false);
        assert!(verifier.verify(message, signature, key).await.unwrap());
        let (message, signature, key) = job(2, true);
        assert!(!verifier.verify(message, signature, key).await.unwrap());
    }
}
