/* /init of the Linux test guest: runs the checks, reports each as one line on the console
 * ("manifold-check NAME ok|FAIL detail"), then powers off. A static program rather than a shell
 * script because on hosts that hand instructions back each system call costs ~0.1 s: this one
 * makes a few hundred, most of them reading sysfs.
 *
 * What to check comes from `manifold_*=` variables on the kernel command line (the kernel hands
 * unknown `name=value` parameters to /init as its environment); a check runs only when its
 * variable is there, so the host test decides what it expects:
 *   manifold_cpus=N             /sys/devices/system/cpu/online is 0..N-1
 *   manifold_pci=ID,ID,...      the virtio device ids (vendor 1af4) found on PCI, in any order
 *   manifold_iommu=ID,ID,...    load virtio_iommu; exactly these device ids are in iommu groups
 *   manifold_blk=1              write a pattern to /dev/vda (direct I/O), read it back, and print
 *                               a checksum of the host's region at 1 MiB
 *   manifold_net=GUEST,HOST     eth0 gets GUEST/24; a UDP datagram to HOST:5555 gets an answer
 *   manifold_rng=1              /dev/hwrng gives bytes, and different ones on a second read
 *   manifold_hvc=1              a line on /dev/hvc0 (the host finds it in its --console file)
 *   manifold_vsock=HP,GP        connect to the host's port HP, then accept on port GP
 *   manifold_sriovnet=K         the virtio-net SR-IOV PF: K (2..8) VFs through sriov_numvfs, K
 *                               new interfaces, VF i's MAC the PF's + 1 + i; VF 0 and VF 1 moved
 *                               into two new network namespaces ping each other (ICMP echo,
 *                               ARP through the embedded switch); 0 VFs: the interfaces are gone
 * With manifold_shell=1 it starts a busybox shell instead of powering off. */
