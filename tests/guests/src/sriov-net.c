/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sriov-net: the embedded switch of a virtio-net SR-IOV PF
 * (`--net tap=NAME,mac=MAC,vfs=N`), driven through VFs enabled as Linux's
 * PCI core does it (lib/sriov.c).
 *
 * The PF (function 0 of the root port's bus, "bus=" on the command line,
 * default 1) must offer VIRTIO_F_SR_IOV and a MAC. Per cycle (the "vfs="
 * list, e.g. vfs=2.3, at least 2 each): NumVFs VFs enabled, each brought up
 * as a virtio-net device whose MAC (config space) must be the PF's low 24
 * bits + 1 + i; then, with frames of ethertype 0x88B5:
 *
 * 1. VF 0 -> VF 1 unicast: VF 1 gets it.
 * 2. VF 0 broadcast: it is the next frame of every other VF, so VFs 2.. did
 *    not get the unicast (isolation); the uplink tap gets it too.
 * 3. VF 1 -> VF 0 unicast: VF 0's first frame (it did not get its own
 *    broadcast back).
 * 4. VF n-1 -> the host's MAC 02:00:00:00:88:01: in cycle 0 not yet
 *    learned, so flooded (every other VF gets it next); later learned on the
 *    uplink. The tap gets it either way.
 *    Prints "sriov-net cycle C sent", waits for a byte on COM1: meanwhile
 *    the host sends a frame from its MAC to VF 1 on the tap.
 * 5. VF 1 gets the host's frame ("manifold-sriov-down", cycle).
 * 6. VF n-1 -> host again: now learned on the uplink, so only the tap gets
 *    it; VF 0's broadcast after it is every other VF's next frame.
 *    Prints "sriov-net cycle C done", waits for a byte (the host checks the
 *    tap saw exactly the broadcasts and the frames for it, in order).
 * 7. VFs reset, VF Enable cleared: they read as absent. Prints "sriov-net
 *    cycle C disabled", waits for a byte (the host counts fds and threads).
 *
 * Ends with "sriov-net passed" (exit 0) or after a FAILED line (exit 1).
 */
#include "guest.h"

#define MAX_VFS 4
#define MAX_CYCLES 8
#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_MRG_RXBUF (1ull << 15)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define VIRTIO_F_SR_IOV_BIT 37
#define HDR 12
#define RXBUFS 4
#define RXLEN (HDR + 1518)
#define ETHERTYPE 0x88B5
#define FLEN 64

static const u8 host_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x88, 0x01 };
static const u8 bcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
static struct virtio_dev vfs[MAX_VFS];
static u8 macs[MAX_VFS][6];
static u8 rx[MAX_VFS][RXBUFS][RXLEN];
static u8 tx[HDR + FLEN];
static int failures;

static void check(int ok, const char *what, u32 n)
{
	if (!ok) {
		print("%s %u: FAILED\n", what, n);
		failures++;
	}
}

