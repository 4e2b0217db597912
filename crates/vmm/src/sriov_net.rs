//! virtio-net SR-IOV PFs (`--net tap=NAME,vfs=N`): the PF and each of its VFs are ports of an
//! embedded switch (`devices::virtio::net::switch`) whose uplink is the PF's tap, so VF-to-VF
//! and PF-to-VF frames never leave the VMM.
//!
//! The PF is put on its root port by [`VirtioPci::add_pf`] like a virtio-blk PF; its VFs are
//! made by [`NetVfs`] when the guest sets VF Enable: VF `i` is a `Net` on a new switch port whose
//! fixed address is `vf_mac(pf, i)` (reported in its config space), watched in the VF event set.
//! Clearing VF Enable drops the VF's device and with it its port, queue and learned addresses.
//!
//! Event-loop watches: the PF's port eventfd edge-triggered (as a tap), the uplink (the tap)
//! level-triggered with a bounded batch per wake-up (`Switch::uplink_input`), and each VF's port
//! eventfd level-triggered in the VF event set, reset before each run
//! (`SwitchPort::clear_wake`).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::virtio::net::switch::{Limits, Mac, Switch, default_pf_mac, vf_mac};
use devices::virtio::net::{Net, NetConfig, Tap};
use devices::virtio::{VirtioDevice, features};

use crate::sriov::{FdHandler, VfError, VfFactory, VfParts};
use crate::virtio_devices::{BackendWatcher, DeviceError, Subscriber};
use crate::virtio_pci::{QueueNotifier, VirtioPci};

/// Makes the VFs of one net PF: VF `i` on a new port of the PF's switch.
pub struct NetVfs {
    pub switch: Arc<Switch>,
    pub pf_mac: Mac,
}

impl VfFactory for NetVfs {
    fn make(&mut self, index: u16, _num_vfs: u16) -> Result<VfParts, VfError> {
        let mac = vf_mac(self.pf_mac, index);
        let port = self
            .switch
            .add_port(Some(mac))
            .map_err(|e| VfError::Other(index, e.to_string()))?;
        let fd = port.as_raw_fd();
        let net = Arc::new(Mutex::new(Net::new(
            port,
            NetConfig {
                mac: Some(mac),
                mtu: None,
            },
        )));
        let dev = net.clone();
        let handler: FdHandler = Arc::new(move || {
            let mut net = lock(&dev);
            // The VF event set is level-triggered: the count only says "look".
            net.backend().clear_wake();
            net.process_backend();
        });
        Ok(VfParts {
            device: net,
            watch: vec![(fd, handler)],
        })
    }
}

impl VirtioPci<'_> {
    /// A virtio-net PF on `tap` with up to `vfs` VFs: the tap becomes the uplink of a new
    /// switch, the PF its first port (address `mac`, or one derived from the tap's name so that
    /// the VFs' can be derived from it). Returns the PF's queue notifier and the event-loop
    /// subscribers for the PF's port and the uplink.
    pub fn add_net_pf(
        &mut self,
        tap: Tap,
        mac: Option<Mac>,
        vfs: u16,
        behind_iommu: bool,
    ) -> Result<(QueueNotifier, Vec<Subscriber>), DeviceError> {
        let pf_mac = mac.unwrap_or_else(|| default_pf_mac(tap.name()));
        let name = tap.name().to_owned();
        let switch = Switch::new(Some(Box::new(tap)), Limits::default());
        let port = switch
            .add_port(Some(pf_mac))
            .map_err(DeviceError::SwitchPort)?;
        let pf = Arc::new(Mutex::new(Net::new(
            port,
            NetConfig {
                mac: Some(pf_mac),
                mtu: None,
            },
        )));
        lock(&pf).common_mut().offer(features::SR_IOV);
        let device: Arc<Mutex<dyn VirtioDevice>> = pf.clone();
        let factory = Box::new(NetVfs {
            switch: switch.clone(),
            pf_mac,
        });
        let notifier = self.add_pf(device, factory, vfs, behind_iommu)?;
        tracing::debug!(tap = %name, vfs, "virtio-net PF with an embedded switch");
        let mut subs = Vec::new();
        let fd = lock(&pf).backend_fd();
        subs.push(BackendWatcher::subscriber(fd, true, move || {
            lock(&pf).process_backend();
        }));
        if let Some(fd) = switch.uplink_fd() {
            // Level-triggered: a batch per wake-up, the rest at the next turn of the loop.
            subs.push(BackendWatcher::subscriber(fd, false, move || {
                switch.uplink_input();
            }));
        }
        Ok((notifier, subs))
    }
}
