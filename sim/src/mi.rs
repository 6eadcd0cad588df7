//! The simulated `mi_datagram` socket and the MI commands, with OpenSIPS's param checking.
//!
//! One task reads requests and answers them one at a time, as `mi_datagram` with
//! `children_count` 1 does (so replies come back in request order). Param sets follow
//! OpenSIPS's "recipes": a request must name exactly one of a command's param sets. As
//! OpenSIPS's `get_cmd_recipe` does, the error detail is "Named parameters do not match" when a
//! set has as many params as the request but other names, and "Too few or too many parameters"
//! when none has that many (fixtures `mi/dlg_end_dlg.*`, `mi/call_hold.missing_params`; the
//! real-OpenSIPS tier's MI differential checks the rest against a running OpenSIPS 3.4).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use callbus_schemas::event::{DlgState, Leg};
use callbus_schemas::mi::{codes, MiErrorReply, MiId, MiParams, MiPlainText, MiRequest, MiRequestError, MiSuccess};
use callbus_schemas::MI_DATAGRAM_BUFFER;
use serde_json::{json, Map, Value};
use tokio::net::UdpSocket;

use crate::scenario::{self, ClientStart, Transfer};
use crate::sip;
use crate::{Inner, State, Subscription, SERVER_VERSION};

/// Every MI command a lab OpenSIPS 3.4.18 listed with `which` (fixture `mi/which.ok`).
const WHICH: &[&str] = &[
    "get_statistics",
    "list_statistics",
    "reset_statistics",
    "reset_all_statistics",
    "uptime",
    "version",
    "pwd",
    "arg",
    "which",
    "ps",
    "kill",
    "log_level",
    "xlog_level",
    "log_level_filter",
    "log_mute_state",
    "shm_check",
    "cache_store",
    "cache_fetch",
    "cache_remove",
    "event_subscribe",
    "events_list",
    "subscribers_list",
    "raise_event",
    "list_tcp_conns",
    "mem_pkg_dump",
    "mem_shm_dump",
    "mem_rpm_dump",
    "reload_routes",
    "sr_get_status",
    "sr_list_status",
    "sr_list_reports",
    "sr_list_identifiers",
    "help",
    "list_blacklists",
    "check_blacklists",
    "check_blacklist",
    "add_blacklist_rule",
    "del_blacklist_rule",
    "t_uac_dlg",
    "t_uac_cancel",
    "t_hash",
    "t_reply",
    "dlg_list",
    "dlg_list_ctx",
    "dlg_end_dlg",
    "dlg_db_sync",
    "dlg_restore_db",
    "dlg_cluster_sync",
    "profile_get_size",
    "profile_list_dlgs",
    "profile_get_values",
    "list_all_profiles",
    "profile_end_dlgs",
    "dlg_push_var",
    "dlg_send_sequential",
    "b2be_list",
    "ua_session_client_start",
    "ua_session_update",
    "ua_session_reply",
    "ua_session_terminate",
    "ua_session_list",
    "call_transfer",
    "call_hold",
    "call_unhold",
];

/// Events registered in the lab OpenSIPS, with their ids (fixture `mi/events_list.ok`).
const EVENTS: &[&str] = &[
    "E_CORE_SR_STATUS_CHANGED",
    "E_CORE_THRESHOLD",
    "E_CORE_SHM_THRESHOLD",
    "E_CORE_PKG_THRESHOLD",
    "E_CORE_PROC_AUTO_SCALE",
    "E_CORE_TCP_DISCONNECT",
    "E_DLG_STATE_CHANGED",
    "E_UA_SESSION",
    "E_CALL_TRANSFER",
    "E_CALL_HOLD",
    "E_CORE_LOG",
];

/// Reads MI datagrams and answers them until the task is aborted.
pub(crate) async fn serve(inner: Arc<Inner>, socket: UdpSocket) {
    // One byte more than the buffer, so an oversized request is seen as such.
    let mut buf = vec![0u8; MI_DATAGRAM_BUFFER + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "MI socket receive failed");
                continue;
            }
        };
        inner.mi_requests.fetch_add(1, Ordering::Relaxed);
        if inner.lock().mi_silent {
            inner.mi_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // OpenSIPS reads a request into its buffer: a larger one is cut there (and so is no
        // longer JSON: "400 Parse_error", as a running OpenSIPS 3.4.18 answers).
        if let Some(reply) = handle_datagram(&inner, &buf[..len.min(MI_DATAGRAM_BUFFER)]) {
            send(&socket, &reply, from).await;
        }
    }
}