#define _GNU_SOURCE
/* Lines and paths are cut to their buffers on purpose: sysfs names here are short. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/vm_sockets.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int out = 1;
static int failures;

static void say(const char *s) { (void)!write(out, s, strlen(s)); }

static void check(const char *name, int ok, const char *detail) {
    char line[512];
    snprintf(line, sizeof line, "manifold-check %s %s %s\n", name, ok ? "ok" : "FAIL", detail);
    if (!ok) failures++;
    say(line);
}

/* Read a small file into buf (NUL-terminated, trailing newline dropped); -1 on error. */
static int slurp(const char *path, char *buf, size_t len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    if (n > 0 && buf[n - 1] == '\n') buf[n - 1] = 0;
    return 0;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Devices behind the IOMMU are probed late (deferred until virtio_iommu is there), so their
 * nodes appear some time after the modules load: poll, with a bound. */
static int wait_path(const char *path, int seconds) {
    for (int i = 0; i < seconds * 4; i++) {
        if (access(path, F_OK) == 0) return 0;
        nap_ms(250);
    }
    return -1;
}

/* FNV-1a, 32 bits: the host test computes the same over the image. */
static uint32_t fnv1a(const unsigned char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* --- PCI ----------------------------------------------------------------------------------- */

#define MAX_PCI 32
static struct {
    char bdf[16];
    unsigned vendor, device, class;
} pci[MAX_PCI];
static int npci;

/* One uevent per function (PCI_CLASS, PCI_ID, PCI_SLOT_NAME) instead of three sysfs files. */
static void pci_scan(void) {
    DIR *d = opendir("/sys/bus/pci/devices");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && npci < MAX_PCI) {
        if (e->d_name[0] == '.') continue;
        char path[128], buf[512];
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/uevent", e->d_name);
        if (slurp(path, buf, sizeof buf) < 0) continue;
        snprintf(pci[npci].bdf, sizeof pci[npci].bdf, "%s", e->d_name);
        char *p = strstr(buf, "PCI_CLASS=");
        if (p) pci[npci].class = strtoul(p + 10, NULL, 16);
        p = strstr(buf, "PCI_ID=");
        if (p) {
            pci[npci].vendor = strtoul(p + 7, &p, 16);
            if (*p == ':') pci[npci].device = strtoul(p + 1, NULL, 16);
        }
        npci++;
    }
    closedir(d);
}

static const char *pci_device_of(const char *bdf, unsigned *device) {
    for (int i = 0; i < npci; i++)
        if (strcmp(pci[i].bdf, bdf) == 0) {
            *device = pci[i].device;
            return pci[i].bdf;
        }
    return NULL;
}

/* `want` is a comma-separated list of hex device ids; `have` holds the ids found. The two must
 * be the same multiset. */
static int same_ids(const char *want, unsigned *have, int nhave) {
    int used[MAX_PCI] = {0}, nwant = 0;
    for (const char *p = want; *p;) {
        char *end;
        unsigned id = strtoul(p, &end, 16);
        if (end == p) return 0;
        nwant++;
        int found = 0;
        for (int i = 0; i < nhave && !found; i++)
            if (!used[i] && have[i] == id) used[i] = found = 1;
        if (!found) return 0;
        p = *end == ',' ? end + 1 : end;
    }
    return nwant == nhave;
}

static void check_pci(const char *want) {
    pci_scan();
    unsigned ids[MAX_PCI];
    int n = 0;
    char detail[400] = "";
    size_t len = 0;
    for (int i = 0; i < npci; i++) {
        char line[96];
        snprintf(line, sizeof line, "manifold-pci %s %04x:%04x class %06x\n", pci[i].bdf,
                 pci[i].vendor, pci[i].device, pci[i].class);
        say(line);
        if (pci[i].vendor != 0x1af4) continue;
        ids[n++] = pci[i].device;
        len += snprintf(detail + len, sizeof detail - len, "%s%04x", n > 1 ? "," : "",
                        pci[i].device);
        if (len >= sizeof detail) len = sizeof detail - 1;
    }
    check("pci", same_ids(want, ids, n), detail);
}

/* --- modules ------------------------------------------------------------------------------- */

/* Dependencies first (modules.dep of Debian's 6.12 cloud kernel); the IOMMU before the devices
 * behind it. Debian's modules are signed; scripts/guest-assets strips the signatures, since
 * hashing a module in the emulated kernel costs seconds (an unsigned module taints the kernel,
 * which a test guest does not mind). */
static void load(const char *name) {
    char path[96], detail[128];
    snprintf(path, sizeof path, "/lib/modules/%s.ko", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long rc = fd < 0 ? -1 : syscall(SYS_finit_module, fd, "", 0);
    int err = errno;
    if (fd >= 0) close(fd);
    if (rc != 0 && err != EEXIST) {
        snprintf(detail, sizeof detail, "%s: %s", name, strerror(err));
        check("module", 0, detail);
    }
}

/* --- devices ------------------------------------------------------------------------------- */

static void check_hvc(void) {
    static const char line[] = "manifold-hvc0: hello from linux\n";
    int fd = open("/dev/hvc0", O_WRONLY | O_NOCTTY);
    ssize_t n = fd < 0 ? -1 : write(fd, line, sizeof line - 1);
    if (fd >= 0) close(fd);
    check("hvc0", n == (ssize_t)sizeof line - 1, n < 0 ? strerror(errno) : "wrote a line");
}

static void check_rng(void) {
    unsigned char a[32], b[32];
    char detail[96];
    int fd = open("/dev/hwrng", O_RDONLY);
    ssize_t na = fd < 0 ? -1 : read(fd, a, sizeof a);
    ssize_t nb = fd < 0 ? -1 : read(fd, b, sizeof b);
    if (fd >= 0) close(fd);
    if (na != sizeof a || nb != sizeof b) {
        snprintf(detail, sizeof detail, "read %zd and %zd bytes: %s", na, nb, strerror(errno));
        check("rng", 0, detail);
        return;
    }
    char current[64] = "?";
    slurp("/sys/class/misc/hw_random/rng_current", current, sizeof current);
    snprintf(detail, sizeof detail, "%s: 2x32 bytes, %02x%02x%02x%02x...", current, a[0], a[1],
             a[2], a[3]);
    check("rng", memcmp(a, b, sizeof a) != 0 && strncmp(current, "virtio_rng", 10) == 0, detail);
}

#define BLK_LEN 65536
#define BLK_HOST_AT (1 << 20)

static void check_blk(void) {
    static unsigned char wbuf[BLK_LEN] __attribute__((aligned(4096)));
    static unsigned char rbuf[BLK_LEN] __attribute__((aligned(4096)));
    char detail[160];
    if (wait_path("/dev/vda", 120) < 0) {
        check("blk", 0, "no /dev/vda");
        return;
    }
    /* The pattern the host test recomputes: a tag, then bytes no two neighbouring sectors share. */
    for (unsigned i = 0; i < BLK_LEN; i++) wbuf[i] = (unsigned char)(i * 31 + i / 512 + 0x5a);
    memcpy(wbuf, "manifold-blk-pattern", 20);
    int fd = open("/dev/vda", O_RDWR | O_DIRECT);
    if (fd < 0) {
        snprintf(detail, sizeof detail, "open /dev/vda: %s", strerror(errno));
        check("blk", 0, detail);
        return;
    }
    ssize_t w = pwrite(fd, wbuf, BLK_LEN, 0);
    int synced = fsync(fd);
    ssize_t r = pread(fd, rbuf, BLK_LEN, 0);
    int same = r == BLK_LEN && memcmp(wbuf, rbuf, BLK_LEN) == 0;
    ssize_t h = pread(fd, rbuf, BLK_LEN, BLK_HOST_AT);
    close(fd);
    snprintf(detail, sizeof detail, "wrote %zd, fsync %d, read back %s, host region fnv %08x", w,
             synced, same ? "same" : "DIFFERENT", h == BLK_LEN ? fnv1a(rbuf, BLK_LEN) : 0);
    check("blk", w == BLK_LEN && synced == 0 && same && h == BLK_LEN, detail);
}

static int ifreq_ioctl(int s, unsigned long req, struct ifreq *ifr) { return ioctl(s, req, ifr); }

static void set_addr(struct ifreq *ifr, in_addr_t a) {
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr->ifr_addr;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = a;
}

static void check_net(const char *spec) {
    char guest[32] = "", detail[160];
    const char *comma = strchr(spec, ',');
    if (!comma || comma - spec >= (long)sizeof guest) {
        check("net", 0, "manifold_net=GUEST,HOST expected");
        return;
    }
    memcpy(guest, spec, comma - spec);
    in_addr_t ga = inet_addr(guest), ha = inet_addr(comma + 1);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "eth0");
    int tries = 0;
    while (ifreq_ioctl(s, SIOCGIFFLAGS, &ifr) < 0 && tries++ < 480) nap_ms(250);
    set_addr(&ifr, ga);
    int ok = ifreq_ioctl(s, SIOCSIFADDR, &ifr) == 0;
    set_addr(&ifr, htonl(0xffffff00));
    ok = ok && ifreq_ioctl(s, SIOCSIFNETMASK, &ifr) == 0;
    ok = ok && ifreq_ioctl(s, SIOCGIFFLAGS, &ifr) == 0;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    ok = ok && ifreq_ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
    if (!ok) {
        snprintf(detail, sizeof detail, "eth0 up with %s: %s", guest, strerror(errno));
        check("net", 0, detail);
        close(s);
        return;
    }
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(5555), .sin_addr = {ha}};
    char msg[64], reply[128];
    ssize_t n = -1;
    int sent;
    /* The first datagram waits for ARP; a lost one is sent again. */
    for (sent = 1; sent <= 10 && n < 0; sent++) {
        int len = snprintf(msg, sizeof msg, "manifold-net ping %d from %s", sent, guest);
        sendto(s, msg, len, 0, (struct sockaddr *)&to, sizeof to);
        n = recv(s, reply, sizeof reply - 1, 0);
    }
    close(s);
    if (n < 0) {
        snprintf(detail, sizeof detail, "no answer from %s:5555 to %d datagrams", comma + 1,
                 sent - 1);
        check("net", 0, detail);
        return;
    }
    reply[n] = 0;
    snprintf(detail, sizeof detail, "eth0 %s, %s:5555 answered \"%s\"", guest, comma + 1, reply);
    check("net", strncmp(reply, "manifold-net pong", 17) == 0, detail);
}

