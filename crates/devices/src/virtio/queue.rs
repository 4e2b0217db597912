//! Serving a split virtqueue with virtio-queue, plus the checks it does not make.
//!
//! What virtio-queue 0.18 checks and what it does not (read from its source):
//!
//! - `Queue::iter` refuses a queue that is not ready and an available index more than the queue
//!   size ahead, but `pop_descriptor_chain` turns those errors, and a failed read of the
//!   available ring, into `None`, which looks like an empty queue. [`drain`] reads the available
//!   index itself and pops exactly that many heads, so a ring fault is an error here.
//! - A chain's iterator stops silently on a loop (it counts down from the queue size), a `next`
//!   index out of range, an unreadable descriptor, a bad indirect table (nested, misaligned,
//!   empty) and a total length over 4 GiB. [`parse_chain`] tells these from a proper end: a
//!   chain ends properly only if its last descriptor has no NEXT flag.
//! - It does not check descriptor order (readable before writable), buffer addresses, or a head
//!   index against the queue size (`add_used` does, too late). Those are checked here or by the
//!   [`DmaSnapshot`] accessors when a buffer is used.

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::dma::{DmaMemory, DmaSnapshot, SgList};

/// A queue the device cannot serve any more: it needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Cannot access the queue's rings")]
    Ring(#[source] virtio_queue::Error),
    #[error("Driver made {pending} buffers available in a queue of {size}")]
    TooManyAvailable { pending: u16, size: u16 },
    #[error("Cannot read available ring entry {index}")]
    AvailEntry { index: u16 },
    #[error("Descriptor head {head} is outside a queue of {size}")]
    BadHead { head: u16, size: u16 },
}

/// A descriptor chain that cannot be used as it stands.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("Descriptor chain is empty or its head is unreadable")]
    Empty,
    #[error(
        "Descriptor chain is cut short (a loop, a bad next index or indirect table, an \
         unreadable descriptor, or over 4 GiB)"
    )]
    Truncated,
    #[error("Descriptor chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("Descriptor chain has a readable descriptor after a writable one")]
    Order,
}

/// The buffers of a well-formed chain: driver-to-device bytes, then device-to-driver bytes.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub readable: SgList,
    pub writable: SgList,
}

/// A chain refused by [`parse_chain`]. `status` is the last byte of the chain's last descriptor
/// when the chain ended properly on a writable descriptor: a device may report an error there.
#[derive(Debug)]
pub struct ChainFault {
    pub error: ChainError,
    pub status: Option<u64>,
}

/// Walk a chain (following an indirect table) into its readable and writable buffers. At most
/// `max_descriptors` are read. Buffer addresses are not checked here: every later access goes
/// through a [`DmaSnapshot`], which does.
pub fn parse_chain<M>(
    chain: DescriptorChain<M>,
    max_descriptors: usize,
) -> Result<ChainBuffers, ChainFault>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut out = ChainBuffers::default();
    let mut count = 0usize;
    let mut last = None;
    let mut order_broken = false;
    for desc in chain {
        count += 1;
        if count > max_descriptors {
            return Err(ChainFault {
                error: ChainError::TooLong(max_descriptors),
                status: None,
            });
        }
        let (addr, len) = (desc.addr().0, u64::from(desc.len()));
        if desc.is_write_only() {
            out.writable.push(addr, len);
        } else {
            order_broken |= !out.writable.is_empty() || last.is_some_and(|(_, _, w, _)| w);
            out.readable.push(addr, len);
        }
        last = Some((addr, len, desc.is_write_only(), desc.has_next()));
    }
    let Some((addr, len, writable, has_next)) = last else {
        return Err(ChainFault {
            error: ChainError::Empty,
            status: None,
        });
    };
    if has_next {
        return Err(ChainFault {
            error: ChainError::Truncated,
            status: None,
        });
    }
    if order_broken {
        // No status byte in a buffer that wraps around the address space.
        let status = (writable && len > 0)
            .then_some(())
            .and_then(|()| addr.checked_add(len - 1));
        return Err(ChainFault {
            error: ChainError::Order,
            status,
        });
    }
    Ok(out)
}

