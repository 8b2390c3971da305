//! Helpers shared by Ember's end-to-end tests: where the repository, the demo
//! models and the `emberd` binary are, and the golden files' format.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `models/NAME` or `tests/fixtures/NAME`, whichever exists.
pub fn model(name: &str) -> PathBuf {
    let m = root().join("models").join(name);
    if m.is_dir() {
        return m;
    }
    root().join("tests/fixtures").join(name)
}

/// The `emberd` binary of this build. `cargo test --workspace` builds it
/// (the emberd package has integration tests); testing this package alone
/// needs a `cargo build -p emberd` first.
pub fn emberd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    // target/<profile>/deps/<test> -> target/<profile>/emberd
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("emberd");
    assert!(
        bin.exists(),
        "{} not built: run `cargo test --workspace` or `cargo build -p emberd` first",
        bin.display()
    );
    bin
}

/// Run `emberd ARGS...`.
pub fn emberd(args: &[&str]) -> Output {
    Command::new(emberd_bin())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run emberd")
}

/// `golden.json` written by tools/demo_models.py with onnxruntime.
#[derive(Debug, Deserialize)]
pub struct Golden {
    /// onnxruntime version.
    pub made_with: String,
    /// One per prompt.
    pub cases: Vec<GoldenCase>,
}

/// One prompt's reference continuation.
#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    /// english / chinese / one_token.
    pub name: String,
    /// Prompt text.
    pub prompt: String,
    /// Its ids.
    pub prompt_ids: Vec<u32>,
    /// Greedy continuation, EOS not treated specially.
    pub greedy_ids: Vec<u32>,
    /// Its text.
    pub greedy_text: String,
    /// Top-5 at some steps.
    pub top5: Vec<Top5>,
    /// Best-minus-second logit at each step.
    pub top1_margins: Vec<f32>,
}

/// Top-5 logits at one step.
#[derive(Debug, Deserialize)]
pub struct Top5 {
    /// Step index (0: after the prompt).
    pub step: usize,
    /// Token ids, best first.
    pub ids: Vec<u32>,
    /// Their logits.
    pub logits: Vec<f32>,
}