/* --- SR-IOV virtio-net ---------------------------------------------------------------------- */

#define MAX_VFS 8

static int count_netdevs(void) {
    int n = 0;
    DIR *d = opendir("/sys/class/net");
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static int write_str(const char *path, const char *v) {
    int fd = open(path, O_WRONLY);
    ssize_t n = fd < 0 ? -1 : write(fd, v, strlen(v));
    int err = errno;
    if (fd >= 0) close(fd);
    errno = err;
    return n == (ssize_t)strlen(v) ? 0 : -1;
}

/* The interface name of PCI function `dir` (a virtio-net device): dir/virtioN/net/NAME. */
static int netdev_of(const char *dir, char *name, size_t len) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && found < 0 && (e = readdir(d))) {
        if (strncmp(e->d_name, "virtio", 6) != 0) continue;
        char path[256];
        snprintf(path, sizeof path, "%s/%s/net", dir, e->d_name);
        DIR *n = opendir(path);
        struct dirent *f;
        while (n && (f = readdir(n)))
            if (f->d_name[0] != '.') {
                snprintf(name, len, "%s", f->d_name);
                found = 0;
                break;
            }
        if (n) closedir(n);
    }
    if (d) closedir(d);
    return found;
}

/* Interface `name` up (flags read first: setting them replaces all the changeable ones), with
 * address `a` if it is not 0; the classful default mask (/8 for 10.x) is all the ping needs. */
