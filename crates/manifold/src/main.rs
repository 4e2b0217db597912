//! `manifold`: a virtual machine monitor on Linux KVM.
//!
//! Thin on purpose: parse the command line, build the [`api::VmConfig`], set up logging and the
//! terminal, call [`vmm::run`], and turn the outcome into an exit status.
//!
//! # Exit status
//!
//! | status            | meaning                                                                |
//! |-------------------|------------------------------------------------------------------------|
//! | 0                 | the guest shut down, or reset with `--on-reboot exit`; `--help`, `--version` |
//! | 1                 | the VMM failed (error printed with its causes)                         |
//! | 2                 | bad input: unknown flag, malformed value, unreadable or invalid config file, missing or unreadable kernel/initramfs/firmware/disk image, a firmware image of a bad size, and every `vmm::Error` whose `is_bad_input()` is true (e.g. a kernel that is neither ELF nor bzImage, an unopenable serial file, a tap that cannot be opened, a vsock socket that cannot be created) |
//! | `(v << 1) \| 1` & 0xff | the guest wrote `v` to the debug-exit port (as QEMU's isa-debug-exit; always odd, so `v = 0` gives 1) |
//! | 128 + N           | stopped by signal N (SIGINT, SIGTERM, SIGHUP)                          |
//! | 101 or 134        | a bug: manifold panicked (101 in debug builds, 134 = SIGABRT in release, where panics abort) |
//!
//! Every error is one line on stderr: `manifold: error: ...`.

mod terminal;

use std::error::Error;
use std::fs::File;
use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use api::{ConsoleConfig, Overrides, SerialConfig, VmConfig};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::level_filters::LevelFilter;
use vmm::VmOutcome;

/// Exit status for a VMM failure.
const EXIT_VMM_ERROR: u8 = 1;
/// Exit status for bad input; clap uses the same for usage errors.
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "manifold",
    version,
    propagate_version = true,
    about = "A virtual machine monitor on Linux KVM",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM and run it until it ends.
    Run(RunArgs),
}

/// Flags override the config file field by field.
#[derive(Debug, Args)]
struct RunArgs {
    /// Kernel to boot: bzImage or ELF (required unless --firmware or the config file gives a
    /// payload).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// BIOS image to boot instead of a kernel (SeaBIOS bios.bin): a multiple of 64 KiB up to
    /// 16 MiB, mapped so that it ends at 4 GiB and run from the reset vector.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// vCPUs: boot=1..254 [default: boot=1]
    #[arg(long, value_name = "boot=N")]
    cpus: Option<String>,
    /// Guest RAM: size=SIZE in bytes, with an optional K, M or G suffix [default: size=512M]
    #[arg(long, value_name = "size=SIZE")]
    memory: Option<String>,
    /// Serial port (COM1): to this terminal, appended to a file, or nowhere [default: tty]
    #[arg(long, value_name = "tty|file=PATH|off")]
    serial: Option<String>,
    /// What a guest reset does: exit manifold, or restart the VM [default: exit]
    #[arg(long, value_name = "exit|restart")]
    on_reboot: Option<String>,
    /// A virtio-blk disk on a raw image (repeatable). readonly=on: guest writes fail; direct=on:
    /// O_DIRECT; serial=ID: what the guest reads with GET_ID (at most 20 bytes).
    #[arg(
        long,
        value_name = "path=IMG[,readonly=on][,direct=on][,serial=ID][,iommu=on]"
    )]
    disk: Vec<String>,
    /// A virtio-net device on a tap (repeatable): opened, or created if missing (needs
    /// CAP_NET_ADMIN); mac=: the guest's address.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<String>,
    /// A virtio-rng device fed by the host's getrandom, or by the file src= names.
    #[arg(long, value_name = "src=PATH", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
    /// A virtio-console (hvc0): output to this terminal (and stdin to it instead of the serial
    /// port), appended to a file, or no device; iommu=on: behind the virtio-iommu [default: off]
    #[arg(long, value_name = "off|tty|file=PATH[,iommu=on]")]
    console: Option<String>,
    /// A virtio-vsock device: the guest's CID (3 or more) and the Unix socket host programs
    /// connect to (then write `CONNECT <port>`).
    #[arg(long, value_name = "cid=N,socket=PATH")]
    vsock: Option<String>,
    /// A virtio-iommu (and an ACPI VIOT) in front of the devices given iommu=on (--disk, --net,
    /// --rng, --console, --vsock); iommu=on without it is refused.
    #[arg(long)]
    iommu: bool,
    /// Config file: TOML, or JSON if its name ends in .json.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Most verbose log messages shown on stderr.
    #[arg(long, value_name = "LEVEL", value_enum, default_value = "warn")]
    log_level: LogLevel,
    /// Check the configuration, print it as JSON and exit without starting the VM.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        }
    }
}

