//! UA sessions (b2b_entities): client and server sessions, their replies, updates and remote
//! requests.

use super::*;

/// Builds an `E_UA_SESSION` for `session`, honouring flags `b` and `h`.
fn ua_event(
    session: &UaSession,
    event_type: UaEventType,
    reply: Option<(i64, &str)>,
    method: &str,
    body: Option<String>,
    headers: Option<String>,
) -> Event {
    let (status, reason) = match reply {
        Some((code, reason)) => (code, Some(reason.to_owned())),
        None => (0, None),
    };
    Event::UaSession(UaSessionEvent {
        key: session.key.clone(),
        event_type,
        entity_type: if session.uac { UaEntity::Uac } else { UaEntity::Uas },
        status,
        reason,
        method: method.to_owned(),
        body: if session.flags.body { body } else { None },
        headers: if session.flags.headers { headers } else { None },
        extra: Map::new(),
    })
}

/// Headers of a reply the remote side sent to one of our requests.
fn reply_headers(state: &mut State, session: &UaSession, cseq: u32, method: &str, body_len: usize) -> String {
    let branch = format!("z9hG4bK{}.{}.0", state.ids.hex(4), state.ids.hex(8));
    let (ours, theirs) = if session.uac {
        (sip::name_addr(Some(&session.from_display), &session.from_uri), session.to_uri.clone())
    } else {
        (sip::name_addr(Some(&session.to_display), &session.to_uri), session.from_uri.clone())
    };
    let (our_tag, their_tag) =
        if session.uac { (&session.from_tag, &session.to_tag) } else { (&session.to_tag, &session.from_tag) };
    HeaderBlock {
        via: format!("127.0.0.1:5060;branch={branch}"),
        from: format!("{ours};tag={our_tag}"),
        to: format!("<{theirs}>;tag={their_tag}"),
        call_id: &session.callid,
        cseq,
        method,
        contact: &session.remote_contact,
        extra: "",
        body_len,
    }
    .render()
}

/// Headers of a request the remote side sent (UA server sessions: the caller's requests).
fn request_headers(
    session: &UaSession,
    cseq: u32,
    method: &str,
    extra: &str,
    body_len: usize,
    with_to_tag: bool,
) -> String {
    let to = sip::name_addr(Some(&session.to_display), &session.to_uri);
    HeaderBlock {
        via: format!("127.0.0.1:5072;branch=z9hG4bK-{}-1-{}", session.local_index, cseq),
        from: format!("{};tag={}", sip::name_addr(Some(&session.from_display), &session.from_uri), session.from_tag),
        to: if with_to_tag { format!("{to};tag={}", session.to_tag) } else { to },
        call_id: &session.callid,
        cseq,
        method,
        contact: &session.remote_contact,
        extra,
        body_len,
    }
    .render()
}

fn new_key(state: &mut State) -> (String, u64) {
    let hash_index = state.ids.next_u64() % 512;
    let local_index = state.ids.next_u64() % 10_000_000;
    let rand = state.ids.next_u64() % 2_147_483_647;
    (format!("B2B.{hash_index}.{local_index}.{}.{rand}", state.started_unix), local_index)
}

/// The peer behaviour for a client session towards `ruri`.
fn peer_for(state: &State, ruri: &str) -> UaPeer {
    if let Some(peer) = state.ua_peers.get(ruri) {
        return *peer;
    }
    let user = ruri.trim_start_matches("sip:").split(['@', ';']).next().unwrap_or_default();
    match user {
        "busy" => UaPeer::Busy,
        "nobody" => UaPeer::Unreachable,
        "noanswer" => UaPeer::RingNoAnswer,
        _ => UaPeer::Answer,
    }
}

/// The params of `ua_session_client_start` the flow needs.
pub(crate) struct ClientStart {
    pub ruri: String,
    pub to: String,
    pub from: String,
    pub flags: String,
}