/// Serve every chain the driver made available on `queue`, then re-arm notifications and loop
/// while more arrived. `handle` returns the number of bytes it wrote into the chain's writable
/// buffers (the used length). Returns whether any chain was returned to the driver.
pub fn drain(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    mut handle: impl FnMut(DescriptorChain<&DmaMemory>) -> u32,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    drain_until(
        queue,
        dma,
        &mut (),
        &mut used_any,
        |_| false,
        |_, chain| handle(chain),
    )?;
    Ok(used_any)
}

/// [`drain`], asking `stop` before each chain: once it says so, the rest stays in the ring with
/// notifications off, and this returns `true`. `used` is set when a chain is returned to the
/// driver.
pub fn drain_until<S>(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    state: &mut S,
    used: &mut bool,
    mut stop: impl FnMut(&mut S) -> bool,
    mut handle: impl FnMut(&mut S, DescriptorChain<&DmaMemory>) -> u32,
) -> Result<bool, QueueError> {
    let mem = dma.memory();
    let size = queue.size();
    loop {
        // With EVENT_IDX, notifications stay off until re-armed below; without it, the
        // NO_NOTIFY flag keeps the driver from kicking while we work.
        queue.disable_notification(mem).map_err(QueueError::Ring)?;
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Ring)?;
        let pending = (avail - Wrapping(queue.next_avail())).0;
        if pending > size {
            return Err(QueueError::TooManyAvailable { pending, size });
        }
        for _ in 0..pending {
            if stop(state) {
                return Ok(true);
            }
            let index = queue.next_avail();
            let chain = queue
                .pop_descriptor_chain(mem)
                .ok_or(QueueError::AvailEntry { index })?;
            let head = chain.head_index();
            if head >= size {
                return Err(QueueError::BadHead { head, size });
            }
            let len = handle(state, chain);
            queue.add_used(mem, head, len).map_err(QueueError::Ring)?;
            *used = true;
        }
        // enable_notification reports buffers that arrived since we last looked.
        if !queue.enable_notification(mem).map_err(QueueError::Ring)? {
            return Ok(false);
        }
    }
}

/// Why [`fill`] stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillEnd {
    /// `want` had nothing more to put in a chain.
    Satisfied,
    /// No chain is available; notifications are on, so the driver kicks when it adds one.
    OutOfBuffers,
    /// `handle` gave its chain back (it stays first in the ring for next time).
    PutBack,
}

