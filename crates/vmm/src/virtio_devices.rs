//! The virtio devices besides disks: net, rng, console and vsock.
//!
//! Their host backends (taps, the vsock socket, output files) are opened by [`Backends::open`]
//! before KVM is touched, so that a user's mistake (a tap that cannot be opened, a socket in a
//! missing directory) is reported as such. [`VirtioPci::add_devices`] then gives each device a
//! PCI function exactly as a disk gets one ([`VirtioPci::add`]: slot, MSI-X vectors, BARs,
//! queue notifier), plus an event-loop subscriber for its backend where it has one:
//!
//! - virtio-net: the tap fd, watched edge-triggered ([`Net::process_backend`] reads only while
//!   the guest has buffers, so a level-triggered watch would spin).
//! - virtio-vsock: the backend's epoll fd (listener, connections, timer), watched for input.
//! - virtio-console with `--console tty`: stdin, through the same flow-controlled reader as the
//!   UART ([`HostInput`]), which then gets no input.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::virtio::VirtioDevice;
use devices::virtio::console::{Console, ConsoleOptions};
use devices::virtio::net::{Net, NetConfig, Tap, TapError};
use devices::virtio::rng::{EntropySource, FileRandom, HostRandom, Rng};
use devices::virtio::vsock::{Vsock, VsockError};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::serial_input::HostInput;
use crate::virtio_pci::{VirtioPci, VirtioPciWiringError};

pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Cannot open the tap of NIC {index}")]
    Tap {
        index: usize,
        #[source]
        source: TapError,
    },
    #[error("Cannot set up virtio-vsock")]
    Vsock(#[source] VsockError),
    #[error("Cannot open console output {}", .0.display())]
    ConsoleFile(PathBuf, #[source] std::io::Error),
    #[error("Cannot open random source {}", .0.display())]
    RngSource(PathBuf, #[source] std::io::Error),
    #[error("Random source {} is a directory", .0.display())]
    RngSourceDir(PathBuf),
    #[error("Cannot set up {0}")]
    Host(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Pci(#[from] VirtioPciWiringError),
    #[error("Cannot give a net PF its switch port")]
    SwitchPort(#[source] devices::virtio::net::switch::SwitchError),
}

impl DeviceError {
    /// What the user asked for cannot be had: a tap that cannot be opened or created, a vsock
    /// CID or socket path that is refused, an output or source file that does not open.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Tap { source, .. } => !matches!(source, TapError::Ioctl { .. }),
            Self::Vsock(e) => e.is_bad_input(),
            Self::ConsoleFile(..) | Self::RngSource(..) | Self::RngSourceDir(_) => true,
            Self::Pci(e) => e.is_bad_input(),
            Self::Host(..) | Self::SwitchPort(_) => false,
        }
    }
}

/// The console's host side.
struct ConsoleBackend {
    output: Box<dyn Write + Send>,
    /// stdin goes to this console (`--console tty`).
    stdin: bool,
    size: Option<(u16, u16)>,
}

/// Host backends of the configured devices, opened and not yet attached to a VM.
pub struct Backends {
    /// Each NIC's tap, MAC and VFs (0: a plain NIC; more: an SR-IOV PF with a switch).
    nets: Vec<(Tap, Option<[u8; 6]>, u16)>,
    rng: Option<Box<dyn EntropySource>>,
    console: Option<ConsoleBackend>,
    vsock: Option<Vsock>,
    behind: BehindIommu,
}

/// Which devices the user put behind the virtio-iommu (`iommu=on`).
#[derive(Default)]
struct BehindIommu {
    nets: Vec<bool>,
    rng: bool,
    console: bool,
    vsock: bool,
}

impl Backends {
    pub fn open(config: &api::VmConfig) -> Result<Self, DeviceError> {
        let nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(index, net)| {
                let tap =
                    Tap::open(&net.tap).map_err(|source| DeviceError::Tap { index, source })?;
                Ok((tap, net.mac.map(|m| m.0), net.vfs))
            })
            .collect::<Result<_, DeviceError>>()?;
        let rng = config.rng.as_ref().map(open_rng).transpose()?;
        let console = open_console(&config.console)?;
        let vsock = config
            .vsock
            .as_ref()
            .map(|v| Vsock::new(v.cid, &v.socket).map_err(DeviceError::Vsock))
            .transpose()?;
        let behind = BehindIommu {
            nets: config.nets.iter().map(|n| n.iommu).collect(),
            rng: config.rng.as_ref().is_some_and(|r| r.iommu),
            console: config.console_iommu,
            vsock: config.vsock.as_ref().is_some_and(|v| v.iommu),
        };
        Ok(Self {
            nets,
            rng,
            console,
            vsock,
            behind,
        })
    }
}

fn open_rng(config: &api::RngConfig) -> Result<Box<dyn EntropySource>, DeviceError> {
    let Some(path) = &config.src else {
        return Ok(Box::new(HostRandom));
    };
    let err = |e| DeviceError::RngSource(path.clone(), e);
    let file = File::open(path).map_err(err)?;
    if file.metadata().map_err(err)?.is_dir() {
        return Err(DeviceError::RngSourceDir(path.clone()));
    }
    Ok(Box::new(FileRandom(file)))
}

fn open_console(config: &api::ConsoleConfig) -> Result<Option<ConsoleBackend>, DeviceError> {
    Ok(match config {
        api::ConsoleConfig::Off => None,
        api::ConsoleConfig::Tty => {
            // Unbuffered, like the UART's: the device flushes once per batch anyway.
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| DeviceError::Host("stdout", e))?;
            Some(ConsoleBackend {
                output: Box::new(File::from(fd)),
                stdin: true,
                size: terminal_size(),
            })
        }
        api::ConsoleConfig::File(path) => Some(ConsoleBackend {
            output: Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| DeviceError::ConsoleFile(path.clone(), e))?,
            ),
            stdin: false,
            size: None,
        }),
    })
}