/// Bad input found before the VM is built.
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error(transparent)]
    Option(#[from] api::OptionError),
    #[error(transparent)]
    Config(#[from] api::ConfigError),
    #[error("Cannot read {what} {}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The {what} {} is not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("Cannot print the configuration")]
    Print(#[source] serde_json::Error),
}

fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(Cli {
            command: Command::Run(args),
        }) => run(args),
        Err(err) => clap_exit(&err),
    }
}

/// Help and version go to stdout with status 0; usage errors become one line with status 2.
fn clap_exit(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;

    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        // `manifold` alone: the full help, on stderr since nothing was done.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(EXIT_BAD_INPUT)
        }
        _ => {
            eprintln!("manifold: error: {}", one_line(&err.render().to_string()));
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// Clap's message is a headline, indented details ("tip: a similar argument exists", "[possible
/// values: ...]"), then usage. Keep the headline and the details, on one line.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let head = lines.next().unwrap_or_default();
    let head = head.strip_prefix("error: ").unwrap_or(head);
    let details: Vec<&str> = lines
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with(' '))
        .map(|l| {
            let l = l.trim();
            // "[possible values: a, b]" reads better without its brackets inside parentheses.
            l.strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .unwrap_or(l)
        })
        .collect();
    if details.is_empty() {
        head.to_owned()
    } else {
        format!("{head} ({})", details.join("; "))
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_logging(args.log_level.into());
    let config = match resolve_config(&args) {
        Ok(config) => config,
        Err(err) => return fail(&err, EXIT_BAD_INPUT),
    };
    if args.dry_run {
        return match serde_json::to_string_pretty(&config) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&InputError::Print(err), EXIT_VMM_ERROR),
        };
    }
    tracing::debug!(?config, "starting");

    let result = {
        // Dropped at the end of this block, before anything is printed.
        let _raw = raw_terminal(&config);
        vmm::run(&config)
    };
    match result {
        Ok(outcome) => {
            tracing::info!(?outcome, "VM ended");
            ExitCode::from(exit_status(outcome))
        }
        Err(err) if err.is_bad_input() => fail(&err, EXIT_BAD_INPUT),
        Err(err) => {
            let status = fail(&err, EXIT_VMM_ERROR);
            // The post-mortem (registers, code bytes) follows the one-line headline.
            if let Some(details) = err.details() {
                for line in details.lines() {
                    eprintln!("  {line}");
                }
            }
            status
        }
    }
}

/// Config file, then flags, then the payload files.
fn resolve_config(args: &RunArgs) -> Result<VmConfig, InputError> {
    let console = args
        .console
        .as_deref()
        .map(api::devices::parse_console_flag)
        .transpose()?;
    let console_iommu = console.as_ref().map(|(_, iommu)| *iommu);
    let overrides = Overrides {
        kernel: args.kernel.clone(),
        initramfs: args.initramfs.clone(),
        cmdline: args.cmdline.clone(),
        firmware: args.firmware.clone(),
        cpus: args.cpus.as_deref().map(str::parse).transpose()?,
        memory: args.memory.as_deref().map(str::parse).transpose()?,
        serial: args.serial.as_deref().map(str::parse).transpose()?,
        on_reboot: args.on_reboot.as_deref().map(str::parse).transpose()?,
        disks: parse_all(&args.disk)?,
        nets: parse_all(&args.net)?,
        rng: args.rng.as_deref().map(str::parse).transpose()?,
        console: console.map(|(c, _)| c),
        vsock: args.vsock.as_deref().map(str::parse).transpose()?,
        console_iommu,
        // Only set when given, so a config file's `iommu = true` stands.
        iommu: args.iommu.then_some(true),
    };
    let config = api::config::build(args.config.as_deref(), overrides)?;
    // Validation left exactly one of the two.
    match &config.payload.firmware {
        Some(firmware) => check_readable("firmware", firmware)?,
        None => check_readable("kernel", &config.payload.kernel)?,
    }
    if let Some(initramfs) = &config.payload.initramfs {
        check_readable("initramfs", initramfs)?;
    }
    for disk in &config.disks {
        check_disk(&disk.path)?;
    }
    Ok(config)
}

