//! Leases and membership: taking, renewing and handing over partitions, and following the
//! workers' heartbeats.

use super::*;
use callbus_schemas::cluster::{heartbeat_key, Heartbeat, Lease};

/// Takes partitions, renews their leases, hands them over, and keeps the heartbeat.
pub(super) async fn manage(shared: Arc<Shared>, cancel: CancellationToken) {
    let me = shared.cluster.worker.clone();
    let ttl = shared.cluster.lease_ttl;
    let renew_every = ttl / 4;
    let mut held: HashMap<u16, Held> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100).min(renew_every));
    let mut last_renew = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    // Since when this worker's heartbeats have been written without a miss: only a worker
    // that has seen the bucket work for a whole TTL judges who is alive and takes partitions
    // (after a JetStream outage every heartbeat looks stale at first).
    let mut healthy_since: Option<Instant> = None;
    // When each live worker was first seen: partitions are handed over only to a worker seen
    // for a whole TTL, which is when it starts taking them (no gap with no owner on a join).
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    let lease_value = Bytes::from(serde_json::to_vec(&Lease { worker: me.clone() }).unwrap_or_default());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        if last_heartbeat.is_none_or(|t| t.elapsed() >= renew_every) {
            let body = Heartbeat {
                worker: me.clone(),
                partitions: held.len(),
                up_ms: started.elapsed().as_millis() as u64,
                moving: Vec::new(),
            };
            let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            match tokio::time::timeout(ttl / 2, shared.kv.put(heartbeat_key(&me), body)).await {
                Ok(Ok(_)) => {
                    last_heartbeat = Some(Instant::now());
                    healthy_since.get_or_insert_with(Instant::now);
                }
                Ok(Err(e)) => {
                    healthy_since = None;
                    tracing::warn!(error = %e, "cluster heartbeat not written: not taking partitions until it is");
                }
                Err(_) => {
                    healthy_since = None;
                    tracing::warn!("cluster heartbeat not written in time: not taking partitions until it is");
                }
            }
        }
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            let renewals = held.iter().map(|(p, h)| {
                let kv = shared.kv.clone();
                let (p, rev, value) = (*p, h.revision, lease_value.clone());
                async move { (p, tokio::time::timeout(ttl / 2, kv.update(lease_key(p), value, rev)).await) }
            });
            for (p, result) in futures::future::join_all(renewals).await {
                let Ok(result) = result else {
                    tracing::warn!(partition = p, "lease not renewed in time; retrying");
                    continue;
                };
                match result {
                    Ok(rev) => {
                        if let Some(h) = held.get_mut(&p) {
                            h.revision = rev;
                        }
                    }
                    Err(e) if e.kind() == jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                        // A renewal whose answer was lost (a NATS server went away) moved the
                        // revision on: still ours if the lease names this worker.
                        match still_ours(&shared.kv, p, &me, lease_value.clone()).await {
                            Some(rev) => {
                                if let Some(h) = held.get_mut(&p) {
                                    h.revision = rev;
                                }
                            }
                            None => {
                                tracing::warn!(partition = p, "lease lost to another worker: stepping down");
                                if let Some(h) = held.remove(&p) {
                                    drop_partition(&shared, p, h);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "lease not renewed; retrying"),
                }
            }
        }
        // Owners that stopped on their own (their log refused them).
        let stopped: Vec<u16> = held.iter().filter(|(_, h)| h.owner.is_finished()).map(|(p, _)| *p).collect();
        for p in stopped {
            if let Some(h) = held.remove(&p) {
                let revision = h.revision;
                drop_partition(&shared, p, h);
                let _ = shared.kv.delete_expect_revision(lease_key(p), Some(revision)).await;
            }
        }
        let judged =
            healthy_since.is_some_and(|t| t.elapsed() >= ttl) && shared.self_seen().is_some_and(|t| t.elapsed() < ttl);
        if !judged {
            continue;
        }
        let mut live: Vec<String> = {
            let workers = shared.workers();
            workers.iter().filter(|(_, seen)| seen.elapsed() < ttl).map(|(w, _)| w.clone()).collect()
        };
        live.push(me.clone());
        live.sort();
        let partitions = shared.cluster.partitions;
        let wanted: Vec<u16> =
            (0..partitions).filter(|p| !held.contains_key(p) && placement(*p, &live) == Some(me.as_str())).collect();
        if !wanted.is_empty() {
            let attempts = wanted.into_iter().map(|p| {
                let shared = Arc::clone(&shared);
                let value = lease_value.clone();
                tokio::spawn(async move { (p, acquire(&shared, p, value).await) })
            });
            for joined in futures::future::join_all(attempts).await {
                match joined {
                    Ok((p, Ok(Some(h)))) => {
                        held.insert(p, h);
                    }
                    Ok((_, Ok(None))) => {}
                    Ok((p, Err(e))) => tracing::warn!(partition = p, error = %e, "partition not taken; retrying"),
                    Err(e) => tracing::error!(error = %e, "taking a partition panicked"),
                }
            }
        }
        // Hand over what belongs on another live worker (a few at a time, so calls keep flowing),
        // once that worker is ready to take it.
        first_seen.retain(|w, _| live.contains(w));
        for w in &live {
            first_seen.entry(w.clone()).or_insert_with(Instant::now);
        }
        let ready = |w: &str| w == me.as_str() || first_seen.get(w).is_some_and(|t| t.elapsed() >= ttl);
        let leaving: Vec<u16> = held
            .keys()
            .copied()
            .filter(|p| placement(*p, &live).is_some_and(|w| w != me.as_str() && ready(w)))
            .take(8)
            .collect();
        for p in leaving {
            if let Some(h) = held.remove(&p) {
                release(&shared, p, h).await;
            }
        }
    }
    let all: Vec<(u16, Held)> = held.drain().collect();
    let releases = all.into_iter().map(|(p, h)| release(&shared, p, h));
    futures::future::join_all(releases).await;
    let _ = shared.kv.delete(format!("w.{me}")).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.client.flush()).await;
    tracing::info!(worker = %me, "left the cluster: partitions handed over");
}

