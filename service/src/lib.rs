//! callbus's parts as NATS services, so that `nats micro ls`, `nats micro info callbus` and
//! `nats micro stats callbus` show them like any NATS service: the micro protocol
//! (`io.nats.micro.v1`), answered on `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`, each also with
//! the service's name and with its name and id.
//!
//! The engine answers a command from its owner loop once the command is logged (and in cluster
//! mode from the partition's owner), not from the task that took it off NATS, so the endpoints
//! keep their own subscriptions and the parts tell a [`Service`] what each request took with
//! [`Service::record`]: requests, errors (refusals) and processing time are counted where the
//! answer is sent. The answers have the shapes async-nats's `service` module reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

/// One endpoint: a request subject and what it is (serialized as INFO lists it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Its name (a command verb, `mi`, ...).
    pub name: String,
    /// The subject its requests come on (may end in `>`).
    pub subject: String,
    /// The queue group its subscribers share.
    pub queue_group: String,
    /// What a client needs to know (the request's fields, the reply's JSON Schema, ...).
    pub metadata: BTreeMap<String, String>,
}

/// What a service is.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Its name: letters, digits, `-` and `_` (`callbus`, `callbus-bridge`).
    pub name: String,
    /// Its version (semver).
    pub version: String,
    /// One line on what it does.
    pub description: String,
    /// About this instance (node, worker).
    pub metadata: BTreeMap<String, String>,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default)]
struct Counters {
    requests: u64,
    errors: u64,
    processing: Duration,
    last_error: String,
}

/// Adds `data` to an endpoint's STATS (the bridge's status, say): given the endpoint's name.
pub type StatsData = Arc<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

struct Inner {
    data: Option<StatsData>,
    spec: Spec,
    id: String,
    started: String,
    counters: Mutex<Vec<Counters>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A running service: answers PING, INFO and STATS until stopped or dropped.
#[derive(Clone)]
pub struct Service(Arc<Inner>);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("name", &self.0.spec.name).field("id", &self.0.id).finish_non_exhaustive()
    }
}

/// What every answer starts with (a PING answer is only this).
#[derive(Serialize)]
struct Head<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Info<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    description: &'a str,
    endpoints: &'a [Endpoint],
}

#[derive(Serialize)]
struct EndpointStats<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: u64,
    num_errors: u64,
    /// Nanoseconds.
    processing_time: u64,
    /// Nanoseconds.
    average_processing_time: u64,
    last_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Stats<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    started: &'a str,
    endpoints: Vec<EndpointStats<'a>>,
}

impl Service {
    /// Starts answering for `spec` on `client`; fails when the name is not a valid service name
    /// or a subscription is refused.
    pub async fn start(client: &async_nats::Client, spec: Spec) -> Result<Service, String> {
        Service::start_with_data(client, spec, None).await
    }

    /// As [`Service::start`], with `data` adding to each endpoint's STATS.
    pub async fn start_with_data(
        client: &async_nats::Client,
        spec: Spec,
        data: Option<StatsData>,
    ) -> Result<Service, String> {
        if spec.name.is_empty() || !spec.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("service name {:?}: use letters, digits, '-' and '_' only", spec.name));
        }
        let id = new_id();
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let started = rfc3339(now);
        let mut subscriptions = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{}", spec.name),
                format!("$SRV.{verb}.{}.{id}", spec.name),
            ] {
                let sub = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
                subscriptions.push(sub.map(move |m| (verb, m)));
            }
        }
        let counters = Mutex::new(vec![Counters::default(); spec.endpoints.len()]);
        let service = Service(Arc::new(Inner { data, spec, id, started, counters, task: Mutex::new(None) }));
        let answering = service.clone();
        let client = client.clone();
        let task = tokio::spawn(async move {
            let mut requests = futures::stream::select_all(subscriptions);
            while let Some((verb, msg)) = requests.next().await {
                let Some(reply) = msg.reply else { continue };
                let body = answering.answer(verb);
                if let Err(e) = client.publish(reply, Bytes::from(body)).await {
                    tracing::debug!(error = %e, "a service {verb} answer was not sent");
                }
            }
        });
        *service.0.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(service)
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Counts one request of `endpoint` answered after `took`; `error` when it was refused or
    /// failed (its code and its text). An unknown endpoint is ignored.
    pub fn record(&self, endpoint: &str, took: Duration, error: Option<(u16, &str)>) {
        let Some(i) = self.0.spec.endpoints.iter().position(|e| e.name == endpoint) else { return };
        let mut counters = self.0.counters.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut counters[i];
        c.requests += 1;
        c.processing += took;
        if let Some((code, text)) = error {
            c.errors += 1;
            c.last_error = format!("{code}:{text}");
        }
    }

    /// Stops answering (a stopped part no longer shows in `nats micro ls`).
    pub fn stop(&self) {
        if let Some(task) = self.0.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }

    fn answer(&self, verb: &str) -> Vec<u8> {
        let s = &self.0.spec;
        let id = self.0.id.as_str();
        let head = |kind| Head { kind, name: &s.name, id, version: &s.version, metadata: &s.metadata };
        let json = match verb {
            "PING" => serde_json::to_vec(&head("io.nats.micro.v1.ping_response")),
            "INFO" => serde_json::to_vec(&Info {
                head: head("io.nats.micro.v1.info_response"),
                description: &s.description,
                endpoints: &s.endpoints,
            }),
            _ => {
                let counters = self.0.counters.lock().unwrap_or_else(|p| p.into_inner()).clone();
                serde_json::to_vec(&Stats {
                    head: head("io.nats.micro.v1.stats_response"),
                    started: &self.0.started,
                    endpoints: s
                        .endpoints
                        .iter()
                        .zip(counters)
                        .map(|(e, c)| EndpointStats {
                            name: &e.name,
                            subject: &e.subject,
                            queue_group: &e.queue_group,
                            num_requests: c.requests,
                            num_errors: c.errors,
                            processing_time: nanos(c.processing),
                            average_processing_time: nanos(
                                c.processing.checked_div(c.requests as u32).unwrap_or_default(),
                            ),
                            last_error: c.last_error,
                            data: self.0.data.as_ref().and_then(|f| f(&e.name)),
                        })
                        .collect(),
                })
            }
        };
        json.unwrap_or_default()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A new instance id: 22 characters of `[0-9A-Za-z]` from the clock and the process.
fn new_id() -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut x = now ^ (u128::from(std::process::id()) << 64) ^ (u128::from(n) << 96);
    let mut out = String::with_capacity(22);
    for _ in 0..22 {
        out.push(char::from(DIGITS[(x % 62) as usize]));
        x /= 62;
    }
    out
}

/// `2026-12-06T03:58:00.123456789Z`.
fn rfc3339(since_epoch: Duration) -> String {
    let (y, mo, d, h, mi, s, _) = callbus_schemas::clock::civil(since_epoch.as_secs());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z", since_epoch.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ids() {
        assert_eq!(rfc3339(Duration::from_millis(1_796_529_480_123)), "2026-12-06T03:58:00.123000000Z");
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