/// The size of the terminal on stdin, if it is one: (cols, rows).
fn terminal_size() -> Option<(u16, u16)> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    // SAFETY: winsize is plain data; all zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(stdin.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

impl VirtioPci<'_> {
    /// Put every device of `backends` on PCI (NICs in order, then rng, console, vsock) and
    /// return the event-loop subscribers that serve them.
    pub fn add_devices(&mut self, backends: Backends) -> Result<Vec<Subscriber>, DeviceError> {
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut push_notifier = |s: crate::virtio_pci::QueueNotifier| {
            subscribers.push(Arc::new(Mutex::new(s)));
        };
        let mut backend_subs: Vec<Subscriber> = Vec::new();

        let behind = backends.behind;
        for (index, (tap, mac, vfs)) in backends.nets.into_iter().enumerate() {
            let iommu = behind.nets.get(index).copied().unwrap_or(false);
            if vfs > 0 {
                let (notifier, subs) = self.add_net_pf(tap, mac, vfs, iommu)?;
                push_notifier(notifier);
                backend_subs.extend(subs);
                continue;
            }
            let name = tap.name().to_owned();
            let net = Arc::new(Mutex::new(Net::new(tap, NetConfig { mac, mtu: None })));
            let device: Arc<Mutex<dyn VirtioDevice>> = net.clone();
            let (bdf, notifier) = self.add_endpoint(device, iommu)?;
            tracing::debug!(%bdf, tap = %name, "virtio-net");
            push_notifier(notifier);
            let fd = lock(&net).backend_fd();
            backend_subs.push(BackendWatcher::subscriber(fd, true, move || {
                lock(&net).process_backend();
            }));
        }

        if let Some(source) = backends.rng {
            let device: Arc<Mutex<dyn VirtioDevice>> =
                Arc::new(Mutex::new(Rng::with_source(source)));
            let (bdf, notifier) = self.add_endpoint(device, behind.rng)?;
            tracing::debug!(%bdf, "virtio-rng");
            push_notifier(notifier);
        }

        if let Some(console) = backends.console {
            let room = Arc::new(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::Host("eventfd", e))?,
            );
            let options = ConsoleOptions {
                size: console.size,
                emerg_write: true,
            };
            let dev = Arc::new(Mutex::new(Console::new(
                console.output,
                console
                    .stdin
                    .then(|| room.clone() as Arc<dyn devices::interrupt::IrqLine>),
                options,
            )));
            let device: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
            let (bdf, notifier) = self.add_endpoint(device, behind.console)?;
            tracing::debug!(%bdf, "virtio-console");
            push_notifier(notifier);
            if console.size.is_some() {
                // The size is only known (and only changes) on a terminal.
                match ConsoleResize::new(dev.clone()) {
                    Ok(resize) => backend_subs.push(Arc::new(Mutex::new(resize))),
                    Err(e) => tracing::warn!("virtio-console: size changes not followed: {e}"),
                }
            }
            if console.stdin {
                backend_subs.push(Arc::new(Mutex::new(HostInput::new(
                    dev,
                    libc::STDIN_FILENO,
                    room,
                ))));
            }
        }

        if let Some(vsock) = backends.vsock {
            let cid = vsock.guest_cid();
            let fd = vsock.backend_fd();
            let vsock = Arc::new(Mutex::new(vsock));
            let device: Arc<Mutex<dyn VirtioDevice>> = vsock.clone();
            let (bdf, notifier) = self.add_endpoint(device, behind.vsock)?;
            tracing::debug!(%bdf, cid, "virtio-vsock");
            push_notifier(notifier);
            backend_subs.push(BackendWatcher::subscriber(fd, false, move || {
                lock(&vsock).process_backend();
            }));
        }

        subscribers.extend(backend_subs);
        Ok(subscribers)
    }
}

/// Watches a device backend's fd in the event loop and lets the device serve it, under the
/// device's lock. The closure holds the device, so the fd stays open while it is watched.
pub struct BackendWatcher {
    fd: RawFd,
    edge: bool,
    process: Box<dyn FnMut() + Send>,
}

