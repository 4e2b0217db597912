/* SPDX-License-Identifier: Apache-2.0 */
/*
 * net: a virtio-net driver over PCI (lib/virtio.c): ECAM, BAR, MSI-X,
 * VERSION_1, MAC, STATUS and MRG_RXBUF negotiated (no offloads; every
 * receive buffer can hold a whole frame behind the 12-byte virtio_net_hdr_v1,
 * so num_buffers must be 1), receive queue 0 and transmit queue 1. Reads the
 * MAC and the link status from the configuration space,
 * posts receive buffers, sends a broadcast frame of ethertype 0x88B5 with the
 * payload "manifold-net-test" and prints "net sent", then a full-size one
 * (payload "manifold-net-big" and a byte pattern, header and frame in two
 * buffers) and prints "net sent big"; then waits for a frame
 * of ethertype 0x88B5 whose payload starts with "manifold-net-reply" and
 * prints "net got reply" (other frames are counted and given back). With
 * "replies=N" it waits for N of them, numbered 0..N-1 by the byte after the
 * text, more than the 8 receive buffers it keeps posted. With
 * "wait=1" it prints "net waiting" before sending and goes on once a byte
 * arrives on COM1. With "iommu=1" the NIC is put behind the virtio-iommu
 * first, as Linux's driver does (ATTACH to domain 1, MAP of the low 8 MiB:
 * image, rings, buffers, stack) and given every ring and buffer at IOVA =
 * GPA + 0x4000_0000, beyond guest RAM, so nothing works untranslated.
 */
#include "viommu.h"

#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_MRG_RXBUF (1ull << 15)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define HDR 12
#define RXBUFS 8
#define RXLEN (HDR + 1518)
#define ETHERTYPE 0x88B5
#define IOVA_OFF 0x40000000ull
#define MAPPED 0x800000u

static const char test_payload[] = "manifold-net-test";
static const char reply_payload[] = "manifold-net-reply";
static u8 rx[RXBUFS][RXLEN];
static u8 tx[HDR + 64];
static const char big_payload[] = "manifold-net-big";
static u8 big_hdr[HDR];
static u8 big[14 + 1500];

