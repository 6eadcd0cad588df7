//! Records compressed with the log's own dictionary: the first records are stored plain and
//! train it, later ones are stored compressed; every record reads back exactly across the
//! boundary, after a reopen, after a crash that left only the write-ahead files, and after a
//! failed commit that held the dictionary; a damaged compressed record is reported in words.

use callbus_engine::log::{EventLog, LogError, Record, SledLog, RECORD_FORMAT};
use callbus_engine::machines::{CallState, DialogState, Input};

/// Records the log samples before it trains its dictionary.
const SAMPLES: u64 = 2_000;

fn record(seq: u64) -> Record {
    let call = format!("c{:08x}", seq / 4);
    Record {
        format: RECORD_FORMAT,
        seq,
        time_ms: 1_795_417_936_000 + seq,
        call_id: call.clone(),
        partition: 0,
        input: Input::Event {
            node: "n1".into(),
            bridge_seq: Some(seq),
            datagram: format!(
                r#"{{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{{"callid":"{call}@10.0.0.1","from_tag":"ft{seq}","old_state":1,"new_state":2}}}}"#
            ),
        },
        before: None,
        after: CallState::Dialog(DialogState::new("n1", &format!("{call}@10.0.0.1"))),
        effects: vec![],
    }
}

/// Writes `n` records from sequence 1, committing every 100, and waits for the dictionary.
async fn write(log: &SledLog, from: u64, to: u64) {
    for seq in from..=to {
        log.stage(&record(seq)).expect("stage");
        if seq % 100 == 0 {
            log.commit().await.expect("commit");
        }
        if seq == SAMPLES {
            log.settle_dictionary().expect("dictionary");
        }
    }
    log.commit().await.expect("commit");
}

fn reopen(dir: &std::path::Path) -> SledLog {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledLog::open(dir) {
            Ok(log) => return log,
            Err(LogError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

fn assert_exact(log: &SledLog, to: u64) {
    let read: Vec<Record> = log.records_from(1).map(|r| r.expect("readable")).collect();
    assert_eq!(read.len() as u64, to);
    for (i, r) in read.iter().enumerate() {
        assert_eq!(*r, record(i as u64 + 1), "record {} reads back as written", i + 1);
    }
    let history: Vec<u64> = log.records_of_call(&record(to).call_id).expect("history").iter().map(|r| r.seq).collect();
    assert!(history.contains(&to), "{history:?}");
}

#[tokio::test]
async fn records_read_back_exactly_on_both_sides_of_the_dictionary_and_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    write(&log, 1, SAMPLES + 1_000).await;
    assert_eq!(log.dictionary(), Some(1), "trained on the first records");
    let plain = log.raw_record(1).expect("read").expect("there");
    assert_eq!(plain.as_ref(), callbus_engine::log::encode(&record(1)).expect("encode").as_slice());
    let compressed = log.raw_record(SAMPLES + 500).expect("read").expect("there");
    assert_eq!(compressed.as_ref(), callbus_engine::log::encode(&record(SAMPLES + 500)).expect("encode").as_slice());
    assert_exact(&log, SAMPLES + 1_000);
    drop(log);

    let log = reopen(dir.path());
    assert_eq!(log.dictionary(), Some(1), "the dictionary is kept with the log");
    assert_exact(&log, SAMPLES + 1_000);
    write(&log, SAMPLES + 1_001, SAMPLES + 1_100).await;
    assert_eq!(log.dictionary(), Some(1), "a log with a dictionary trains no other");
    assert_exact(&log, SAMPLES + 1_100);
}

#[tokio::test]
async fn compression_makes_the_stored_records_several_times_smaller() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    write(&log, 1, SAMPLES).await;
    let plain_part = log.stored_bytes();
    let plain: u64 =
        (1..=SAMPLES).map(|s| 8 + callbus_engine::log::encode(&record(s)).expect("encode").len() as u64).sum();
    assert_eq!(plain_part, plain, "the samples are stored as they are");
    write(&log, SAMPLES + 1, 2 * SAMPLES).await;
    let compressed = log.stored_bytes() - plain_part;
    assert!(compressed * 3 < plain, "{compressed} bytes stored for {plain} bytes of records");
    // The count is kept with the log.
    let before = log.stored_bytes();
    log.stage_checkpoint(2 * SAMPLES).expect("checkpoint");
    log.commit().await.expect("commit");
    write(&log, 2 * SAMPLES + 1, 2 * SAMPLES + 10).await;
    let after = log.stored_bytes();
    assert!(after > before);
    drop(log);
    assert_eq!(reopen(dir.path()).stored_bytes(), after, "the count at the checkpoint and the records after it");
}

#[tokio::test]
async fn the_dictionary_comes_back_from_the_write_ahead_files_after_a_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    write(&log, 1, SAMPLES + 300).await;
    assert_eq!(log.dictionary(), Some(1));
    // What a crash leaves when sled wrote nothing: the write-ahead files alone.
    let crashed = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(crashed.path().join("wal")).expect("mkdir");
    for entry in std::fs::read_dir(dir.path().join("wal")).expect("wal dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), crashed.path().join("wal").join(entry.file_name())).expect("copy");
    }
    drop(log);
    let log = reopen(crashed.path());
    assert_eq!(log.dictionary(), Some(1));
    assert_exact(&log, SAMPLES + 300);
}

#[tokio::test]
async fn a_failed_commit_that_held_the_dictionary_stages_it_again() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    for seq in 1..=SAMPLES {
        log.stage(&record(seq)).expect("stage");
    }
    log.commit().await.expect("commit");
    log.settle_dictionary().expect("dictionary");
    log.stage(&record(SAMPLES + 1)).expect("stage");
    log.fail_next_commits(1);
    log.commit().await.expect_err("fails on purpose");
    // The dictionary stays in use: the next records are compressed with it, and it is stored.
    write(&log, SAMPLES + 1, SAMPLES + 50).await;
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(log.dictionary(), Some(1));
    assert_exact(&log, SAMPLES + 50);
}

#[tokio::test]
async fn a_damaged_compressed_record_is_reported_with_its_sequence_and_the_rest_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let log = SledLog::open(dir.path()).expect("open");
        write(&log, 1, SAMPLES + 10).await;
        log.damage_record(SAMPLES + 5).expect("damage");
        log.commit().await.expect("commit");
    }
    let log = reopen(dir.path());
    let results: Vec<Result<Record, LogError>> = log.records_from(SAMPLES + 1).collect();
    assert_eq!(results.len(), 10);
    let bad: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].contains(&format!("log record {} is corrupt", SAMPLES + 5)) && bad[0].contains("compressed record"),
        "{}",
        bad[0]
    );
}
