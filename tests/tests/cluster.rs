//! Many engines on a 3-node NATS JetStream cluster (replicas 3), in this process: partitions
//! spread over the workers; a worker stopped at once (as a crash would) has its calls go on at
//! the others; a clean shutdown hands partitions over; and the replicated log holds every event
//! the simulated OpenSIPS sent, once, in order. (`cli/tests/cluster.rs` does the same with
//! processes: kill -9, SIGSTOP, rolling restarts.)

use std::time::{Duration, Instant};

use callbus_engine::cluster::{self, ClusterConfig, ClusterEngine};
use callbus_engine::log::Record;
use callbus_engine::EngineConfig;
use callbus_schemas::command::{CommandErrorCode, CommandReply};
use callbus_tests::cluster::{
    all_records, assert_fenced, assert_log_is_what_was_sent, cmd, listed, opensips, settled, wait_ended_in_log,
};
use callbus_tests::stack::{accepted, timeouts, NODE};
use callbus_tests::NatsCluster;
use opensips_sim::CallScript;
use serde_json::json;

/// These tests run one at a time: each starts three nats-servers and three workers, and two
/// at once on two cores would measure the machine, not the cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: u16 = 16;

fn engine_config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.to_owned(),
        timeouts: timeouts(),
        nodes: vec![NODE.into()],
        mi_timeout: Duration::from_secs(3),
        ..EngineConfig::default()
    }
}

async fn worker(nats: &NatsCluster, name: &str, dir: &std::path::Path) -> ClusterEngine {
    worker_with(nats, name, engine_config(dir), 3).await
}

