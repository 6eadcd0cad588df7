//! The input stream: OpenSIPS events read once per worker and handed to the owners of their
//! partitions, with the input position each partition has consumed.

use super::*;

/// Where an OpenSIPS event goes.
pub(super) enum Route {
    One(u16),
    /// A UA event for a key no partition here knows yet: every partition parks it; the one
    /// that learns the key (from `ua_session_client_start`'s reply) handles it.
    All,
    None,
}

pub(super) fn route(payload: &[u8], keys: &Keys, partitions: u16) -> Route {
    match Event::parse(payload) {
        Ok(Event::DlgStateChanged(d)) => Route::One(partition_of(&d.callid, partitions)),
        Ok(Event::CallHold(h)) => Route::One(partition_of(&h.callid, partitions)),
        Ok(Event::CallTransfer(t)) => Route::One(partition_of(&t.callid, partitions)),
        Ok(Event::UaSession(u)) => match keys.get(&u.key) {
            Some(p) => Route::One(p),
            None if u.event_type == UaEventType::New => Route::One(partition_of(&u.key, partitions)),
            None => Route::All,
        },
        _ => Route::None,
    }
}

/// A partition for the event reader to feed: its owner's queue and the input position its
/// log reached.
pub(super) struct Register {
    pub(super) partition: u16,
    pub(super) tx: mpsc::Sender<Work>,
    pub(super) done: u64,
}

/// An event's position in the input: its batch message's stream sequence times 2^16 plus
/// its index in the batch.
pub fn position(stream_seq: u64, index: usize) -> u64 {
    (stream_seq << 16) | (index as u64 & 0xffff)
}

/// Reads the input stream from the lowest position an owned partition needs and hands each
/// event to its partition's owner (once per partition).
pub(super) async fn read_events(
    shared: Arc<Shared>,
    mut register: mpsc::Receiver<Register>,
    cancel: CancellationToken,
) {
    // Registers a partition; the batch to read from again when it needs earlier events.
    let add = |r: Register| -> u64 {
        let from = (r.done + 1) >> 16;
        if !r.tx.is_closed() {
            shared.dispatch().owned.insert(r.partition, (r.tx, r.done));
        }
        from
    };
    // The stream sequence of the next batch to read.
    let mut from: Option<u64> = None;
    'outer: loop {
        let start = match from {
            Some(s) => s,
            None => tokio::select! {
                r = register.recv() => match r { Some(r) => add(r), None => return },
                _ = cancel.cancelled() => return,
            },
        }
        .max(1);
        let stream = match shared.js.get_stream(EVENTS_STREAM).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "input stream not readable yet");
                from = Some(start);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let config = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        };
        let messages = match stream.create_consumer(config).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the input stream yet");
                from = Some(start);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        tracing::debug!(from = start, "reading the input stream");
        let mut next = start;
        let mut last_position = Instant::now();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                r = register.recv() => match r {
                    Some(r) => {
                        let needs = add(r);
                        if needs < next {
                            from = Some(needs);
                            continue 'outer;
                        }
                        continue;
                    }
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    post_positions(&shared, position(next, 0).saturating_sub(1)).await;
                    // Quiet: is the stream quiet too, or did the consumer stall (it may sit on
                    // a server that went away)?
                    let mut stream = stream.clone();
                    let behind = matches!(
                        tokio::time::timeout(Duration::from_secs(2), stream.info()).await,
                        Ok(Ok(info)) if info.state.last_sequence >= next
                    );
                    if behind {
                        tracing::warn!(next, "the input stream reader stalled: reading again from where it stopped");
                        from = Some(next);
                        continue 'outer;
                    }
                    continue;
                }
                _ = cancel.cancelled() => return,
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "input stream read failed: reading again");
                    from = Some(next);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'outer;
                }
                None => {
                    from = Some(next);
                    continue 'outer;
                }
            };
            let Ok(seq) = msg.info().map(|i| i.stream_sequence) else { continue };
            next = seq + 1;
            let Some(node) = callbus_schemas::input::node_of(msg.subject.as_str()) else { continue };
            let batch = match callbus_schemas::input::decode(&msg.payload) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(seq, subject = %msg.subject, error = %e, "an input batch is unreadable: skipped");
                    continue;
                }
            };
            for (index, (bridge_seq, datagram)) in batch.into_iter().enumerate() {
                let at = position(seq, index);
                let targets: Vec<mpsc::Sender<Work>> = {
                    let routed = route(datagram, &shared.keys, shared.cluster.partitions);
                    let mut dispatch = shared.dispatch();
                    let mut out = Vec::new();
                    let mut take = |entry: &mut (mpsc::Sender<Work>, u64)| {
                        if entry.1 < at {
                            entry.1 = at;
                            out.push(entry.0.clone());
                        }
                    };
                    match routed {
                        Route::One(p) => {
                            if let Some(e) = dispatch.owned.get_mut(&p) {
                                take(e);
                            }
                        }
                        Route::All => dispatch.owned.values_mut().for_each(take),
                        Route::None => {}
                    }
                    out
                };
                if targets.is_empty() {
                    continue;
                }
                let payload = msg.payload.slice_ref(datagram);
                for tx in targets {
                    let work = Work::Event {
                        node: node.into(),
                        bridge_seq: Some(bridge_seq),
                        payload: payload.clone(),
                        stream_seq: Some(at),
                    };
                    let _ = tx.send(work).await;
                }
            }
            if last_position.elapsed() >= Duration::from_secs(1) {
                last_position = Instant::now();
                post_positions(&shared, position(seq + 1, 0) - 1).await;
            }
        }
    }
}

/// Tells every owned partition that the input stream was read up to `seq`.
pub(super) async fn post_positions(shared: &Shared, seq: u64) {
    if seq == 0 {
        return;
    }
    let targets: Vec<mpsc::Sender<Work>> = {
        let mut dispatch = shared.dispatch();
        dispatch
            .owned
            .values_mut()
            .filter(|(_, done)| *done < seq)
            .map(|(tx, done)| {
                *done = seq;
                tx.clone()
            })
            .collect()
    };
    for tx in targets {
        let _ = tx.try_send(Work::Position { stream_seq: seq });
    }
}