static int if_up(int s, const char *name, in_addr_t a) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (a) {
        set_addr(&ifr, a);
        if (ifreq_ioctl(s, SIOCSIFADDR, &ifr) < 0) return -1;
    }
    if (ifreq_ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags |= IFF_UP;
    return ifreq_ioctl(s, SIOCSIFFLAGS, &ifr);
}

/* Move interfaces `names[i]` into the network namespaces of processes `pids[i]`: one
 * RTM_NEWLINK each (found by IFLA_IFNAME, moved by IFLA_NET_NS_PID), all in one send, then
 * their acks. 0 or a negative errno. */
static int move_to_netns(char (*names)[IFNAMSIZ], const pid_t *pids, int n) {
    struct req {
        struct nlmsghdr nh;
        struct ifinfomsg ifi;
        struct rtattr pid_attr;
        uint32_t pid;
        struct rtattr name_attr;
        char name[IFNAMSIZ];
    } req[2];
    if (n > 2) return -EINVAL;
    memset(req, 0, sizeof req);
    for (int i = 0; i < n; i++) {
        req[i].nh = (struct nlmsghdr){.nlmsg_len = sizeof req[i], .nlmsg_type = RTM_NEWLINK,
                                      .nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK,
                                      .nlmsg_seq = i + 1};
        req[i].ifi.ifi_family = AF_UNSPEC;
        req[i].pid_attr = (struct rtattr){RTA_LENGTH(sizeof(uint32_t)), IFLA_NET_NS_PID};
        req[i].pid = pids[i];
        req[i].name_attr = (struct rtattr){RTA_LENGTH(IFNAMSIZ), IFLA_IFNAME};
        snprintf(req[i].name, IFNAMSIZ, "%s", names[i]);
    }
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (s < 0) return -errno;
    int err = send(s, req, n * sizeof req[0], 0) < 0 ? -errno : 0;
    /* Each request's ack: an NLMSG_ERROR carrying 0 or the errno; they may share a read. */
    for (int acked = 0; err == 0 && acked < n;) {
        char buf[1024];
        ssize_t len = recv(s, buf, sizeof buf, 0);
        if (len < 0) err = -errno;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; len > 0 && NLMSG_OK(h, len);
             h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type != NLMSG_ERROR) continue;
            acked++;
            int e = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (e) err = e;
        }
    }
    close(s);
    return err;
}