/// `ua_session_client_start`: creates the session, sends the INVITE and returns the key.
/// Replies then arrive as events; the first may be raised before the MI reply when
/// [`crate::SimConfig::uac_event_before_reply`] is set.
pub(crate) fn client_start(inner: &Arc<Inner>, state: &mut State, start: ClientStart) -> String {
    let (key, local_index) = new_key(state);
    let (from_display, from_uri) = sip::split_display(&start.from);
    let (to_display, to_uri) = sip::split_display(&start.to);
    let from_tag = format!("{}-4a11", state.ids.hex(32));
    let peer = peer_for(state, &start.ruri);
    let pid = 1_000 + state.ids.next_u64() % 20_000;
    let session = UaSession {
        key: key.clone(),
        uac: true,
        flags: UaFlags::parse(&start.flags),
        b2b_state: 1,
        callid: key.clone(),
        from_display: from_display.unwrap_or_default().to_owned(),
        from_uri: from_uri.to_owned(),
        from_tag,
        to_display: to_display.unwrap_or_default().to_owned(),
        to_uri: to_uri.to_owned(),
        to_tag: format!("{pid}SIPpTag011"),
        local_index,
        cseq_local: 2,
        cseq_remote: 1,
        remote_contact: "<sip:127.0.0.1:5080;transport=UDP>".into(),
        remote_sdp: sip::sdp("uas", 20320, Some("sendrecv")),
        pending_remote: Vec::new(),
        last_method: method_bit("INVITE"),
        last_reply_code: None,
    };
    state.insert_session(session);
    let generation = state.generation;
    let early_now = inner.config.uac_event_before_reply && peer != UaPeer::Unreachable;
    if early_now {
        uac_ringing(inner, state, &key);
    }
    let task_inner = Arc::clone(inner);
    let task_key = key.clone();
    tokio::spawn(async move { run_uac(task_inner, generation, task_key, peer, early_now).await });
    key
}

fn uac_ringing(inner: &Inner, state: &mut State, key: &str) {
    let Some(session) = state.sessions.get(key).cloned() else {
        return;
    };
    let headers = reply_headers(state, &session, 2, "INVITE", 0);
    let event =
        ua_event(&session, UaEventType::Early, Some((180, "Ringing")), "INVITE", Some(String::new()), Some(headers));
    if let Some(s) = state.sessions.get_mut(key) {
        s.b2b_state = 3;
    }
    inner.raise(state, Source::Sip, &event);
}

/// The local 408 of a UA client INVITE nobody answered: body null, headers only our From.
fn uac_timeout(inner: &Inner, state: &mut State, key: &str) {
    let Some(session) = state.sessions.get(key).cloned() else {
        return;
    };
    let from = sip::name_addr(Some(&session.from_display), &session.from_uri);
    let tag = session.from_tag.trim_end_matches("-4a11");
    let headers = format!("From: {from};tag={tag}-0000\r\n");
    let event = ua_event(&session, UaEventType::Rejected, Some((408, "Timeout")), "INVITE", None, Some(headers));
    inner.raise(state, Source::Sip, &event);
    state.remove_session(key);
}

async fn run_uac(inner: Arc<Inner>, generation: u64, key: String, peer: UaPeer, ringing_sent: bool) {
    let inner = &*inner;
    if peer == UaPeer::Unreachable {
        tokio::time::sleep(inner.config.ua_timeout).await;
        if_current(inner, generation, |state| uac_timeout(inner, state, &key));
        return;
    }
    if !ringing_sent {
        step(inner).await;
        if_current(inner, generation, |state| uac_ringing(inner, state, &key));
    }
    match peer {
        UaPeer::Answer => {
            step(inner).await;
            with_state(inner, generation, |state| {
                let session = state.sessions.get(&key)?.clone();
                let body = session.remote_sdp.clone();
                let headers = reply_headers(state, &session, 2, "INVITE", body.len());
                let event =
                    ua_event(&session, UaEventType::Answered, Some((200, "OK")), "INVITE", Some(body), Some(headers));
                let s = state.sessions.get_mut(&key)?;
                s.b2b_state = if s.flags.no_auto_ack { 4 } else { 5 };
                s.last_reply_code = Some(200);
                if !s.flags.no_auto_ack {
                    s.last_method = method_bit("ACK");
                }
                inner.raise(state, Source::Sip, &event);
                Some(())
            });
        }
        UaPeer::Busy => {
            step(inner).await;
            with_state(inner, generation, |state| {
                let session = state.sessions.get(&key)?.clone();
                let headers = reply_headers(state, &session, 2, "INVITE", 0);
                let event = ua_event(
                    &session,
                    UaEventType::Rejected,
                    Some((486, "Busy Here")),
                    "INVITE",
                    Some(String::new()),
                    Some(headers),
                );
                inner.raise(state, Source::Sip, &event);
                state.remove_session(&key);
                Some(())
            });
        }
        UaPeer::RingNoAnswer => {
            tokio::time::sleep(inner.config.ua_timeout).await;
            if_current(inner, generation, |state| uac_timeout(inner, state, &key));
        }
        UaPeer::Unreachable => {}
    }
}

/// Why `ua_session_update` or `ua_session_reply` cannot send.
pub(crate) enum UaRefusal {
    NoSession,
    BadState,
}

