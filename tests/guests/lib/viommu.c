/* SPDX-License-Identifier: Apache-2.0 */
/* A virtio-iommu driver for test guests: see include/viommu.h. */
#include "viommu.h"

#define R_ATTACH 1
#define R_MAP 3
#define R_UNMAP 4
#define R_PROBE 5

static u8 req[72] __attribute__((aligned(8)));
static volatile u8 tail[4];

static void put32(u32 at, u32 v) { memcpy(&req[at], &v, 4); }
static void put64(u32 at, u64 v) { memcpy(&req[at], &v, 8); }

int viommu_init(struct virtio_dev *iommu, u16 qsize)
{
	/* Untranslated itself: the IOMMU does not offer ACCESS_PLATFORM. */
	if (virtio_init(iommu, VIRTIO_ID_IOMMU, 0) ||
	    virtio_negotiate(iommu, (1 << 0) | (1 << 1) | (1 << 2) | (1 << 4) | (1 << 6)) ||
	    virtio_queue_init(iommu, 0, qsize, 1) || virtio_queue_init(iommu, 1, qsize, 0))
		return -1;
	virtio_driver_ok(iommu);
	return 0;
}

/* Send `len` bytes of `req` (type `type`), then `out` for the device to fill, then the tail. */
static u8 request(struct virtio_dev *iommu, u8 type, u32 len, u8 *out, u32 out_len)
{
	req[0] = type;
	tail[0] = 0xFF;
	struct vbuf b[3] = { { req, len, 0 }, { out, out_len, 1 }, { (void *)tail, 4, 1 } };
	if (!out_len)
		b[1] = b[2];
	if (virtq_xfer(&iommu->q[0], b, out_len ? 3 : 2) < 0)
		return 0xFF;
	return tail[0];
}

u8 viommu_attach(struct virtio_dev *iommu, u32 domain, u32 endpoint)
{
	memset(req, 0, sizeof(req));
	put32(4, domain);
	put32(8, endpoint);
	return request(iommu, R_ATTACH, 20, NULL, 0);
}

u8 viommu_map(struct virtio_dev *iommu, u32 domain, u64 iova, u64 gpa, u64 len, u32 flags)
{
	memset(req, 0, sizeof(req));
	put32(4, domain);
	put64(8, iova);
	put64(16, iova + len - 1);
	put64(24, gpa);
	put32(32, flags);
	return request(iommu, R_MAP, 36, NULL, 0);
}

u8 viommu_unmap(struct virtio_dev *iommu, u32 domain, u64 iova, u64 len)
{
	memset(req, 0, sizeof(req));
	put32(4, domain);
	put64(8, iova);
	put64(16, iova + len - 1);
	return request(iommu, R_UNMAP, 28, NULL, 0);
}

u8 viommu_probe(struct virtio_dev *iommu, u32 endpoint, u8 *props, u32 size)
{
	memset(req, 0, sizeof(req));
	put32(4, endpoint);
	return request(iommu, R_PROBE, 72, props, size);
}
