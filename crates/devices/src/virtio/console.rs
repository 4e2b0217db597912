//! virtio-console (virtio 1.2, 5.3) with one port and no MULTIPORT: queue 0 (receiveq) carries
//! host input to the guest, queue 1 (transmitq) guest output to the host. Linux shows it as
//! `hvc0`.
//!
//! Output: the readable bytes of each transmit chain go to a writer (stdout, a file, a sink),
//! which is flushed once at the end of each processed batch, so a burst costs one flush and a
//! prompt without a newline still shows up at once. A chain whose buffers are not all readable
//! by the device is dropped whole (debug log), so a bad chain never leaves half a line.
//!
//! Input follows the UART's flow control ([`crate::legacy::Serial::enqueue`]): the VMM offers
//! bytes with [`Console::enqueue`], which takes what fits in the receive buffers the guest has
//! posted and returns how many; the caller keeps the rest. When it could not take everything,
//! the device asks the driver to notify when it posts more buffers, and the next notification
//! of queue 0 raises the `input_room` line, so the event loop knows when to offer the rest:
//! nothing is lost, nothing is polled. Receive buffers are only taken from the ring when there
//! are bytes for them.
//!
//! Configuration space: `cols`, `rows` (valid with VIRTIO_CONSOLE_F_SIZE, offered when the size
//! is known), `max_nr_ports` (1) and the write-only `emerg_wr` (VIRTIO_CONSOLE_F_EMERG_WRITE,
//! when enabled): a byte written there goes straight to the output, even before the driver is
//! ready.
//!
//! For `--console tty` the VMM gives this device stdout and stdin. With the UART on the
//! terminal too, stdin should go to one of them only (two readers of one terminal split the
//! keystrokes between two shells): to this console, the one the user asked for and the one a
//! guest runs its login on (`console=hvc0`, the UART keeping early boot messages).

use std::io::{self, Write};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};

use super::dma::{Access, DmaSnapshot};
use super::features::bit;
use super::queue::{Chain, FillEnd, QueueError, fill, parse_chain};
use super::{ActivateError, DmaSpace, VirtioCommon, VirtioDevice, VirtioInterrupt};
use crate::interrupt::IrqLine;

/// Largest queue the driver may set up.
pub const QUEUE_SIZE: u16 = 256;
/// receiveq of port 0: host to guest.
pub const RX_QUEUE: u16 = 0;
/// transmitq of port 0: guest to host.
pub const TX_QUEUE: u16 = 1;

/// Feature bits (virtio 1.2, 5.3.3). MULTIPORT (1) is not offered.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// `struct virtio_console_config`: cols (le16), rows (le16), max_nr_ports (le32),
/// emerg_wr (le32).
const CONFIG_LEN: usize = 12;
const EMERG_WR: u64 = 8;
/// Most descriptors a chain may have.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Guest output is copied through a buffer of this size.
const CHUNK: usize = 4096;

/// What the device offers beyond a plain port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Terminal size as (cols, rows), if known: offers VIRTIO_CONSOLE_F_SIZE. Update it with
    /// [`Console::set_size`].
    pub size: Option<(u16, u16)>,
    /// Offer VIRTIO_CONSOLE_F_EMERG_WRITE (output through the configuration space).
    pub emerg_write: bool,
}

/// The writer, and whether it holds bytes not yet flushed.
struct Output {
    inner: Box<dyn Write + Send>,
    dirty: bool,
}

