//! Thin images whose blob data lives on a remote: a directory, and nginx over loopback HTTP.
//! Needs root, /dev/fuse and nginx (Debian package nginx-light; scripts/install-deps).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{
    FuseMount, bin, manifest_blobs, pread, pseudo_random_bytes, run, run_ok, wait_until,
};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EIO: i32 = 5;

struct Fixture {
    t: tempfile::TempDir,
    img: PathBuf,
    thin: PathBuf,
    /// digest -> content
    blobs: HashMap<String, Vec<u8>>,
    pub_key: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        for (i, size) in [0usize, 1, 4096, 4097, 100_000, 3 << 20, (9 << 20) + 5]
            .iter()
            .enumerate()
        {
            fs::write(
                src.join(format!("f{i}")),
                pseudo_random_bytes(i as u64 + 7, *size),
            )
            .unwrap();
        }
        let key = t.path().join("k.pem");
        run_ok(Command::new(bin("blobfs")).arg("keygen").arg(&key));
        let img = t.path().join("img");
        run_ok(
            Command::new(bin("mkfs-blobfs"))
                .arg("-q")
                .arg("--sign")
                .arg(&key)
                .arg("--manifest")
                .arg(t.path().join("man"))
                .arg(&img)
                .arg(&src),
        );
        let blobs = manifest_blobs(&t.path().join("man"));
        let thin = t.path().join("thin");
        run_ok(Command::new(bin("blobfs")).arg("thin").arg(&img).arg(&thin));
        Fixture {
            pub_key: t.path().join("k.pub.pem"),
            img,
            thin,
            blobs,
            t,
        }
    }

    fn push(&self, url: &str) -> String {
        run_ok(
            Command::new(bin("blobfs"))
                .arg("push")
                .arg(&self.img)
                .arg(url),
        )
    }

    /// The thin image, signed, from `url`.
    fn mount(&self, url: &str, extra: &[&str]) -> Result<FuseMount, String> {
        let key = self.pub_key.to_str().unwrap();
        let args = [&["--key", key, "--remote", url], extra].concat();
        self.mount_thin(&args, |_| {})
    }

    /// The thin image in the foreground with `args`; `env` adds to the daemon's environment.
    fn mount_thin(&self, args: &[&str], env: impl Fn(&mut Command)) -> Result<FuseMount, String> {
        FuseMount::start(|dir| {
            let mut c = Command::new(bin("blobfs"));
            c.arg("mount").arg(&self.thin).arg(dir).arg("-f").args(args);
            env(&mut c);
            c
        })
    }

    fn big(&self) -> &str {
        self.blobs
            .iter()
            .max_by_key(|(_, c)| c.len())
            .map(|(d, _)| d.as_str())
            .unwrap()
    }
}

fn object(dir: &Path, digest: &str) -> PathBuf {
    dir.join(&digest[..2]).join(&digest[2..])
}

/// nginx serving `root` on a free loopback port, in the foreground, killed on drop.
struct Nginx {
    child: Option<Child>,
    port: u16,
    _conf: tempfile::TempDir,
}