/// Read a model's golden file.
pub fn golden(model_dir: &Path) -> Golden {
    let text = std::fs::read_to_string(model_dir.join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// An `emberd serve` process on a socket in its own temporary directory,
/// queried with the real `curl --unix-socket`. Killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<std::process::Child>,
    /// The socket.
    pub socket: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// The temporary directory (socket, config, logs).
    pub dir: tempfile::TempDir,
}

/// A `curl` result: HTTP status, headers, body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status (0 when the connection failed).
    pub status: u16,
    /// Raw response headers.
    pub headers: String,
    /// Body.
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The text of an SSE stream's chunks (completion `text` or chat
    /// `delta.content`), the last chunk's finish reason, and whether it ended
    /// with `[DONE]`.
    pub fn sse_text(&self) -> (String, Option<String>, bool) {
        let mut text = String::new();
        let mut finish = None;
        let mut done = false;
        for line in self.body.lines() {
            let Some(d) = line.strip_prefix("data: ") else {
                continue;
            };
            if d == "[DONE]" {
                done = true;
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d}: {e}"));
            assert!(v.get("error").is_none(), "error chunk: {d}");
            let c = &v["choices"][0];
            if let Some(t) = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
            {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        (text, finish, done)
    }
}

/// Run curl against `socket`; `args` are extra curl arguments.
pub fn curl(socket: &Path, method: &str, path: &str, body: Option<&str>, args: &[&str]) -> Reply {
    let dir = tempfile::tempdir().expect("tempdir");
    let headers = dir.path().join("headers");
    let mut c = Command::new("curl");
    c.arg("-sS")
        .arg("--unix-socket")
        .arg(socket)
        .arg("-X")
        .arg(method)
        .arg("-D")
        .arg(&headers)
        .arg("-w")
        .arg("\n%{http_code}")
        .args(args);
    if let Some(b) = body {
        c.arg("-H")
            .arg("content-type: application/json")
            .arg("--data-binary")
            .arg(b);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c.output().expect("run curl (apt install curl)");
    let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
    let code_at = all.rfind('\n').map_or(0, |i| i + 1);
    let status = all[code_at..].trim().parse().unwrap_or(0);
    all.truncate(code_at.saturating_sub(1));
    Reply {
        status,
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: all,
    }
}

impl Daemon {
    /// Start `emberd serve --config` with `config` (TOML; `SOCKET` is replaced
    /// by the socket path, `MODELS` by the demo models folder) and wait until
    /// `/health` says ready.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_in(tempfile::tempdir().expect("tempdir"), config)
    }

    /// [`Daemon::start`] in a prepared directory (the socket is `ember.sock` in it).
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Daemon {
        Daemon::start_env(dir, config, &[])
    }

    /// [`Daemon::start_in`] with extra environment variables.
    pub fn start_env(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Daemon {
        let socket = dir.path().join("ember.sock");
        let path = dir.path().join("ember.toml");
        Daemon::write_config(&path, &socket, config);
        let log = std::fs::File::create(dir.path().join("emberd.log")).expect("log file");
        let child = Command::new(emberd_bin())
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_BACKTRACE")
            .env("EMBER_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start emberd serve");
        let mut d = Daemon {
            child: Some(child),
            socket,
            config: path,
            dir,
        };
        d.wait_ready();
        d
    }

    fn write_config(path: &Path, socket: &Path, config: &str) {
        let text = config
            .replace("SOCKET", &socket.display().to_string())
            .replace("MODELS", &root().join("models").display().to_string());
        std::fs::write(path, text).expect("write config");
    }

    /// Replace the configuration file (for SIGHUP reloads).
    pub fn rewrite_config(&self, config: &str) {
        Daemon::write_config(&self.config, &self.socket, config);
    }

    /// Wait for `/health` to answer 200 (panics with the log after 60 s or
    /// if the daemon exits).
    pub fn wait_ready(&mut self) {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("emberd exited early ({st}):\n{}", self.log());
            }
            if self.socket.exists() && self.get("/health").status == 200 {
                return;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "emberd not ready after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("emberd.log")).unwrap_or_default()
    }

    /// Poll `/health` until model `model`'s entry satisfies `f`, failing
    /// with `what` and the last reply after `secs` seconds.
    pub fn wait_health(
        &self,
        model: &str,
        what: &str,
        secs: u64,
        f: impl Fn(&serde_json::Value) -> bool,
    ) {
        let t0 = std::time::Instant::now();
        loop {
            let h = self.get("/health").json();
            if f(&h["models"][model]) {
                return;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(secs),
                "waiting for {what}: {h}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// GET `path`.
    pub fn get(&self, path: &str) -> Reply {
        curl(&self.socket, "GET", path, None, &[])
    }

    /// POST JSON `body` to `path`.
    pub fn post(&self, path: &str, body: &str) -> Reply {
        curl(&self.socket, "POST", path, Some(body), &[])
    }

    /// Send a signal (`"TERM"`, `"HUP"`, ...) with `kill`.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} {pid} failed");
    }

    /// Wait for the process to exit (panics after `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let t0 = std::time::Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if t0.elapsed() > std::time::Duration::from_secs(secs) {
                let _ = child.kill();
                panic!("emberd did not exit within {secs} s:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Debian `mosquitto` broker on a free loopback port, with persistence in
/// its own directory (so a restart keeps sessions and queued messages).
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<std::process::Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    listener: String,
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Mosquitto {
    /// Start a broker that takes anonymous clients.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("allow_anonymous true")
    }

    /// Start a broker whose loopback listener has these settings (TLS files,
    /// `allow_anonymous`, `password_file`, ...) instead of anonymous access.
    pub fn start_with(listener: &str) -> Mosquitto {
        let mut m = Mosquitto {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            listener: listener.into(),
        };
        m.launch();
        m
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        // Run as root, mosquitto drops to its own user: let it write its state.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod the broker's directory");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\n{}\nset_tcp_nodelay true\npersistence true\npersistence_location {}/\nmessage_size_limit 0\nmax_queued_messages 10000\n",
                self.port,
                self.listener,
                self.dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto (apt install mosquitto)");
        self.child = Some(child);
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `HOST:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop it (SIGTERM: it saves its state) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A rumqttc v5 test client for the MQTT tests and benchmark.
pub mod mqtt {
    use std::sync::mpsc;
    use std::time::Duration;

    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Client, Event, MqttOptions};
    use serde_json::Value;

    /// A message a test client received.
    #[derive(Debug, Clone)]
    pub struct Msg {
        /// Topic.
        pub topic: String,
        /// Payload as text.
        pub payload: String,
        /// v5 properties.
        pub props: Option<PublishProperties>,
        /// A broker redelivery (QoS 1: the first delivery's ack may have been lost).
        pub dup: bool,
    }

    impl Msg {
        /// The payload as JSON.
        pub fn json(&self) -> Value {
            serde_json::from_str(&self.payload).unwrap_or_else(|e| panic!("{e}: {}", self.payload))
        }

        /// A user property.
        pub fn user(&self, key: &str) -> Option<String> {
            self.props
                .as_ref()?
                .user_properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        }
    }

    /// A rumqttc v5 client whose incoming messages arrive on a channel.
    pub struct TestClient {
        /// The rumqttc client.
        pub client: Client,
        rx: mpsc::Receiver<Msg>,
        subacks: mpsc::Receiver<()>,
    }

    impl std::fmt::Debug for TestClient {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TestClient")
        }
    }

    impl TestClient {
        /// Connect as `id` (a persistent session when `persistent`).
        pub fn connect(port: u16, id: &str, persistent: bool) -> TestClient {
            let mut o = MqttOptions::new(id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(5));
            let mut net = rumqttc::NetworkOptions::new();
            net.set_tcp_nodelay(true);
            o.set_network_options(net);
            o.set_clean_start(!persistent);
            if persistent {
                o.set_session_expiry_interval(Some(600));
            }
            let (client, mut conn) = Client::new(o, 10_000);
            let (tx, rx) = mpsc::channel();
            let (stx, subacks) = mpsc::channel();
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    match ev {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let m = Msg {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                props: p.properties,
                                dup: p.dup,
                            };
                            if tx.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = stx.send(());
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
            TestClient {
                client,
                rx,
                subacks,
            }
        }

        /// Subscribe (QoS 1) and wait for the SUBACK.
        pub fn subscribe(&self, topic: &str) {
            self.client.subscribe(topic, QoS::AtLeastOnce).unwrap();
            self.subacks
                .recv_timeout(Duration::from_secs(10))
                .expect("SUBACK");
        }

        /// Publish a v5 request with a response topic and correlation data.
        pub fn request(&self, topic: &str, body: &Value, reply_to: &str, id: &str) {
            let props = PublishProperties {
                response_topic: Some(reply_to.into()),
                correlation_data: Some(id.to_string().into_bytes().into()),
                ..Default::default()
            };
            self.client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_string(), props)
                .unwrap();
        }

        /// The next message within `secs`.
        pub fn recv(&self, secs: u64) -> Option<Msg> {
            self.rx.recv_timeout(Duration::from_secs(secs)).ok()
        }
    }
}
