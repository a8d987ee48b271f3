//! Closed-loop load for tests that change something under traffic (Redis
//! killed, a configuration reloaded): clients that repeat one request and
//! count the answers that were not 200.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` tasks, client `i` sending `request(i)` until stopped; a
    /// request is good when it answers `true` (a 200, as the caller sees it).
    pub fn start<F, Fut>(clients: usize, request: F) -> Load
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let request = Arc::new(request);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|i| {
                let (stop, done, failed, request) =
                    (stop.clone(), done.clone(), failed.clone(), request.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if !request(i).await {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            failed,
            clients,
        }
    }

    /// Returns once `n` more requests have completed (fails after a minute).
    pub async fn progress(&self, n: u64) {
        let target = self.done.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.done.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "clients stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every client; (requests done, requests failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("load client");
        }
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