async fn worker_with(nats: &NatsCluster, name: &str, config: EngineConfig, replicas: usize) -> ClusterEngine {
    let cluster = ClusterConfig {
        worker: name.into(),
        partitions: PARTITIONS,
        replicas,
        lease_ttl: Duration::from_millis(1500),
        ..ClusterConfig::default()
    };
    // Each worker on its own connection, as separate processes would be.
    ClusterEngine::start(config, cluster, nats.connect().await).await.expect("cluster worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_s_calls_continue_on_the_others_and_the_log_holds_each_event_once() {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let (sim, bridge) = opensips(&nats).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut workers = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        workers.push(Some(worker(&nats, &format!("w{i}"), dir.path()).await));
    }
    let owners = settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(30)).await;
    // Each worker is an instance of the `callbus` NATS service (`nats micro info callbus`).
    let inbox = client.new_inbox();
    let mut infos = client.subscribe(inbox.clone()).await.expect("sub");
    client.publish_with_reply("$SRV.INFO.callbus", inbox, "".into()).await.expect("pub");
    let mut workers_seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut infos)).await
    {
        let info: async_nats::service::Info = serde_json::from_slice(&m.payload).expect("an info answer");
        assert_eq!(info.metadata.get("mode").map(String::as_str), Some("cluster"));
        assert_eq!(info.endpoints.len(), callbus_schemas::subjects::Verb::ALL.len());
        workers_seen.push(info.metadata.get("worker").cloned().unwrap_or_default());
    }
    workers_seen.sort();
    assert_eq!(workers_seen, ["w0", "w1", "w2"]);
    // The servers' logs are kept, for a failure to show them.
    assert_eq!(nats.log_tails(1_000).matches("Server is ready").count(), 3, "{}", nats.log_tails(5));
    // Bad commands get the precise error wherever they arrive (the router forwards them to a
    // partition's owner, whose parser answers).
    let refusal = |reply: CommandReply| match reply {
        CommandReply::Refused { error, .. } => (error.code, error.field, error.message),
        other => panic!("not refused: {other:?}"),
    };
    let raw = |subject: &'static str, body: Vec<u8>| {
        let client = client.clone();
        async move {
            let answer = client.request(subject, body.into()).await.expect("an answer");
            serde_json::from_slice::<CommandReply>(&answer.payload).expect("a command reply")
        }
    };
    let (code, _, message) = refusal(raw("callbus.cmd.call.hold", b"{not json".to_vec()).await);
    assert_eq!(code, CommandErrorCode::BadRequest);
    assert!(message.contains("not JSON"), "{message}");
    let (code, field, _) = refusal(cmd(&client, "call.hold", json!({"call_id": 7})).await);
    assert_eq!((code, field.as_deref()), (CommandErrorCode::WrongType, Some("call_id")));
    let (code, field, _) = refusal(cmd(&client, "call.hold", json!({})).await);
    assert_eq!((code, field.as_deref()), (CommandErrorCode::MissingField, Some("call_id")));
    let (code, _, _) = refusal(cmd(&client, "call.hold", json!({"call_id": "c0123456789ab000001p3"})).await);
    assert_eq!(code, CommandErrorCode::UnknownCall);
    let (code, _, _) = refusal(cmd(&client, "call.hold", json!({"sip_call_id": "nobody@nowhere"})).await);
    assert_eq!(code, CommandErrorCode::UnknownCall);
    let (code, _, message) = refusal(raw("callbus.cmd.call.hold", vec![b' '; 70 * 1024]).await);
    assert_eq!(code, CommandErrorCode::BadRequest);
    assert!(message.contains("limit"), "{message}");
    let (code, _, message) = refusal(raw("callbus.cmd.call.dance", b"{}".to_vec()).await);
    assert_eq!(code, CommandErrorCode::Unsupported);
    assert!(message.contains("callbus.cmd.call.dance"), "{message}");
    sim.start_trace();
    const CALLS: usize = 300;
    let sips: Vec<String> = (0..CALLS)
        .map(|_| sim.proxied_call(CallScript { hangup_after: Some(Duration::from_secs(6)), ..Default::default() }))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while listed(&client, "confirmed").await < CALLS {
        assert!(Instant::now() < deadline, "calls not confirmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved: Vec<&String> =
        sips.iter().filter(|sip| owners[&cluster::partition_of(sip, PARTITIONS)] == "w1").collect();
    assert!(moved.len() > 1);
    // A command on a call of w1 before the crash, to be retried at its new owner.
    let before = json!({"sip_call_id": moved[moved.len() - 1], "cmd_id": "before-crash"});
    let first = accepted(&cmd(&client, "call.hold", before.clone()).await);
    let crashed_at = Instant::now();
    workers[1].take().expect("w1").abort();
    settled(&client, PARTITIONS, &["w0", "w2"], Duration::from_secs(10)).await;
    let taken_after = crashed_at.elapsed();
    // A command on a moved call reaches its new owner.
    accepted(&cmd(&client, "call.hold", json!({"sip_call_id": moved[0], "cmd_id": "after-crash"})).await);
    // The retry of a command w1 accepted gets w1's answer from the new owner, not a second hold.
    assert_eq!(accepted(&cmd(&client, "call.hold", before).await), first, "a retry after a takeover");
    // Every call ends (the simulated caller hangs up), the moved ones at their new owners.
    wait_ended_in_log(&client, PARTITIONS, &sips, Duration::from_secs(30)).await;
    // w1 comes back: a clean shutdown of w2 hands its partitions to the others.
    workers[1] = Some(worker(&nats, "w1", dirs[1].path()).await);
    settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(20)).await;
    workers[2].take().expect("w2").shutdown().await;
    settled(&client, PARTITIONS, &["w0", "w1"], Duration::from_secs(10)).await;
    let records = all_records(&client, PARTITIONS).await;
    let retried = |r: &&Record| matches!(&r.input, callbus_engine::machines::Input::Command { cmd_id, .. } if cmd_id == "before-crash");
    assert_eq!(records.iter().filter(retried).count(), 1, "the retried hold is in the log once");
    assert_log_is_what_was_sent(&sips, &sim.take_trace(), &records);
    let takeovers = assert_fenced(&client, PARTITIONS).await;
    assert!(takeovers.iter().all(|n| *n >= 1), "{takeovers:?}");
    assert!(takeovers.iter().sum::<usize>() > 2 * PARTITIONS as usize, "partitions moved: {takeovers:?}");
    println!(
        "FIGURE|cluster in-process|{CALLS} calls on 3 workers, {} moved; partitions re-placed {} ms after the crash",
        moved.len(),
        taken_after.as_millis()
    );
    for w in workers.into_iter().flatten() {
        w.shutdown().await;
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_nats_server_of_three_mid_traffic_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let (sim, bridge) = opensips(&nats).await;
    let sim = std::sync::Arc::new(sim);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut workers = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        workers.push(worker(&nats, &format!("w{i}"), dir.path()).await);
    }
    settled(&client, PARTITIONS, &["w0", "w1", "w2"], Duration::from_secs(30)).await;
    sim.start_trace();
    let placing = {
        let sim = std::sync::Arc::clone(&sim);
        tokio::spawn(async move {
            let mut sips = Vec::new();
            for _ in 0..400 {
                sips.push(sim.proxied_call(CallScript {
                    hangup_after: Some(Duration::from_millis(1500)),
                    ..Default::default()
                }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sips
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    nats.servers[0].kill();
    let sips = placing.await.expect("placing");
    let records = wait_ended_in_log(&client, PARTITIONS, &sips, Duration::from_secs(40)).await;
    assert_log_is_what_was_sent(&sips, &sim.take_trace(), &records);
    assert_fenced(&client, PARTITIONS).await;
    println!(
        "FIGURE|nats-server killed|1 of 3 killed mid-traffic; {} calls all ended {} ms after the kill; log exact",
        sips.len(),
        killed.elapsed().as_millis()
    );
    for w in workers {
        w.shutdown().await;
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_udp_lost_before_the_bridge_is_repaired_by_the_partitions_periodic_reconciliation() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3);
    nats.wait_jetstream().await;
    let client = nats.connect().await;
    let (sim, bridge) = opensips(&nats).await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut workers = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let config = EngineConfig { reconcile_every: Some(Duration::from_millis(700)), ..engine_config(dir.path()) };
        workers.push(worker_with(&nats, &format!("w{i}"), config, 1).await);
    }
    settled(&client, PARTITIONS, &["w0", "w1"], Duration::from_secs(30)).await;
    let ended = sim.proxied_call(CallScript::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed(&client, "confirmed").await < 1 {
        assert!(Instant::now() < deadline, "the call is not confirmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // UDP loses every event datagram for a while: one call ends, another starts and is
    // answered, and no engine hears of either.
    sim.set_events_lost(true);
    let end = client.request(
        format!("opensips.{NODE}.mi.dlg_end_dlg"),
        bytes::Bytes::from(json!({"dialog_id": ended}).to_string()),
    );
    end.await.expect("the bridge answers");
    let unheard = sim.proxied_call(CallScript::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set_events_lost(false);
    // The periodic lists find both: the ended call is closed, the unheard one adopted, once.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let CommandReply::Data { result, .. } = cmd(&client, "call.list", json!({})).await else { panic!("call.list") };
        let calls = result["calls"].as_array().cloned().unwrap_or_default();
        let sips: Vec<&str> = calls.iter().filter_map(|c| c["sip_call_id"].as_str()).collect();
        let adopted = sips.iter().filter(|s| **s == unheard).count();
        assert!(adopted <= 1, "adopted by one partition only: {sips:?}");
        if adopted == 1 && !sips.contains(&ended.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "not reconciled: {calls:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = all_records(&client, PARTITIONS).await;
    let reconciled: Vec<&Record> =
        records.iter().filter(|r| matches!(r.input, callbus_engine::machines::Input::Reconcile { .. })).collect();
    assert!(
        reconciled.iter().any(|r| r.after.sip_call_id() == Some(ended.as_str()) && r.after.is_ended()),
        "the ended call is closed in the replicated log"
    );
    assert_eq!(
        reconciled.iter().filter(|r| r.after.sip_call_id() == Some(unheard.as_str()) && r.before.is_none()).count(),
        1,
        "the unheard call is adopted once, in the replicated log"
    );
    for w in workers {
        w.shutdown().await;
    }
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_logs_limits_follow_engine_retention_and_retention_bytes() {
    let nats = callbus_tests::NatsServer::start_jetstream();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let limits = |log_max_age: Duration, log_max_bytes: u64| ClusterConfig {
        log_max_age,
        log_max_bytes,
        partitions: 4,
        ..ClusterConfig::default()
    };
    let stream_limits = || async {
        let info = js.get_stream(cluster::LOG_STREAM).await.expect("stream").info().await.expect("info").clone();
        (info.config.max_age, info.config.max_bytes)
    };
    cluster::ensure_streams(&js, &limits(Duration::from_secs(7200), 1 << 30)).await.expect("streams");
    assert_eq!(stream_limits().await, (Duration::from_secs(7200), 1 << 30));
    // Changed on an existing stream; too small a limit is raised to what a takeover needs.
    cluster::ensure_streams(&js, &limits(Duration::from_secs(60), 1 << 20)).await.expect("streams");
    assert_eq!(stream_limits().await, (cluster::LOG_MIN_AGE, 4 * cluster::LOG_MIN_BYTES_PER_PARTITION as i64));
    // Zero: no limit.
    cluster::ensure_streams(&js, &limits(Duration::ZERO, 0)).await.expect("streams");
    assert_eq!(stream_limits().await, (Duration::ZERO, -1));
}