/// A repeatable flag: `None` when not given, so that the config file's list stays.
fn parse_all<T: std::str::FromStr>(values: &[String]) -> Result<Option<Vec<T>>, T::Err> {
    if values.is_empty() {
        return Ok(None);
    }
    values
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Open it now: a typo in a path is then reported before any VM is built, and as bad input even on
/// a host where opening /dev/kvm would fail first.
fn check_readable(what: &'static str, path: &Path) -> Result<(), InputError> {
    let unreadable = |source| InputError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = File::open(path)
        .and_then(|f| f.metadata())
        .map_err(unreadable)?;
    if !meta.is_file() {
        return Err(InputError::NotAFile {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// A disk image must open (a block device is fine too); read-write access is checked when the
/// VM is built.
fn check_disk(path: &Path) -> Result<(), InputError> {
    let meta = File::open(path)
        .and_then(|f| f.metadata())
        .map_err(|source| InputError::Unreadable {
            what: "disk image",
            path: path.to_owned(),
            source,
        })?;
    if meta.is_dir() {
        return Err(InputError::NotAFile {
            what: "disk image",
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn init_logging(level: LevelFilter) {
    // Fails only if a subscriber is already set, which nothing else in this process does.
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(level)
        .with_ansi(io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}

/// Raw mode when a guest console (the UART or the virtio-console) is this terminal. A failure
/// only costs line editing, so it is logged, not fatal.
fn raw_terminal(config: &VmConfig) -> Option<terminal::RawTerminal> {
    if config.serial != SerialConfig::Tty && config.console != ConsoleConfig::Tty {
        return None;
    }
    match terminal::RawTerminal::enable() {
        Ok(raw) => {
            tracing::debug!(raw = raw.is_some(), "terminal mode");
            raw
        }
        Err(err) => {
            tracing::warn!("Cannot put the terminal in raw mode: {err}");
            None
        }
    }
}

fn exit_status(outcome: VmOutcome) -> u8 {
    match outcome {
        VmOutcome::Reset | VmOutcome::Shutdown => 0,
        // As QEMU's isa-debug-exit; dropping the high bits is the point.
        VmOutcome::DebugExit(v) => ((v << 1) | 1) as u8,
        VmOutcome::Signal(sig) => 128_i32
            .checked_add(sig)
            .and_then(|s| u8::try_from(s).ok())
            .unwrap_or(EXIT_VMM_ERROR),
    }
}

/// Prints `manifold: error: ...` with the error's causes on one line and returns `status`.
fn fail(err: &dyn Error, status: u8) -> ExitCode {
    let mut line = format!("manifold: error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    // One line even if a cause spans several (a path may hold a newline, too).
    eprintln!("{}", line.replace('\n', " "));
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(VmOutcome::Shutdown), 0);
        assert_eq!(exit_status(VmOutcome::Reset), 0);
        assert_eq!(exit_status(VmOutcome::DebugExit(0)), 1);
        assert_eq!(exit_status(VmOutcome::DebugExit(0x10)), 0x21);
        assert_eq!(exit_status(VmOutcome::DebugExit(0x7f)), 0xff);
        assert_eq!(exit_status(VmOutcome::DebugExit(0x80)), 1);
        assert_eq!(exit_status(VmOutcome::DebugExit(u32::MAX)), 0xff);
        assert_eq!(exit_status(VmOutcome::Signal(libc::SIGINT)), 130);
        assert_eq!(exit_status(VmOutcome::Signal(libc::SIGTERM)), 143);
        assert_eq!(exit_status(VmOutcome::Signal(-200)), EXIT_VMM_ERROR);
        assert_eq!(exit_status(VmOutcome::Signal(i32::MAX)), EXIT_VMM_ERROR);
    }

    #[test]
    fn clap_errors_fold_to_one_line() {
        let rendered = "error: unexpected argument '--kernal' found\n\n  tip: a similar argument \
                        exists: '--kernel'\n\nUsage: manifold run [OPTIONS]\n\nFor more \
                        information, try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "unexpected argument '--kernal' found (tip: a similar argument exists: '--kernel')"
        );
        assert_eq!(one_line("error: bad\n\nUsage: x\n"), "bad");
        assert_eq!(
            one_line("error: invalid value 'x'\n  [possible values: a, b]\n\nFor more"),
            "invalid value 'x' (possible values: a, b)"
        );
        assert_eq!(one_line(""), "");
    }
}