async fn send(socket: &UdpSocket, reply: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(reply, to).await {
        tracing::debug!(error = %e, %to, "MI reply not sent");
    }
}

/// Answers one request datagram; None when OpenSIPS sends nothing back.
pub(crate) fn handle_datagram(inner: &Arc<Inner>, bytes: &[u8]) -> Option<Vec<u8>> {
    let request = match MiRequest::parse(bytes) {
        Ok(r) => r,
        Err(MiRequestError::NotJson { .. }) => return Some(MiPlainText::ParseError.as_text().into_bytes()),
        // An id that is not a number, a string or null makes OpenSIPS fail building any reply.
        Err(MiRequestError::BadId { .. }) => return Some(MiPlainText::InternalError.as_text().into_bytes()),
        // -32600 is the one error OpenSIPS answers even without an id (with "id":null).
        Err(MiRequestError::InvalidRequest { id, .. }) => {
            return Some(MiErrorReply::new(codes::INVALID_REQUEST, "Invalid Request", None, id).to_bytes())
        }
        Err(MiRequestError::Oversized { .. }) => return None,
    };
    let id = request.id.clone()?;
    inner.traced(Instant::now(), || crate::Traced::Mi {
        command: request.method.clone(),
        params: serde_json::to_value(&request.params).unwrap_or_default(),
    });
    let result = {
        let mut state = inner.lock();
        let result = dispatch(inner, &mut state, &request);
        if let Some(p) = &result.1 {
            state.mi_param_err = p.last_err.get();
        }
        result.0
    };
    let reply = match result {
        Ok(value) => MiSuccess::new(value, echo_id(id)).to_bytes(),
        Err(e) => MiErrorReply::new(e.code, e.message, e.data.as_deref(), echo_id(id)).to_bytes(),
    };
    if reply.len() > MI_DATAGRAM_BUFFER {
        return Some(MiPlainText::InternalError.as_text().into_bytes());
    }
    Some(reply)
}

/// OpenSIPS echoes numeric ids through a C `int` (cJSON `valueint`): fractions are cut and
/// values outside the `int` range saturate.
fn echo_id(id: MiId) -> MiId {
    match id {
        MiId::Number(n) => {
            let as_int = match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => i.clamp(i64::from(i32::MIN), i64::from(i32::MAX)),
                (None, Some(f)) => f.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i64,
                _ => 0,
            };
            MiId::Number(as_int.into())
        }
        other => other,
    }
}

/// An MI error, before it gets the request's id.
pub(crate) struct Fail {
    code: i64,
    message: String,
    data: Option<String>,
}

fn fail(code: i64, message: &str) -> Fail {
    Fail { code, message: message.to_owned(), data: None }
}

fn invalid_params(data: &str) -> Fail {
    Fail { code: codes::INVALID_PARAMS, message: "Invalid params".into(), data: Some(data.to_owned()) }
}

fn server_error(data: &str) -> Fail {
    Fail { code: codes::SERVER_ERROR, message: "Server error".into(), data: Some(data.to_owned()) }
}

type Recipe = Vec<&'static str>;

/// Every subset of `optional`, each added to `required`.
fn with_optional(required: &[&'static str], optional: &[&'static str]) -> Vec<Recipe> {
    (0..1u32 << optional.len())
        .map(|mask| {
            let mut r = required.to_vec();
            r.extend(optional.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| *n));
            r
        })
        .collect()
}

