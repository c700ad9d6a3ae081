/*
 * vm-exec: both ends of the command channel of tests/vm/run.
 *
 * Guest side, `vm-exec SHARE_DIR`: PID 1 once the root is set up (exec'd by
 * stage2). Runs the command forwarded through the per-run 9p share with the
 * caller's argv, environment and working directory, relays its stdout and
 * stderr to two virtio serial ports, records its exit status in the share
 * and powers off.
 *   SHARE_DIR/argv    command and arguments, each NUL-terminated
 *   SHARE_DIR/env     environment, "NAME=VALUE" entries, each NUL-terminated
 *   SHARE_DIR/cwd     working directory
 *   SHARE_DIR/nonce   end-of-stream marker (read, then deleted)
 *   SHARE_DIR/status  written: decimal exit status (128+N on signal N)
 *   SHARE_DIR/ack     created by the host once it has received both streams
 *
 * Host side, `vm-exec relay NONCE`: copies one port's stream from stdin to
 * stdout, up to the end-of-stream marker, which it strips. Exits 0 when it
 * saw the marker, 1 on EOF without it (the guest died mid-stream).
 *
 * Why this protocol: virtio serial ports are fast (~40 MB/s under TCG,
 * against ~0.2 MB/s for a UART and ~1 MB/s for a virtio console tty), but a
 * write returns as soon as the buffer is queued, and queued data is lost if
 * the guest powers off before qemu has passed it on. So the guest ends each
 * stream with a random marker the command cannot know (the nonce file is
 * deleted before the command starts) and waits until the host, having seen
 * both markers, creates the ack file.
 *
 * Why C and not shell: argv and the environment arrive as NUL-separated
 * files (any byte but NUL, and more than a kernel command line holds);
 * busybox sh cannot read them. Built static, so the same binary runs in the
 * initramfs, in the guest's root and on the host.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NONCE_MAX 128
#define BUF_SIZE 65536

static const char *share;

/* Diagnostics of the harness itself go to the console log (ttyS0). */
static void say(const char *what, const char *arg)
{
	int e = errno, fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);

	if (fd >= 0) {
		dprintf(fd, "vm-exec: %s %s: %s\n", what, arg, strerror(e));
		close(fd);
	}
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	/* Without ACPI power-off, qemu -no-reboot turns a reboot into an exit. */
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Write all of buf; returns -1 on error (errno set). */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t w = write(fd, buf, len);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += w;
		len -= w;
	}
	return 0;
}

/* --- host side ---------------------------------------------------------- */

static int relay(const char *nonce)
{
	static char buf[BUF_SIZE + NONCE_MAX];
	size_t n = strlen(nonce), have = 0, keep;
	int out_ok = 1;
	ssize_t r;

	if (n == 0 || n > NONCE_MAX)
		return 2;
	/* If our reader goes away (`run ... | head`), keep draining so the
	 * guest is never blocked on a full port. */
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		r = read(0, buf + have, BUF_SIZE);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (out_ok)
				write_all(1, buf, have);
			return 1;
		}
		have += r;
		if (have >= n && memcmp(buf + have - n, nonce, n) == 0) {
			if (out_ok)
				write_all(1, buf, have - n);
			return 0;
		}
		/* Hold back what could be the start of the marker. */
		keep = have < n - 1 ? have : n - 1;
		if (out_ok && write_all(1, buf, have - keep) < 0)
			out_ok = 0;
		memmove(buf, buf + have - keep, keep);
		have = keep;
	}
}

/* --- guest side --------------------------------------------------------- */

/* Read a whole file of the share into a NUL-terminated buffer. */
static char *slurp(const char *name, size_t *len)
{
	char path[4096];
	size_t cap = BUF_SIZE, n = 0;
	char *buf = malloc(cap + 1);
	ssize_t r;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", share, name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || !buf) {
		say("cannot read", path);
		power_off();
	}
	while ((r = read(fd, buf + n, cap - n)) != 0) {
		if (r < 0) {
			if (errno == EINTR)
				continue;
			say("read", path);
			power_off();
		}
		n += r;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
			if (!buf)
				power_off();
		}
	}
	close(fd);
	buf[n] = '\0';
	*len = n;
	return buf;
}

/* Split a buffer of NUL-terminated strings into a NULL-terminated vector. */
static char **split0(char *buf, size_t len)
{
	size_t count = 0, i, k = 0;
	char **v;

	for (i = 0; i < len; i++)
		count += buf[i] == '\0';
	v = calloc(count + 2, sizeof(*v));
	if (!v)
		power_off();
	for (i = 0; i < len; i += strlen(buf + i) + 1)
		v[k++] = buf + i;
	v[k] = NULL;
	return v;
}

/*
 * Open the virtio serial port qemu named NAME (run passes name=...). Looked
 * up by name in sysfs because the /dev/vportNpM numbers depend on the PCI
 * order of all virtio devices.
 */
