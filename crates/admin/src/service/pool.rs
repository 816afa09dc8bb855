//! The threads the control plane's store calls run on, and the one every snapshot is built on
//! ([`builds`]): of their own, below the data plane's priority, so that a burst of admin writes
//! takes the CPU the data plane leaves rather than the CPU it needs (tokio's blocking pool is
//! shared with the data plane's own blocking work, whose priority must not drop).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

/// How much nicer than the data plane (Linux `nice`, 0 to 19): at 15 the scheduler gives these
/// threads about a thirtieth of what a data-plane thread gets when both want the CPU (nothing when
/// the CPU is free). With 8 clients signing up as fast as they can at a million keys on a saturated
/// CPU, 15 kept the data plane's p99 within 2x idle in seven runs of eight (1.2-1.7x; 2.06x once)
/// where 10 let it reach 2.2-2.5x on Redis and 5 2.9x; 19 kept it at 1.0x but a lone signup then
/// waited 85 ms (p99) against 18-32 ms at 15 (BENCHMARKS.md).
const NICER_BY: i32 = 15;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of low-priority threads running jobs in order of arrival.
pub(crate) struct Pool {
    jobs: Mutex<Sender<Job>>,
}

impl Pool {
    /// `threads` threads, named `<name>-<n>`.
    pub(crate) fn new(name: &str, threads: usize) -> Self {
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // A job that panics answers nothing (its caller sees an error); the
                        // thread carries on.
                        let _ = catch_unwind(AssertUnwindSafe(job));
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a control-plane thread");
            }
        }
        Self {
            jobs: Mutex::new(jobs),
        }
    }

    /// Runs `f` on one of the threads; `Err` when it panicked or no thread runs.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.jobs
            .lock()
            .map_err(|_| "the control plane's threads are gone".to_owned())?
            .send(job)
            .map_err(|_| "the control plane's threads are gone".to_owned())?;
        answer
            .await
            .map_err(|_| "a control-plane call failed".to_owned())
    }
}

/// The one thread, for the life of the process, that builds every snapshot: the start's and each
/// write's. glibc gives each thread an arena; built on whichever thread asked, a write's shards went
/// to that thread's arena while the ones they replaced were freed in the start's, where the holes
/// stayed resident and no later build reused them: 1.35x of the start's memory after 4,000 signups
/// at a million keys, growing towards 2x (BENCHMARKS.md). On one thread that lives on, each build
/// reuses what the builds before it freed. (A thread started for each build would not: threads
/// started meanwhile take its arena from glibc's free list.)
pub(crate) fn builds() -> &'static Pool {
    static BUILDS: OnceLock<Pool> = OnceLock::new();
    BUILDS.get_or_init(|| Pool::new("tollgate-build", 1))
}

/// Makes the calling thread nicer than the data plane's (Linux keeps a nice value per thread).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICER_BY) {
        tracing::warn!(error = %e, "could not lower a control-plane thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_nicer_threads_and_survives_a_panic() {
        let pool = Pool::new("test", 2);
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("test-"));
        let nice = pool
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .unwrap()
            .unwrap();
        assert!(nice >= NICER_BY, "nice {nice}");
        assert!(pool.run(|| panic!("a job that fails")).await.is_err());
        assert_eq!(pool.run(|| 42).await, Ok(42), "the threads carry on");
    }

    #[tokio::test]
    async fn every_build_runs_on_one_thread_that_lives_on() {
        let thread = || {
            let t = std::thread::current();
            (t.id(), t.name().map(str::to_owned))
        };
        let first = builds().run(thread).await.unwrap();
        assert_eq!(first.1.as_deref(), Some("tollgate-build-0"));
        assert!(builds().run(|| panic!("a build that fails")).await.is_err());
        // Concurrent callers too, and after a panic.
        let again = futures_util::future::join_all((0..8).map(|_| builds().run(thread))).await;
        assert!(again.into_iter().all(|t| t.as_ref() == Ok(&first)));
        let nice = builds()
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .unwrap()
            .unwrap();
        assert!(nice >= NICER_BY, "nice {nice}");
    }
}
