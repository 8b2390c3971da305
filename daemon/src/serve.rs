//! `emberd serve`: the socket, the accept loop, model loading, reload and
//! shutdown (after mini-redis: a semaphore bounds connections, a broadcast
//! tells every task to stop, and the daemon waits for them to drain).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, Semaphore};

use crate::api::{router, App, Peer, Phase, Registry, Served};
use crate::config::{ModelSettings, Settings};
use crate::engine::{LoadOptions, Model};
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::sched::{Limits, Scheduler};
use crate::systemd::Notifier;
use crate::template::ChatTemplate;

/// Socket errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Another daemon answers on the socket path.
    #[error("{0} is in use by another running daemon (it accepted a connection); stop it or choose another --socket")]
    InUse(PathBuf),
    /// The socket could not be created or configured.
    #[error("cannot set up socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `socket_group` names no group.
    #[error("socket group {0:?} does not exist")]
    NoGroup(String),
    /// The service manager passed something that is not a listening Unix socket.
    #[error("LISTEN_FDS: fd {0} is not a usable listening Unix socket: {1}")]
    Inherited(RawFd, std::io::Error),
}

/// A model that failed to load, by name.
#[derive(Debug, thiserror::Error)]
#[error("model {name}: {source}")]
pub struct LoadError {
    /// Its name.
    pub name: String,
    /// Why.
    #[source]
    pub source: ModelError,
}

/// The listening socket passed by systemd socket activation, if any
/// (`LISTEN_PID` is us and `LISTEN_FDS` ≥ 1: fd 3).
pub fn inherited_listener() -> Result<Option<std::os::unix::net::UnixListener>, TransportError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !ours || n == 0 {
        return Ok(None);
    }
    // Children must not inherit them.
    // SAFETY: called at startup before any other thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    const FD: RawFd = 3;
    // SAFETY: the service manager passed fd 3 open for us (LISTEN_PID is our pid);
    // we take ownership of it exactly once, here.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(FD) };
    l.local_addr()
        .map_err(|e| TransportError::Inherited(FD, e))?;
    l.set_nonblocking(true)
        .map_err(|e| TransportError::Inherited(FD, e))?;
    Ok(Some(l))
}

/// Bind the socket: replace a stale file left by a crash, refuse if a live
/// daemon answers there, then set its mode and group.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<std::os::unix::net::UnixListener, TransportError> {
    let err = |source| TransportError::Socket {
        path: path.into(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(TransportError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| TransportError::NoGroup(g.into()))?
            .gid;
        std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(err)?;
    }
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Load one model and start its scheduler (blocking: run off the async threads).
pub fn load_model(s: &ModelSettings, metrics: &Metrics) -> Result<Served, LoadError> {
    let fail = |source| LoadError {
        name: s.name.clone(),
        source,
    };
    // Serving spreads a batch's sequences over the model's threads, each
    // sequence single-threaded (tract's intra-op threads do not pay off here).
    let opts = LoadOptions {
        backend: s.backend,
        quantize_fp32: s.quantize_fp32,
        kv_cache: s.kv_cache,
        max_seqs: s.max_batch,
        threads: 1,
        batch_threads: s.threads,
    };
    let mut model = Model::load(&s.path, &opts).map_err(fail)?;
    if let Some(cap) = s.max_context {
        model.context = Some(model.context.map_or(cap, |c| c.min(cap)));
    }
    let template = ChatTemplate::for_model(
        &s.path,
        s.chat_template.as_deref(),
        model.dir.ember.chat_template.as_deref(),
    )
    .map_err(|reason| {
        fail(ModelError::Config {
            path: s.path.join("tokenizer_config.json"),
            reason,
        })
    })?;
    let mm = metrics.model(&s.name);
    mm.load_seconds.set(model.load_time.as_secs_f64());
    let model = Arc::new(model);
    let sched = Scheduler::spawn(
        &s.name,
        model.clone(),
        Limits {
            max_batch: s.max_batch,
            max_queue: s.max_queue,
        },
        mm,
    );
    tracing::info!(model = %s.name, path = %s.path.display(), load_ms = model.load_time.as_millis() as u64, "model loaded");
    Ok(Served {
        settings: s.clone(),
        model,
        sched,
        template,
    })
}

/// Load every model of `settings`, reusing those in `old` whose settings are
/// unchanged.
pub fn load_all(
    settings: &Settings,
    old: &Registry,
    metrics: &Metrics,
) -> Result<Registry, LoadError> {
    let mut reg = Registry::default();
    for s in &settings.models {
        let served = match old.models.get(&s.name) {
            Some(o) if o.settings == *s => o.clone(),
            _ => Arc::new(load_model(s, metrics)?),
        };
        reg.models.insert(s.name.clone(), served);
    }
    Ok(reg)
}

/// What stops the daemon or reloads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM / SIGINT: drain and exit.
    Stop,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// Run the daemon until SIGTERM/SIGINT, reloading on SIGHUP. `reload` reads
/// the configuration again.
pub fn run(
    settings: Settings,
    reload: impl Fn() -> anyhow::Result<Settings> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("emberd-io")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        tokio::spawn(async move {
            loop {
                let c = tokio::select! {
                    _ = term.recv() => Control::Stop,
                    _ = int.recv() => Control::Stop,
                    _ = hup.recv() => Control::Reload,
                };
                if ctl_tx.send(c).is_err() {
                    return;
                }
            }
        });
        serve(settings, ctl_rx, reload).await
    })
}

