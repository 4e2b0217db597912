/* /init of the Linux test guest: runs the checks, reports each as one line on the console
 * ("manifold-check NAME ok|FAIL detail"), then powers off. A static program rather than a shell
 * script because on hosts that hand instructions back each system call costs ~0.1 s: this one
 * makes a dozen. With manifold_shell=1 on the kernel command line it starts a busybox shell
 * instead of powering off. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <unistd.h>

static int out = 1;

static void say(const char *s) { (void)!write(out, s, strlen(s)); }

static void check(const char *name, int ok, const char *detail) {
    char line[256];
    snprintf(line, sizeof line, "manifold-check %s %s %s\n", name, ok ? "ok" : "FAIL", detail);
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

    if (getenv("manifold_shell")) {
        say("manifold-init: starting /bin/sh\n");
        dup2(out, 0);
        dup2(out, 1);
        dup2(out, 2);
        execl("/bin/sh", "sh", NULL);
        say("manifold-init: cannot start /bin/sh\n");
    }
    say("manifold-init: powering off\n");
    sync();
    reboot(RB_POWER_OFF);
    return 1;
}