fn sets(list: &[&[&'static str]]) -> Vec<Recipe> {
    list.iter().map(|r| r.to_vec()).collect()
}

/// A command's param sets and whether it refuses positional params; None for unknown commands.
fn recipes(command: &str) -> Option<(Vec<Recipe>, bool)> {
    let ua_optional = |base: &[&'static str]| {
        let mut v = vec![base.to_vec()];
        for extra in [
            &["body"][..],
            &["extra_headers"],
            &["body", "content_type"],
            &["body", "extra_headers"],
            &["body", "content_type", "extra_headers"],
        ] {
            let mut r = base.to_vec();
            r.extend_from_slice(extra);
            v.push(r);
        }
        v
    };
    Some(match command {
        "version" => (sets(&[&[], &["revision"]]), false),
        "which" => (sets(&[&[], &["command"]]), false),
        "uptime" | "ps" | "events_list" => (sets(&[&[]]), false),
        "get_statistics" => (sets(&[&["statistics"]]), false),
        "event_subscribe" => (sets(&[&["event", "socket"], &["event", "socket", "expire"]]), false),
        "subscribers_list" => (sets(&[&[], &["event"], &["event", "socket"]]), false),
        "dlg_list" | "dlg_list_ctx" => {
            (sets(&[&[], &["callid"], &["callid", "from_tag"], &["index", "counter"]]), true)
        }
        "dlg_end_dlg" => (sets(&[&["dialog_id"], &["dialog_id", "extra_hdrs"]]), false),
        "call_hold" | "call_unhold" => (sets(&[&["callid"]]), false),
        "call_transfer" => (
            sets(&[
                &["callid", "leg", "destination"],
                &["callid", "leg", "transfer_callid", "transfer_leg"],
                &["callid", "leg", "transfer_callid", "transfer_leg", "destination"],
                &["callid", "leg", "transfer_callid", "transfer_fromtag", "transfer_totag", "transfer_destination"],
            ]),
            false,
        ),
        "ua_session_client_start" => {
            // Every subset of the optional params, except {proxy, body, flags, socket}: OpenSIPS's
            // recipe table is full at 48 entries (reference notes §4.5).
            let all = with_optional(
                &["ruri", "to", "from"],
                &["proxy", "body", "content_type", "extra_headers", "flags", "socket"],
            );
            let recipes = all
                .into_iter()
                .filter(|r| !r.contains(&"content_type") || r.contains(&"body"))
                .filter(|r| {
                    let mut opt: Vec<&str> = r[3..].to_vec();
                    opt.sort_unstable();
                    opt != ["body", "flags", "proxy", "socket"]
                })
                .collect();
            (recipes, false)
        }
        "ua_session_update" => (ua_optional(&["key", "method"]), false),
        "ua_session_reply" => (ua_optional(&["key", "method", "code", "reason"]), false),
        "ua_session_terminate" => (sets(&[&["key"], &["key", "extra_headers"]]), false),
        "ua_session_list" => (sets(&[&[], &["key"]]), false),
        other if WHICH.contains(&other) => (sets(&[&[]]), false),
        _ => return None,
    })
}

/// The kind of the last failed param lookup. OpenSIPS keeps it per process (`param_err_type`,
/// mi/item.c) and reports it when a handler rejects a value it did find: callops's
/// `call_transfer` with a bad `leg` answers -32602 "Bad type for parameter 'leg'" when the last
/// failure was a bad type (so also on a fresh start: the initial value is "bad type"), and -32000
/// "Failed to handle parameter" when it was a missing param (b2b_entities looks up every optional
/// param, so any UA command without a body leaves it so: fixture `mi/call_transfer.bad_leg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParamErr {
    /// A param had the wrong type.
    BadType,
    /// A looked-up param was absent.
    Missing,
}

/// The request's params, named, after matching them against the command's recipes, with the
/// kind of the last failed lookup.
struct Params {
    named: Map<String, Value>,
    last_err: std::cell::Cell<ParamErr>,
}

impl Params {
    fn new(named: Map<String, Value>) -> Params {
        Params { named, last_err: std::cell::Cell::new(ParamErr::BadType) }
    }

    fn has(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    fn bad_type(&self, name: &str) -> Fail {
        self.last_err.set(ParamErr::BadType);
        invalid_params(&format!("Bad type for parameter '{name}'"))
    }

    fn missing(&self) -> Fail {
        self.last_err.set(ParamErr::Missing);
        server_error("Failed to handle parameter")
    }

    /// What a handler answers when it rejects the value of `name` after finding it.
    fn rejected(&self, name: &str) -> Fail {
        match self.last_err.get() {
            ParamErr::BadType => invalid_params(&format!("Bad type for parameter '{name}'")),
            ParamErr::Missing => server_error("Failed to handle parameter"),
        }
    }

    /// A "string" param: a JSON string, or a number printed as an int.
    fn str(&self, name: &str) -> Result<String, Fail> {
        match self.named.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.as_i64().map_or_else(|| n.to_string(), |i| i.to_string())),
            Some(_) => Err(self.bad_type(name)),
            None => Err(self.missing()),
        }
    }

    /// An optional "string" param, looked up as OpenSIPS's `try_get_mi_string_param` does: an
    /// absent one counts as a failed lookup.
    fn opt_str(&self, name: &str) -> Result<Option<String>, Fail> {
        if self.has(name) {
            self.str(name).map(Some)
        } else {
            self.last_err.set(ParamErr::Missing);
            Ok(None)
        }
    }

    /// An "int" param: a JSON number, or a numeric string.
    fn int(&self, name: &str) -> Result<i64, Fail> {
        match self.named.get(name) {
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| self.bad_type(name)),
            Some(Value::String(s)) => s.trim().parse().map_err(|_| self.bad_type(name)),
            Some(_) => Err(self.bad_type(name)),
            None => Err(self.missing()),
        }
    }
}

