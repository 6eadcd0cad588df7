//! The Call API compatibility door: OpenSIPS Call API's own protocol (JSON-RPC 2.0 over
//! WebSocket on `/call-api`), so existing Call API clients work unchanged.
//!
//! The door is a client of the engine over NATS: each request becomes a `callbus.cmd.*`
//! command, and the command's notifications are translated back into Call API's event
//! names. Unlike Call API, no method name can crash it, params of any JSON type get a clear
//! error, and a command that fails says so (`Error`, then `Ended`), including a failed
//! transfer, which Call API reported as pending for ever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callbus_client::Client;
use callbus_schemas::callapi::{self, Method, Request};
use callbus_schemas::command::{CallNotification, CommandReply};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as HttpRequest, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The WebSocket path Call API serves.
pub const PATH: &str = "/call-api";
/// How long a command may take before the door reports it failed.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(140);
/// Frames waiting to be written to one client.
const OUTGOING_FRAMES: usize = 1024;
/// SIP Call-IDs a connection remembers the callbus call of (a Call-ID names one call for its
/// whole life): a connection's repeated commands on a call skip the `call.get` lookup. Past
/// this many the memory starts over.
const KNOWN_CALLS: usize = 10_000;

/// A connection's SIP Call-ID → callbus `call_id`.
type KnownCalls = Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>;

/// A running door.
pub struct CallApiDoor {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl CallApiDoor {
    /// Listens on `listen` and serves every connection until shut down; no token is asked for
    /// (Call API's own behaviour), so `listen` must be a loopback address.
    pub async fn start(listen: SocketAddr, client: async_nats::Client) -> std::io::Result<CallApiDoor> {
        CallApiDoor::start_with_token(listen, client, None).await
    }