/// `ua_session_update`: sends an in-dialog request; the remote answers a step later.
pub(crate) fn update(inner: &Arc<Inner>, state: &mut State, key: &str, method: &str) -> Result<(), UaRefusal> {
    let generation = state.generation;
    let session = state.sessions.get_mut(key).ok_or(UaRefusal::NoSession)?;
    let early = session.b2b_state < 4;
    match (session.b2b_state, method) {
        (7, "BYE" | "CANCEL") => return Ok(()),
        (7, _) => return Err(UaRefusal::BadState),
        (_, "UPDATE" | "PRACK" | "CANCEL" | "INVITE") => {}
        (_, "BYE") if early && !session.uac => return Err(UaRefusal::BadState),
        _ if early && method != "BYE" => return Err(UaRefusal::BadState),
        _ => {}
    }
    if method == "ACK" {
        if session.b2b_state == 4 {
            session.b2b_state = 5;
        }
        session.last_method = method_bit("ACK");
        return Ok(());
    }
    session.cseq_local += 1;
    session.last_method = method_bit(method);
    let cseq = session.cseq_local;
    let method = method.to_owned();
    let key = key.to_owned();
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        step(&inner).await;
        with_state(&inner, generation, |state| {
            let session = state.sessions.get(&key)?.clone();
            let (event, gone) = match method.as_str() {
                // An early UAC turns BYE/CANCEL into CANCEL: the INVITE ends with 487.
                "BYE" | "CANCEL" if session.b2b_state < 4 => {
                    let headers = reply_headers(state, &session, 2, "INVITE", 0);
                    let e = ua_event(
                        &session,
                        UaEventType::Rejected,
                        Some((487, "Request Terminated")),
                        "INVITE",
                        Some(String::new()),
                        Some(headers),
                    );
                    (e, true)
                }
                "INVITE" => {
                    let body = session.remote_sdp.replace("sendrecv", "recvonly");
                    let headers = reply_headers(state, &session, cseq, "INVITE", body.len());
                    (
                        ua_event(
                            &session,
                            UaEventType::Answered,
                            Some((200, "OK")),
                            "INVITE",
                            Some(body),
                            Some(headers),
                        ),
                        false,
                    )
                }
                other => {
                    let headers = reply_headers(state, &session, cseq, other, 0);
                    let e = ua_event(
                        &session,
                        UaEventType::Answered,
                        Some((200, "OK")),
                        other,
                        Some(String::new()),
                        Some(headers),
                    );
                    (e, other == "BYE")
                }
            };
            inner.raise(state, Source::Sip, &event);
            if gone {
                state.remove_session(&key);
            } else if let Some(s) = state.sessions.get_mut(&key) {
                s.last_reply_code = Some(200);
            }
            Some(())
        });
    });
    Ok(())
}

/// `ua_session_reply`: answers a pending request from the remote side.
pub(crate) fn reply(
    inner: &Arc<Inner>,
    state: &mut State,
    key: &str,
    method: &str,
    code: i64,
) -> Result<(), UaRefusal> {
    let generation = state.generation;
    let session = state.sessions.get_mut(key).ok_or(UaRefusal::NoSession)?;
    let pos = session.pending_remote.iter().position(|m| m == method).ok_or(UaRefusal::BadState)?;
    session.last_reply_code = Some(code);
    if code < 200 {
        if session.b2b_state < 3 {
            session.b2b_state = 3;
        }
        return Ok(());
    }
    session.pending_remote.remove(pos);
    if method != "INVITE" {
        return Ok(());
    }
    let initial = session.b2b_state < 4;
    session.b2b_state = if code < 300 { 4 } else { 7 };
    // The caller ACKs our final reply to its INVITE (also a negative one: fixture
    // events/E_UA_SESSION.2.ua_server_reject.json); with flag `a` that is an UPDATED event.
    let key = key.to_owned();
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        step(&inner).await;
        with_state(&inner, generation, |state| {
            let session = state.sessions.get(&key)?.clone();
            let cseq = if initial { 1 } else { session.cseq_remote };
            let headers = request_headers(&session, cseq, "ACK", "Max-Forwards: 70\r\n", 0, true);
            if let Some(s) = state.sessions.get_mut(&key) {
                if s.b2b_state == 4 {
                    s.b2b_state = 5;
                }
                s.last_method = method_bit("ACK");
            }
            if session.flags.report_ack {
                let event = ua_event(&session, UaEventType::Updated, None, "ACK", Some(String::new()), Some(headers));
                inner.raise(state, Source::Sip, &event);
            }
            Some(())
        });
    });
    Ok(())
}