/// The daemon on the current runtime, controlled through `ctl` (tests drive
/// it directly; [`run`] feeds it signals).
pub async fn serve(
    settings: Settings,
    mut ctl: tokio::sync::mpsc::UnboundedReceiver<Control>,
    reload: impl Fn() -> anyhow::Result<Settings> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let notify = Notifier::from_env();
    notify.status(&format!("loading {} models", settings.models.len()));
    let (std_listener, owned_path) = match inherited_listener()? {
        Some(l) => (l, None),
        None => {
            let s = &settings.server;
            let l = bind(&s.socket, s.socket_mode, s.socket_group.as_deref())?;
            (l, Some(s.socket.clone()))
        }
    };
    let listener = UnixListener::from_std(std_listener).context("registering the socket")?;
    let app = Arc::new(App::new(settings.server.clone(), metrics.clone()));
    let (stop_tx, _) = broadcast::channel::<()>(1);
    // Subscribe before spawning: a load that fails at once must still stop it.
    let accept = tokio::spawn(accept_loop(listener, app.clone(), stop_tx.subscribe()));
    tracing::info!(socket = %settings.server.socket.display(), models = settings.models.len(), "listening; loading models");

    // Load (fail fast: a model that cannot load stops the daemon).
    let t0 = Instant::now();
    let (s2, m2) = (settings.clone(), metrics.clone());
    let loaded =
        tokio::task::spawn_blocking(move || load_all(&s2, &Registry::default(), &m2)).await?;
    let reg = match loaded {
        Ok(r) => r,
        Err(e) => {
            let _ = stop_tx.send(());
            let _ = accept.await;
            if let Some(p) = &owned_path {
                let _ = std::fs::remove_file(p);
            }
            return Err(e.into());
        }
    };
    app.swap_registry(reg);
    app.set_phase(Phase::Ready);
    tracing::info!(load_ms = t0.elapsed().as_millis() as u64, "ready");
    notify.ready(&crate::systemd::serving_status(&app));
    let heartbeat = tokio::spawn(crate::systemd::heartbeat(notify.clone(), app.clone()));
    let mqtt = settings.mqtt.clone().map(|m| {
        let (app, stop) = (app.clone(), stop_tx.subscribe());
        tokio::spawn(async move {
            if let Err(e) = crate::mqtt::run(m, app, stop).await {
                tracing::error!("MQTT transport stopped: {e:#}");
            }
        })
    });

    let reload = Arc::new(reload);
    let mut current = settings;
    while let Some(c) = ctl.recv().await {
        match c {
            Control::Stop => break,
            Control::Reload => {
                notify.reloading();
                let (r, app2, m2) = (reload.clone(), app.clone(), metrics.clone());
                let prev = current.clone();
                let res = tokio::task::spawn_blocking(move || -> anyhow::Result<Settings> {
                    let new = r()?;
                    if new.server != prev.server {
                        tracing::warn!("[server] settings changed; they take effect on restart");
                    }
                    let old = app2.registry();
                    let reg = load_all(&new, &old, &m2)?;
                    let old = app2.swap_registry(reg);
                    let now = app2.registry();
                    for (name, served) in &old.models {
                        if !now.models.get(name).is_some_and(|n| Arc::ptr_eq(n, served)) {
                            // Replaced or removed: take no more, finish what it has.
                            served.sched.close();
                        }
                    }
                    Ok(new)
                })
                .await?;
                match res {
                    Ok(new) => {
                        tracing::info!(models = new.models.len(), "configuration reloaded");
                        current = new;
                    }
                    Err(e) => tracing::error!(
                        "reload failed, still serving the previous configuration: {e:#}"
                    ),
                }
                notify.ready(&crate::systemd::serving_status(&app));
            }
        }
    }

    // Drain: stop accepting, let running requests finish, then cancel.
    tracing::info!("stopping: draining in-flight requests");
    notify.stopping();
    heartbeat.abort();
    app.set_phase(Phase::Stopping);
    let _ = stop_tx.send(());
    let reg = app.registry();
    for s in reg.models.values() {
        s.sched.close();
    }
    let deadline = app.settings.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, accept).await;
    if drained.is_err() {
        tracing::warn!("requests still running after {deadline:?}; cancelling them");
        for s in reg.models.values() {
            s.sched.abort();
        }
    }
    if let Some(m) = mqtt {
        let _ = tokio::time::timeout(deadline + Duration::from_secs(3), m).await;
    }
    let reg2 = reg.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for s in reg2.models.values() {
            s.sched.join();
        }
    })
    .await;
    if let Some(p) = &owned_path {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Accept connections until told to stop, then wait for the open ones to
/// finish their requests.
async fn accept_loop(listener: UnixListener, app: Arc<App>, mut stop_rx: broadcast::Receiver<()>) {
    let sem = Arc::new(Semaphore::new(app.settings.max_connections));
    let graceful = GracefulShutdown::new();
    let router = router(app.clone());
    loop {
        let permit = tokio::select! {
            _ = stop_rx.recv() => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, _) = tokio::select! {
            _ = stop_rx.recv() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let peer = stream
            .peer_cred()
            .map(|c| Peer {
                uid: c.uid(),
                pid: c.pid(),
            })
            .unwrap_or_default();
        let svc = TowerToHyperService::new(router.clone().layer(axum::Extension(peer)));
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