/// The lease's revision if it still names `me`; a lease that expired meanwhile (JetStream was
/// away longer than the TTL) is taken again if no one else took it.
pub(super) async fn still_ours(kv: &jetstream::kv::Store, p: u16, me: &str, value: Bytes) -> Option<u64> {
    let entry = match kv.entry(lease_key(p)).await.ok()? {
        Some(e) if e.operation == jetstream::kv::Operation::Put => e,
        _ => return kv.create(lease_key(p), value).await.ok(),
    };
    let holder: Lease = serde_json::from_slice(&entry.value).ok()?;
    (entry.operation == jetstream::kv::Operation::Put && holder.worker == me).then_some(entry.revision)
}

/// Stops feeding a partition and drops it at once (its owner may not write any more).
pub(super) fn drop_partition(shared: &Shared, p: u16, h: Held) {
    shared.dispatch().owned.remove(&p);
    h.commands.abort();
    h.cancel.cancel();
    h.owner.abort();
    metrics::gauge!("callbus_cluster_partitions_owned").decrement(1.0);
}

/// Hands a partition over cleanly: no more input, what is queued handled and logged, lease
/// released.
pub(super) async fn release(shared: &Shared, p: u16, mut h: Held) {
    shared.dispatch().owned.remove(&p);
    h.commands.abort();
    h.cancel.cancel();
    let _ = (&mut h.owner).await;
    if let Err(e) = shared.kv.delete_expect_revision(lease_key(p), Some(h.revision)).await {
        tracing::warn!(partition = p, error = %e, "lease not released; it expires by itself");
    }
    metrics::gauge!("callbus_cluster_partitions_owned").decrement(1.0);
    tracing::info!(partition = p, "partition handed over");
}