impl Nginx {
    fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, None)
    }

    /// With `tls` (certificate, key), the server speaks HTTPS only.
    fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx not installed (apt-get install nginx-light; scripts/install-deps)");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = tempfile::tempdir().unwrap();
        let c = conf.path().display();
        let text = format!(
            "daemon off; master_process off; worker_processes 1; pid {c}/pid;\n\
             error_log {c}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {c}/b; proxy_temp_path {c}/p;\n\
             fastcgi_temp_path {c}/f; uwsgi_temp_path {c}/u; scgi_temp_path {c}/s;\n\
             server {{ listen 127.0.0.1:{port}{}; root {}; }} }}\n",
            match tls {
                Some((cert, key)) => format!(
                    " ssl; ssl_certificate {}; ssl_certificate_key {}",
                    cert.display(),
                    key.display()
                ),
                None => String::new(),
            },
            root.display()
        );
        fs::write(conf.path().join("nginx.conf"), text).unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(conf.path().join("nginx.conf"))
            .arg("-p")
            .arg(conf.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "nginx did not start listening: {}",
            fs::read_to_string(conf.path().join("error.log")).unwrap_or_default()
        );
        Nginx {
            child: Some(child),
            port,
            _conf: conf,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn thin_image_is_the_signed_prefix_and_needs_a_remote() {
    let f = Fixture::new();
    let full = fs::read(&f.img).unwrap();
    let thin = fs::read(&f.thin).unwrap();
    assert!(
        thin.len() < full.len() / 10,
        "thin {} of {}",
        thin.len(),
        full.len()
    );
    assert_eq!(
        &full[..thin.len()],
        &thin[..],
        "header, signatures, index, trees unchanged"
    );

    let d = f.big().to_owned();
    let out = run(Command::new(bin("blobfs")).arg("cat").arg(&f.thin).arg(&d));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("thin image"), "{err}");

    let mp = f.t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let out = run(Command::new(bin("blobfs"))
        .arg("mount")
        .arg(&f.thin)
        .arg(&mp)
        .arg("-f"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remote"));

    // Unsupported remotes are usage-level failures with a message, not panics.
    let out = run(Command::new(bin("blobfs"))
        .arg("cat")
        .arg(&f.thin)
        .arg(&d)
        .arg("--remote")
        .arg("gopher://example.invalid/x"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported URL"));

    // A thin image cannot be pushed or thinned again; neither leaves anything behind.
    for args in [
        vec!["push".into(), f.thin.clone(), f.t.path().join("objs")],
        vec!["thin".into(), f.thin.clone(), f.t.path().join("thinner")],
    ] {
        let out = run(Command::new(bin("blobfs")).args(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!args[2].exists(), "{args:?} left {}", args[2].display());
    }
}

#[test]
fn push_names_objects_by_digest_and_resumes() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    let out = f.push(objs.to_str().unwrap());
    assert!(
        out.contains(&format!("{} blobs uploaded", f.blobs.len())),
        "{out}"
    );
    for (d, content) in &f.blobs {
        assert_eq!(&fs::read(object(&objs, d)).unwrap(), content, "object {d}");
    }
    let out = f.push(&format!("file://{}", objs.display()));
    assert!(out.contains("0 blobs uploaded"), "{out}");
    let verify = || {
        run(Command::new(bin("blobfs"))
            .arg("verify")
            .arg(&f.thin)
            .arg("--key")
            .arg(&f.pub_key)
            .arg("--remote")
            .arg(&objs))
    };
    let v = verify();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(
        out.contains(&format!("{} already there", f.blobs.len())),
        "{out}"
    );

    // An interrupted push: one object missing, one cut short. Both are sent again.
    let mut digests: Vec<_> = f.blobs.keys().filter(|d| !f.blobs[*d].is_empty()).collect();
    digests.sort();
    fs::remove_file(object(&objs, digests[0])).unwrap();
    let cut = fs::OpenOptions::new()
        .write(true)
        .open(object(&objs, digests[1]))
        .unwrap();
    cut.set_len(f.blobs[digests[1]].len() as u64 / 2).unwrap();
    let v = verify();
    assert_eq!(v.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&v.stdout).matches("BAD ").count() == 2);
    let out = f.push(objs.to_str().unwrap());
    assert!(out.contains("2 blobs uploaded"), "{out}");
    for (d, content) in &f.blobs {
        assert_eq!(&fs::read(object(&objs, d)).unwrap(), content, "object {d}");
    }
}

#[test]
fn thin_mount_from_a_directory_reads_every_blob() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let m = f.mount(&format!("file://{}", objs.display()), &[]).unwrap();
    for (d, content) in &f.blobs {
        assert_eq!(&fs::read(m.path.join(d)).unwrap(), content, "blob {d}");
    }
    let log = m.unmount();
    assert!(log.contains("thin image"), "{log}");
}

#[test]
fn thin_mount_over_http_verifies_and_tampered_blocks_fail_alone() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let nginx = Nginx::start(&objs);
    {
        let m = f.mount(&nginx.url(), &[]).unwrap();
        for (d, content) in &f.blobs {
            assert_eq!(&fs::read(m.path.join(d)).unwrap(), content, "blob {d}");
            let file = fs::File::open(m.path.join(d)).unwrap();
            for k in 0..20u64 {
                let len = content.len() as u64;
                let off = if len == 0 { 0 } else { (k * 7919 * 4093) % len };
                let n = (k as usize * 1031) % 70_000 + 1;
                let got = pread(&file, off, n).unwrap();
                let hi = (off as usize + n).min(content.len());
                assert_eq!(&got[..], &content[off as usize..hi], "{d} at {off}+{n}");
            }
        }
    }

    // The server now lies about block 5 of the big blob. Only that block fails.
    let d = f.big().to_owned();
    let obj = fs::OpenOptions::new()
        .write(true)
        .open(object(&objs, &d))
        .unwrap();
    obj.write_all_at(b"\xffTAMPERED", 5 * 4096 + 17).unwrap();
    let m = f.mount(&nginx.url(), &[]).unwrap();
    let file = fs::File::open(m.path.join(&d)).unwrap();
    let content = &f.blobs[&d];
    for block in [0u64, 4, 6, 100, (content.len() as u64 - 1) / 4096] {
        let got = pread(&file, block * 4096, 4096).unwrap();
        let lo = (block * 4096) as usize;
        let hi = (lo + 4096).min(content.len());
        assert_eq!(&got[..], &content[lo..hi], "block {block}");
    }
    assert_eq!(pread(&file, 5 * 4096, 4096), Err(EIO));
    assert_eq!(pread(&file, 5 * 4096 + 100, 10), Err(EIO));
    drop(file);
    let log = m.unmount();
    assert!(log.contains(&d[..16]) || log.contains(&d), "{log}");
}

/// Reads of a dead or silent remote fail with EIO within the timeout: no hung mount.
#[test]
fn dead_and_silent_servers_give_eio_not_a_hang() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let d = f.big().to_owned();

    // Accepts connections, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let m = f
        .mount(
            &format!("http://127.0.0.1:{silent_port}/"),
            &["-o", "remote_timeout=1"],
        )
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(
        integration_tests::read_file(&m.path.join(&d)).map(|v| v.len()),
        Err(EIO)
    );
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(60), "read took {waited:?}");
    drop(m);

    // nginx serves a first read, then dies: later reads fail, the mount stays usable.
    let mut nginx = Nginx::start(&objs);
    let m = f.mount(&nginx.url(), &["-o", "remote_timeout=1"]).unwrap();
    let file = fs::File::open(m.path.join(&d)).unwrap();
    assert_eq!(pread(&file, 0, 4096).unwrap(), &f.blobs[&d][..4096]);
    nginx.stop();
    assert_eq!(pread(&file, 2 << 20, 4096), Err(EIO));
    // Still mounted and answering metadata.
    assert!(fs::metadata(m.path.join(&d)).is_ok());
    drop(file);
    drop(m);
}

