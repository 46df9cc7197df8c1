//! Work on both cores (or a few more) without a thread pool crate: scoped threads pulling
//! item indices from an atomic counter. Results come back in input order; after the first
//! error no new item is started and that error is returned.

use crate::error::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Cores kept free of transaction work (the daemon keeps one for its HTTP API).
static RESERVED_CORES: AtomicUsize = AtomicUsize::new(0);

/// Keeps `n` cores free of worker threads from now on (at least one worker always runs).
pub fn reserve_cores(n: usize) {
    RESERVED_CORES.store(n, Ordering::Relaxed);
}

/// Worker threads: the available cores less the reserved ones, at most 4 (the work is mostly
/// I/O-bound beyond that).
pub fn workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    cores.saturating_sub(RESERVED_CORES.load(Ordering::Relaxed)).clamp(1, 4)
}

/// `f` over `items`, each worker with its own state from `init` (e.g. its own archive reader).
///
/// # Panics
/// If `f` or `init` panics in a worker (the panic is carried to the caller).
pub fn try_map_with<T, S, R>(
    items: &[T],
    init: impl Fn() -> Result<S> + Sync,
    f: impl Fn(&mut S, &T) -> Result<R> + Sync,
) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
{
    let n = workers().min(items.len());
    if n <= 1 {
        let mut state = init()?;
        return items.iter().map(|t| f(&mut state, t)).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let run = || -> Result<Vec<(usize, R)>> {
        let mut state = init()?;
        let mut out = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            match f(&mut state, item) {
                Ok(r) => out.push((i, r)),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(out)
    };
    let results: Vec<Result<Vec<(usize, R)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(run)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    for r in results {
        for (i, v) in r? {
            slots[i] = Some(v);
        }
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("every item was processed when no worker failed"))
        .collect())
}

/// `f` over `items` on several threads.
pub fn try_map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    try_map_with(items, || Ok(()), |(), t| f(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorCode};

    #[test]
    fn results_keep_input_order() {
        let items: Vec<u32> = (0..1000).collect();
        assert_eq!(
            try_map(&items, |x| Ok(x * 2)).unwrap(),
            items.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_error_is_returned_and_stops_new_work() {
        let started = AtomicUsize::new(0);
        let items: Vec<u32> = (0..10_000).collect();
        let r = try_map(&items, |x| {
            started.fetch_add(1, Ordering::Relaxed);
            if *x == 10 { Err(Error::new(ErrorCode::HashMismatch, "boom")) } else { Ok(*x) }
        });
        assert_eq!(r.unwrap_err().code, ErrorCode::HashMismatch);
        assert!(started.load(Ordering::Relaxed) < 10_000, "work continued after the failure");
    }

    #[test]
    fn each_worker_gets_its_own_state() {
        let inits = AtomicUsize::new(0);
        let items: Vec<u32> = (0..100).collect();
        let out =
            try_map_with(&items, || Ok(inits.fetch_add(1, Ordering::Relaxed)), |_state, x| Ok(*x))
                .unwrap();
        assert_eq!(out.len(), 100);
        assert!(inits.load(Ordering::Relaxed) <= workers());
    }
}
