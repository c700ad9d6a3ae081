//! mount(8)-style option strings: `-o key,key=value,...`.
//!
//! A comma inside a value can be written as `\,` (and a backslash as `\\`), so paths with
//! commas remain expressible in fstab.

/// One `key` or `key=value` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOpt {
    pub key: String,
    pub value: Option<String>,
}

/// Split an option string. Empty items (`a,,b`) are ignored as mount(8) does.
pub fn parse(s: &str) -> Vec<MountOpt> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    let mut push = |item: &mut String| {
        if !item.is_empty() {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (item.clone(), None),
            };
            out.push(MountOpt { key, value });
        }
        item.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ',' => push(&mut cur),
            c => cur.push(c),
        }
    }
    push(&mut cur);
    out
}

/// Options that only mean something to mount(8) or fstab processing and are passed to helpers
/// anyway; a helper accepts and ignores them.
pub fn is_fstab_only(key: &str) -> bool {
    matches!(
        key,
        "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "owner"
            | "group"
            | "_netdev"
            | "nofail"
            | "comment"
            | "loop"
    ) || key.starts_with("x-")
        || key.starts_with("X-")
}

/// Generic VFS flags that FUSE-based helpers pass to the kernel mount.
pub fn is_vfs_flag(key: &str) -> bool {
    matches!(
        key,
        "ro" | "rw"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "exec"
            | "noexec"
            | "atime"
            | "noatime"
            | "relatime"
            | "sync"
            | "async"
            | "dirsync"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: Option<&str>) -> MountOpt {
        MountOpt {
            key: k.into(),
            value: v.map(Into::into),
        }
    }

    #[test]
    fn splits_keys_values_and_escapes() {
        assert_eq!(
            parse("ro,key=/a\\,b,,uid=0,layout=objects"),
            vec![
                kv("ro", None),
                kv("key", Some("/a,b")),
                kv("uid", Some("0")),
                kv("layout", Some("objects"))
            ]
        );
        assert_eq!(parse(""), vec![]);
        assert_eq!(parse("a=b=c"), vec![kv("a", Some("b=c"))]);
    }

    #[test]
    fn classifies_fstab_and_vfs_options() {
        assert!(is_fstab_only("noauto") && is_fstab_only("x-systemd.automount"));
        assert!(is_vfs_flag("nodev") && !is_vfs_flag("uid"));
    }
}
