//! The weights a decoded token streams, on 2 MiB pages: over 4 KiB pages, streaming 1 GB a
//! token is a TLB miss every 4 KiB, and transparent huge pages are often `madvise`-only, with
//! nothing madvising a `Vec`. `MADV_COLLAPSE` asks the kernel to copy a buffer onto huge pages
//! now; at 2B-4T that is about 1 GB copied, 2 s of system time, so a background thread does it
//! while the rest of the model loads, and [`wait_for_huge_pages`] waits for the last of it.
//! Best effort: a kernel before 6.1, or without THP, refuses and nothing changes.

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::mpsc::{self, Sender};
    use std::sync::{Condvar, Mutex, OnceLock};

    /// Address ranges waiting for the thread, and how many.
    struct Collapser {
        queue: Mutex<Option<Sender<(usize, usize)>>>,
        pending: Mutex<usize>,
        idle: Condvar,
    }

    fn collapse(start: usize, end: usize) {
        // The uapi value; not every libc crate target defines it.
        const MADV_COLLAPSE: libc::c_int = 25;
        // SAFETY: MADV_COLLAPSE changes how a range is mapped, never what it holds, whatever
        // the range: memory freed (and even reused) since it was queued keeps its contents,
        // and an unmapped range only makes the call fail.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_COLLAPSE) };
    }

    fn collapser() -> &'static Collapser {
        static COLLAPSER: OnceLock<Collapser> = OnceLock::new();
        COLLAPSER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<(usize, usize)>();
            let spawned = std::thread::Builder::new()
                .name("huge-pages".into())
                .spawn(move || {
                    for (start, end) in rx {
                        collapse(start, end);
                        let c = collapser();
                        *c.pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                        c.idle.notify_all();
                    }
                });
            Collapser {
                // Without the thread, each range is collapsed by its caller.
                queue: Mutex::new(spawned.ok().map(|_| tx)),
                pending: Mutex::new(0),
                idle: Condvar::new(),
            }
        })
    }

    pub fn queue(start: usize, end: usize) {
        let c = collapser();
        let queue = c.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = c.pending.lock().unwrap_or_else(|e| e.into_inner());
        match queue.as_ref().map(|tx| tx.send((start, end))) {
            Some(Ok(())) => *pending += 1,
            _ => {
                drop((pending, queue));
                collapse(start, end)
            }
        }
    }

    pub fn wait() {
        let c = collapser();
        let pending = c.pending.lock().unwrap_or_else(|e| e.into_inner());
        drop(c.idle.wait_while(pending, |n| *n > 0));
    }
}

/// The addresses `start..end` of the whole pages of `page` bytes inside `data`, if any: what
/// an `madvise` over `data` may touch without reaching past it.
#[cfg(target_os = "linux")]
pub(crate) fn whole_pages<T>(data: &[T], page: usize) -> Option<(usize, usize)> {
    let begin = data.as_ptr() as usize;
    let (start, end) = (
        begin.next_multiple_of(page),
        (begin + std::mem::size_of_val(data)) / page * page,
    );
    (end > start).then_some((start, end))
}

/// Queues `data`'s whole 2 MiB pages to be moved onto huge pages by the background thread.
pub fn back_with_huge_pages<T>(data: &[T]) {
    #[cfg(target_os = "linux")]
    if let Some((start, end)) = whole_pages(data, 2 << 20) {
        linux::queue(start, end);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// Returns once every buffer queued by [`back_with_huge_pages`] is on huge pages (or refused):
/// a loaded model decodes at full speed from its first token, with no copy beside it.
pub fn wait_for_huge_pages() {
    #[cfg(target_os = "linux")]
    linux::wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_buffers_keep_their_contents() {
        let buffers: Vec<Vec<u64>> = (0..3)
            .map(|b| (0..(3 << 20) / 8).map(|i| i * 7 + b).collect())
            .collect();
        for b in &buffers {
            back_with_huge_pages(b);
        }
        wait_for_huge_pages();
        for (b, buffer) in (0u64..).zip(&buffers) {
            assert!((0u64..).zip(buffer).all(|(i, &v)| v == i * 7 + b));
        }
    }
}