static uint16_t inet_sum(const void *p, size_t n) {
    const uint16_t *w = p;
    uint32_t sum = 0;
    for (; n > 1; n -= 2) sum += *w++;
    if (n) sum += *(const uint8_t *)w;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

static long usec_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000L + (t.tv_nsec - t0->tv_nsec) / 1000;
}

/* What the pinging namespace reports back to init through a pipe (one write, atomic). */
struct ping_result {
    int replies, sent, err;
    long first_us, second_us; /* the first reply (its ARP resolution included), the next one */
};

/* In the pinging namespace: ICMP echo requests from a raw socket to `to` until two replies
 * came back (one a second, at most 30 requests). The other namespace's kernel answers. */
static struct ping_result ping_twice(in_addr_t to) {
    struct ping_result r = {0};
    int s = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
    if (s < 0) {
        r.err = errno;
        return r;
    }
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_addr = {to}};
    while (r.replies < 2 && r.sent < 30) {
        struct {
            uint8_t type, code;
            uint16_t sum, id, seq;
            char data[24];
        } echo = {.type = 8, .id = htons(0x6d66), .seq = htons(++r.sent)};
        memcpy(echo.data, "manifold-sriov-ping-ns", 22);
        echo.sum = inet_sum(&echo, sizeof echo);
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (sendto(s, &echo, sizeof echo, 0, (struct sockaddr *)&dst, sizeof dst) < 0) {
            r.err = errno;
            nap_ms(1000); /* no route or link yet: wait as a lost reply would */
            continue;
        }
        /* A raw ICMP socket sees the IP header too; take only our reply, from `to`. */
        unsigned char got[128];
        ssize_t n;
        while ((n = recv(s, got, sizeof got, 0)) >= 0) {
            int ihl = (got[0] & 15) * 4;
            uint16_t seq;
            memcpy(&seq, got + ihl + 6, 2);
            if (n >= ihl + 8 && memcmp(got + 12, &to, 4) == 0 && got[ihl] == 0 &&
                ntohs(seq) == r.sent) {
                if (r.replies++ == 0) r.first_us = usec_since(&t0);
                else r.second_us = usec_since(&t0);
                break;
            }
        }
    }
    close(s);
    return r;
}

/* VF interfaces a and b into two new network namespaces, 10.77.0.1 and 10.77.0.2 on them, and a
 * ping from the first to the second: ARP and ICMP through the embedded switch, nothing else
 * shared. Each namespace is a child that unshared one; init moves the interfaces in by netlink.
 * Pipes order it: `ready` (children to init: unshared, then the result), `go` (init to children:
 * the interfaces are in). The answering child waits for init's SIGKILL. */
