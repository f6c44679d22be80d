//! The training progress bar and Ctrl-C: the first Ctrl-C or SIGTERM asks the run to stop after
//! its step; a second ends the process.

/// Set by the first Ctrl-C; a run stops after its current step.
pub(crate) static INTERRUPTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(crate) extern "C" fn on_interrupt(_: libc::c_int) {
    // A second Ctrl-C (or SIGTERM) ends the process at once: by its own hand, since as PID 1 (in a
    // container) the default action of both signals is to do nothing.
    if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

pub(crate) fn install_interrupt_handler() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls _exit(), both async-signal-safe.
    // SIGTERM (what `docker stop` and `kill` send) is handled like Ctrl-C.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::signal(
                sig,
                on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// A progress bar with images/s and the loss.
#[derive(Default)]
pub(crate) struct Bar {
    pub(crate) bar: Option<indicatif::ProgressBar>,
}

impl barlow::train::run::Progress for Bar {
    fn stop_requested(&self) -> bool {
        INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn start(&mut self, total: usize, first: usize) {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(first as u64);
        self.bar = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f64, rate: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!(
                "loss {loss:8.2}  {rate:6.0} pairs/s ({:.0} images/s)",
                2.0 * rate
            ));
        }
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            // Drawn bars print above themselves; without a terminal the bar is hidden, and so
            // would its lines be.
            Some(b) if !b.is_hidden() => b.println(text),
            _ => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}