int guest_main(struct boot_info *bi)
{
	static struct virtio_dev d, iommu;
	virtio_irq_init();
	if (virtio_init(&d, VIRTIO_ID_NET, 0))
		return 1;
	const char *behind = cmdline_find(bi->cmdline, "iommu");
	if (behind && behind[0] == '1') {
		u16 ep = virtio_bdf(&d);
		if (viommu_init(&iommu, 8) || viommu_attach(&iommu, 1, ep) ||
		    viommu_map(&iommu, 1, IOVA_OFF, 0, MAPPED, VIOMMU_MAP_R | VIOMMU_MAP_W)) {
			print("iommu setup failed\n");
			return 1;
		}
		d.iova_off = IOVA_OFF;
		print("net behind the iommu: endpoint %x in domain 1, iova = gpa + %llx\n", ep,
		      IOVA_OFF);
	}
	if (virtio_negotiate(&d, VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS) ||
	    virtio_queue_init(&d, 0, 16, 1) || virtio_queue_init(&d, 1, 8, 1))
		return 1;
	/* Without VIRTIO_NET_F_MAC the driver makes one up, as Linux does (locally administered). */
	u8 mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x88, 0xB5 };
	if (d.features & VIRTIO_NET_F_MAC)
		for (u32 i = 0; i < 6; i++)
			mac[i] = virtio_cfg8(&d, i);
	else
		print("no MAC offered\n");
	print("mac %02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
	if (d.features & VIRTIO_NET_F_STATUS)
		print("link %s\n", (virtio_cfg16(&d, 6) & 1) ? "up" : "down");
	virtio_driver_ok(&d);

	struct virtq *rq = &d.q[0];
	for (u32 i = 0; i < RXBUFS; i++) {
		struct vbuf b = { rx[i], RXLEN, 1 };
		virtq_add(rq, &b, 1);
	}
	virtq_kick(rq);

	/* "wait=1": the host brings its end up first and says so with a byte on COM1. */
	const char *wait = cmdline_find(bi->cmdline, "wait");
	if (wait && wait[0] == '1') {
		print("net waiting\n");
		while (!(inb(COM1 + UART_LSR) & UART_LSR_DR))
			cpu_relax();
		(void)inb(COM1 + UART_RBR);
	}

	/* Header all zeros (no offload); broadcast; our MAC; 0x88B5; payload; padded to 60. */
	u8 *f = tx + HDR;
	memset(f, 0xFF, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xFF;
	memcpy(f + 14, test_payload, sizeof(test_payload) - 1);
	struct vbuf out = { tx, HDR + 60, 0 };
	if (virtq_xfer(&d.q[1], &out, 1) < 0) {
		print("transmit failed\n");
		return 1;
	}
	print("net sent\n");

	/*
	 * A full-size frame (1514 bytes), its header in a buffer of its own as Linux sends it: a
	 * chain of two, in an indirect table when negotiated. Payload "manifold-net-big", then
	 * bytes (i * 7) & 0xFF up to 1500.
	 */
	memset(big, 0xFF, 6);
	memcpy(big + 6, mac, 6);
	big[12] = ETHERTYPE >> 8;
	big[13] = ETHERTYPE & 0xFF;
	memcpy(big + 14, big_payload, sizeof(big_payload) - 1);
	for (u32 i = sizeof(big_payload) - 1; i < 1500; i++)
		big[14 + i] = (u8)(i * 7);
	struct vbuf two[2] = { { big_hdr, HDR, 0 }, { big, sizeof(big), 0 } };
	if (virtq_xfer(&d.q[1], two, 2) < 0) {
		print("transmit failed\n");
		return 1;
	}
	print("net sent big\n");

	/* "replies=N": N replies, the byte after the payload text numbering them 0, 1, ... */
	const char *r = cmdline_find(bi->cmdline, "replies");
	int num_ok = 0;
	u32 want = r ? (u32)parse_u64(r, &num_ok) : 1;
	if (!num_ok || want == 0)
		want = 1;
	u32 others = 0, got = 0, bad = 0;
	const u32 plen = sizeof(reply_payload) - 1;
	while (got < want) {
		u32 len;
		int id = virtq_wait(rq, &len);
		/* The device was given the IOVA; the buffer is at the GPA. */
		u8 *p = (u8 *)(uptr)(rq->desc[id].addr - rq->iova_off);
		u8 *e = p + HDR;
		if (len >= HDR + 14 + plen + 1 && e[12] == (ETHERTYPE >> 8) &&
		    e[13] == (ETHERTYPE & 0xFF) && memcmp(e + 14, reply_payload, plen) == 0) {
			if (got == 0) {
				/* num_buffers: 1 for a frame in one buffer (with MRG_RXBUF; else unused). */
				if (d.features & VIRTIO_NET_F_MRG_RXBUF)
					print("num_buffers %u\n", p[10] | (p[11] << 8));
				print("reply from %02x:%02x:%02x:%02x:%02x:%02x to %02x:%02x:%02x:%02x:%02x:%02x, %u bytes\n",
				      e[6], e[7], e[8], e[9], e[10], e[11], e[0], e[1], e[2], e[3], e[4],
				      e[5], len - HDR);
			}
			if (e[14 + plen] != (u8)got) {
				print("reply %u where %u was due\n", e[14 + plen], got);
				bad++;
			}
			got++;
		} else {
			others++;
		}
		struct vbuf b = { p, RXLEN, 1 };
		virtq_add(rq, &b, 1);
		virtq_kick(rq);
	}
	print("other frames: %u\n", others);
	print("interrupts: %u\n", virtio_irqs);
	if (bad) {
		print("replies out of order\n");
		return 1;
	}
	print("net got %u replies in order\n", got);
	print("net got reply\n");
	return 0;
}
