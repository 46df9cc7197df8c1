//! A background thread's wake-ups: `notify` (new work), `stop` (shutdown) and a sleep that
//! either ends. Shared by the threads that deliver durable outboxes and poll servers (the
//! reporter, the DDI poller and its feedback sender), so that each of them stops at once when
//! idle or backing off, and never holds the lock across I/O.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Signals {
    notified: bool,
    stop: bool,
}

#[derive(Default)]
pub struct Wakeup {
    signals: Mutex<Signals>,
    cv: Condvar,
}

impl Wakeup {
    pub fn stopping(&self) -> bool {
        self.signals.lock().unwrap_or_else(PoisonError::into_inner).stop
    }

    /// New work: ends a `sleep(.., true)` in progress, or the next one at once.
    pub fn notify(&self) {
        self.signals.lock().unwrap_or_else(PoisonError::into_inner).notified = true;
        self.cv.notify_all();
    }

    pub fn stop(&self) {
        self.signals.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        self.cv.notify_all();
    }

    /// Sleeps up to `timeout`; returns `true` when asked to stop. With `wake_on_notify` a
    /// `notify` (also one made before this call) ends the sleep early.
    pub fn sleep(&self, timeout: Duration, wake_on_notify: bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.signals.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if s.stop {
                return true;
            }
            if wake_on_notify && s.notified {
                s.notified = false;
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// A named thread running `work` with a `Wakeup`; stopped and joined on `stop` or drop.
pub struct Worker {
    name: &'static str,
    wakeup: Arc<Wakeup>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread. A thread that cannot start is logged: its work waits in the
    /// journal for the next start.
    pub fn start(name: &'static str, work: impl FnOnce(&Wakeup) + Send + 'static) -> Worker {
        let wakeup = Arc::new(Wakeup::default());
        let for_thread = wakeup.clone();
        let thread = match std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&for_thread))
        {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(thread = name, error = %e, "cannot start a thread; its work waits \
                    in the journal for the next start");
                None
            }
        };
        Worker { name, wakeup, thread }
    }

    /// Wakes the thread if it sleeps idle (never blocks: the lock is never held across I/O).
    pub fn notify(&self) {
        self.wakeup.notify();
    }

    /// Stops the thread and waits for it: at once when it sleeps, else after its request in
    /// progress ends.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.wakeup.stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(thread = self.name, "the thread panicked");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notify_before_the_sleep_ends_it_at_once_and_only_once() {
        let w = Wakeup::default();
        w.notify();
        let t = Instant::now();
        assert!(!w.sleep(Duration::from_secs(10), true));
        assert!(t.elapsed() < Duration::from_secs(5));
        let t = Instant::now();
        assert!(!w.sleep(Duration::from_millis(50), true));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "the notify was consumed by the first sleep"
        );
    }

    #[test]
    fn a_backoff_sleep_ignores_notify_but_not_stop() {
        let w = Wakeup::default();
        w.notify();
        let t = Instant::now();
        assert!(!w.sleep(Duration::from_millis(50), false));
        assert!(t.elapsed() >= Duration::from_millis(50));
        w.stop();
        assert!(w.sleep(Duration::from_secs(10), false));
        assert!(w.stopping());
    }

    #[test]
    fn stopping_a_worker_ends_its_idle_sleep_and_joins_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = Worker::start("test-worker", move |w| {
            let stopped = w.sleep(Duration::from_secs(600), true);
            tx.send(stopped).unwrap();
        });
        let t = Instant::now();
        worker.stop();
        assert!(rx.recv().unwrap(), "the sleep ended for the stop");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