fn match_recipe(request: &MiRequest, recipes: &[Recipe], named_only: bool) -> Result<Params, Fail> {
    let given = request.params.as_ref().filter(|p| !p.is_empty());
    match given {
        None => {
            if recipes.iter().any(|r| r.is_empty()) {
                Ok(Params::new(Map::new()))
            } else {
                Err(invalid_params("Too few or too many parameters"))
            }
        }
        Some(MiParams::Named(map)) => {
            let same_count: Vec<&Recipe> = recipes.iter().filter(|r| r.len() == map.len() && !r.is_empty()).collect();
            if same_count.iter().any(|r| r.iter().all(|n| map.contains_key(*n))) {
                Ok(Params::new(map.clone()))
            } else if same_count.is_empty() {
                Err(invalid_params("Too few or too many parameters"))
            } else {
                Err(invalid_params("Named parameters do not match"))
            }
        }
        Some(MiParams::Positional(list)) => {
            if named_only {
                return Err(invalid_params("Command only supports named parameters"));
            }
            let mut same_count = recipes.iter().filter(|r| r.len() == list.len());
            match (same_count.next(), same_count.next()) {
                (Some(r), None) => {
                    Ok(Params::new(r.iter().map(|n| (*n).to_owned()).zip(list.iter().cloned()).collect()))
                }
                (Some(_), Some(_)) => Err(invalid_params("Ambiguous call, use named parameters instead")),
                (None, _) => Err(invalid_params("Too few or too many parameters")),
            }
        }
    }
}