/// A server that answers with fewer bytes than it announced, then hangs up.
#[test]
fn truncated_responses_give_eio() {
    let f = Fixture::new();
    let d = f.big().to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-131071/3145728\r\n\
                  Content-Length: 131072\r\n\r\nshort",
            );
        }
    });
    let m = f
        .mount(
            &format!("http://127.0.0.1:{port}/"),
            &["-o", "remote_timeout=2"],
        )
        .unwrap();
    assert_eq!(
        integration_tests::read_file(&m.path.join(&d)).map(|v| v.len()),
        Err(EIO)
    );
}

fn store_init(f: &Fixture) -> PathBuf {
    let store = f.t.path().join("cache");
    run_ok(
        Command::new(bin("blobfs"))
            .args(["store", "init"])
            .arg(&store),
    );
    store
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn cache_serves_later_reads_once_the_server_is_gone() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let store = store_init(&f);
    let mut nginx = Nginx::start(&objs);
    let m = f
        .mount(
            &nginx.url(),
            &["--cache", store.to_str().unwrap(), "-o", "remote_timeout=1"],
        )
        .unwrap();
    for (d, content) in &f.blobs {
        assert_eq!(&fs::read(m.path.join(d)).unwrap(), content, "blob {d}");
    }
    // Each blob read is fetched whole into the store in the background (an empty blob needs
    // no data). Wait until every data file is there before the server goes.
    let fetched = wait_until(Duration::from_secs(60), || {
        f.blobs
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .all(|(d, _)| object(&store.join("objects"), d).exists())
    });
    assert!(
        fetched,
        "blobs read through the mount were not fetched into the cache"
    );
    nginx.stop();
    // Dropping the page cache makes every read go to the daemon, which now has only its
    // cache (retried briefly: a data file lands a moment before its index record).
    let all_local = wait_until(Duration::from_secs(30), || {
        drop_caches();
        f.blobs
            .iter()
            .all(|(d, c)| fs::read(m.path.join(d)).is_ok_and(|got| &got == c))
    });
    assert!(
        all_local,
        "blobs not served from the cache after the server stopped"
    );
    drop(m);
    let ls = run_ok(
        Command::new(bin("blobfs"))
            .args(["store", "ls"])
            .arg(&store),
    );
    for (d, _) in f.blobs.iter().filter(|(_, c)| !c.is_empty()) {
        assert!(ls.contains(d.as_str()), "{d} not in the cache: {ls}");
    }
}