/* VF `from` sends a frame to `dst`: the text, then the cycle and VF bytes. */
static void send(u32 from, const u8 *dst, const char *text, u32 cycle)
{
	u8 *f = tx + HDR;
	memset(tx, 0, sizeof(tx));
	memcpy(f, dst, 6);
	memcpy(f + 6, macs[from], 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xFF;
	u32 tl = strlen(text);
	memcpy(f + 14, text, tl);
	f[14 + tl] = (u8)cycle;
	f[15 + tl] = (u8)from;
	struct vbuf out = { tx, HDR + FLEN, 0 };
	check(virtq_xfer(&vfs[from].q[1], &out, 1) >= 0, "transmit from VF", from);
}

/*
 * The next frame of our ethertype VF `vf` receives must be `text` for this
 * cycle from `src` (VF index, or -1: the host) to `dst`; buffers go back to
 * the ring.
 */
static void expect(u32 vf, const char *text, u32 cycle, int src, const u8 *dst)
{
	struct virtq *rq = &vfs[vf].q[0];
	u32 len;
	u8 *p, *e;
	for (;;) {
		int id = virtq_wait(rq, &len);
		if (id < 0) {
			check(0, "receive on VF", vf);
			return;
		}
		p = (u8 *)(uptr)rq->desc[id].addr;
		e = p + HDR;
		if (len >= HDR + 14 && e[12] == (ETHERTYPE >> 8) && e[13] == (ETHERTYPE & 0xFF))
			break;
		/* The host's own traffic on the tap (IPv6 neighbour discovery...): not ours. */
		struct vbuf b = { p, RXLEN, 1 };
		virtq_add(rq, &b, 1);
		virtq_kick(rq);
	}
	u32 tl = strlen(text);
	const u8 *from = src < 0 ? host_mac : macs[src];
	int ok = len >= HDR + 14 + tl + 2 && !memcmp(e, dst, 6) && !memcmp(e + 6, from, 6) &&
		 e[12] == (ETHERTYPE >> 8) && e[13] == (ETHERTYPE & 0xFF) &&
		 !memcmp(e + 14, text, tl) && e[14 + tl] == (u8)cycle &&
		 (src < 0 || e[15 + tl] == (u8)src) && p[10] == 1 && p[11] == 0;
	if (!ok) {
		print("VF %u expected %s (cycle %u) from %d\n", vf, text, cycle, src);
		print_hex("got", p, len < HDR + 40 ? len : HDR + 40);
		check(0, "frame on VF", vf);
	}
	struct vbuf b = { p, RXLEN, 1 };
	virtq_add(rq, &b, 1);
	virtq_kick(rq);
}

/* Every VF but `except` gets `text` next. */
static void expect_all_but(u32 n, u32 except, const char *text, u32 cycle, int src,
			   const u8 *dst)
{
	for (u32 i = 0; i < n; i++)
		if (i != except)
			expect(i, text, cycle, src, dst);
}

int guest_main(struct boot_info *bi)
{
	virtio_irq_init();
	pci_scan();

	u32 bus, counts[MAX_CYCLES], ncycles;
	if (sriov_args(bi->cmdline, &bus, counts, MAX_CYCLES, &ncycles)) {
		print("bad command line\n");
		return 1;
	}

	static struct sriov s;
	if (sriov_find(&s, bus))
		return 1;
	u32 id = mmio_read32(s.pf);
	print("pf %02x:00.0 %04x:%04x, TotalVFs %u, ARI %s\n", bus, id & 0xFFFF, id >> 16, s.total,
	      s.ari ? "yes" : "no");
	if (id != ((VIRTIO_DEVICE_ID(VIRTIO_ID_NET) << 16) | VIRTIO_VENDOR))
		return 1;

	/* The PF: a virtio-net device offering VIRTIO_F_SR_IOV and its MAC, which the VFs'
	 * derive from. Its own queues are not used. */
	static struct virtio_dev pfdev;
	if (virtio_init_at(&pfdev, s.pf, NULL))
		return 1;
	check((pfdev.offered >> VIRTIO_F_SR_IOV_BIT) & 1, "pf feature SR_IOV", VIRTIO_F_SR_IOV_BIT);
	check(pfdev.offered & VIRTIO_NET_F_MAC ? 1 : 0, "pf feature MAC", 5);
	u8 pf_mac[6];
	for (u32 i = 0; i < 6; i++)
		pf_mac[i] = virtio_cfg8(&pfdev, i);
	print("pf mac %02x:%02x:%02x:%02x:%02x:%02x\n", pf_mac[0], pf_mac[1], pf_mac[2], pf_mac[3],
	      pf_mac[4], pf_mac[5]);
	mmio_write8(pfdev.common + 0x14, 0);
	if (sriov_place(&s, pfdev.bars[0], MAX_VFS))
		return 1;

	for (u32 cycle = 0; cycle < ncycles; cycle++) {
		u32 n = counts[cycle];
		if (n < 2 || n > s.total || n > MAX_VFS) {
			print("cycle %u: %u VFs: need 2 to %u\n", cycle, n, MAX_VFS);
			return 1;
		}
		sriov_enable(&s, n);
		for (u32 i = 0; i < n; i++) {
			u32 rid = sriov_vf_rid(&s, i);
			uptr bars[6] = { sriov_vf_bar(&s, i), 0, 0, 0, 0, 0 };
			struct virtio_dev *d = &vfs[i];
			if (virtio_init_at(d, sriov_cfg(rid), bars) ||
			    virtio_negotiate(d, VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF |
							VIRTIO_NET_F_STATUS) ||
			    virtio_queue_init(d, 0, 8, 1) || virtio_queue_init(d, 1, 8, 1)) {
				print("VF %u (%02x:%02x.%u) does not come up\n", i, rid >> 8,
				      (rid >> 3) & 31, rid & 7);
				return 1;
			}
			/* The PF's low 24 bits + 1 + i, locally administered, unicast. */
			u32 low = ((u32)pf_mac[3] << 16 | (u32)pf_mac[4] << 8 | pf_mac[5]) + 1 + i;
			u8 want[6] = { (u8)((pf_mac[0] | 2) & ~1), pf_mac[1], pf_mac[2],
				       (u8)(low >> 16), (u8)(low >> 8), (u8)low };
			for (u32 k = 0; k < 6; k++)
				macs[i][k] = virtio_cfg8(d, k);
			check((d->features & VIRTIO_NET_F_MAC) && !memcmp(macs[i], want, 6), "VF MAC",
			      i);
			check((virtio_cfg16(d, 6) & 1) == 1, "VF link up", i);
			virtio_driver_ok(d);
			for (u32 b = 0; b < RXBUFS; b++) {
				struct vbuf v = { rx[i][b], RXLEN, 1 };
				virtq_add(&d->q[0], &v, 1);
			}
			virtq_kick(&d->q[0]);
		}
		print("cycle %u: %u VFs up, VF 0 mac %02x:%02x:%02x:%02x:%02x:%02x\n", cycle, n,
		      macs[0][0], macs[0][1], macs[0][2], macs[0][3], macs[0][4], macs[0][5]);
		u32 last = n - 1;

		send(0, macs[1], "manifold-sriov-uni", cycle);
		expect(1, "manifold-sriov-uni", cycle, 0, macs[1]);
		send(0, bcast, "manifold-sriov-bcast", cycle);
		expect_all_but(n, 0, "manifold-sriov-bcast", cycle, 0, bcast);
		send(1, macs[0], "manifold-sriov-uni", cycle);
		expect(0, "manifold-sriov-uni", cycle, 1, macs[0]);
		send(last, host_mac, "manifold-sriov-up", cycle);
		/* Unknown before the host's first frame: flooded. Learned after (cycle 1 on): the
		 * tap's only, checked by the broadcast every VF gets next in step 6. */
		if (cycle == 0)
			expect_all_but(n, last, "manifold-sriov-up", cycle, (int)last, host_mac);
		print("sriov-net cycle %u sent\n", cycle);
		serial_wait_byte();

		expect(1, "manifold-sriov-down", cycle, -1, macs[1]);
		send(last, host_mac, "manifold-sriov-up2", cycle);
		send(0, bcast, "manifold-sriov-bcast2", cycle);
		expect_all_but(n, 0, "manifold-sriov-bcast2", cycle, 0, bcast);
		print("sriov-net cycle %u done\n", cycle);
		serial_wait_byte();

		for (u32 i = 0; i < n; i++)
			mmio_write8(vfs[i].common + 0x14, 0);
		virtio_release_all();
		sriov_disable(&s);
		for (u32 i = 0; i < n; i++)
			check(mmio_read32(sriov_cfg(sriov_vf_rid(&s, i)) + 0x08) == 0xFFFFFFFF,
			      "VF gone", i);
		print("sriov-net cycle %u disabled\n", cycle);
		serial_wait_byte();
	}
	if (failures)
		return 1;
	print("sriov-net passed\n");
	return 0;
}