/// Runs a request; its answer, and its params (whose last failed lookup the process keeps).
fn dispatch(inner: &Arc<Inner>, state: &mut State, request: &MiRequest) -> (Result<Value, Fail>, Option<Params>) {
    let command = request.method.as_str();
    let Some((recipes, named_only)) = recipes(command) else {
        return (Err(fail(codes::METHOD_NOT_FOUND, "Method not found")), None);
    };
    let p = match match_recipe(request, &recipes, named_only) {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    p.last_err.set(state.mi_param_err);
    let answer = run_command(inner, state, command, &p);
    (answer, Some(p))
}

fn run_command(inner: &Arc<Inner>, state: &mut State, command: &str, p: &Params) -> Result<Value, Fail> {
    match command {
        "which" => match p.opt_str("command")? {
            None => Ok(json!(WHICH)),
            // A command's recipes, as lists of param names.
            Some(command) => match recipes(&command) {
                Some((sets, _)) if WHICH.contains(&command.as_str()) => Ok(json!(sets)),
                _ => Err(fail(404, "unknown MI command")),
            },
        },
        // A build from a source tarball knows no git revision.
        "version" if p.has("revision") => Ok(json!({ "Server": SERVER_VERSION, "unknown": "unknown" })),
        "version" => Ok(json!({ "Server": SERVER_VERSION })),
        "uptime" => {
            let now = sip::unix_now();
            Ok(json!({
                "Now": sip::ctime(now),
                "Up since": sip::ctime(state.started_unix),
                "Up time": format!("{} [sec]", now.saturating_sub(state.started_unix)),
            }))
        }
        "ps" => Ok(ps(inner)),
        "events_list" => Ok(
            json!({ "Events": EVENTS.iter().enumerate().map(|(id, name)| json!({"name": name, "id": id})).collect::<Vec<_>>() }),
        ),
        "event_subscribe" => event_subscribe(state, p),
        "subscribers_list" => subscribers_list(state, p),
        "get_statistics" => get_statistics(state, p),
        "dlg_list" | "dlg_list_ctx" => dlg_list(state, p),
        "dlg_end_dlg" => {
            let dialog_id = p.str("dialog_id")?;
            let callid = state.find_dialog_key(&dialog_id).ok_or_else(|| fail(404, "Requested Dialog not found"))?;
            scenario::end_dialog_later(inner, state.generation, callid);
            Ok(json!("OK"))
        }
        "call_hold" | "call_unhold" => {
            let hold = command == "call_hold";
            let callid = p.str("callid")?;
            let dialog = state.dialogs.get(&callid).ok_or_else(|| fail(404, "Dialog not found"))?;
            if dialog.state != DlgState::Confirmed {
                return Err(fail(410, "Dialog not ready"));
            }
            if scenario::hold(inner, state, &callid, hold) {
                Ok(json!("OK"))
            } else if hold {
                Err(fail(480, "Both dialog legs are on hold"))
            } else {
                Err(fail(480, "No dialog legs on hold"))
            }
        }
        "call_transfer" => call_transfer(inner, state, p),
        "ua_session_client_start" => {
            let (ruri, to, from) = (p.str("ruri")?, p.str("to")?, p.str("from")?);
            for optional in ["proxy", "body", "content_type", "extra_headers"] {
                p.opt_str(optional)?;
            }
            let flags = p.opt_str("flags")?.unwrap_or_default();
            p.opt_str("socket")?;
            let start = ClientStart { ruri, to, from, flags };
            Ok(json!(scenario::client_start(inner, state, start)))
        }
        "ua_session_update" => {
            let (key, method) = (p.str("key")?, p.str("method")?.to_ascii_uppercase());
            for optional in ["body", "content_type", "extra_headers"] {
                p.opt_str(optional)?;
            }
            scenario::update(inner, state, &key, &method)
                .map(|()| json!("OK"))
                .map_err(|_| fail(500, "Failed to send sequential request"))
        }
        "ua_session_reply" => {
            let (key, method, code) = (p.str("key")?, p.str("method")?.to_ascii_uppercase(), p.int("code")?);
            p.str("reason")?;
            for optional in ["body", "content_type", "extra_headers"] {
                p.opt_str(optional)?;
            }
            scenario::reply(inner, state, &key, &method, code)
                .map(|()| json!("OK"))
                .map_err(|_| fail(500, "Failed to send reply"))
        }
        "ua_session_terminate" => {
            let key = p.str("key")?;
            p.opt_str("extra_headers")?;
            let answered = state.sessions.get(&key).map(|s| s.uac || s.b2b_state >= 4);
            match answered {
                Some(true) => {
                    // BYE (or CANCEL if early) goes out; no event for it or its reply.
                    state.remove_session(&key);
                    Ok(json!("OK"))
                }
                Some(false) | None => Err(fail(500, "Failed to terminate session")),
            }
        }
        "ua_session_list" => ua_session_list(state, p),
        _ => Ok(json!("OK")),
    }
}

fn ps(inner: &Inner) -> Value {
    let base = std::process::id();
    let mut types =
        vec!["attendant".to_owned(), "MI Datagram".to_owned(), "time_keeper".to_owned(), "timer".to_owned()];
    types.extend((0..inner.config.sip_workers.max(1)).map(|_| "SIP receiver udp:127.0.0.1:5060".to_owned()));
    types.push("Timer handler".to_owned());
    let list: Vec<Value> =
        types.iter().enumerate().map(|(i, t)| json!({"ID": i, "PID": base + i as u32, "Type": t})).collect();
    json!({ "Processes": list })
}

fn event_subscribe(state: &mut State, p: &Params) -> Result<Value, Fail> {
    let event = p.str("event")?;
    let socket = p.str("socket")?;
    let expire = if p.has("expire") { p.int("expire")? } else { 3600 };
    if expire < 0 {
        return Err(invalid_params("Negative expire value"));
    }
    if !EVENTS.contains(&event.as_str()) {
        return Err(fail(400, "Bad parameter value"));
    }
    let addr: SocketAddr =
        socket.strip_prefix("udp:").and_then(|a| a.parse().ok()).ok_or_else(|| fail(400, "Bad parameter value"))?;
    let now = Instant::now();
    // Renewal: the same event and socket string refreshes the existing entry.
    if let Some(sub) = state.subscriptions.iter_mut().find(|s| s.event == event && s.socket == socket) {
        sub.expire_secs = expire as u64;
        sub.since = now;
    } else {
        state.subscriptions.push(Subscription { event, socket, addr, expire_secs: expire as u64, since: now });
    }
    Ok(json!("OK"))
}

fn subscriber_json(s: &Subscription, now: Instant) -> Value {
    let ttl = if s.is_live(now) { json!(s.ttl_secs(now)) } else { json!("expired") };
    json!({ "socket": s.socket, "expire": s.expire_secs, "ttl": ttl })
}

fn subscribers_list(state: &mut State, p: &Params) -> Result<Value, Fail> {
    let now = Instant::now();
    let event_json = |name: &str, id: usize, subs: Vec<Value>| json!({"name": name, "id": id, "Subscribers": subs});
    let result = match p.opt_str("event")? {
        None => {
            let events: Vec<Value> = EVENTS
                .iter()
                .enumerate()
                .filter_map(|(id, name)| {
                    let subs: Vec<Value> = state
                        .subscriptions
                        .iter()
                        .filter(|s| s.event == *name)
                        .map(|s| subscriber_json(s, now))
                        .collect();
                    (!subs.is_empty()).then(|| event_json(name, id, subs))
                })
                .collect();
            json!({ "Events": events })
        }
        Some(event) => {
            let id = EVENTS.iter().position(|e| *e == event).ok_or_else(|| fail(404, "Event not published"))?;
            let mut subs = state.subscriptions.iter().filter(|s| s.event == event);
            match p.opt_str("socket")? {
                None => {
                    json!({ "Event": event_json(&event, id, subs.map(|s| subscriber_json(s, now)).collect()) })
                }
                Some(socket) => {
                    let sub =
                        subs.find(|s| s.socket == socket).ok_or_else(|| fail(404, "Subscriber does not exist"))?;
                    json!({ "Event": {"name": event, "id": id, "Subscriber": subscriber_json(sub, now)} })
                }
            }
        }
    };
    // Listed once as expired, then purged.
    state.subscriptions.retain(|s| s.is_live(now));
    Ok(result)
}

fn get_statistics(state: &State, p: &Params) -> Result<Value, Fail> {
    let wanted: Vec<String> = match p.named.get("statistics") {
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }
        Some(Value::Array(_)) => return Err(invalid_params("Empty array in parameter 'statistics'")),
        _ => return Err(invalid_params("Bad type for parameter 'statistics'")),
    };
    let active =
        state.dialogs.values().filter(|d| d.state == DlgState::Confirmed || d.state == DlgState::Answered).count();
    let early = state.dialogs.values().filter(|d| d.state == DlgState::Early).count();
    let dialog_stats = [
        ("dialog:active_dialogs", active as u64),
        ("dialog:early_dialogs", early as u64),
        ("dialog:processed_dialogs", state.processed_dialogs),
        ("dialog:expired_dialogs", 0),
        ("dialog:failed_dialogs", state.failed_dialogs),
        ("dialog:create_sent", 0),
        ("dialog:update_sent", 0),
        ("dialog:delete_sent", 0),
        ("dialog:create_recv", 0),
        ("dialog:update_recv", 0),
        ("dialog:delete_recv", 0),
    ];
    let mut out = Map::new();
    for (name, value) in dialog_stats {
        if wanted.iter().any(|w| w == "all" || w == name || (w.ends_with(':') && name.starts_with(w.as_str()))) {
            out.insert(name.to_owned(), json!(value));
        }
    }
    Ok(Value::Object(out))
}