/// Pop chains one at a time while `want` has something for them (for a device that fills the
/// driver's buffers when it has data, not when the driver kicks), with the same ring checks as
/// [`drain`]. `want` is asked before each chain and its answer goes to `handle` with the chain;
/// `handle` returns the used length, or `None` to put the chain back and stop. Out of chains,
/// notifications are re-armed (and the ring looked at again if buffers arrived meanwhile).
/// `used` is set when a chain is returned to the driver.
pub fn fill<S, T>(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    state: &mut S,
    used: &mut bool,
    mut want: impl FnMut(&mut S) -> Option<T>,
    mut handle: impl FnMut(&mut S, T, DescriptorChain<&DmaMemory>) -> Option<u32>,
) -> Result<FillEnd, QueueError> {
    let mem = dma.memory();
    let size = queue.size();
    loop {
        let Some(item) = want(state) else {
            return Ok(FillEnd::Satisfied);
        };
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Ring)?;
        let pending = (avail - Wrapping(queue.next_avail())).0;
        if pending > size {
            return Err(QueueError::TooManyAvailable { pending, size });
        }
        if pending == 0 {
            // enable_notification reports buffers posted since we looked.
            if queue.enable_notification(mem).map_err(QueueError::Ring)? {
                continue;
            }
            return Ok(FillEnd::OutOfBuffers);
        }
        let index = queue.next_avail();
        let chain = queue
            .pop_descriptor_chain(mem)
            .ok_or(QueueError::AvailEntry { index })?;
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError::BadHead { head, size });
        }
        let Some(len) = handle(state, item, chain) else {
            queue.go_to_previous_position();
            return Ok(FillEnd::PutBack);
        };
        queue.add_used(mem, head, len).map_err(QueueError::Ring)?;
        *used = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::dma::DmaSpace;
    use crate::virtio::testutil::{Desc, TestDriver, test_memory};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;

    #[test]
    fn proper_and_broken_chains() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        let snap = dma.snapshot();
        let mut results = Vec::new();

        drv.add(&[
            Desc::r(0x10000, 16),
            Desc::w(0x11000, 0x200),
            Desc::w(0x12000, 1),
        ]);
        // Readable after writable.
        drv.add(&[
            Desc::r(0x10000, 16),
            Desc::w(0x11000, 4),
            Desc::r(0x12000, 1),
            Desc::w(0x13000, 2),
        ]);
        // A loop: 3 -> 4 -> 3.
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(0x10000, 16, 1, h + 1));
        drv.write_raw(h + 1, Descriptor::new(0x11000, 16, 1, h));
        drv.publish(h);
        // next index outside the queue.
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(0x10000, 16, 1, 200));
        drv.publish(h);
        // An indirect table inside an indirect table, and an empty indirect table.
        let table = 0x20000;
        mem_write_desc(&mem, table, 0, Descriptor::new(0x30000, 32, 4, 0));
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(table, 16, 4, 0));
        drv.publish(h);
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(table, 0, 4, 0));
        drv.publish(h);

        let used = drain(&mut q, &snap, |chain| {
            results.push(parse_chain(chain, 64).map(|b| (b.readable.len(), b.writable.len())));
            0
        })
        .unwrap();
        assert!(used);
        assert_eq!(results[0].as_ref().unwrap(), &(16, 0x201));
        let e = results[1].as_ref().unwrap_err();
        assert_eq!(e.error, ChainError::Order);
        assert_eq!(e.status, Some(0x13001));
        for r in &results[2..] {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(e.error, ChainError::Truncated | ChainError::Empty),
                "{e:?}"
            );
            assert_eq!(e.status, None);
        }
        assert_eq!(results.len(), 6);
        assert_eq!(drv.used_idx(), 6);
    }

    #[test]
    fn chain_length_cap() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        let descs: Vec<_> = (0..10).map(|i| Desc::r(0x10000 + i * 16, 16)).collect();
        drv.add(&descs);
        let mut res = None;
        drain(&mut q, &dma.snapshot(), |c| {
            res = Some(parse_chain(c, 8).map(|_| ()));
            0
        })
        .unwrap();
        assert_eq!(res.unwrap().unwrap_err().error, ChainError::TooLong(8));
    }

    #[test]
    fn ring_faults_are_errors_not_empty_queues() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        // The driver claims 17 new buffers in a queue of 16.
        drv.set_avail_idx(17);
        let err = drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err();
        assert!(matches!(
            err,
            QueueError::TooManyAvailable {
                pending: 17,
                size: 16
            }
        ));

        // A head index outside the queue.
        let mut drv = TestDriver::new(&mem, 16);
        let mut q = drv.queue();
        drv.publish(40);
        let err = drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err();
        assert!(matches!(err, QueueError::BadHead { head: 40, size: 16 }));

        // Rings outside guest memory.
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0xf000_0000), Some(0));
        q.set_avail_ring_address(Some(0xf000_1000), Some(0));
        q.set_used_ring_address(Some(0xf000_2000), Some(0));
        q.set_ready(true);
        assert!(matches!(
            drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err(),
            QueueError::Ring(_)
        ));
    }

    fn mem_write_desc(mem: &crate::virtio::dma::PhysMemory, table: u64, i: u64, d: Descriptor) {
        use vm_memory::{Bytes, GuestAddress};
        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i))
            .unwrap();
    }
}
