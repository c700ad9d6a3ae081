# Install the tools where mount(8) and mkfs(8) find their helpers.
#   make install [PREFIX=/usr/local] [DESTDIR=...]
# Helpers go to /usr/sbin (= /sbin on merged-/usr Debian), which mount(8) and mkfs(8) search.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= /usr/sbin
MANDIR ?= $(PREFIX)/share/man
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
REL := $(TARGET_DIR)/release

.PHONY: all build man install uninstall check

all: build

build:
	$(CARGO) build --release --workspace --bins

man: build
	$(CARGO) run --release --quiet -p xtask -- man $(TARGET_DIR)/man >/dev/null

install: build man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m 0755 $(REL)/blobfs $(DESTDIR)$(BINDIR)/blobfs
	install -m 0755 $(REL)/mkfs-blobfs $(DESTDIR)$(SBINDIR)/mkfs.blobfs
	# mount.blobfs is the blobfs binary under another name (it checks argv[0]).
	ln -sf $(BINDIR)/blobfs $(DESTDIR)$(SBINDIR)/mount.blobfs
	ln -sf $(BINDIR)/blobfs $(DESTDIR)$(SBINDIR)/mount.blobfs-store
	install -m 0755 $(REL)/subdir-mount $(DESTDIR)$(SBINDIR)/subdir-mount
	# mount.subdir (fstab type "subdir") is subdir-mount under another name.
	ln -sf subdir-mount $(DESTDIR)$(SBINDIR)/mount.subdir
	install -m 0755 $(REL)/idmap-overlay $(DESTDIR)$(SBINDIR)/idmap-overlay
	install -m 0755 $(REL)/loop-immutable $(DESTDIR)$(SBINDIR)/loop-immutable
	install -m 0644 $(TARGET_DIR)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(TARGET_DIR)/man/*.8 $(DESTDIR)$(MANDIR)/man8/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/blobfs $(DESTDIR)$(SBINDIR)/mkfs.blobfs $(DESTDIR)$(SBINDIR)/mount.blobfs
	rm -f $(DESTDIR)$(SBINDIR)/mount.blobfs-store
	rm -f $(DESTDIR)$(MANDIR)/man1/blobfs*.1 $(DESTDIR)$(MANDIR)/man8/mkfs.blobfs.8
	rm -f $(DESTDIR)$(SBINDIR)/subdir-mount $(DESTDIR)$(SBINDIR)/mount.subdir $(DESTDIR)$(MANDIR)/man8/subdir-mount.8
	rm -f $(DESTDIR)$(SBINDIR)/idmap-overlay $(DESTDIR)$(MANDIR)/man8/idmap-overlay.8
	rm -f $(DESTDIR)$(SBINDIR)/loop-immutable $(DESTDIR)$(MANDIR)/man8/loop-immutable.8 $(DESTDIR)$(MANDIR)/man1/loop-immutable-*.1

check:
	./check
