/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A virtio-iommu driver for test guests (lib/viommu.c), programming the
 * device as Linux's virtio_iommu does: one request at a time on queue 0,
 * status in the request's tail. Every call returns that status (0 = OK),
 * 0xFF when the request did not come back.
 */
#ifndef VIOMMU_H
#define VIOMMU_H

#include "guest.h"

#define VIRTIO_ID_IOMMU 23
#define VIOMMU_MAP_R 1
#define VIOMMU_MAP_W 2

/*
 * Bring up the first virtio-iommu: features INPUT_RANGE, DOMAIN_RANGE,
 * MAP_UNMAP, PROBE, BYPASS_CONFIG; request queue 0 (MSI-X) and event queue 1
 * (polled) of `qsize`; DRIVER_OK. Returns 0, or -1 with a line printed.
 */
int viommu_init(struct virtio_dev *iommu, u16 qsize);
u8 viommu_attach(struct virtio_dev *iommu, u32 domain, u32 endpoint);
/* Map [iova, iova + len) to guest physical `gpa` with VIOMMU_MAP_* `flags`. */
u8 viommu_map(struct virtio_dev *iommu, u32 domain, u64 iova, u64 gpa, u64 len, u32 flags);
u8 viommu_unmap(struct virtio_dev *iommu, u32 domain, u64 iova, u64 len);
/* PROBE `endpoint`: `size` bytes of properties into `props`. */
u8 viommu_probe(struct virtio_dev *iommu, u32 endpoint, u8 *props, u32 size);

/* A function's PCI requester id (bus 0), its endpoint id behind the IOMMU. */
static inline u16 virtio_bdf(const struct virtio_dev *d) { return (u16)((d->cfg - pci_ecam) >> 12); }

#endif