fn dialog_json(d: &crate::Dialog) -> Value {
    let mut o = Map::new();
    o.insert("ID".into(), json!(d.id));
    o.insert("db_id".into(), json!(d.db_id));
    o.insert("state".into(), json!(d.state.code()));
    o.insert("user_flags".into(), json!(""));
    o.insert("timestart".into(), json!(d.timestart));
    o.insert("datestart".into(), json!(sip::datetime(d.timestart)));
    o.insert("timeout".into(), json!(d.timestart + 3600));
    o.insert("dateout".into(), json!(sip::datetime(d.timestart + 3600)));
    o.insert("callid".into(), json!(d.callid));
    o.insert("from_uri".into(), json!(d.from_uri));
    o.insert("to_uri".into(), json!(d.to_uri));
    o.insert("caller_tag".into(), json!(d.from_tag));
    o.insert("caller_contact".into(), json!(d.from_uri));
    // Mislabelled in OpenSIPS: this is the caller leg's cseq.
    o.insert("callee_cseq".into(), json!("0"));
    o.insert("caller_route_set".into(), json!(""));
    o.insert("caller_bind_addr".into(), json!("udp:127.0.0.1:5060"));
    o.insert("caller_sdp".into(), json!(d.caller_sdp));
    if let Some(to_tag) = &d.to_tag {
        o.insert(
            "CALLEES".into(),
            json!([{
                "callee_tag": to_tag,
                "callee_contact": "sip:127.0.0.1:5080;transport=UDP",
                "caller_cseq": "1",
                "callee_route_set": "",
                "callee_bind_addr": "udp:127.0.0.1:5060",
                "callee_sdp": d.callee_sdp,
            }]),
        );
    }
    Value::Object(o)
}