impl Output {
    /// The writer's errors mean lost output; the guest cannot be stalled for them, so go on.
    fn put(&mut self, bytes: &[u8]) {
        self.dirty = true;
        if let Err(e) = self.inner.write_all(bytes) {
            tracing::debug!("virtio-console: output lost: {e}");
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.dirty) {
            self.inner.flush()
        } else {
            Ok(())
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

pub struct Console {
    common: VirtioCommon,
    cols: u16,
    rows: u16,
    emerg_write: bool,
    output: Output,
    /// Raised once the guest posts receive buffers after a short [`Console::enqueue`].
    input_room: Option<Arc<dyn IrqLine>>,
    /// A short enqueue is waiting for receive buffers.
    room_wanted: bool,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("common", &self.common)
            .field("size", &(self.cols, self.rows))
            .field("room_wanted", &self.room_wanted)
            .finish()
    }
}

impl Console {
    /// Guest output goes to `output`; `input_room` (optional) is raised when the guest posts
    /// receive buffers after an [`enqueue`](Self::enqueue) that could not take all its bytes.
    pub fn new(
        output: Box<dyn Write + Send>,
        input_room: Option<Arc<dyn IrqLine>>,
        options: ConsoleOptions,
    ) -> Self {
        let mut features = 0;
        if options.size.is_some() {
            features |= bit(VIRTIO_CONSOLE_F_SIZE);
        }
        if options.emerg_write {
            features |= bit(VIRTIO_CONSOLE_F_EMERG_WRITE);
        }
        let (cols, rows) = options.size.unwrap_or((0, 0));
        Self {
            common: VirtioCommon::new(VIRTIO_ID_CONSOLE, vec![QUEUE_SIZE, QUEUE_SIZE], features),
            cols,
            rows,
            emerg_write: options.emerg_write,
            output: Output {
                inner: output,
                dirty: false,
            },
            input_room,
            room_wanted: false,
            scratch: Vec::new(),
        }
    }

    /// The terminal was resized (SIGWINCH): update `cols`/`rows` and tell the driver if it
    /// negotiated VIRTIO_CONSOLE_F_SIZE.
    pub fn set_size(&mut self, cols: u16, rows: u16) {
        if (cols, rows) == (self.cols, self.rows) {
            return;
        }
        self.cols = cols;
        self.rows = rows;
        if self.common.has_feature(bit(VIRTIO_CONSOLE_F_SIZE)) {
            if let Some(irq) = self.common.interrupt() {
                irq.signal_config();
            }
        }
    }

    /// Whether a short [`enqueue`](Self::enqueue) is waiting for the guest to post receive
    /// buffers (`input_room` fires when it does).
    pub fn input_wanted(&self) -> bool {
        self.room_wanted
    }

    /// Offer input to the guest: takes as many bytes as fit in the receive buffers the guest
    /// has posted and returns how many; the caller keeps the rest and offers it again once
    /// `input_room` fires. Takes nothing while the device is not active.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let taken = self.receive(bytes);
        self.room_wanted = taken < bytes.len();
        taken
    }

    /// Flush guest output still buffered in the writer.
    pub fn flush_output(&mut self) -> io::Result<()> {
        self.output.flush()
    }

    fn signal_room(&mut self) {
        if std::mem::take(&mut self.room_wanted) {
            if let Some(line) = &self.input_room {
                if let Err(e) = line.trigger() {
                    tracing::debug!("virtio-console: cannot signal input room: {e}");
                }
            }
        }
    }

    /// Fill receive buffers from `bytes`; returns how many bytes the guest got.
    fn receive(&mut self, bytes: &[u8]) -> usize {
        // Buffers are taken when the host has input, not when the driver notifies.
        let mut taken = 0usize;
        self.common.serve(RX_QUEUE, |queue, snapshot| {
            let mut used = false;
            fill_receive_buffers(queue, snapshot, bytes, &mut taken, &mut used)?;
            Ok(used)
        });
        taken
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..2].copy_from_slice(&self.cols.to_le_bytes());
        c[2..4].copy_from_slice(&self.rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        // emerg_wr reads as zero.
        c
    }
}

/// Pop receive chains and fill them from `bytes[*taken..]` until the bytes or the chains run
/// out. Out of chains with bytes left, notifications are turned on so that the driver kicks
/// when it posts more; with every byte delivered, they are turned off (no wake-ups for buffers
/// nobody waits for). The ring checks are [`fill`]'s.
fn fill_receive_buffers(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    bytes: &[u8],
    taken: &mut usize,
    used: &mut bool,
) -> Result<(), QueueError> {
    // The bytes of the last chain count once it is back with the driver: `want` runs after
    // every add_used, so it adds them (a ring fault in add_used leaves them out).
    let mut last = 0usize;
    let mut state = (taken, &mut last);
    let end = fill(
        queue,
        dma,
        &mut state,
        used,
        |(taken, last)| {
            **taken += std::mem::take(*last);
            (**taken < bytes.len()).then_some(())
        },
        |(taken, last), (), chain| {
            let n = deliver(dma, chain, &bytes[**taken..]);
            // n <= the bytes offered.
            **last = usize::try_from(n).unwrap_or(0);
            Some(n)
        },
    )?;
    if end == FillEnd::Satisfied {
        queue
            .disable_notification(dma.memory())
            .map_err(QueueError::Ring)?;
    }
    Ok(())
}

/// Write the front of `data` into one receive chain; returns how many bytes it got. A chain
/// without writable buffers, or a malformed one, gets none (debug log).
fn deliver(dma: &DmaSnapshot, chain: Chain<'_>, data: &[u8]) -> u32 {
    let head = chain.head_index();
    let buffers = match parse_chain(chain, MAX_DESCRIPTORS) {
        Ok(b) => b,
        Err(fault) => {
            tracing::debug!(head, "virtio-console: receive chain: {}", fault.error);
            return 0;
        }
    };
    if !buffers.readable.is_empty() {
        tracing::debug!(
            head,
            len = buffers.readable.len(),
            "virtio-console: readable bytes in a receive chain ignored"
        );
    }
    // The used length is a u32.
    let data = &data[..data.len().min(u32::MAX as usize)];
    let mut done = 0usize;
    for r in buffers.writable.ranges() {
        if done == data.len() {
            break;
        }
        let n = usize::try_from(r.len)
            .unwrap_or(usize::MAX)
            .min(data.len() - done);
        // Buffer by buffer, so that the used length counts exactly what reached the guest.
        if let Err(e) = dma.write(r.addr, &data[done..done + n]) {
            tracing::debug!(head, "virtio-console: receive buffer: {e}");
            break;
        }
        done += n;
    }
    if buffers.writable.is_empty() {
        tracing::debug!(head, "virtio-console: receive chain has no writable buffer");
    }
    u32::try_from(done).unwrap_or(0)
}

/// Copy one transmit chain to the output. Returns the used length, always 0: the device
/// writes nothing into a transmit buffer.
fn transmit(
    output: &mut Output,
    scratch: &mut Vec<u8>,
    dma: &DmaSnapshot,
    chain: Chain<'_>,
) -> u32 {
    let head = chain.head_index();
    let buffers = match parse_chain(chain, MAX_DESCRIPTORS) {
        Ok(b) => b,
        Err(fault) => {
            tracing::debug!(head, "virtio-console: transmit chain: {}", fault.error);
            return 0;
        }
    };
    if !buffers.writable.is_empty() {
        tracing::debug!(
            head,
            len = buffers.writable.len(),
            "virtio-console: writable bytes in a transmit chain ignored"
        );
    }
    // All or nothing: check every buffer before any byte goes out.
    for r in buffers.readable.ranges() {
        if let Err(e) = dma.check(r.addr, r.len, Access::Read) {
            tracing::debug!(head, "virtio-console: transmit buffer: {e}");
            return 0;
        }
    }
    if scratch.len() < CHUNK {
        scratch.resize(CHUNK, 0);
    }
    for r in buffers.readable.ranges() {
        let mut off = 0u64;
        while off < r.len {
            // Checked above: addr + len does not wrap, and CHUNK fits a u64 and a usize.
            let n = (r.len - off).min(CHUNK as u64);
            let buf = &mut scratch[..usize::try_from(n).unwrap_or(CHUNK)];
            if let Err(e) = dma.read(r.addr + off, buf) {
                // Only a concurrent IOMMU change gets here.
                tracing::debug!(head, "virtio-console: transmit buffer: {e}");
                return 0;
            }
            output.put(buf);
            off += n;
        }
    }
    0
}

impl VirtioDevice for Console {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only emerg_wr is writable; its low byte is the character. The spec allows it at any
        // time once offered (early boot, a broken ring), so neither negotiation nor activation
        // is required.
        let end = offset.saturating_add(data.len() as u64);
        if self.emerg_write && offset <= EMERG_WR && EMERG_WR < end {
            let i = usize::try_from(EMERG_WR - offset).unwrap_or(0);
            self.output.put(&data[i..=i]);
            if let Err(e) = self.output.flush() {
                tracing::debug!("virtio-console: flushing output failed: {e}");
            }
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-console: config write ignored"
            );
        }
    }

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), ActivateError> {
        self.common.activate(queues, interrupt, dma)?;
        // Input offered before the driver was ready: the driver may have posted its receive
        // buffers (and kicked) before DRIVER_OK, when nobody listened. Have it offered again.
        self.signal_room();
        Ok(())
    }

    fn process_queue(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => {
                // The driver posted receive buffers: wake the input pump if it waits for them.
                if self.common.is_active() {
                    self.signal_room();
                }
            }
            TX_QUEUE => {
                let Self {
                    common,
                    output,
                    scratch,
                    ..
                } = self;
                common.process_queue(TX_QUEUE, |dma, chain| transmit(output, scratch, dma, chain));
                if let Err(e) = self.output.flush() {
                    tracing::debug!("virtio-console: flushing output failed: {e}");
                }
            }
            _ => tracing::debug!(queue, "virtio-console: notification for an unknown queue"),
        }
    }
}

#[cfg(test)]
mod tests;
