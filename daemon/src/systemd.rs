//! The service manager's side of the daemon: `sd_notify` states, the
//! watchdog and journald logging.
//!
//! Why each matters on a board that runs for months unattended:
//! * `READY=1` only once every model has loaded, so `systemctl start` (and
//!   units ordered after emberd) wait for a daemon that can answer;
//! * `STATUS=` shows what it is doing in `systemctl status` (loading, serving
//!   N models with their queue, reloading, draining);
//! * `WATCHDOG=1` is sent only while every model's scheduler makes progress
//!   (no prefill or decode step running longer than the watchdog period): a
//!   wedged engine stops the pings and systemd restarts the daemon, which a
//!   liveness check of the I/O tasks alone would never do;
//! * `RELOADING=1` (with `MONOTONIC_USEC`) on SIGHUP and `STOPPING=1` on
//!   SIGTERM, so the manager knows a slow drain is intended.
//!
//! Everything is a no-op without `NOTIFY_SOCKET` (not started by systemd).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::api::App;

/// Sends states to the service manager (when there is one).
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("sd_notify failed: {e}");
        }
    }

    /// `STATUS=...`.
    pub fn status(&self, s: &str) {
        self.send(&[NotifyState::Status(s)]);
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, s: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(s)]);
    }

    /// `RELOADING=1` (with the monotonic timestamp systemd ≥ 253 wants).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading configuration"),
            ]),
            Err(_) => self.send(&[
                NotifyState::Reloading,
                NotifyState::Status("reloading configuration"),
            ]),
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining requests"),
        ]);
    }

    /// One watchdog ping with the current status line.
    fn ping(&self, s: &str) {
        self.send(&[NotifyState::Watchdog, NotifyState::Status(s)]);
    }
}

/// `serving N models (a: q queued, n active; ...)`.
pub fn serving_status(app: &App) -> String {
    let reg = app.registry();
    let parts: Vec<String> = reg
        .models
        .iter()
        .map(|(name, m)| {
            format!(
                "{name}: {} queued, {} active",
                m.sched.queued(),
                m.sched.active()
            )
        })
        .collect();
    format!("serving {} models ({})", reg.models.len(), parts.join("; "))
}

/// Models whose worker is stuck for longer than `limit`.
fn wedged_models(app: &App, limit: Duration) -> Vec<String> {
    app.registry()
        .models
        .iter()
        .filter(|(_, m)| m.sched.wedged(limit))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Until the task is aborted: ping the watchdog at half its period while no
/// scheduler is wedged (a step running longer than the period), and refresh
/// the status line. Without a watchdog the status alone, every 5 s.
pub async fn heartbeat(n: Notifier, app: Arc<App>) {
    if !n.enabled {
        return;
    }
    let period = n.watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 2).max(Duration::from_millis(10))
    });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = false;
    loop {
        tick.tick().await;
        let status = serving_status(&app);
        let Some(limit) = n.watchdog else {
            n.status(&status);
            continue;
        };
        let wedged = wedged_models(&app, limit);
        if wedged.is_empty() {
            n.ping(&status);
            reported = false;
        } else if !reported {
            // No ping: the manager restarts us after the watchdog period.
            tracing::error!(
                models = %wedged.join(","),
                "a model's worker has been stuck in one step for more than {limit:?}; \
                 stopping watchdog pings so the service manager restarts the daemon"
            );
            n.status(&format!("wedged: {}", wedged.join(", ")));
            reported = true;
        }
    }
}

/// Whether stderr is the journal (`JOURNAL_STREAM` names stderr's device
/// and inode), i.e. logs should go to journald with their fields.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().is_ok_and(|d| d == meta.dev())
        && ino.parse::<u64>().is_ok_and(|i| i == meta.ino())
}
