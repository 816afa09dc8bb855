//! A deadline on one reusable timer, for the waits that repeat per request on a connection.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// A deadline on one reusable timer: moving it later costs a store, and the timer is re-registered
/// only when it fires early or must fire sooner, not once per request.
pub(crate) struct LazyDeadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl LazyDeadline {
    pub(crate) fn new(at: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    pub(crate) fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Resolves once the deadline has passed.
    pub(crate) async fn expired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
    }
}