static struct ping_result ping_between_netns(char (*names)[IFNAMSIZ]) {
    struct ping_result r = {0};
    int ready[2], go[2];
    pid_t pids[2] = {-1, -1};
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(go, O_CLOEXEC) < 0) {
        r.err = errno;
        return r;
    }
    for (int i = 0; i < 2; i++) {
        pids[i] = fork();
        if (pids[i] != 0) continue;
        close(go[1]); /* so that init's close is the EOF */
        char c = unshare(CLONE_NEWNET) == 0 ? 'u' : 'x';
        (void)!write(ready[1], &c, 1);
        if (c == 'x' || read(go[0], &c, 1) != 1) _exit(1);
        int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        int up = s >= 0 && if_up(s, "lo", 0) == 0 &&
                 if_up(s, names[i], htonl(0x0a4d0001 + i)) == 0;
        if (i == 0) {
            struct ping_result mine = {.err = up ? 0 : errno};
            if (up) mine = ping_twice(htonl(0x0a4d0002));
            (void)!write(ready[1], &mine, sizeof mine);
        } else {
            pause(); /* its kernel answers the pings until init kills it */
        }
        _exit(0);
    }
    close(ready[1]);
    char c[2];
    int got = 0;
    while (pids[0] > 0 && pids[1] > 0 && got < 2 && read(ready[0], c + got, 1) == 1 && c[got] == 'u') got++;
    if (got < 2) {
        r.err = ENOTSUP;
    } else if ((r.err = -move_to_netns(names, pids, 2)) == 0 && write(go[1], "gg", 2) == 2 &&
               read(ready[0], &r, sizeof r) != sizeof r) {
        r.err = EPIPE;
    }
    close(go[1]);
    close(ready[0]);
    close(go[0]);
    for (int i = 0; i < 2; i++)
        if (pids[i] > 0) {
            kill(pids[i], SIGKILL);
            waitpid(pids[i], NULL, 0);
        }
    return r;
}

static void check_sriovnet(const char *spec) {
    char detail[400], pf[160] = "", path[224], v[32];
    int k = atoi(spec);
    /* The PF: a virtio-net function (1af4:1041) with an SR-IOV capability. */
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    while (d && !pf[0] && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char dev[16] = "";
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", e->d_name);
        slurp(path, dev, sizeof dev);
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/sriov_totalvfs", e->d_name);
        if (strcmp(dev, "0x1041") == 0 && access(path, R_OK) == 0)
            snprintf(pf, sizeof pf, "/sys/bus/pci/devices/%s", e->d_name);
    }
    if (d) closedir(d);
    if (!pf[0] || k < 2 || k > MAX_VFS) {
        check("sriovnet", 0, pf[0] ? "manifold_sriovnet=K with 2 <= K <= 8" : "no virtio-net PF");
        return;
    }
    /* The PF's own interface first, so that the count below is the VFs' alone. */
    char name[MAX_VFS][IFNAMSIZ], pf_name[IFNAMSIZ];
    for (int t = 0; t < 480 && netdev_of(pf, pf_name, sizeof pf_name) < 0; t++) nap_ms(250);
    int before = count_netdevs();
    snprintf(v, sizeof v, "%d", k);
    snprintf(path, sizeof path, "%s/sriov_numvfs", pf);
    if (write_str(path, v) < 0) {
        snprintf(detail, sizeof detail, "echo %d > %s: %s", k, path, strerror(errno));
        check("sriovnet", 0, detail);
        return;
    }
    int t = 0;
    while (count_netdevs() < before + k && t++ < 480) nap_ms(250);
    int after = count_netdevs();
    /* Each VF's interface and MAC: VF i's is the PF's + 1 + i, locally administered. */
    unsigned char mac[6], pf_mac[6] = {0};
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", pf_name);
    int macs_ok = ifreq_ioctl(s, SIOCGIFHWADDR, &ifr) == 0;
    memcpy(pf_mac, ifr.ifr_hwaddr.sa_data, 6);
    unsigned pf_low = ((unsigned)pf_mac[3] << 16) | (pf_mac[4] << 8) | pf_mac[5];
    for (int i = 0; i < k; i++) {
        char vf[192];
        snprintf(vf, sizeof vf, "%s/virtfn%d", pf, i);
        if (netdev_of(vf, name[i], sizeof name[i]) < 0) snprintf(name[i], IFNAMSIZ, "?");
        snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name[i]);
        int got = ifreq_ioctl(s, SIOCGIFHWADDR, &ifr) == 0;
        memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
        unsigned want = pf_low + 1 + i;
        macs_ok = macs_ok && got && mac[0] == ((pf_mac[0] | 2) & ~1) && mac[1] == pf_mac[1] &&
                  mac[2] == pf_mac[2] && mac[3] == ((want >> 16) & 0xff) &&
                  mac[4] == ((want >> 8) & 0xff) && mac[5] == (want & 0xff);
    }
    if (s >= 0) close(s);
    int len = snprintf(detail, sizeof detail, "%d VFs: %d interfaces -> %d (%s..%s), MACs %s", k,
                       before, after, name[0], name[k - 1], macs_ok ? "PF+1.." : "WRONG");
    struct ping_result r = ping_between_netns(name);
    int ok = after == before + k && macs_ok && r.replies == 2;
    if (r.replies == 2)
        len += snprintf(detail + len, sizeof detail - len,
                        "; ping %s (netns A, 10.77.0.1) -> %s (netns B, 10.77.0.2): 2 replies to "
                        "%d requests, round trip %ld.%03ld ms (with ARP), %ld.%03ld ms",
                        name[0], name[1], r.sent, r.first_us / 1000, r.first_us % 1000,
                        r.second_us / 1000, r.second_us % 1000);
    else
        len += snprintf(detail + len, sizeof detail - len,
                        "; ping %s (netns A) -> %s (netns B): %d replies to %d requests, %s",
                        name[0], name[1], r.replies, r.sent, strerror(r.err));
    if (len >= (int)sizeof detail) len = sizeof detail - 1;
    if (write_str(path, "0") < 0) ok = 0;
    t = 0;
    while (count_netdevs() > before && t++ < 480) nap_ms(250);
    snprintf(detail + len, sizeof detail - len, "; 0 VFs: %d interfaces", count_netdevs());
    check("sriovnet", ok && count_netdevs() == before, detail);
}

