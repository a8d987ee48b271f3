//! The "stop now" signal every long-running task listens to (mini-redis'
//! shutdown, on a watch channel). A base room: it imports nothing of ours.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// The sender stops everything; dropping it does too.
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub async fn wait(&mut self) {
        // A dropped sender also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