/// An incoming INVITE for a UA server session; see [`crate::Sim::incoming_ua_call`].
pub(crate) fn start_uas(inner: &Arc<Inner>, script: UasScript) -> Option<String> {
    let mut state = inner.lock();
    let (key, local_index) = new_key(&mut state);
    let n = state.ids.next_counter();
    let pid = 17_000 + state.ids.next_u64() % 9_000;
    let (from_display, from_uri) = sip::split_display(&script.from_uri);
    let (to_display, to_uri) = sip::split_display(&script.to_uri);
    let user = |uri: &str| uri.trim_start_matches("sip:").split('@').next().unwrap_or_default().to_owned();
    let session = UaSession {
        key: key.clone(),
        uac: false,
        flags: UaFlags::parse(&script.flags),
        b2b_state: 1,
        callid: format!("{n}-{pid}@127.0.0.1"),
        from_display: from_display.map(str::to_owned).unwrap_or_else(|| user(from_uri)),
        from_uri: from_uri.to_owned(),
        from_tag: format!("{pid}SIPpTag001"),
        to_display: to_display.map(str::to_owned).unwrap_or_else(|| user(to_uri)),
        to_uri: to_uri.to_owned(),
        to_tag: key.clone(),
        local_index,
        cseq_local: 1,
        cseq_remote: 1,
        remote_contact: from_uri.to_owned(),
        remote_sdp: script.body.clone().unwrap_or_default(),
        pending_remote: vec!["INVITE".into()],
        last_method: 0,
        last_reply_code: None,
    };
    let body = script.body.clone();
    let mut extra = "Max-Forwards: 69\r\n".to_owned();
    if let Some(subject) = &script.subject {
        extra.push_str(&format!("Subject: {subject}\r\n"));
    }
    let headers = request_headers(&session, 1, "INVITE", &extra, body.as_ref().map_or(0, String::len), false);
    let no_new = session.flags.no_new;
    let event = ua_event(&session, UaEventType::New, None, "INVITE", body, Some(headers));
    state.insert_session(session);
    // A NEW event too large for a datagram is lost; OpenSIPS then deletes the session and the
    // caller gets 408 (docs/opensips.md §2).
    if !no_new && !inner.raise(&mut state, Source::Sip, &event) {
        state.remove_session(&key);
        return None;
    }
    Some(key)
}

/// An in-dialog request from the remote side of a UA session; see [`crate::Sim::ua_remote_request`].
pub(crate) fn remote_request(inner: &Arc<Inner>, key: &str, request: RemoteRequest) -> Result<(), SimError> {
    let mut state = inner.lock();
    let session = state.sessions.get_mut(key).ok_or_else(|| SimError::UnknownSession(key.to_owned()))?;
    let bad = |reason: &str| SimError::BadState { key: key.to_owned(), reason: reason.to_owned() };
    let (method, body, event_type) = match &request {
        RemoteRequest::ReInvite(sdp) => ("INVITE", Some(sdp.clone()), UaEventType::Updated),
        RemoteRequest::Info(body) => ("INFO", Some(body.clone()), UaEventType::Updated),
        RemoteRequest::Bye => ("BYE", Some(String::new()), UaEventType::Terminated),
        RemoteRequest::Cancel => ("CANCEL", Some(String::new()), UaEventType::Terminated),
    };
    match &request {
        RemoteRequest::Cancel if session.uac || session.b2b_state >= 4 => {
            return Err(bad("CANCEL only applies to an unanswered incoming INVITE"))
        }
        RemoteRequest::ReInvite(_) | RemoteRequest::Info(_) if session.b2b_state < 4 || session.b2b_state == 7 => {
            return Err(bad("in-dialog requests need an established session"))
        }
        _ => {}
    }
    session.cseq_remote += 1;
    session.last_method = method_bit(method);
    if matches!(request, RemoteRequest::ReInvite(_) | RemoteRequest::Info(_)) {
        session.pending_remote.push(method.to_owned());
    }
    if let RemoteRequest::ReInvite(sdp) = &request {
        session.remote_sdp = sdp.clone();
    }
    let session = session.clone();
    let cseq = if matches!(request, RemoteRequest::Cancel) { 1 } else { session.cseq_remote };
    let headers = if session.uac {
        reply_headers(&mut state, &session, cseq, method, body.as_ref().map_or(0, String::len))
    } else {
        let tagged = !matches!(request, RemoteRequest::Cancel);
        request_headers(&session, cseq, method, "Max-Forwards: 70\r\n", body.as_ref().map_or(0, String::len), tagged)
    };
    let event = ua_event(&session, event_type, None, method, body, Some(headers));
    inner.raise(&mut state, Source::Sip, &event);
    // OpenSIPS answers a BYE itself and deletes the session; a CANCEL leaves it listed.
    if matches!(request, RemoteRequest::Bye) {
        state.remove_session(key);
    }
    Ok(())
}
