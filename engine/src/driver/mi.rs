//! MI requests through a node's bridge (NATS, or the bridge in this process), and the lists
//! reconciliation takes from OpenSIPS.

use std::time::Duration;

use bytes::Bytes;
use callbus_schemas::bus::{BridgeErrorKind, MiBusReply};
use callbus_schemas::mi::DlgListPage;
use callbus_schemas::mi_call::{DlgList, MiCall};
use callbus_schemas::subjects;
use serde_json::Value;

use crate::core::Reconciled;
use crate::EngineConfig;

/// Where MI requests go: NATS (`opensips.<node>.mi.<command>`), or straight to the bridge when
/// it runs in this process.
#[derive(Clone)]
pub(crate) struct MiRoute {
    client: async_nats::Client,
    local: Option<crate::LocalMi>,
}

impl MiRoute {
    pub(crate) fn new(client: async_nats::Client, config: &EngineConfig) -> MiRoute {
        MiRoute { client, local: config.local.as_ref().map(|l| l.mi.clone()) }
    }
}

/// Runs an MI command through the node's bridge.
pub(crate) async fn mi_request(
    route: &MiRoute,
    node: &str,
    command: &str,
    params: Value,
    timeout: Duration,
) -> MiBusReply {
    if let Some(local) = route.local.as_ref().filter(|l| l.node == node) {
        return match tokio::time::timeout(timeout, (local.call)(command.to_owned(), params)).await {
            Ok(reply) => reply,
            Err(_) => MiBusReply::bridge_error(
                BridgeErrorKind::Timeout,
                format!("no answer from the bridge of node {node} to {command} within {timeout:?}"),
            ),
        };
    }
    let client = &route.client;
    let subject = match subjects::mi(node, command) {
        Ok(s) => s,
        Err(e) => return MiBusReply::bridge_error(BridgeErrorKind::Unavailable, e.to_string()),
    };
    let body = Bytes::from(serde_json::to_vec(&params).unwrap_or_default());
    match tokio::time::timeout(timeout, client.request(subject.clone(), body)).await {
        Ok(Ok(msg)) => serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
            MiBusReply::bridge_error(BridgeErrorKind::Unavailable, format!("unreadable reply on {subject}: {e}"))
        }),
        Ok(Err(e)) => MiBusReply::bridge_error(
            BridgeErrorKind::Unavailable,
            format!("no bridge answered on {subject} ({e}): is `callbus bridge --node {node}` running?"),
        ),
        Err(_) => {
            MiBusReply::bridge_error(BridgeErrorKind::Timeout, format!("no answer on {subject} within {timeout:?}"))
        }
    }
}

/// Runs a typed MI command through the node's bridge.
async fn mi_call(route: &MiRoute, node: &str, call: MiCall, timeout: Duration) -> MiBusReply {
    mi_request(route, node, call.command(), call.params(), timeout).await
}

/// Reads every dialog OpenSIPS has on `node`, page by page.
pub(crate) async fn list_dialogs(
    client: &MiRoute,
    node: &str,
    timeout: Duration,
) -> Result<Vec<(String, i64)>, String> {
    const PAGE: u64 = 50;
    let mut out = Vec::new();
    let mut index = 0u64;
    loop {
        let reply = mi_call(client, node, MiCall::DlgList(DlgList { index, counter: PAGE }), timeout).await;
        let page: DlgListPage = match reply {
            MiBusReply::Result { result } => {
                serde_json::from_value(result).map_err(|e| format!("unexpected dlg_list result: {e}"))?
            }
            MiBusReply::Error { error } => return Err(error.to_string()),
        };
        let n = page.dialogs.len() as u64;
        out.extend(page.dialogs.into_iter().map(|d| (d.callid, d.state)));
        index += n;
        if n == 0 || index >= page.count.unwrap_or(0) {
            return Ok(out);
        }
    }
}

/// The keys of every UA session OpenSIPS has on `node` (`ua_session_list` items carry no key:
/// a client session's key is its Call-ID, a server session's its To-tag; both are returned).
pub(crate) async fn list_ua_keys(client: &MiRoute, node: &str, timeout: Duration) -> Result<Vec<String>, String> {
    match mi_call(client, node, MiCall::UaSessionList, timeout).await {
        MiBusReply::Result { result: Value::Array(items) } => Ok(items
            .iter()
            .flat_map(|i| [i.get("callid"), i.get("to_tag")])
            .filter_map(|v| v.and_then(Value::as_str).map(str::to_owned))
            .collect()),
        MiBusReply::Result { result } => Err(format!("unexpected ua_session_list result: {result}")),
        MiBusReply::Error { error } => Err(error.to_string()),
    }
}

/// How many times a reconciliation lists a node before it gives up until the next one.
const RECONCILE_ATTEMPTS: u32 = 5;

/// Lists each node's dialogs and UA sessions (retrying a few times), for the core, which may
/// close only `candidates`: calls it knew before the lists were taken.
pub(crate) async fn reconcile_nodes(
    client: MiRoute,
    nodes: Vec<String>,
    candidates: Vec<String>,
    timeout: Duration,
    periodic: bool,
) -> Vec<Reconciled> {
    let mut lists = Vec::new();
    for node in nodes {
        for attempt in 1..=RECONCILE_ATTEMPTS {
            match list_dialogs(&client, &node, timeout).await {
                Ok(dialogs) => {
                    let ua_keys = match list_ua_keys(&client, &node, timeout).await {
                        Ok(keys) => Some(keys),
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "cannot list UA sessions: UA calls are not reconciled");
                            None
                        }
                    };
                    lists.push(Reconciled {
                        node: node.clone(),
                        dialogs,
                        ua_keys,
                        candidates: candidates.clone(),
                        periodic,
                    });
                    break;
                }
                // Said once as a warning, then once more if it gives up (not at every attempt).
                Err(e) if attempt == 1 => {
                    tracing::warn!(%node, error = %e, "cannot reconcile with OpenSIPS yet: retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) if attempt < RECONCILE_ATTEMPTS => {
                    tracing::debug!(%node, attempt, error = %e, "cannot reconcile with OpenSIPS yet");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => tracing::warn!(
                    %node,
                    error = %e,
                    "gave up reconciling with OpenSIPS after {RECONCILE_ATTEMPTS} attempts: the periodic reconciliation (engine.reconcile_every) or OpenSIPS coming back tries again"
                ),
            }
        }
    }
    lists
}