/// Takes partition `p` if its lease is free: lease, fence, rebuild from the log, start.
pub(super) async fn acquire(shared: &Arc<Shared>, p: u16, value: Bytes) -> Result<Option<Held>, String> {
    let key = lease_key(p);
    let me = &shared.cluster.worker;
    let revision = match shared.kv.create(&key, value.clone()).await {
        Ok(rev) => rev,
        Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
            // Ours from before (an owner that stopped)? Then take it back.
            match shared.kv.entry(&key).await {
                Ok(Some(entry)) => {
                    let holder: Option<Lease> = serde_json::from_slice(&entry.value).ok();
                    if holder.is_some_and(|h| &h.worker == me) {
                        shared.kv.update(&key, value, entry.revision).await.map_err(|e| e.to_string())?
                    } else {
                        return Ok(None);
                    }
                }
                _ => return Ok(None),
            }
        }
        Err(e) => return Err(format!("lease {key}: {e}")),
    };
    let started = Instant::now();
    let subject = log_subject(p);
    let log_stream = shared.js.get_stream(LOG_STREAM).await.map_err(|e| format!("stream {LOG_STREAM}: {e}"))?;
    // Fence: append a marker after the last message, so the previous owner's next append fails.
    let mut marker_seq = 0;
    for attempt in 0..20 {
        let last = match log_stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(format!("last message of {subject}: {e}")),
        };
        let marker = jetstream::message::PublishMessage::build()
            .expected_last_subject_sequence(last)
            .header(HEADER_OWNER, me.as_str())
            .header(HEADER_RECORDS, "0");
        match shared.js.send_publish(subject.clone(), marker).await {
            Ok(ack) => match ack.await {
                Ok(ack) => {
                    marker_seq = ack.sequence;
                    break;
                }
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(format!("takeover marker on {subject}: {e}")),
            },
            Err(e) => return Err(format!("takeover marker on {subject}: {e}")),
        }
        tracing::debug!(partition = p, attempt, "the previous owner appended meanwhile: fencing again");
    }
    if marker_seq == 0 {
        return Err(format!("could not fence {subject}: the previous owner keeps appending"));
    }
    // The local copy, rebuilt from the replicated log.
    let dir = partition_dir(&shared.config.data_dir, p);
    let rebuilt = rebuild(&shared.js, &dir, p, marker_seq, shared.config.cache_bytes).await?;
    let (position, tail, from_snapshot) = (rebuilt.position, rebuilt.tail, rebuilt.snapshot);
    let log = Arc::new(rebuilt.log);
    let mut config = shared.config.clone();
    config.data_dir = dir;
    // Only the periodic reconciliation (`reconcile_every`): what happened while the partition
    // changed owner is in the input stream; what UDP lost before the bridge is not, and the
    // periodic list finds it.
    let store = PartitionStore::new(shared, p, Arc::clone(&log), Fenced { marker: marker_seq, position, tail });
    let (core, restored) = driver::recover(&config, &store).map_err(|e| e.to_string())?;
    let (live, records) = (restored.live, restored.tail);
    for key in core.known_keys() {
        shared.keys.lock().insert(key, p);
    }
    let mut owner = driver::Owner::new(config.clone(), core, store, shared.client.clone(), false);
    owner.service = Some(shared.service.clone());
    let (tx, rx) = mpsc::channel(config.input_queue.max(1));
    let commands = shared
        .client
        .subscribe(format!("{}>", partition_cmd_prefix(p)))
        .await
        .map_err(|e| format!("subscribing to partition {p}'s commands: {e}"))?;
    let cancel = CancellationToken::new();
    let commands = tokio::spawn(driver::forward_commands_from(
        commands,
        partition_cmd_prefix(p),
        tx.clone(),
        shared.client.clone(),
        cancel.clone(),
        Some(shared.service.clone()),
    ));
    let _ = shared.register.send(Register { partition: p, tx, done: position }).await;
    let owner = tokio::spawn(owner.run(rx, cancel.clone()));
    metrics::gauge!("callbus_cluster_partitions_owned").increment(1.0);
    tracing::info!(
        partition = p,
        live,
        records,
        resume_after = position,
        snapshot_log_seq = from_snapshot,
        took_ms = started.elapsed().as_millis() as u64,
        "partition taken"
    );
    Ok(Some(Held { revision, cancel, owner, commands }))
}

pub(super) fn partition_dir(data_dir: &std::path::Path, p: u16) -> PathBuf {
    data_dir.join("partitions").join(p.to_string())
}

/// Follows the workers' heartbeats. The watch is made anew when it stops showing this
/// worker's own heartbeat (a consumer can stall silently while JetStream moves a leader).
pub(super) async fn watch_workers(shared: Arc<Shared>, cancel: CancellationToken) {
    let me = heartbeat_key(&shared.cluster.worker);
    let ttl = shared.cluster.lease_ttl;
    loop {
        let mut watch = match shared.kv.watch("w.>").await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the workers yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        let mut own = Instant::now();
        loop {
            let entry = tokio::select! {
                e = tokio::time::timeout(ttl, watch.next()) => e,
                _ = cancel.cancelled() => return,
            };
            match entry {
                Ok(Some(Ok(entry))) if entry.key == me => {
                    own = Instant::now();
                    *shared.self_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(own);
                }
                Ok(Some(Ok(entry))) => {
                    let name = entry.key.trim_start_matches("w.").to_owned();
                    match entry.operation {
                        jetstream::kv::Operation::Put => {
                            shared.workers().insert(name, Instant::now());
                        }
                        _ => {
                            shared.workers().remove(&name);
                        }
                    }
                }
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {}
            }
            if own.elapsed() >= ttl {
                tracing::debug!("the heartbeat watch went quiet: watching again");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