impl BackendWatcher {
    pub(crate) fn subscriber(
        fd: RawFd,
        edge: bool,
        process: impl FnMut() + Send + 'static,
    ) -> Subscriber {
        Arc::new(Mutex::new(Self {
            fd,
            edge,
            process: Box::new(process),
        }))
    }
}

impl MutEventSubscriber for BackendWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        (self.process)();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut set = EventSet::IN;
        if self.edge {
            set |= EventSet::EDGE_TRIGGERED;
        }
        if let Err(e) = ops.add(Events::new_raw(self.fd, set)) {
            tracing::error!(?e, fd = self.fd, "cannot watch a device backend");
        }
    }
}

/// Follows the terminal's size (SIGWINCH, read through a signalfd) into the console's config
/// space.
struct ConsoleResize {
    console: Arc<Mutex<Console>>,
    fd: OwnedFd,
}

impl ConsoleResize {
    /// Blocks SIGWINCH in this thread, and so in the vCPU threads it spawns later, so that only
    /// the signalfd sees it.
    fn new(console: Arc<Mutex<Console>>) -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data that sigemptyset initialises.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t and SIGWINCH a valid signal.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGWINCH);
        }
        // SAFETY: valid set pointer; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: valid set pointer; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { console, fd })
    }
}

impl MutEventSubscriber for ConsoleResize {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // Drain every pending SIGWINCH; only the size now matters.
        // SAFETY: each read writes at most `len` bytes into `info`, which is that large.
        while unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&raw mut info).cast::<libc::c_void>(),
                len,
            )
        } > 0
        {}
        if let Some((cols, rows)) = terminal_size() {
            tracing::debug!(cols, rows, "virtio-console: terminal resized");
            lock(&self.console).set_size(cols, rows);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!(?e, "cannot watch SIGWINCH");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(config: api::VmConfig) -> Result<Backends, DeviceError> {
        Backends::open(&config)
    }

    #[test]
    fn backends_that_cannot_be_had_are_bad_input() {
        let err = open(api::VmConfig {
            rng: Some(api::RngConfig {
                src: Some("/nonexistent/random".into()),
                iommu: false,
            }),
            ..Default::default()
        })
        .err()
        .expect("missing source");
        assert!(matches!(err, DeviceError::RngSource(..)) && err.is_bad_input());

        let err = open(api::VmConfig {
            console: api::ConsoleConfig::File("/nonexistent/hvc0.log".into()),
            ..Default::default()
        })
        .err()
        .expect("missing directory");
        assert!(matches!(err, DeviceError::ConsoleFile(..)) && err.is_bad_input());

        let err = open(api::VmConfig {
            vsock: Some(api::VsockConfig {
                cid: 3,
                socket: "/nonexistent/v.sock".into(),
                iommu: false,
            }),
            ..Default::default()
        })
        .err()
        .expect("missing directory");
        assert!(matches!(err, DeviceError::Vsock(_)) && err.is_bad_input());

        // An over-long name is refused before any syscall; `lo` is no tap (or, without rights
        // to /dev/net/tun, the tap cannot be opened at all).
        for tap in ["sixteen-bytes-xx", "lo"] {
            let nets = vec![api::NetConfig {
                tap: tap.into(),
                ..Default::default()
            }];
            let err = open(api::VmConfig {
                nets,
                ..Default::default()
            })
            .err()
            .expect("bad taps");
            assert!(
                matches!(err, DeviceError::Tap { index: 0, .. }) && err.is_bad_input(),
                "{err}"
            );
        }

        // A failure after the tap opened is the host's, not the user's.
        let host = DeviceError::Tap {
            index: 0,
            source: TapError::Ioctl {
                name: "t".into(),
                what: "TUNSETOFFLOAD",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            },
        };
        assert!(!host.is_bad_input());
        assert!(
            !DeviceError::Host("eventfd", std::io::Error::from_raw_os_error(libc::EMFILE))
                .is_bad_input()
        );
    }

    #[test]
    fn nothing_configured_opens_nothing() {
        let b = open(api::VmConfig::default()).expect("no devices");
        assert!(b.nets.is_empty() && b.rng.is_none() && b.console.is_none() && b.vsock.is_none());
    }

    #[test]
    fn rng_from_a_file() {
        let b = open(api::VmConfig {
            rng: Some(api::RngConfig {
                src: Some("/dev/urandom".into()),
                iommu: false,
            }),
            ..Default::default()
        })
        .expect("urandom");
        let mut src = b.rng.expect("source");
        let mut buf = [0u8; 64];
        src.fill(&mut buf).expect("read");
        assert!(buf.iter().any(|&b| b != 0));
        let err = open(api::VmConfig {
            rng: Some(api::RngConfig {
                src: Some("/".into()),
                iommu: false,
            }),
            ..Default::default()
        })
        .err()
        .expect("directory");
        assert!(matches!(err, DeviceError::RngSourceDir(_)));
    }
}