/* Each iommu group's devices, by PCI address, mapped to device ids. */
static void check_iommu(const char *want) {
    unsigned ids[MAX_PCI];
    int n = 0;
    char detail[256] = "";
    size_t len = 0;
    DIR *groups = opendir("/sys/kernel/iommu_groups");
    struct dirent *g;
    while (groups && (g = readdir(groups))) {
        if (g->d_name[0] == '.') continue;
        char path[128];
        snprintf(path, sizeof path, "/sys/kernel/iommu_groups/%s/devices", g->d_name);
        DIR *devs = opendir(path);
        struct dirent *d;
        while (devs && (d = readdir(devs)) && n < MAX_PCI) {
            if (d->d_name[0] == '.') continue;
            unsigned id = 0;
            pci_device_of(d->d_name, &id);
            ids[n++] = id;
            len += snprintf(detail + len, sizeof detail - len, "%sgroup %s: %s (%04x)",
                            n > 1 ? ", " : "", g->d_name, d->d_name, id);
            if (len >= sizeof detail) len = sizeof detail - 1;
        }
        if (devs) closedir(devs);
    }
    if (groups) closedir(groups);
    check("iommu-groups", n > 0 && same_ids(want, ids, n), n ? detail : "no iommu groups");
}

static int read_line(int fd, char *buf, size_t len) {
    size_t got = 0;
    while (got < len - 1) {
        ssize_t n = read(fd, buf + got, len - 1 - got);
        if (n <= 0) break;
        got += n;
        if (memchr(buf, '\n', got)) break;
    }
    buf[got] = 0;
    char *nl = strchr(buf, '\n');
    if (nl) *nl = 0;
    return nl ? 0 : -1;
}

