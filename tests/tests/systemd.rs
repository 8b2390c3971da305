//! systemd integration: the units pass `systemd-analyze verify` and the
//! security bar, and the daemon speaks sd_notify to a test NOTIFY_SOCKET
//! listener (READY after load, watchdog pings that stop when a worker wedges,
//! RELOADING, STOPPING).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_tests::{curl, emberd_bin, root, Daemon};

const CONFIG: &str = r#"
[server]
socket = "SOCKET"
[models.kjv-gpt2]
path = "MODELS/kjv-gpt2"
[models.kjv-lstm]
path = "MODELS/kjv-lstm"
"#;

/// A directory with CONFIG written for a socket in it: (dir, socket, config).
fn config_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ember.sock");
    let config = dir.path().join("ember.toml");
    let text = CONFIG
        .replace("SOCKET", &socket.display().to_string())
        .replace("MODELS", &root().join("models").display().to_string());
    std::fs::write(&config, text).unwrap();
    (dir, socket, config)
}

/// A two-token completion through the socket must succeed.
fn two_tokens(socket: &Path, model: &str) {
    let body = format!(r#"{{"model":"{model}","prompt":"And","max_tokens":2}}"#);
    let r = curl(socket, "POST", "/v1/completions", Some(&body), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The units, with `ExecStart` pointing at the built binary (verify wants an
/// executable there), copied into `dir`.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let bin = emberd_bin();
    ["emberd.service", "emberd.socket"]
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(root().join("systemd").join(u)).unwrap();
            let p = dir.join(u);
            std::fs::write(
                &p,
                text.replace("/usr/bin/emberd", &bin.display().to_string()),
            )
            .unwrap();
            p
        })
        .collect()
}

#[test]
fn units_verify_and_the_service_exposure_is_at_most_2() {
    let d = tempfile::tempdir().unwrap();
    let units = units_in(d.path());
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (apt install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");

    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&units[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("emberd.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {text}"));
    assert!(score <= 2.0, "exposure {score}:\n{text}");

    // The snippets parse as what they claim to be.
    let sysusers = std::fs::read_to_string(root().join("systemd/emberd.sysusers")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u ember ")));
    let tmpfiles = std::fs::read_to_string(root().join("systemd/emberd.tmpfiles")).unwrap();
    assert!(tmpfiles.lines().any(|l| l.starts_with("d /run/ember ")));
}

/// A NOTIFY_SOCKET listener: every datagram with the time it came.
struct Notify {
    path: PathBuf,
    rx: mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), msg)).is_err() {
                    return;
                }
            }
        });
        Notify {
            path,
            rx,
            _dir: dir,
        }
    }

    /// Messages until one contains `what` (panics after `secs`); returns them all.
    fn until(&self, what: &str, secs: u64) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut seen = vec![];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((_, m)) => {
                    let hit = m.lines().any(|l| l == what || l.starts_with(what));
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!("no {what:?} within {secs} s; got {seen:?}"),
            }
        }
    }

    /// Everything that arrives during `d`.
    fn during(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut seen = vec![];
        while let Ok((_, m)) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            seen.push(m);
        }
        seen
    }
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[test]
fn ready_after_load_watchdog_pings_reloading_and_stopping() {
    let n = Notify::new();
    let notify = n.path.display().to_string();
    let (_dir, socket, config) = config_dir();
    // Start by hand (not Daemon::start, which waits for /health itself).
    let mut child = std::process::Command::new(emberd_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let before = n.until("READY=1", 60);
    // The moment READY arrives every model answers.
    let r = curl(&socket, "GET", "/health", None, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    two_tokens(&socket, "kjv-lstm");
    assert!(before[0].contains("STATUS=loading 2 models"), "{before:?}");
    let ready = before.last().unwrap();
    assert!(ready.contains("STATUS=serving 2 models"), "{ready}");

    // Pings at half the 1 s watchdog period, with the status.
    let msgs = n.during(Duration::from_millis(2600));
    assert!(pings(&msgs) >= 3, "{msgs:?}");
    assert!(msgs
        .iter()
        .any(|m| m.contains("kjv-gpt2: 0 queued, 0 active")));

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
    let kill = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
    };
    kill("-HUP");
    let msgs = n.until("RELOADING=1", 10);
    let reloading = msgs.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    n.until("READY=1", 30);

    // SIGTERM: STOPPING=1, then a clean exit.
    kill("-TERM");
    n.until("STOPPING=1", 10);
    let st = child.wait().unwrap();
    assert!(st.success());
}

#[test]
fn a_wedged_worker_stops_the_watchdog_pings() {
    let n = Notify::new();
    let notify = n.path.display().to_string();
    let d = Daemon::start_env(
        tempfile::tempdir().unwrap(),
        CONFIG,
        &[
            ("NOTIFY_SOCKET", notify.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("EMBER_FAULT_WEDGE", "kjv-lstm"),
        ],
    );
    n.until("READY=1", 60);
    // Idle workers are healthy: pings flow.
    assert!(pings(&n.during(Duration::from_millis(1600))) >= 2);
    // A request to kjv-lstm hangs its worker in its first step.
    let socket = d.socket.clone();
    std::thread::spawn(move || {
        curl(
            &socket,
            "POST",
            "/v1/completions",
            Some(r#"{"model":"kjv-lstm","prompt":"And","max_tokens":2}"#),
            &["--max-time", "20"],
        )
    });
    // Once the step has run for longer than the period: no more pings.
    let msgs = n.until("STATUS=wedged: kjv-lstm", 15);
    assert!(!msgs.last().unwrap().contains("WATCHDOG=1"));
    let after = n.during(Duration::from_millis(2600));
    assert_eq!(pings(&after), 0, "{after:?}");
    assert!(d.log().contains("stopping watchdog pings"), "{}", d.log());
    // The other model still serves (the daemon is not dead, only reported).
    let r = d.post(
        "/v1/completions",
        r#"{"model":"kjv-gpt2","prompt":"And","max_tokens":2}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Fields of one journald native-protocol datagram (`KEY=value` lines; a
/// value with a newline is `KEY\n` + 64-bit LE length + bytes + `\n`).
fn journal_fields(mut b: &[u8]) -> Vec<(String, String)> {
    let mut out = vec![];
    while !b.is_empty() {
        let line_end = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..line_end];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            b = &b[(line_end + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[line_end + 1..];
            let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.push((key, String::from_utf8_lossy(&rest[8..8 + n]).into_owned()));
            b = &rest[(8 + n + 1).min(rest.len())..];
        }
    }
    out
}

#[test]
fn logs_go_to_journald_with_fields_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    // A stand-in journald: our datagram socket, bind-mounted over
    // /run/systemd/journal in a private mount namespace of the daemon.
    let jdir = tempfile::tempdir().unwrap();
    let journal = UnixDatagram::bind(jdir.path().join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (dir, socket, config) = config_dir();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
             mount --bind \"$1\" /run/systemd/journal && shift && exec \"$@\"",
        )
        .arg("sh")
        .arg(jdir.path())
        .arg(emberd_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("EMBER_LOG", "info")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .spawn()
        .expect("unshare (util-linux)");
    // Read as journald does, all the time: the socket's queue is short
    // (net.unix.max_dgram_qlen, often 10) and a full one blocks the sender.
    let entries = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let reader = {
        let entries = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut quiet_since = Instant::now();
            // Until 1 s without a message after the request's entry arrived.
            loop {
                match journal.recv(&mut buf) {
                    Ok(n) if n > 0 => {
                        entries.lock().unwrap().push(journal_fields(&buf[..n]));
                        quiet_since = Instant::now();
                    }
                    _ => {
                        let done =
                            entries
                                .lock()
                                .unwrap()
                                .iter()
                                .any(|e: &Vec<(String, String)>| {
                                    e.iter().any(|(k, v)| k == "MESSAGE" && v == "request")
                                });
                        if (done && quiet_since.elapsed() > Duration::from_secs(1))
                            || quiet_since.elapsed() > Duration::from_secs(60)
                        {
                            return;
                        }
                    }
                }
            }
        })
    };
    let t0 = Instant::now();
    while curl(&socket, "GET", "/health", None, &[]).status != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not ready: {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    two_tokens(&socket, "kjv-gpt2");
    let _ = reader.join();
    let entries = std::mem::take(&mut *entries.lock().unwrap());
    let _ = child.kill();
    let _ = child.wait();
    let get = |e: &[(String, String)], k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let request = entries
        .iter()
        .find(|e| get(e, "MESSAGE").as_deref() == Some("request"))
        .unwrap_or_else(|| panic!("no request entry in {entries:?}"));
    assert_eq!(
        get(request, "MODEL").as_deref(),
        Some("kjv-gpt2"),
        "{request:?}"
    );
    assert!(get(request, "REQUEST").unwrap().starts_with("cmpl-"));
    assert!(get(request, "PEER").unwrap().starts_with("uid 0 pid "));
    assert_eq!(get(request, "SYSLOG_IDENTIFIER").as_deref(), Some("emberd"));
    assert_eq!(get(request, "PRIORITY").as_deref(), Some("6"));
    assert!(entries
        .iter()
        .any(|e| get(e, "MESSAGE").as_deref() == Some("ready")));
    // Nothing went to stderr instead.
    let text = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!text.contains("request"), "{text}");
}
