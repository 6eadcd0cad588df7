//! Keeps the bridge's event subscriptions alive in OpenSIPS.
//!
//! OpenSIPS datagram subscriptions always expire and are forgotten when OpenSIPS restarts.
//! Every health interval the manager asks `uptime`: when "Up since" changes (a restart) or
//! OpenSIPS answers again after failing to (it was down or unreachable), every event is
//! subscribed again at once; otherwise each is renewed when a third of its expiry has passed.
//! On a clean shutdown each is removed with `expire 0`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callbus_schemas::bus::{MiBusReply, SubscriptionStatus};
use callbus_schemas::mi::MiParams;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::mi::MiClient;
use crate::Counters;

/// One event kept subscribed.
#[derive(Clone, Debug)]
struct Entry {
    event: String,
    renewed_at: Option<Instant>,
    last_error: Option<String>,
}

/// What the manager knows, for the status message.
#[derive(Debug, Default)]
pub(crate) struct Health {
    entries: Vec<Entry>,
    pub reachable: bool,
    pub up_since: Option<String>,
    /// Whether "OpenSIPS does not answer" was said since it last answered (said once, not on
    /// every check).
    said_unreachable: bool,
    /// Whether every subscription was in place at the last check (a change is said once).
    all_subscribed: bool,
}

/// The subscription manager's settings.
pub(crate) struct Manager {
    pub mi: MiClient,
    pub socket: String,
    pub expire: Duration,
    pub health_interval: Duration,
    pub health: Arc<Mutex<Health>>,
    pub counters: Arc<Counters>,
}

impl Health {
    /// The subscriptions as reported in the status.
    pub fn subscriptions(&self, socket: &str, expire: Duration) -> Vec<SubscriptionStatus> {
        let now = Instant::now();
        self.entries
            .iter()
            .map(|e| SubscriptionStatus {
                event: e.event.clone(),
                socket: socket.to_owned(),
                expire_secs: expire.as_secs(),
                expires_in_secs: e.renewed_at.map(|t| expire.saturating_sub(now.duration_since(t)).as_secs()),
                last_error: e.last_error.clone(),
            })
            .collect()
    }
}

fn named(params: Value) -> Option<MiParams> {
    match params {
        Value::Object(map) => Some(MiParams::Named(map)),
        _ => None,
    }
}

impl Manager {
    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn subscribe(&self, event: &str, expire_secs: u64) -> Result<(), String> {
        let params = named(json!({"event": event, "socket": self.socket, "expire": expire_secs}));
        match self.mi.call("event_subscribe", params).await {
            MiBusReply::Result { .. } => Ok(()),
            MiBusReply::Error { error } => Err(error.to_string()),
        }
    }

    /// Says once when every subscription is in place (at start, after a restart of OpenSIPS).
    fn say_when_all_subscribed(&self) {
        let mut health = self.lock();
        let all = health.entries.iter().all(|e| e.renewed_at.is_some() && e.last_error.is_none());
        if all && !health.all_subscribed {
            let events: Vec<&str> = health.entries.iter().map(|e| e.event.as_str()).collect();
            tracing::info!(
                up_since = health.up_since.as_deref().unwrap_or("?"),
                socket = %self.socket,
                events = %events.join(","),
                "OpenSIPS answers MI and sends its events here"
            );
        }
        health.all_subscribed = all;
    }

    async fn renew(&self, event: &str) {
        let result = self.subscribe(event, self.expire.as_secs().max(1)).await;
        let mut health = self.lock();
        if let Some(entry) = health.entries.iter_mut().find(|e| e.event == event) {
            match result {
                Ok(()) => {
                    tracing::debug!(event, socket = %self.socket, "subscribed");
                    entry.renewed_at = Some(Instant::now());
                    entry.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(event, socket = %self.socket, error = %e, "event_subscribe failed; will retry");
                    entry.last_error = Some(e);
                }
            }
        }
    }

    /// Checks OpenSIPS's uptime; true when every subscription must be done again now.
    async fn check_health(&self) -> bool {
        let reply = self.mi.call("uptime", None).await;
        let mut health = self.lock();
        match reply {
            MiBusReply::Result { result } => {
                health.said_unreachable = false;
                let up_since = result.get("Up since").and_then(Value::as_str).map(str::to_owned);
                let restarted = health.up_since.is_some() && up_since.is_some() && health.up_since != up_since;
                let came_back = !health.reachable;
                health.up_since = up_since;
                health.reachable = true;
                if restarted || came_back {
                    if restarted || health.entries.iter().any(|e| e.renewed_at.is_some()) {
                        self.counters.opensips_restarts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            restarted,
                            "OpenSIPS restarted or is reachable again: subscribing every event now"
                        );
                    }
                    for e in &mut health.entries {
                        e.renewed_at = None;
                    }
                    return true;
                }
                false
            }
            MiBusReply::Error { error } => {
                if health.reachable || !health.said_unreachable {
                    tracing::warn!(
                        %error,
                        "OpenSIPS does not answer MI `uptime`: no events until it does (is it running, with mi_datagram on this address?)"
                    );
                    health.said_unreachable = true;
                }
                health.reachable = false;
                health.all_subscribed = false;
                false
            }
        }
    }

    /// Runs until cancelled, then unsubscribes.
    pub async fn run(self, events: Vec<String>, cancel: CancellationToken) {
        {
            let mut health = self.lock();
            health.entries =
                events.iter().map(|e| Entry { event: e.clone(), renewed_at: None, last_error: None }).collect();
            health.reachable = false;
        }
        let renew_every = (self.expire / 3).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(self.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A stop does not wait out an MI request OpenSIPS may never answer.
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.check_health() => {}
            }
            let due: Vec<String> = {
                let health = self.lock();
                if !health.reachable {
                    continue;
                }
                let now = Instant::now();
                health
                    .entries
                    .iter()
                    .filter(|e| e.renewed_at.is_none_or(|t| now.duration_since(t) >= renew_every))
                    .map(|e| e.event.clone())
                    .collect()
            };
            let renewed = !due.is_empty();
            for event in due {
                self.renew(&event).await;
            }
            if renewed {
                self.say_when_all_subscribed();
            }
        }
        // Undo only what is in place (nothing, when OpenSIPS never answered).
        let subscribed: Vec<String> =
            self.lock().entries.iter().filter(|e| e.renewed_at.is_some()).map(|e| e.event.clone()).collect();
        for event in &subscribed {
            match self.subscribe(event, 0).await {
                Ok(()) => tracing::info!(event, "unsubscribed"),
                Err(e) => {
                    tracing::warn!(event, error = %e, "could not unsubscribe; the subscription will lapse by itself")
                }
            }
        }
    }
}