#[test]
fn prefetch_fills_the_cache_for_an_offline_mount_and_refuses_bad_objects() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let store = store_init(&f);
    let mut nginx = Nginx::start(&objs);

    // A tampered object is refused (its digest does not match) and not cached.
    let d = f.big().to_owned();
    let obj = fs::OpenOptions::new()
        .write(true)
        .open(object(&objs, &d))
        .unwrap();
    obj.write_all_at(b"\x00BAD", 4096 * 9).unwrap();
    let prefetch = || {
        run(Command::new(bin("blobfs"))
            .args(["store", "prefetch"])
            .arg(&store)
            .arg("--remote")
            .arg(nginx.url())
            .arg(&f.thin))
    };
    let out = prefetch();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let n = f.blobs.len();
    assert!(
        stdout.contains(&format!(
            "{} blobs fetched, 0 already cached, 1 failed",
            n - 1
        )),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    // Repaired on the server: the next run fetches only what is missing.
    obj.write_all_at(&f.blobs[&d][4096 * 9..4096 * 9 + 4], 4096 * 9)
        .unwrap();
    let out = prefetch();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "1 blobs fetched, {} already cached, 0 failed",
            n - 1
        )),
        "{stdout}"
    );
    nginx.stop();

    let offline = f
        .mount_thin(&["--cache", store.to_str().unwrap(), "--offline"], |_| {})
        .unwrap();
    for (d, content) in &f.blobs {
        assert_eq!(
            &fs::read(offline.path.join(d)).unwrap(),
            content,
            "blob {d}"
        );
    }
    drop(offline);

    // Offline needs a cache; with an empty cache, reads fail cleanly.
    let mp = f.t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let out = run(Command::new(bin("blobfs"))
        .arg("mount")
        .arg(&f.thin)
        .arg(&mp)
        .arg("-f")
        .arg("--offline"));
    assert_eq!(out.status.code(), Some(2));
    let empty = f.t.path().join("empty-cache");
    run_ok(
        Command::new(bin("blobfs"))
            .args(["store", "init"])
            .arg(&empty),
    );
    let m = f
        .mount_thin(&["--cache", empty.to_str().unwrap(), "--offline"], |_| {})
        .unwrap();
    assert_eq!(
        integration_tests::read_file(&m.path.join(&d)).map(|v| v.len()),
        Err(EIO)
    );
}

/// moto's S3 server on a free loopback port, with one bucket, killed on drop. moto stands in
/// for an S3-compatible store (scripts/install-deps puts it in a venv in the project cache).
struct S3 {
    child: Child,
    port: u16,
    python: PathBuf,
}

