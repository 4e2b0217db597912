/* SPDX-License-Identifier: Apache-2.0 */
/*
 * vsock: a virtio-vsock driver over PCI (lib/virtio.c): ECAM, BAR, MSI-X,
 * VERSION_1, rx (0), tx (1) and event (2) queues; stream sockets with credit
 * flow control (virtio 1.2, 5.10.6).
 *
 * Prints the guest_cid from the configuration space and "vsock ready" once
 * receive buffers are posted. Then:
 *  1. waits for a REQUEST from the host to port 1234, answers RESPONSE,
 *     collects the host's data up to '\n' ("vsock got: <line>") and sends
 *     back "echo: <line>\n"; with "bulk=N" on the command line it then takes
 *     N bytes (more than the 4 KiB of credit it gives, so the host stalls
 *     unless its CREDIT_UPDATEs arrive) and answers "bulk N sum S\n";
 *  2. connects to host port 5000 (REQUEST, waits for RESPONSE), sends
 *     "hello from guest <cid>\n" and collects the host's answer up to '\n'
 *     ("vsock got on 5000: <line>");
 *  3. shuts both connections down and prints "vsock done".
 */
#include "guest.h"

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3

#define LISTEN_PORT 1234
#define HOST_PORT 5000
#define LOCAL_PORT 49152
#define PAYLOAD 256
#define RXBUFS 8
#define BUF_ALLOC 4096

struct hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct pkt {
	struct hdr h;
	u8 data[PAYLOAD];
} __attribute__((packed));

struct conn {
	u32 local, peer;
	u32 fwd_cnt;               /* bytes we took from the peer */
	u32 reported;              /* fwd_cnt the peer was last told */
	u32 tx_cnt;                /* bytes we sent */
	u32 peer_buf, peer_fwd;    /* the peer's credit */
};

static struct virtio_dev d;
static u64 cid;
static struct pkt rx[RXBUFS];
static struct pkt in; /* the packet being looked at */
static struct pkt out;
static u8 events[2][8];

static void post_rx(void *p)
{
	struct vbuf b = { p, sizeof(struct pkt), 1 };
	virtq_add(&d.q[0], &b, 1);
	virtq_kick(&d.q[0]);
}

static int send(struct conn *c, u16 op, u32 flags, const void *data, u32 len)
{
	if (op == OP_RW && len > c->peer_buf - (c->tx_cnt - c->peer_fwd)) {
		print("vsock: no credit for %u bytes\n", len);
		return -1;
	}
	memset(&out.h, 0, sizeof(out.h));
	out.h.src_cid = cid;
	out.h.dst_cid = HOST_CID;
	out.h.src_port = c->local;
	out.h.dst_port = c->peer;
	out.h.len = len;
	out.h.type = TYPE_STREAM;
	out.h.op = op;
	out.h.flags = flags;
	out.h.buf_alloc = BUF_ALLOC;
	out.h.fwd_cnt = c->fwd_cnt;
	c->reported = c->fwd_cnt;
	memcpy(out.data, data, len);
	struct vbuf b = { &out, sizeof(struct hdr) + len, 0 };
	if (virtq_xfer(&d.q[1], &b, 1) < 0) {
		print("vsock: transmit failed\n");
		return -1;
	}
	if (op == OP_RW)
		c->tx_cnt += len;
	return 0;
}