fn dlg_list(state: &State, p: &Params) -> Result<Value, Fail> {
    if p.has("callid") {
        let callid = p.str("callid")?;
        let from_tag = p.opt_str("from_tag")?;
        let dialog = state
            .dialogs
            .get(&callid)
            .filter(|d| from_tag.as_ref().is_none_or(|t| *t == d.from_tag))
            .ok_or_else(|| fail(404, "No such dialog"))?;
        return Ok(json!({ "Dialog": dialog_json(dialog) }));
    }
    if p.has("index") {
        let (index, counter) = (p.int("index")?, p.int("counter")?);
        if index < 0 || counter <= 0 {
            return Err(invalid_params("Bad type for parameter 'index'"));
        }
        let page: Vec<Value> =
            state.dialogs_in_order().skip(index as usize).take(counter as usize).map(dialog_json).collect();
        return Ok(json!({ "count": state.dialogs.len(), "Dialogs": page }));
    }
    Ok(json!({ "Dialogs": state.dialogs_in_order().map(dialog_json).collect::<Vec<_>>() }))
}

/// `call_transfer`, with callops's order of checks: params first (a bad `leg` is answered
/// with the last lookup failure's kind, see [`ParamErr`]), then the transfer dialog (attended),
/// then the dialog.
fn call_transfer(inner: &Arc<Inner>, state: &mut State, p: &Params) -> Result<Value, Fail> {
    let callid = p.str("callid")?;
    let leg = match p.str("leg")?.as_str() {
        "caller" => Leg::Caller,
        "callee" => Leg::Callee,
        _ => return Err(p.rejected("leg")),
    };
    if p.has("transfer_callid") {
        p.str("transfer_callid")?;
        if p.opt_str("destination")?.is_none() && p.has("transfer_fromtag") {
            // The third attended recipe reads `destination` while it names
            // `transfer_destination`: it always fails in 3.4.
            return Err(p.rejected("destination"));
        }
        if let Some(b_leg) = p.opt_str("transfer_leg")? {
            if b_leg != "caller" && b_leg != "callee" {
                return Err(p.rejected("transfer_leg"));
            }
        }
        let b_callid = p.str("transfer_callid")?;
        if !state.dialogs.contains_key(&b_callid) {
            return Err(fail(404, "Transfer dialog not found"));
        }
    } else {
        p.str("destination")?;
    }
    let dialog = state.dialogs.get(&callid).ok_or_else(|| fail(404, "Dialog not found"))?;
    // Any transfer ever started on the dialog blocks the next one (`call_transfer_leg` is
    // never deleted): fixtures mi/call_transfer.already_transferring, .after_declined_refer.
    if dialog.transfer_leg.is_some() {
        return Err(fail(491, "Request Pending"));
    }
    if dialog.state != DlgState::Confirmed {
        return Err(server_error("Command handler returned null"));
    }
    let transfer = if p.has("transfer_callid") {
        let b_callid = p.str("transfer_callid")?;
        let b = state.dialogs.get(&b_callid).ok_or_else(|| fail(404, "Transfer dialog not found"))?;
        let b_leg = match p.str("transfer_leg")?.as_str() {
            "caller" => Leg::Caller,
            _ => Leg::Callee,
        };
        let destination = match p.named.get("destination").and_then(Value::as_str).map(str::to_owned) {
            Some(d) => d,
            None if b_leg == Leg::Caller => b.from_uri.clone(),
            None => b.to_uri.clone(),
        };
        Transfer { callid, leg, destination, replaces: Some((b_callid, b_leg)) }
    } else {
        Transfer { callid, leg, destination: p.str("destination")?, replaces: None }
    };
    scenario::transfer(inner, state, transfer);
    Ok(json!("Accepted"))
}