impl S3 {
    fn start() -> S3 {
        let venv = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
            .join("uapi-wishes/venv-moto/bin");
        let server = venv.join("moto_server");
        assert!(
            server.exists(),
            "{} missing: run scripts/install-deps",
            server.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s3 = S3 {
            child,
            port,
            python: venv.join("python"),
        };
        assert!(
            wait_until(Duration::from_secs(30), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "moto_server did not start"
        );
        s3.boto("s3.create_bucket(Bucket='blobs')");
        s3
    }

    fn env(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true");
    }

    /// Run boto3 code with `s3` a client of this server (for what blobfs itself never does).
    fn boto(&self, code: &str) {
        let script = format!(
            "import boto3, sys\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1', \
             aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n",
            self.port
        );
        run_ok(Command::new(&self.python).arg("-c").arg(script));
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn s3_push_mount_read_and_tamper() {
    let f = Fixture::new();
    let s3 = S3::start();
    let url = "s3://blobs/fleet/v1";
    let push = || {
        let mut c = Command::new(bin("blobfs"));
        c.arg("push").arg(&f.img).arg(url);
        s3.env(&mut c);
        run_ok(&mut c)
    };
    let out = push();
    assert!(
        out.contains(&format!("{} blobs uploaded", f.blobs.len())),
        "{out}"
    );
    assert!(push().contains("0 blobs uploaded"));

    let key = f.pub_key.to_str().unwrap();
    let mount = || {
        f.mount_thin(&["--key", key, "--remote", url], |c| s3.env(c))
            .unwrap()
    };
    {
        let m = mount();
        for (d, content) in &f.blobs {
            assert_eq!(&fs::read(m.path.join(d)).unwrap(), content, "blob {d}");
        }
    }

    // Replace the big blob's object with one whose block 5 differs.
    let d = f.big().to_owned();
    let mut bad = f.blobs[&d].clone();
    bad[5 * 4096 + 3] ^= 0x55;
    let bad_path = f.t.path().join("bad-object");
    fs::write(&bad_path, &bad).unwrap();
    s3.boto(&format!(
        "s3.upload_file('{}', 'blobs', 'fleet/v1/{}/{}')",
        bad_path.display(),
        &d[..2],
        &d[2..]
    ));
    let m = mount();
    let file = fs::File::open(m.path.join(&d)).unwrap();
    assert_eq!(
        pread(&file, 4 * 4096, 4096).unwrap(),
        &f.blobs[&d][4 * 4096..5 * 4096]
    );
    assert_eq!(
        pread(&file, 6 * 4096, 4096).unwrap(),
        &f.blobs[&d][6 * 4096..7 * 4096]
    );
    assert_eq!(pread(&file, 5 * 4096, 4096), Err(EIO));
}

/// HTTPS: the server's certificate must chain to a trusted root (here a test CA given through
/// SSL_CERT_FILE, which the TLS client reads); an untrusted one is refused.
#[test]
fn https_remote_needs_a_trusted_certificate() {
    let f = Fixture::new();
    let objs = f.t.path().join("objs");
    f.push(objs.to_str().unwrap());
    let dir = f.t.path().join("tls");
    fs::create_dir(&dir).unwrap();
    let ossl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(&dir).args(args));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    ossl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=blobfs test CA"],
        ]
        .concat(),
    );
    ossl(
        &[
            &["req"],
            &ec[..],
            &["-keyout", "key.pem", "-out", "leaf.csr"],
            &["-subj", "/CN=127.0.0.1"],
        ]
        .concat(),
    );
    fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    let nginx = Nginx::start_with(&objs, Some((&dir.join("cert.pem"), &dir.join("key.pem"))));
    let url = nginx.url().replace("http://", "https://");
    let d = f.big().to_owned();
    let cat = |trust: Option<&Path>| {
        let mut c = Command::new(bin("blobfs"));
        c.arg("cat").arg(&f.thin).arg(&d).arg("--remote").arg(&url);
        if let Some(ca) = trust {
            c.env("SSL_CERT_FILE", ca);
        }
        run(&mut c)
    };
    let ok = cat(Some(&dir.join("ca.pem")));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(ok.stdout, f.blobs[&d]);
    let refused = cat(None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty());
}