/* `v` in decimal at `out`; returns the number of digits. */
static u32 fmt_u32(char *out, u32 v)
{
	char digits[10];
	u32 nd = 0, n = 0;
	do {
		digits[nd++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (nd)
		out[n++] = digits[--nd];
	return n;
}

/* Next packet into `in` (its rx buffer goes straight back to the device). */
static void recv(void)
{
	u32 len;
	int id = virtq_wait(&d.q[0], &len);
	void *p = (void *)(uptr)d.q[0].desc[id].addr;
	memcpy(&in, p, len < sizeof(in) ? len : sizeof(in));
	if (len < sizeof(struct hdr) || in.h.len > len - sizeof(struct hdr))
		in.h.len = len > sizeof(struct hdr) ? len - sizeof(struct hdr) : 0;
	post_rx(p);
}

/*
 * Wait for a packet of operation `op` on connection `c` (c->peer 0: any peer to c->local),
 * answering credit requests meanwhile. Returns 0, or -1 on RST.
 */
static int expect(struct conn *c, u16 op)
{
	for (;;) {
		recv();
		struct hdr *h = &in.h;
		if (h->src_cid != HOST_CID || h->dst_cid != cid || h->dst_port != c->local ||
		    (c->peer && h->src_port != c->peer) || h->type != TYPE_STREAM) {
			print("vsock: stray packet op %u %u->%u\n", h->op, h->src_port, h->dst_port);
			continue;
		}
		c->peer = h->src_port;
		c->peer_buf = h->buf_alloc;
		c->peer_fwd = h->fwd_cnt;
		if (h->op == op)
			return 0;
		if (h->op == OP_RST) {
			print("vsock: reset by the host on port %u\n", c->local);
			return -1;
		}
		if (h->op == OP_CREDIT_REQUEST)
			send(c, OP_CREDIT_UPDATE, 0, NULL, 0);
		else if (h->op != OP_CREDIT_UPDATE)
			print("vsock: op %u ignored while waiting for %u\n", h->op, op);
	}
}

/* Collect RW payload on `c` into `line` up to '\n' (not included). */
static int read_line(struct conn *c, char *line, u32 max)
{
	u32 n = 0;
	for (;;) {
		if (expect(c, OP_RW))
			return -1;
		c->fwd_cnt += in.h.len;
		for (u32 k = 0; k < in.h.len && k < PAYLOAD; k++) {
			if (in.data[k] == '\n') {
				line[n] = 0;
				return (int)n;
			}
			if (n < max - 1)
				line[n++] = (char)in.data[k];
		}
	}
}

/*
 * Take `n` bytes of RW payload on `c`, summing them; tell the peer of the room freed whenever
 * half the buffer has been taken (it may not send more than BUF_ALLOC unacknowledged).
 */
static int read_bulk(struct conn *c, u32 n, u32 *sum, u32 *updates)
{
	u32 got = 0;
	while (got < n) {
		if (expect(c, OP_RW))
			return -1;
		u32 len = in.h.len < PAYLOAD ? in.h.len : PAYLOAD;
		*sum += byte_sum(in.data, len);
		got += len;
		c->fwd_cnt += len;
		if (c->fwd_cnt - c->reported >= BUF_ALLOC / 2) {
			if (send(c, OP_CREDIT_UPDATE, 0, NULL, 0))
				return -1;
			(*updates)++;
		}
	}
	return (int)got;
}

int guest_main(struct boot_info *bi)
{
	(void)bi;
	static char line[PAYLOAD], msg[PAYLOAD + 16];
	virtio_irq_init();
	if (virtio_init(&d, VIRTIO_ID_VSOCK, 0) || virtio_negotiate(&d, 0) ||
	    virtio_queue_init(&d, 0, 16, 1) || virtio_queue_init(&d, 1, 8, 1) ||
	    virtio_queue_init(&d, 2, 4, 1))
		return 1;
	cid = virtio_cfg32(&d, 0) | ((u64)virtio_cfg32(&d, 4) << 32);
	print("vsock cid %u\n", (u32)cid);
	virtio_driver_ok(&d);
	for (u32 i = 0; i < RXBUFS; i++)
		post_rx(&rx[i]);
	for (u32 i = 0; i < 2; i++) {
		struct vbuf b = { events[i], sizeof(events[i]), 1 };
		virtq_add(&d.q[2], &b, 1);
	}
	virtq_kick(&d.q[2]);
	print("vsock ready\n");

	/* 1. The host connects to port 1234. */
	static struct conn a = { .local = LISTEN_PORT };
	if (expect(&a, OP_REQUEST))
		return 1;
	print("vsock request from host port %u\n", a.peer);
	if (send(&a, OP_RESPONSE, 0, NULL, 0))
		return 1;
	if (read_line(&a, line, sizeof(line)) < 0)
		return 1;
	print("vsock got: %s\n", line);
	u32 n = (u32)strlen(line);
	memcpy(msg, "echo: ", 6);
	memcpy(msg + 6, line, n);
	msg[6 + n] = '\n';
	if (send(&a, OP_RW, 0, msg, 7 + n))
		return 1;
	print("vsock echoed\n");

	/* 1b. More than the credit we gave: only moves if our credit updates get through. */
	const char *bulk = cmdline_find(bi->cmdline, "bulk");
	int ok;
	u32 want = bulk ? (u32)parse_u64(bulk, &ok) : 0;
	if (want) {
		u32 sum = 0, updates = 0;
		int got = read_bulk(&a, want, &sum, &updates);
		if (got < 0)
			return 1;
		print("vsock bulk: %d bytes, sum %u, %u credit updates\n", got, sum, updates);
		static const char pre[] = "bulk ";
		n = 0;
		memcpy(msg, pre, sizeof(pre) - 1);
		n = sizeof(pre) - 1;
		n += fmt_u32(msg + n, (u32)got);
		memcpy(msg + n, " sum ", 5);
		n += 5;
		n += fmt_u32(msg + n, sum);
		msg[n++] = '\n';
		if (send(&a, OP_RW, 0, msg, n))
			return 1;
	}

	/* 2. We connect to host port 5000. */
	static struct conn b = { .local = LOCAL_PORT, .peer = HOST_PORT };
	if (send(&b, OP_REQUEST, 0, NULL, 0) || expect(&b, OP_RESPONSE)) {
		print("vsock: connect to host port %u failed\n", HOST_PORT);
		return 1;
	}
	print("vsock connected to host port %u\n", HOST_PORT);
	static const char hi[] = "hello from guest ";
	memcpy(msg, hi, sizeof(hi) - 1);
	n = sizeof(hi) - 1;
	n += fmt_u32(msg + n, (u32)cid);
	msg[n++] = '\n';
	if (send(&b, OP_RW, 0, msg, n))
		return 1;
	print("vsock sent to host port %u\n", HOST_PORT);
	if (read_line(&b, line, sizeof(line)) < 0)
		return 1;
	print("vsock got on %u: %s\n", HOST_PORT, line);

	/* 3. Shut both down. */
	send(&a, OP_SHUTDOWN, SHUTDOWN_BOTH, NULL, 0);
	send(&b, OP_SHUTDOWN, SHUTDOWN_BOTH, NULL, 0);
	print("interrupts: %u\n", virtio_irqs);
	print("vsock done\n");
	return 0;
}