fn session_json(s: &crate::UaSession) -> Value {
    let mut o = Map::new();
    o.insert("dlg".into(), json!(s.local_index));
    o.insert("logic_key".into(), json!(""));
    o.insert("mod_name".into(), json!("b2b_entities"));
    o.insert("state".into(), json!(s.b2b_state));
    o.insert("last_invite_cseq".into(), json!(if s.uac { 2 } else { 1 }));
    o.insert("last_method".into(), json!(s.last_method));
    if let Some(code) = s.last_reply_code.filter(|_| !s.uac) {
        o.insert("last_reply_code".into(), json!(code));
    }
    o.insert("db_flag".into(), json!(2));
    if !s.uac {
        o.insert("ruri".into(), json!(s.to_uri));
    }
    o.insert("callid".into(), json!(s.callid));
    o.insert("from".into(), json!(s.from_display));
    o.insert("from_uri".into(), json!(s.from_uri));
    o.insert("from_tag".into(), json!(s.from_tag));
    o.insert("to".into(), json!(if s.uac { String::new() } else { s.to_display.clone() }));
    o.insert("to_uri".into(), json!(s.to_uri));
    o.insert("to_tag".into(), json!(s.to_tag));
    o.insert("cseq".into(), json!({"caller": if s.uac { s.cseq_local } else { s.cseq_remote }, "callee": 1}));
    let (caller_contact, callee_contact) = if s.uac {
        ("sip:opensips@127.0.0.1:5060".to_owned(), s.remote_contact.trim_matches(['<', '>']).to_owned())
    } else {
        (s.remote_contact.clone(), "sip:127.0.0.1:5060".to_owned())
    };
    o.insert("contact".into(), json!({"caller": caller_contact, "callee": callee_contact}));
    o.insert("send_sock".into(), json!("127.0.0.1"));
    if s.uac && s.b2b_state >= 4 {
        o.insert("LEGS".into(), json!([{"id": 0, "tag": s.to_tag, "cseq": s.cseq_local, "contact": callee_contact}]));
    }
    Value::Object(o)
}

fn ua_session_list(state: &State, p: &Params) -> Result<Value, Fail> {
    match p.opt_str("key")? {
        Some(key) => {
            // Keys look like B2B.<hash>.<local>.<time>.<rand>; only the first two numbers matter.
            let parts: Vec<&str> = key.split('.').collect();
            if parts.len() < 3 || parts[1..3].iter().any(|n| n.parse::<u64>().is_err()) {
                return Err(fail(400, "Bad format for b2b key"));
            }
            let session = state.sessions.get(&key).ok_or_else(|| fail(404, "Entity not found"))?;
            Ok(session_json(session))
        }
        None => Ok(Value::Array(
            state.session_order.values().filter_map(|k| state.sessions.get(k)).map(session_json).collect(),
        )),
    }
}

/// The events callbus subscribes to exist in the simulated OpenSIPS.
#[cfg(test)]
#[path = "mi_tests.rs"]
mod tests;
