//! SIGINT and SIGTERM during a long run (Ctrl-C; a batch scheduler's notice before it kills): while
//! armed, the first one only raises a flag, the run writes a checkpoint at its next boundary and stops
//! with one error line; a second one ends the process at once. Unarmed, they end it as by default. A
//! SIGINT ignored when the process started stays ignored.
use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Once;

/// True when a signal must end the process now: not armed, or a signal already came.
static EXIT_NOW: AtomicBool = AtomicBool::new(true);
/// The signal that came while armed (0: none).
static RAISED: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
/// Whether [`arm`] may install handlers: only the CLI's `main` says so ([`enable`]); a library
/// caller (the C ABI, Python) keeps its own signal handling.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Lets [`arm`] install the SIGINT/SIGTERM handlers (the `stuffed` binary calls it first thing).
pub fn enable() {
    ENABLED.store(true, SeqCst);
}

/// Catches SIGINT and SIGTERM until dropped ([`raised`] tells whether one came).
pub struct Armed(());

pub fn arm() -> Armed {
    if !ENABLED.load(SeqCst) {
        return Armed(());
    }
    // Armed before the handlers go in: a signal landing between their installation and these
    // stores used to find EXIT_NOW still true and end the process with 128 + signal (seen once in a
    // clean-clone CI: exit 143 where the checkpoint and exit 1 were due), or had its flag cleared.
    RAISED.store(0, SeqCst);
    EXIT_NOW.store(false, SeqCst);
    INSTALL.call_once(|| {
        for sig in [SIGINT, SIGTERM] {
            // Started with SIGINT ignored (a non-interactive shell does that to its background jobs,
            // so that Ctrl-C stops the script but not them): it stays ignored, as the caller asked.
            if sig == SIGINT && ignored(sig) {
                continue;
            }
            // Order matters: the exit test runs before this signal sets the flag for the next one.
            let ok = signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, &EXIT_NOW).is_ok()
                && signal_hook::flag::register_usize(sig, &RAISED, sig as usize).is_ok()
                && signal_hook::flag::register(sig, &EXIT_NOW).is_ok();
            if !ok {
                eprintln!("stuffed: note: cannot catch signal {sig}; it ends the run without a checkpoint");
            }
        }
    });
    Armed(())
}

/// Whether `sig`'s disposition is SIG_IGN.
fn ignored(sig: i32) -> bool {
    handler(sig) == Some(libc::SIG_IGN)
}

/// `sig`'s handler as the process has it (None if the query fails).
fn handler(sig: i32) -> Option<libc::sighandler_t> {
    // SAFETY: a query (null new action) into a zeroed sigaction.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(sig, std::ptr::null(), &mut old) == 0).then_some(old.sa_sigaction)
    }
}

/// The signal that came while armed, by name, once one did.
pub fn raised() -> Option<&'static str> {
    match RAISED.load(SeqCst) as i32 {
        0 => None,
        SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        EXIT_NOW.store(true, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    fn sigint_handler() -> libc::sighandler_t {
        super::handler(libc::SIGINT).expect("sigaction query")
    }

    /// A library caller's run (the C ABI, Python) installs no handler; the binary's does, except over
    /// an ignored SIGINT (a shell starts background jobs with SIGINT ignored).
    #[test]
    fn only_the_binary_installs_handlers() {
        let inherited = sigint_handler();
        drop(super::arm());
        assert_eq!(sigint_handler(), inherited, "arm() without enable() installed a SIGINT handler");
        super::enable();
        let armed = super::arm();
        let ours = sigint_handler();
        if inherited == libc::SIG_IGN {
            assert_eq!(ours, libc::SIG_IGN, "an ignored SIGINT got a handler (cli.rs tests that case)");
        } else {
            assert!(ours != libc::SIG_DFL && ours != libc::SIG_IGN, "enable() + arm() installed no SIGINT handler");
        }
        drop(armed);
    }
}
