//! Raw mode for the guest console on the host terminal.
//!
//! Keys go to the guest as typed: no line editing, no echo, and Ctrl-C / Ctrl-Z reach the guest
//! instead of stopping manifold (as in Cloud Hypervisor). Output post-processing stays on so that
//! our own log lines still start at column 0. The saved settings come back on every way out:
//! [`RawTerminal`]'s `Drop` on return or error, a panic hook on panic (which also runs when
//! panics abort).

use std::io::{self, IsTerminal};
use std::mem::MaybeUninit;
use std::panic;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

const FD: libc::c_int = libc::STDIN_FILENO;

/// The settings found before raw mode; the panic hook needs them without a `RawTerminal`.
static SAVED: OnceLock<libc::termios> = OnceLock::new();
/// Whether raw mode is on, so that a panic after a normal restore leaves the terminal alone.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

/// Stdin in raw mode until dropped.
#[derive(Debug)]
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal that we own (foreground); `None` otherwise.
    pub fn enable() -> io::Result<Option<Self>> {
        if !io::stdin().is_terminal() || !in_foreground() {
            return Ok(None);
        }
        let saved = get_attr()?;
        let saved = *SAVED.get_or_init(|| saved);
        HOOK.call_once(|| {
            let previous = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        let raw = make_raw(saved);
        ACTIVE.store(true, Ordering::SeqCst);
        if let Err(e) = set_attr(&raw) {
            ACTIVE.store(false, Ordering::SeqCst);
            return Err(e);
        }
        Ok(Some(Self(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts back the saved settings if raw mode is on. Safe to call more than once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        if let Some(saved) = SAVED.get() {
            // Nothing useful to do on failure: we are on the way out.
            let _ = set_attr(saved);
        }
    }
}

/// cfmakeraw(3) minus clearing OPOST.
fn make_raw(mut t: libc::termios) -> libc::termios {
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

/// A background job that changes the terminal gets SIGTTOU and stops: leave it cooked there.
fn in_foreground() -> bool {
    // SAFETY: tcgetpgrp and getpgrp only read process state; an error is a return value.
    unsafe { libc::tcgetpgrp(FD) == libc::getpgrp() }
}

fn get_attr() -> io::Result<libc::termios> {
    let mut t = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: `t` points to writable memory the size of a termios, which tcgetattr fills.
    if unsafe { libc::tcgetattr(FD, t.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr returned 0, so it wrote the whole struct.
    Ok(unsafe { t.assume_init() })
}

fn set_attr(t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` is a valid termios that tcsetattr only reads.
    if unsafe { libc::tcsetattr(FD, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_keeps_output_processing() {
        // SAFETY: termios is plain integers and arrays, for which all zeroes is a valid value.
        let mut cooked: libc::termios = unsafe { std::mem::zeroed() };
        cooked.c_oflag = libc::OPOST | libc::ONLCR;
        cooked.c_lflag = libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN;
        cooked.c_iflag = libc::ICRNL | libc::IXON;
        cooked.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        let raw = make_raw(cooked);
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR);
        assert_eq!(raw.c_lflag, 0);
        assert_eq!(raw.c_iflag, 0);
        assert_eq!(raw.c_cflag, libc::CS8 | libc::CREAD);
        assert_eq!(raw.c_cc[libc::VMIN], 1);
        assert_eq!(raw.c_cc[libc::VTIME], 0);
    }
}
