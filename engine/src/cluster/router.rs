//! The command router: a command taken at any worker goes to the owner of its call's
//! partition, and its answer comes back.

use super::*;

/// How long a stopping worker lets the commands it is routing finish.
const ROUTES_DRAIN: Duration = Duration::from_secs(2);

/// Forwards each command to the owner of its call's partition and relays the answer. Each
/// command is routed in a task of one `JoinSet` (a command may wait for a handover), reaped
/// as they end and given [`ROUTES_DRAIN`] to finish when the worker stops.
pub(super) async fn route_commands(shared: Arc<Shared>, mut sub: async_nats::Subscriber, cancel: CancellationToken) {
    let mut routing = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            Some(_) = routing.join_next(), if !routing.is_empty() => continue,
            _ = cancel.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        let shared = Arc::clone(&shared);
        routing.spawn(async move { route_command(&shared, msg).await });
    }
    let _ = sub.unsubscribe().await;
    let drained = tokio::time::timeout(ROUTES_DRAIN, async { while routing.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        routing.shutdown().await;
    }
}

pub(super) async fn route_command(shared: &Shared, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else { return };
    let verb = msg.subject.as_str().strip_prefix(subjects::CMD_PREFIX).unwrap_or_default().to_owned();
    if Verb::from_name(&verb).is_none() {
        let error =
            refusal(CommandErrorCode::Unsupported, format!("{} is not a command subject", msg.subject), &msg.payload);
        let _ = shared.client.publish(reply, error).await;
        return;
    }
    let partitions = shared.cluster.partitions;
    let body: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&msg.payload).ok();
    let field = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str).map(str::to_owned);
    let answer = if verb == Verb::CallList.as_str() {
        gather_list(shared, &verb, &msg.payload).await
    } else if verb == Verb::CallStart.as_str() || verb == Verb::UaStart.as_str() {
        // A new call: placed by its cmd_id, so a repeat goes where the first went.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let p = match field("cmd_id") {
            Some(id) => partition_of(&id, partitions),
            // No cmd_id, no repeat to land with: the partitions in turn.
            None => (NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % u64::from(partitions.max(1))) as u16,
        };
        ask(shared, p, &verb, &msg.payload).await
    } else if let Some(id) = field("call_id") {
        ask(shared, partition_of_call_id(&id, partitions), &verb, &msg.payload).await
    } else if let Some(p) = field("key").and_then(|k| shared.keys.get(&k)) {
        ask(shared, p, &verb, &msg.payload).await
    } else if let Some(sip) = field("sip_call_id") {
        let first = ask(shared, partition_of(&sip, partitions), &verb, &msg.payload).await;
        if is_unknown_call(&first) {
            // A click-to-dial leg's Call-ID does not hash to its call's partition: ask all.
            search(shared, &verb, &msg.payload).await.unwrap_or(first)
        } else {
            first
        }
    } else if field("key").is_some() {
        let p = partition_of(&field("key").unwrap_or_default(), partitions);
        let first = ask(shared, p, &verb, &msg.payload).await;
        if is_unknown_call(&first) {
            search(shared, &verb, &msg.payload).await.unwrap_or(first)
        } else {
            first
        }
    } else {
        // No target: any owner answers with the precise error.
        ask(shared, partition_of(&verb, partitions), &verb, &msg.payload).await
    };
    let _ = shared.client.publish(reply, answer).await;
}

pub(super) fn refusal(code: CommandErrorCode, message: String, payload: &[u8]) -> Bytes {
    let cmd_id = CommandRequest::cmd_id_of(payload);
    Bytes::from(CommandReply::Refused { cmd_id, error: CommandError::new(code, message) }.to_bytes())
}

pub(super) fn is_unknown_call(answer: &Bytes) -> bool {
    matches!(
        serde_json::from_slice::<CommandReply>(answer),
        Ok(CommandReply::Refused { error, .. }) if error.code == CommandErrorCode::UnknownCall
    )
}

/// Asks partition `p`'s owner, waiting through a handover (no owner yet) for a while.
pub(super) async fn ask(shared: &Shared, p: u16, verb: &str, payload: &Bytes) -> Bytes {
    let subject = format!("{}{verb}", partition_cmd_prefix(p));
    let deadline = Instant::now() + COMMAND_ROUTE_WAIT;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), shared.client.request(subject.clone(), payload.clone()))
            .await
        {
            Ok(Ok(answer)) => return answer.payload,
            Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {}
            Ok(Err(e)) => {
                return refusal(
                    CommandErrorCode::Unavailable,
                    format!("partition {p}'s owner did not answer: {e}"),
                    payload,
                )
            }
            Err(_) => {
                return refusal(
                    CommandErrorCode::Unavailable,
                    format!("partition {p}'s owner did not answer within 5 s: retry with the same cmd_id"),
                    payload,
                )
            }
        }
        if Instant::now() >= deadline {
            return refusal(
                CommandErrorCode::Unavailable,
                format!(
                    "no engine owns partition {p} now (a handover takes a few seconds): retry with the same cmd_id"
                ),
                payload,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks every partition with an owner; the first answer that knows the call.
pub(super) async fn search(shared: &Shared, verb: &str, payload: &Bytes) -> Option<Bytes> {
    let asks = (0..shared.cluster.partitions).map(|p| {
        let subject = format!("{}{verb}", partition_cmd_prefix(p));
        let client = shared.client.clone();
        let payload = payload.clone();
        async move { tokio::time::timeout(Duration::from_secs(2), client.request(subject, payload)).await }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|r| r.ok().and_then(|r| r.ok()))
        .map(|m| m.payload)
        .find(|a| !is_unknown_call(a))
}

/// `call.list` across the cluster: every owned partition's live calls.
pub(super) async fn gather_list(shared: &Shared, verb: &str, payload: &Bytes) -> Bytes {
    let asks = (0..shared.cluster.partitions).map(|p| {
        let subject = format!("{}{verb}", partition_cmd_prefix(p));
        let client = shared.client.clone();
        let payload = payload.clone();
        async move { tokio::time::timeout(Duration::from_secs(2), client.request(subject, payload)).await }
    });
    let mut calls = Vec::new();
    let mut cmd_id = None;
    let mut answered = HashSet::new();
    for (p, r) in futures::future::join_all(asks).await.into_iter().enumerate() {
        let Ok(Ok(m)) = r else { continue };
        match serde_json::from_slice::<CommandReply>(&m.payload) {
            Ok(CommandReply::Data { cmd_id: id, result }) => {
                answered.insert(p);
                cmd_id = Some(id);
                if let Some(Value::Array(list)) = result.get("calls") {
                    calls.extend(list.iter().cloned());
                }
            }
            Ok(other) => return Bytes::from(other.to_bytes()),
            Err(_) => {}
        }
    }
    let answer = CommandReply::Data {
        cmd_id: cmd_id.unwrap_or_default(),
        result: serde_json::json!({ "calls": calls, "partitions_answered": answered.len() }),
    };
    Bytes::from(answer.to_bytes())
}