    /// Listens on `listen`; with `token`, a client must send `Authorization: Bearer <token>`
    /// in its WebSocket handshake (or `?token=<token>` on the URL, for clients that cannot set
    /// headers), else it gets 401. Without a token only a loopback address is accepted: the
    /// door can end and transfer every call.
    pub async fn start_with_token(
        listen: SocketAddr,
        client: async_nats::Client,
        token: Option<String>,
    ) -> std::io::Result<CallApiDoor> {
        if token.is_none() && !listen.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("the Call API door would serve {listen} to anyone who can reach it: bind a loopback address, or set a bearer token (callapi_token / CALLBUS_CALLAPI_TOKEN)"),
            ));
        }
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let token: Option<Arc<str>> = token.map(Arc::from);
        let client = Client::new(client).with_timeout(Duration::from_secs(10)).with_cmd_prefix("callapi");
        let task = tokio::spawn(accept(listener, client, token, cancel.clone()));
        tracing::info!(%addr, path = PATH, "Call API door listening");
        Ok(CallApiDoor { addr, cancel, task })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes the connections.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn accept(listener: TcpListener, client: Client, token: Option<Arc<str>>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = cancel.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Frames are small and come in bursts (the answer, then notifications): with
                // Nagle's algorithm on, the second one waits for the client's delayed ACK
                // (~40 ms on Linux). Each frame is one write, so nothing is gained by waiting.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "Call API door: cannot set TCP_NODELAY");
                }
                tokio::spawn(connection(stream, peer, client.clone(), token.clone(), cancel.child_token()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "Call API door: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether a handshake carries `token` (constant time in the token's length).
fn presents(request: &HttpRequest, token: &str) -> bool {
    let header = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query = request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let same = |given: &str| {
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    };
    header.is_some_and(same) || query.is_some_and(same)
}

/// Accepts the WebSocket handshake on [`PATH`] only, with the token when one is set.
// The callback's signature (and so its large error type) is tungstenite's.
#[allow(clippy::result_large_err)]
fn check_handshake(request: &HttpRequest, response: Response, token: Option<&str>) -> Result<Response, ErrorResponse> {
    if request.uri().path() != PATH {
        let mut refusal = ErrorResponse::new(Some(format!("the Call API is served on {PATH}")));
        *refusal.status_mut() = StatusCode::NOT_FOUND;
        return Err(refusal);
    }
    if token.is_some_and(|t| !presents(request, t)) {
        let mut refusal = ErrorResponse::new(Some("a bearer token is required (Authorization: Bearer …)".into()));
        *refusal.status_mut() = StatusCode::UNAUTHORIZED;
        return Err(refusal);
    }
    Ok(response)
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    client: Client,
    token: Option<Arc<str>>,
    cancel: CancellationToken,
) {
    #[allow(clippy::result_large_err)]
    let check = |request: &HttpRequest, response: Response| check_handshake(request, response, token.as_deref());
    let ws = match tokio_tungstenite::accept_hdr_async(stream, check).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::info!(%peer, error = %e, "Call API handshake refused");
            return;
        }
    };
    tracing::info!(%peer, "Call API client connected");
    let (mut sink, mut source) = ws.split();
    let (out, mut outgoing) = mpsc::channel::<String>(OUTGOING_FRAMES);
    let known: KnownCalls = Arc::default();
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.send(Message::text(frame)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    loop {
        let frame = tokio::select! {
            f = source.next() => f,
            _ = cancel.cancelled() => break,
        };
        let bytes = match frame {
            Some(Ok(Message::Text(text))) => Bytes::copy_from_slice(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::info!(%peer, error = %e, "Call API connection failed");
                break;
            }
        };
        match callapi::parse_request(&bytes) {
            Ok(request) => {
                tokio::spawn(run(request, client.clone(), out.clone(), Arc::clone(&known)));
            }
            Err((id, error)) => {
                tracing::info!(%peer, message = error.message(), "Call API request refused");
                let _ = out.send(callapi::error(&id, error)).await;
            }
        }
    }
    drop(out);
    let _ = writer.await;
    tracing::info!(%peer, "Call API client gone");
}

async fn command(client: &Client, verb: &str, body: Value) -> Result<CommandReply, String> {
    client.request(verb, &body).await.map_err(|e| e.to_string())
}

/// The callbus command for a Call API request, and the SIP Call-ID of the call it acts on.
fn as_command(request: &Request, cmd_id: &str) -> Option<(&'static str, Value, String)> {
    let p = |name: &str| request.param(name).to_owned();
    Some(match request.method {
        Method::CallStart => return None, // run() starts the call itself
        Method::CallEnd => ("call.end", json!({"sip_call_id": p("callid"), "cmd_id": cmd_id}), p("callid")),
        Method::CallHold => ("call.hold", json!({"sip_call_id": p("callid"), "cmd_id": cmd_id}), p("callid")),
        Method::CallUnhold => ("call.unhold", json!({"sip_call_id": p("callid"), "cmd_id": cmd_id}), p("callid")),
        Method::CallBlindTransfer => (
            "call.transfer.blind",
            json!({"sip_call_id": p("callid"), "leg": p("leg"), "destination": p("destination"), "cmd_id": cmd_id}),
            p("callid"),
        ),
        Method::CallAttendedTransfer => (
            "call.transfer.attended",
            json!({"sip_call_id": p("callidA"), "leg": p("legA"), "transfer_sip_call_id": p("callidB"), "transfer_leg": p("legB"), "cmd_id": cmd_id}),
            p("callidA"),
        ),
    })
}

/// Call API's CallStart event for a notification of a click-to-dial call, if it has one.
fn translate_start(request: &Request, note: &CallNotification) -> Option<(&'static str, Option<Value>)> {
    let d = &note.data;
    let is = |leg: &str| d["leg"] == json!(leg);
    // The parties are the request's: callbus's leg notifications name a leg, not both parties.
    let (caller, callee) = (json!(request.param("caller")), json!(request.param("callee")));
    Some(match note.event.as_str() {
        "answered" if is("caller") => ("CallerAnswered", Some(json!({"caller": caller, "callee": callee}))),
        "dialing" if is("callee") => ("Transferring", Some(json!({"caller": caller, "destination": callee}))),
        "calling" if is("callee") => {
            ("TransferStart", Some(json!({"callid": d["key"], "caller": caller, "callee": callee})))
        }
        "ringing" if is("callee") => {
            let extra = format!("{} {}", d["status"], d["reason"].as_str().unwrap_or_default());
            let data = json!({"callid": d["key"], "caller": caller, "callee": callee, "extra": extra});
            ("TransferPending", Some(data))
        }
        "connected" => ("CalleeAnswered", Some(json!({"callid": d["callee_key"], "caller": caller, "callee": callee}))),
        _ => return None,
    })
}

/// Call API's event for a callbus notification, if it has one.
fn translate(request: &Request, note: &CallNotification) -> Option<(&'static str, Option<Value>)> {
    if request.method == Method::CallStart {
        return translate_start(request, note);
    }
    let leg = || Some(json!({"leg": note.data["leg"]}));
    // As Call API does, `callid` of TransferStart/Pending/Successful is the transfer's new call
    // (OpenSIPS's `transfer_callid`), blind or attended: the call a client goes on with.
    let callid = note.data["new_sip_call_id"].clone();
    let attended = request.method == Method::CallAttendedTransfer;
    let destination = (!attended).then(|| json!(request.param("destination")));
    let with_destination = |mut data: Value| {
        if let Some(d) = &destination {
            data["destination"] = d.clone();
        }
        Some(data)
    };
    Some(match note.event.as_str() {
        "hold_requested" => ("CallHolding", None),
        "hold_started" => ("CallHoldStart", leg()),
        "held" => ("CallHoldSuccessful", leg()),
        "unhold_requested" => ("CallUnholding", None),
        "unhold_started" => ("CallUnholdStart", leg()),
        "resumed" => ("CallUnholdSuccessful", leg()),
        "transfer_requested" if attended => ("Transferring", None),
        "transfer_requested" => ("Transferring", with_destination(json!({}))),
        "transfer_started" => ("TransferStart", with_destination(json!({"callid": callid}))),
        "transfer_progress" => {
            ("TransferPending", with_destination(json!({"callid": callid, "extra": note.data["status"]})))
        }
        "transferred" => ("TransferSuccessful", with_destination(json!({"callid": callid}))),
        _ => return None,
    })
}

async fn run(request: Request, client: Client, out: mpsc::Sender<String>, known: KnownCalls) {
    let method = request.method;
    let cmd_id = request.cmd_id.clone().unwrap_or_else(|| client.new_cmd_id());
    let send = |frame: String| {
        let out = out.clone();
        async move {
            let _ = out.send(frame).await;
        }
    };
    let fail = |reason: String| {
        let cmd_id = cmd_id.clone();
        async move {
            send(callapi::notification(method, &cmd_id, "Error", Some(json!(reason)))).await;
            send(callapi::notification(method, &cmd_id, "Ended", None)).await;
        }
    };
    let mut notes = if request.method == Method::CallStart {
        // The call exists only once the engine accepted the command. Its first notification
        // that Call API shows (CallerAnswered) needs a whole MI round trip and a SIP answer
        // after that, so following the call from the accepted reply loses none of them.
        let body = json!({"caller": request.param("caller"), "callee": request.param("callee"), "cmd_id": cmd_id});
        let reply = command(&client, "call.start", body).await;
        send(callapi::started(&request.id, &cmd_id)).await;
        let call_id = match reply {
            Ok(CommandReply::Accepted { call_id, .. }) => call_id,
            Ok(CommandReply::Refused { error, .. }) => return fail(error.message).await,
            Ok(CommandReply::Data { .. }) => return fail("unexpected answer from the engine".into()).await,
            Err(reason) => return fail(reason).await,
        };
        match client.follow(&call_id).await {
            Ok(notes) => notes,
            Err(e) => return fail(e.to_string()).await,
        }
    } else {
        let Some((verb, body, sip_call_id)) = as_command(&request, &cmd_id) else { return };
        // Subscribe to the call's notifications before the command, so none is missed.
        let remembered = known.lock().unwrap_or_else(|p| p.into_inner()).get(&sip_call_id).cloned();
        let call_id = match remembered {
            Some(id) => Some(id),
            None => match command(&client, "call.get", json!({"sip_call_id": sip_call_id, "history": false})).await {
                Ok(CommandReply::Data { result, .. }) => {
                    let id = result["call"]["call_id"].as_str().map(str::to_owned);
                    if let Some(id) = &id {
                        let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
                        if known.len() >= KNOWN_CALLS {
                            known.clear();
                        }
                        known.insert(sip_call_id.clone(), id.clone());
                    }
                    id
                }
                _ => None,
            },
        };
        let notes = match &call_id {
            Some(id) => match client.follow(id).await {
                Ok(notes) => Some(notes),
                Err(e) => {
                    send(callapi::started(&request.id, &cmd_id)).await;
                    fail(e.to_string()).await;
                    return;
                }
            },
            None => None,
        };
        // No flush needed: NATS handles one connection's SUB and PUB in order, so the
        // subscription is in place before the engine can see the command.
        let reply = command(&client, verb, body).await;
        send(callapi::started(&request.id, &cmd_id)).await;
        match reply {
            Ok(CommandReply::Accepted { .. }) => {}
            Ok(CommandReply::Refused { error, .. }) => return fail(error.message).await,
            Ok(CommandReply::Data { .. }) => return fail("unexpected answer from the engine".into()).await,
            Err(reason) => return fail(reason).await,
        }
        match notes {
            Some(n) => n,
            None => return fail("the call is unknown".into()).await,
        }
    };
    let notes = &mut notes;
    // OpenSIPS raises a leg's hold `start` before it answers `call_hold`, so the first sign of
    // the operation may be a leg event: Call API clients see `CallHolding` first all the same.
    let announce = match method {
        Method::CallHold => Some("CallHolding"),
        Method::CallUnhold => Some("CallUnholding"),
        _ => None,
    };
    let mut announced = false;
    let outcome = tokio::time::timeout(OUTCOME_TIMEOUT, async {
        while let Some(note) = notes.next().await {
            if note.cmd_id.as_deref() != Some(cmd_id.as_str()) {
                continue;
            }
            match note.event.as_str() {
                "command_succeeded" => return Ok(()),
                "command_failed" => return Err(note.data["reason"].as_str().unwrap_or("failed").to_owned()),
                _ => {
                    let Some((event, data)) = translate(&request, &note) else { continue };
                    if let Some(first) = announce {
                        if !announced {
                            announced = true;
                            send(callapi::notification(method, &cmd_id, first, None)).await;
                        }
                        if event == first {
                            continue;
                        }
                    }
                    send(callapi::notification(method, &cmd_id, event, data)).await;
                }
            }
        }
        Err("the notification stream closed".to_owned())
    })
    .await;
    match outcome {
        Ok(Ok(())) => send(callapi::notification(method, &cmd_id, "Ended", None)).await,
        Ok(Err(reason)) => fail(reason).await,
        Err(_) => fail(format!("no outcome within {} s", OUTCOME_TIMEOUT.as_secs())).await,
    }
}
