//! The main thread: one event loop for host input, signals and VM control, while the vCPU
//! threads run the guest.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::control::Control;
use crate::{Error, VmOutcome, builder};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Host signals that stop the VM, read through a signalfd so that no handler runs at an
/// arbitrary point.
pub struct Signals {
    fd: Arc<OwnedFd>,
    /// The first stop signal read, 0 if none: it outlives the VM it arrived in, so that a
    /// signal racing a guest reset is not lost to `--on-reboot restart`.
    received: Arc<AtomicI32>,
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl Signals {
    /// Block the stop signals in this thread (and so in every thread it spawns from now on),
    /// route them to a signalfd, and install the vCPU kick handler.
    pub fn install() -> Result<Self, Error> {
        let err = |what| move |e| Error::Host(what, e);
        register_signal_handler(SIGRTMIN(), crate::vcpu::kick_handler)
            .map_err(|e| Error::Host("vCPU kick signal", e.into()))?;
        // An inherited "ignore" would discard SIGTERM before the signalfd sees it, and then
        // nothing could stop the VM politely. SIGINT and SIGHUP keep what the parent chose
        // (background jobs, nohup).
        // SAFETY: setting the default disposition of a valid signal.
        if unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(err("SIGTERM disposition")(std::io::Error::last_os_error()));
        }
        // SAFETY: sigset_t is plain data that sigemptyset initialises.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: valid set pointer; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(err("signal mask")(std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: valid set pointer; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(err("signalfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd: Arc::new(fd),
            received: Arc::new(AtomicI32::new(0)),
        })
    }

    /// The stop signal received so far, if any.
    pub fn received(&self) -> Option<i32> {
        Some(self.received.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }
}

/// The next pending stop signal on a signalfd, if any.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let len = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `len` bytes into `info`, which is that large.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast::<libc::c_void>(), len) };
    (usize::try_from(n) == Ok(len)).then(|| i32::try_from(info.ssi_signo).unwrap_or(0))
}

/// Watches the control eventfd and the signalfd.
struct ControlSubscriber {
    control: Arc<Control>,
    signals: Arc<OwnedFd>,
    received: Arc<AtomicI32>,
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signals.as_raw_fd() {
            if let Some(sig) = read_signal(&self.signals) {
                tracing::info!(sig, "stopping on signal");
                let _ = self
                    .received
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
                self.control.finish(Ok(VmOutcome::Signal(sig)));
            }
        } else {
            // The value only says "look at the control state", which the loop does.
            let _ = self.control.wake.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.control.wake.as_raw_fd(), self.signals.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(?e, "cannot watch control fd");
            }
        }
    }
}

/// Build one VM, run it to its end, tear it down.
pub fn run_once(config: &api::VmConfig, signals: &Signals) -> Result<VmOutcome, Error> {
    let control = Arc::new(Control::new().map_err(|e| Error::Host("control eventfd", e))?);
    let built = builder::build(config, control.clone())?;

    let mut em = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
    em.add_subscriber(Arc::new(Mutex::new(ControlSubscriber {
        control: control.clone(),
        signals: signals.fd.clone(),
        received: signals.received.clone(),
    })));
    for s in built.subscribers {
        em.add_subscriber(s);
    }

    let mut threads = Vec::with_capacity(built.vcpus.len());
    for vcpu in built.vcpus {
        let vcpu_control = control.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id))
            // The loop needs little stack; a small one keeps per-vCPU memory down.
            .stack_size(256 << 10)
            .spawn(move || vcpu.run(&vcpu_control));
        match handle {
            Ok(h) => threads.push(h),
            Err(e) => {
                control.finish(Err(Error::Host("vCPU thread", e)));
                break;
            }
        }
    }

    while !control.stopping() {
        if let Err(e) = em.run() {
            control.finish(Err(Error::EventLoop(e)));
        }
    }
    for t in &threads {
        // A thread that already left its loop has no handler to run; ESRCH is fine.
        let _ = t.kill(SIGRTMIN());
    }
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
    drop(em);
    drop(built.vm);
    control
        .take_outcome()
        .unwrap_or(Err(Error::Config("VM stopped without an outcome".into())))
}