static void check_vsock(const char *spec) {
    unsigned host_port = 0, guest_port = 0;
    char line[128], detail[200];
    if (sscanf(spec, "%u,%u", &host_port, &guest_port) != 2) {
        check("vsock", 0, "manifold_vsock=HOSTPORT,GUESTPORT expected");
        return;
    }
    /* Guest to host: a line out, the host's line back. */
    struct sockaddr_vm host = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                               .svm_port = host_port};
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int ok = s >= 0 && connect(s, (struct sockaddr *)&host, sizeof host) == 0;
    static const char hello[] = "hello from linux\n";
    ok = ok && write(s, hello, sizeof hello - 1) == sizeof hello - 1;
    struct timeval tv = {60, 0};
    if (ok) setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ok = ok && read_line(s, line, sizeof line) == 0;
    if (s >= 0) close(s);
    snprintf(detail, sizeof detail, "to host port %u: %s%s", host_port,
             ok ? "got " : strerror(errno), ok ? line : "");
    check("vsock-connect", ok && strcmp(line, "hello linux") == 0, detail);

    /* Host to guest: accept on guest_port, echo a line. */
    struct sockaddr_vm any = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                              .svm_port = guest_port};
    int l = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ok = l >= 0 && bind(l, (struct sockaddr *)&any, sizeof any) == 0 && listen(l, 1) == 0;
    if (ok) setsockopt(l, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (ok) {
        snprintf(line, sizeof line, "manifold-init: vsock listening on %u\n", guest_port);
        say(line);
    }
    int c = ok ? accept(l, NULL, NULL) : -1;
    if (l >= 0) close(l);
    ok = c >= 0;
    if (ok) setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ok = ok && read_line(c, line, sizeof line) == 0;
    char echo[160];
    int len = snprintf(echo, sizeof echo, "echo: %s\n", line);
    ok = ok && write(c, echo, len) == len;
    if (c >= 0) close(c);
    snprintf(detail, sizeof detail, "on port %u: %s%s", guest_port, ok ? "got " : strerror(errno),
             ok ? line : "");
    check("vsock-accept", ok, detail);
}

int main(void) {
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int fd = open("/dev/console", O_WRONLY);
    if (fd >= 0) out = fd;
    say("manifold-init: started\n");
    check("console", 1, "ttyS0");

    char buf[128];
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    const char *want = getenv("manifold_cpus");
    if (slurp("/sys/devices/system/cpu/online", buf, sizeof buf) == 0) {
        char expect[32] = "0";
        if (want && strcmp(want, "1") != 0) snprintf(expect, sizeof expect, "0-%d", atoi(want) - 1);
        check("cpus-online", strcmp(buf, expect) == 0, buf);
    } else {
        check("cpus-online", 0, "cannot read /sys/devices/system/cpu/online");
    }

    const char *pci_want = getenv("manifold_pci"), *iommu = getenv("manifold_iommu"),
               *blk = getenv("manifold_blk"), *net = getenv("manifold_net"),
               *rng = getenv("manifold_rng"), *hvc = getenv("manifold_hvc"),
               *vsock = getenv("manifold_vsock"), *sriovnet = getenv("manifold_sriovnet");
    if (pci_want || iommu) check_pci(pci_want ? pci_want : "");

    if (iommu || blk || net || rng || vsock || sriovnet) say("manifold-init: loading modules\n");
    if (iommu) load("virtio-iommu");
    if (blk) load("virtio_blk");
    if (net || sriovnet) {
        load("failover");
        load("net_failover");
        load("virtio_net");
    }
    if (rng) load("virtio-rng");
    if (vsock) {
        load("vsock");
        load("vmw_vsock_virtio_transport_common");
        load("vmw_vsock_virtio_transport");
    }

    if (hvc) check_hvc();
    if (rng) check_rng();
    if (blk) check_blk();
    if (net) check_net(net);
    if (sriovnet) check_sriovnet(sriovnet);
    /* After blk and net: a device behind the IOMMU joins its group when its deferred probe runs. */
    if (iommu) check_iommu(iommu);
    if (vsock) check_vsock(vsock);

    if (getenv("manifold_shell")) {
        say("manifold-init: starting /bin/sh\n");
        dup2(out, 0);
        dup2(out, 1);
        dup2(out, 2);
        execl("/bin/sh", "sh", NULL);
        say("manifold-init: cannot start /bin/sh\n");
    }
    snprintf(buf, sizeof buf, "manifold-init: %d check%s failed, powering off\n", failures,
             failures == 1 ? "" : "s");
    say(buf);
    sync();
    reboot(RB_POWER_OFF);
    return 1;
}
