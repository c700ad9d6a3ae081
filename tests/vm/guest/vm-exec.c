/*
 * vm-exec: the guest's PID 1 once the root is set up (exec'd by stage2).
 *
 * Runs the command that tests/vm/run forwarded through the per-run share,
 * with the caller's argv, environment and working directory, stdout on
 * /dev/ttyS1 and stderr on /dev/ttyS2 (each streamed to the host's own
 * stdout/stderr), then records the exit status in the share and powers off.
 *
 * Why C and not shell: argv and the environment arrive as NUL-separated
 * files (they may hold any byte but NUL, and the environment can exceed
 * what the kernel command line or a shell-quoted file handles safely);
 * busybox sh cannot read NUL-separated data. Static, so it does not depend
 * on the libc of the host root the guest switches into.
 *
 * Usage: vm-exec SHARE_DIR
 *   SHARE_DIR/argv  command and arguments, each NUL-terminated
 *   SHARE_DIR/env   environment, "NAME=VALUE" entries, each NUL-terminated
 *   SHARE_DIR/cwd   working directory (no trailing newline needed)
 *   SHARE_DIR/status  written here: decimal exit status (128+N on signal N)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

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

/* Read a whole file; returns its size in *len, NUL-terminates the buffer. */
static char *slurp(const char *name, size_t *len)
{
	char path[4096];
	size_t cap = 65536, n = 0;
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

/* Raw mode: no \n -> \r\n translation, every byte passes through as is. */
static int open_tty(const char *path)
{
	struct termios t;
	int fd = open(path, O_WRONLY | O_NOCTTY);

	if (fd < 0) {
		say("cannot open", path);
		power_off();
	}
	if (tcgetattr(fd, &t) == 0) {
		cfmakeraw(&t);
		tcsetattr(fd, TCSANOW, &t);
	}
	return fd;
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

int main(int argc, char **argv)
{
	size_t alen, elen, clen;
	char **cargv, **cenv, *abuf, *ebuf, *cwd;
	int out, err, status, code;
	pid_t child, pid;

	if (argc != 2)
		return 2;
	share = argv[1];
	abuf = slurp("argv", &alen);
	ebuf = slurp("env", &elen);
	cargv = split0(abuf, alen);
	cenv = split0(ebuf, elen);
	cwd = slurp("cwd", &clen);
	if (!cargv[0]) {
		errno = EINVAL;
		say("empty command in", share);
		power_off();
	}

	out = open_tty("/dev/ttyS1");
	err = open_tty("/dev/ttyS2");

	child = fork();
	if (child < 0) {
		say("fork", "");
		power_off();
	}
	if (child == 0) {
		int null = open("/dev/null", O_RDONLY);

		setsid();
		dup2(null, 0);
		dup2(out, 1);
		dup2(err, 2);
		if (null > 2)
			close(null);
		close(out);
		close(err);
		if (chdir(cwd) < 0) {
			dprintf(2, "vm: cannot enter %s in the guest: %s\n", cwd, strerror(errno));
			_exit(125);
		}
		/* execvp looks PATH up in the current environment: install the
		 * caller's first. */
		environ = cenv;
		execvp(cargv[0], cargv);
		dprintf(2, "vm: cannot execute %s: %s\n", cargv[0], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}

	/* As PID 1 we inherit every orphan: reap them all until ours exits. */
	for (;;) {
		pid = wait(&status);
		if (pid == child)
			break;
		if (pid < 0 && errno != EINTR) {
			say("wait", "");
			power_off();
		}
	}
	code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

	/* Wait until the UARTs have sent every byte to qemu before the
	 * status appears and the machine goes away. */
	tcdrain(out);
	tcdrain(err);
	write_status(code);
	power_off();
	return 0;
}