static int open_port(const char *name)
{
	char path[512], got[128];
	struct dirent *de;
	int tries, fd;
	ssize_t r;
	DIR *d;

	/* The name arrives in a control message after the port appears. */
	for (tries = 0; tries < 500; tries++) {
		d = opendir("/sys/class/virtio-ports");
		while (d && (de = readdir(d))) {
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", de->d_name);
			fd = open(path, O_RDONLY);
			if (fd < 0)
				continue;
			r = read(fd, got, sizeof(got) - 1);
			close(fd);
			if (r <= 0)
				continue;
			got[r] = '\0';
			got[strcspn(got, "\n")] = '\0';
			if (strcmp(got, name) == 0) {
				snprintf(path, sizeof(path), "/dev/%s", de->d_name);
				closedir(d);
				fd = open(path, O_WRONLY | O_CLOEXEC);
				if (fd < 0) {
					say("cannot open", path);
					power_off();
				}
				return fd;
			}
		}
		if (d)
			closedir(d);
		sleep_ms(10);
	}
	errno = ENOENT;
	say("no virtio serial port named", name);
	power_off();
	return -1;
}

static void write_status(int status)
{
	char path[4096], tmp[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/status", share);
	snprintf(tmp, sizeof(tmp), "%s/status.tmp", share);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		say("cannot write", tmp);
		return;
	}
	dprintf(fd, "%d\n", status);
	fsync(fd);
	close(fd);
	/* Rename so the host never sees a half-written status. */
	if (rename(tmp, path) < 0)
		say("rename", path);
}

static void on_sigchld(int sig)
{
	(void)sig; /* only here to interrupt poll() */
}

/* Copy one read's worth from pipe *in to port out; closes *in (-1) at EOF.
 * Returns whether it copied anything. */
static int pump(int *in, int out, char *buf)
{
	ssize_t r = read(*in, buf, BUF_SIZE);

	if (r > 0) {
		if (write_all(out, buf, r) < 0)
			say("write to", "port");
		return 1;
	}
	if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
		close(*in);
		*in = -1;
	}
	return 0;
}

static int guest(void)
{
	static char buf[BUF_SIZE];
	char **cargv, **cenv, *abuf, *ebuf, *cwd, *nonce, path[4096];
	size_t alen, elen, clen, nlen;
	int out, err, opipe[2], epipe[2], status = 0, code, done = 0, i;
	struct sigaction sa;
	pid_t child, pid;

	abuf = slurp("argv", &alen);
	ebuf = slurp("env", &elen);
	cwd = slurp("cwd", &clen);
	nonce = slurp("nonce", &nlen);
	snprintf(path, sizeof(path), "%s/nonce", share);
	unlink(path);
	cargv = split0(abuf, alen);
	cenv = split0(ebuf, elen);
	if (!cargv[0] || nlen == 0) {
		errno = EINVAL;
		say("empty command or nonce in", share);
		power_off();
	}
	out = open_port("uapi-vm.stdout");
	err = open_port("uapi-vm.stderr");
	if (pipe2(opipe, O_CLOEXEC) < 0 || pipe2(epipe, O_CLOEXEC) < 0) {
		say("pipe", "");
		power_off();
	}

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sigaction(SIGCHLD, &sa, NULL); /* no SA_RESTART: wakes poll() */

	child = fork();
	if (child < 0) {
		say("fork", "");
		power_off();
	}
	if (child == 0) {
		int null = open("/dev/null", O_RDONLY);

		signal(SIGCHLD, SIG_DFL);
		setsid();
		dup2(null, 0);
		dup2(opipe[1], 1);
		dup2(epipe[1], 2);
		if (chdir(cwd) < 0) {
			dprintf(2, "vm: cannot enter %s in the guest: %s\n", cwd, strerror(errno));
			_exit(125);
		}
		/* execvp looks PATH up in the current environment. */
		environ = cenv;
		execvp(cargv[0], cargv);
		dprintf(2, "vm: cannot execute %s: %s\n", cargv[0], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}
	close(opipe[1]);
	close(epipe[1]);

	/* Relay output until the command exits. As PID 1 we also reap every
	 * orphan. Once it has exited, take what is left in the pipes but do
	 * not wait for EOF: a daemon it left behind may hold them open. */
	while (!done) {
		struct pollfd p[2] = { { opipe[0], POLLIN, 0 }, { epipe[0], POLLIN, 0 } };

		if (poll(p, 2, 100) > 0) {
			if (p[0].revents && opipe[0] >= 0)
				pump(&opipe[0], out, buf);
			if (p[1].revents && epipe[0] >= 0)
				pump(&epipe[0], err, buf);
		}
		while ((pid = waitpid(-1, &i, WNOHANG)) > 0) {
			if (pid == child) {
				status = i;
				done = 1;
			}
		}
	}
	fcntl(opipe[0], F_SETFL, O_NONBLOCK);
	fcntl(epipe[0], F_SETFL, O_NONBLOCK);
	while (opipe[0] >= 0 && pump(&opipe[0], out, buf))
		;
	while (epipe[0] >= 0 && pump(&epipe[0], err, buf))
		;
	code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

	if (write_all(out, nonce, nlen) < 0 || write_all(err, nonce, nlen) < 0)
		say("write end marker to", "port");
	write_status(code);
	/* Power off only once the host has both streams (see the top). The
	 * host's timeout covers a host that never answers. */
	snprintf(path, sizeof(path), "%s/ack", share);
	while (access(path, F_OK) < 0)
		sleep_ms(5);
	power_off();
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "relay") == 0)
		return relay(argv[2]);
	if (argc != 2) {
		fprintf(stderr, "usage: vm-exec SHARE_DIR | vm-exec relay NONCE\n");
		return 2;
	}
	share = argv[1];
	return guest();
}
