//! The sled log: records and snapshots survive a reopen, the per-call index finds a call's
//! records, corrupt records are reported with their sequence and the rest is still read, and
//! concurrent commits share flushes.

use std::sync::Arc;

use callbus_engine::log::{EventLog, LogError, Record, SledLog, Snapshot, RECORD_FORMAT};
use callbus_engine::machines::{CallState, DialogState, Input};

fn record(seq: u64, call: &str) -> Record {
    Record {
        format: RECORD_FORMAT,
        seq,
        time_ms: 1_000 + seq,
        call_id: call.into(),
        partition: 0,
        input: Input::Timer { name: format!("t{seq}") },
        before: None,
        after: CallState::Dialog(DialogState::new("n1", &format!("{call}@sip"))),
        effects: vec![],
    }
}

/// Opens the log a dropped `SledLog` just closed. sled lets go of its file lock once its own
/// IO threads are done with the last write, which can be a moment after the drop.
fn reopen(dir: &std::path::Path) -> SledLog {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledLog::open(dir) {
            Ok(log) => return log,
            Err(e) if matches!(e, LogError::InUse { .. }) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

#[tokio::test]
async fn with_sync_data_the_log_opens_commits_and_reads_back() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let log = SledLog::open_with(dir.path(), 4 << 20, true).expect("open with sync_data");
        for seq in 1..=3 {
            log.stage(&record(seq, "c")).expect("stage");
            log.commit().await.expect("commit with fdatasync");
        }
    }
    // The file fdatasync'd is sled's log: were it renamed by a sled upgrade, opening would fail.
    assert!(dir.path().join("db").is_file());
    let log = reopen(dir.path());
    let seqs: Vec<u64> = log.records_from(1).map(|r| r.expect("read").seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test]
async fn records_and_snapshots_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let log = SledLog::open(dir.path()).expect("open");
        assert_eq!(log.next_seq(), 1);
        for seq in 1..=10 {
            log.stage(&record(seq, if seq % 2 == 0 { "even" } else { "odd" })).expect("stage");
        }
        log.stage_snapshot(&Snapshot {
            seq: 10,
            call_id: "even".into(),
            state: record(10, "even").after,
            timers: vec![],
        })
        .expect("snap");
        log.stage_checkpoint(6).expect("checkpoint");
        log.commit().await.expect("commit");
        assert_eq!(
            log.records_of_call("even").expect("index").len(),
            5,
            "indexed and not yet indexed records both count"
        );
    }
    let log = reopen(dir.path());
    assert_eq!(log.next_seq(), 11);
    let all: Vec<Record> = log.records_from(1).collect::<Result<_, _>>().expect("read");
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(all[3], record(4, "even"));
    // 2, 4, 6 come from the index chunk written at the checkpoint; 8, 10 from the tail read at open.
    assert_eq!(log.checkpoint().expect("checkpoint"), 6);
    let even = log.records_of_call("even").expect("index");
    assert_eq!(even.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 4, 6, 8, 10]);
    assert!(log.records_of_call("ev").expect("prefix is not a match").is_empty());
    assert_eq!(log.snapshots().expect("snaps").len(), 1);
    log.remove_snapshot("even").expect("remove");
    assert!(log.snapshots().expect("snaps").is_empty());
    assert_eq!(log.records_from(8).count(), 3);
}

#[tokio::test]
async fn a_corrupt_record_is_reported_with_its_sequence_and_the_rest_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let log = SledLog::open(dir.path()).expect("open");
        for seq in 1..=5 {
            log.stage(&record(seq, "c")).expect("stage");
        }
        log.stage_checkpoint(5).expect("checkpoint");
        log.commit().await.expect("commit");
    }
    {
        // Damage record 3 (and truncate record 4) behind the log's back.
        let db = sled::open(dir.path()).expect("raw open");
        let records = db.open_tree("records").expect("tree");
        records.insert(3u64.to_be_bytes(), &b"\xc1garbage"[..]).expect("insert");
        let four = records.get(4u64.to_be_bytes()).expect("get").expect("present");
        records.insert(4u64.to_be_bytes(), &four[..four.len() / 2]).expect("insert");
        db.flush().expect("flush");
    }
    let log = reopen(dir.path());
    let results: Vec<Result<Record, LogError>> = log.records_from(1).collect();
    assert_eq!(results.len(), 5);
    let bad: Vec<u64> = results
        .iter()
        .filter_map(|r| match r {
            Err(LogError::Corrupt { seq, .. }) => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(bad, vec![3, 4]);
    assert!(results[4].as_ref().is_ok_and(|r| r.seq == 5), "records after the damage are still read");
    assert!(log.records_of_call("c").is_err(), "reading a damaged call says so");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_all_become_durable() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = Arc::new(SledLog::open(dir.path()).expect("open"));
    let tasks: Vec<_> = (0..16u64)
        .map(|t| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for i in 0..50u64 {
                    log.stage(&record(1 + t * 50 + i, &format!("call{t}"))).expect("stage");
                    log.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(30), t).await.expect("no hang (sled#1308)").expect("task");
    }
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(log.records_from(1).count(), 800);
}

/// A new data dir holding only the write-ahead files of `from`: what a crash leaves when sled
/// had written nothing of what was committed.
fn write_ahead_files_only(from: &std::path::Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(to.path().join("wal")).expect("mkdir");
    for entry in std::fs::read_dir(from.join("wal")).expect("wal dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.path().join("wal").join(entry.file_name())).expect("copy");
    }
    to
}

fn wal_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("wal"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn snapshot(seq: u64, call: &str) -> Snapshot {
    Snapshot { seq, call_id: call.into(), state: record(seq, call).after, timers: vec![] }
}

async fn committed_changes_come_back_from_the_write_ahead_files_alone(sync_data: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open_with(dir.path(), 4 << 20, sync_data).expect("open");
    for seq in 1..=10 {
        log.stage(&record(seq, if seq % 2 == 0 { "even" } else { "odd" })).expect("stage");
    }
    log.stage_snapshot(&snapshot(10, "even")).expect("snap");
    log.stage_checkpoint(6).expect("checkpoint");
    log.commit().await.expect("commit");
    log.remove_snapshot("even").expect("remove");
    log.stage_snapshot(&snapshot(11, "odd")).expect("snap");
    log.stage(&record(11, "odd")).expect("stage");
    log.commit().await.expect("commit");
    // Staged, never committed: never acknowledged, and not in the write-ahead file.
    log.stage(&record(12, "odd")).expect("stage");

    let crashed = write_ahead_files_only(dir.path());
    drop(log);
    {
        let log = SledLog::open_with(crashed.path(), 4 << 20, sync_data).expect("open after the crash");
        assert!(wal_files(crashed.path()).is_empty(), "applied files are deleted once sled has them");
        assert_eq!(log.next_seq(), 12);
        let seqs: Vec<u64> = log.records_from(1).map(|r| r.expect("read").seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
        assert_eq!(log.checkpoint().expect("checkpoint"), 6);
        let even: Vec<u64> = log.records_of_call("even").expect("index").iter().map(|r| r.seq).collect();
        assert_eq!(even, vec![2, 4, 6, 8, 10], "the index chunk of the checkpoint and the tail after it");
        let snaps: Vec<String> = log.snapshots().expect("snaps").into_iter().map(|s| s.call_id).collect();
        assert_eq!(snaps, vec!["odd".to_owned()], "the removal is applied after the insert it follows");
    }
    // And sled kept them: they are there without the files.
    let log = reopen(crashed.path());
    assert_eq!(log.records_from(1).count(), 11);
    assert_eq!(log.snapshots().expect("snaps").len(), 1);
}

#[tokio::test]
async fn committed_changes_come_back_from_the_write_ahead_files_alone_after_a_crash() {
    committed_changes_come_back_from_the_write_ahead_files_alone(false).await;
}

#[tokio::test]
async fn with_sync_data_committed_changes_come_back_from_the_write_ahead_files_alone() {
    committed_changes_come_back_from_the_write_ahead_files_alone(true).await;
}

#[tokio::test]
async fn a_commit_cut_short_is_ignored_and_the_commits_before_it_are_kept() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    for seq in 1..=3 {
        log.stage(&record(seq, "c")).expect("stage");
    }
    log.commit().await.expect("commit");
    log.stage(&record(4, "c")).expect("stage");
    log.commit().await.expect("commit");

    // The process died while writing the second commit: its frame is cut.
    let cut = write_ahead_files_only(dir.path());
    let files = wal_files(cut.path());
    assert_eq!(files.len(), 1);
    let len = std::fs::metadata(&files[0]).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&files[0]).expect("open").set_len(len - 7).expect("truncate");
    {
        let log = SledLog::open(cut.path()).expect("a torn tail is not an error");
        let seqs: Vec<u64> = log.records_from(1).map(|r| r.expect("read").seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(log.next_seq(), 4);
    }

    // A power cut left zeros after the last commit (the file grew, its data did not land).
    let holed = write_ahead_files_only(dir.path());
    let file = &wal_files(holed.path())[0];
    let mut bytes = std::fs::read(file).expect("read");
    bytes.extend_from_slice(&[0; 4096]);
    std::fs::write(file, bytes).expect("write");
    let log2 = SledLog::open(holed.path()).expect("zeros are not an error");
    assert_eq!(log2.records_from(1).count(), 4);
    drop(log);
}

#[tokio::test]
async fn the_write_ahead_files_are_replaced_and_deleted_as_sled_catches_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    let value = vec![7u8; 64 << 10];
    // 24 MiB committed, 64 KiB at a time: three times a file's size.
    for seq in 1..=384u64 {
        log.stage_raw(seq, "big", &value).expect("stage");
        log.commit().await.expect("commit");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let on_disk = |dir: &std::path::Path| -> u64 {
        wal_files(dir).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum()
    };
    while on_disk(dir.path()) > 12 << 20 {
        assert!(std::time::Instant::now() < deadline, "write-ahead files not deleted: {:?}", wal_files(dir.path()));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // What is left of them plus sled has every record.
    let crashed = write_ahead_files_only(dir.path());
    drop(log);
    assert!(wal_files(dir.path()).is_empty(), "a clean close deletes them");
    let log = reopen(dir.path());
    assert_eq!(log.raw_records_from(1).count(), 384);
    assert!(log.raw_records_from(1).all(|r| r.is_ok_and(|(_, v)| v.as_ref() == value.as_slice())));
    // The files alone hold the records after the last rotation, in a run of whole commits.
    let tail = SledLog::open(crashed.path()).expect("open");
    let seqs: Vec<u64> = tail.raw_records_from(1).map(|r| r.expect("read").0).collect();
    assert!(!seqs.is_empty() && seqs.len() < 384, "{} records in the files left", seqs.len());
    assert_eq!(seqs.last(), Some(&384));
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[tokio::test]
async fn a_failed_commit_leaves_no_trace_in_sled_nor_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    log.stage(&record(1, "a")).expect("stage");
    log.stage_snapshot(&snapshot(1, "a")).expect("snapshot");
    log.stage_checkpoint(1).expect("checkpoint");
    log.commit().await.expect("commit");

    // A batch that overwrites a snapshot, adds records and moves the checkpoint, then fails.
    log.stage(&record(2, "a")).expect("stage");
    log.stage(&record(3, "b")).expect("stage");
    log.stage_snapshot(&snapshot(3, "a")).expect("snapshot");
    log.stage_snapshot(&snapshot(3, "b")).expect("snapshot");
    log.stage_checkpoint(3).expect("checkpoint");
    log.fail_next_commits(1);
    let e = log.commit().await.expect_err("fails on purpose");
    assert!(e.to_string().contains("on purpose"), "{e}");
    // Taken back at once, in memory.
    assert_eq!(log.next_seq(), 2);
    assert!(log.raw_record(2).expect("read").is_none() && log.raw_record(3).expect("read").is_none());
    assert_eq!(log.checkpoint().expect("checkpoint"), 1);
    assert_eq!(log.snapshots().expect("snapshots"), vec![snapshot(1, "a")]);
    assert_eq!(log.records_of_call("a").expect("history").len(), 1);

    // The same log goes on: the next batch takes the sequences the failed one had.
    log.stage(&record(2, "c")).expect("stage");
    log.commit().await.expect("commit");
    drop(log); // sled flushes what it holds

    let log = reopen(dir.path());
    let calls: Vec<String> =
        log.records_from(1).map(|r| r.expect("readable")).map(|r| format!("{}:{}", r.seq, r.call_id)).collect();
    assert_eq!(calls, ["1:a", "2:c"]);
    assert_eq!(log.checkpoint().expect("checkpoint"), 1);
    assert_eq!(log.snapshots().expect("snapshots"), vec![snapshot(1, "a")]);
}

#[tokio::test]
async fn retention_removes_whole_calls_older_than_the_cutoff_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    // time_ms is 1000 + seq: calls a (1, 4), b (2, 9: its last record is young), live (3), c (5, 6).
    for (seq, call) in [(1, "a"), (2, "b"), (3, "live"), (4, "a"), (5, "c"), (6, "c"), (9, "b")] {
        log.stage(&record(seq, call)).expect("stage");
    }
    log.stage_checkpoint(9).expect("checkpoint");
    log.commit().await.expect("commit");
    let keep = |id: &str| id == "live";
    // Cutoff at time 1008: a and c are older; b's last record (1009) is not.
    let first = log.prune(1, 1008, keep, 3, None).expect("prune");
    assert_eq!((first.scanned, first.next), (3, Some(4)), "a budget of 3 records");
    assert_eq!(first.floor, 2, "a went, b is the first record kept");
    let rest = log.prune(first.next.expect("more"), 1008, keep, 100, None).expect("prune");
    assert_eq!(rest.next, None, "reached a young record");
    assert_eq!(rest.floor, 9, "a's and c's records went, b's young one stays");
    log.commit().await.expect("commit");
    assert_eq!((first.calls + rest.calls, first.records + rest.records), (2, 4));
    let left: Vec<u64> = log.records_from(1).map(|r| r.expect("readable").seq).collect();
    assert_eq!(left, [2, 3, 9]);
    assert!(log.seqs_of_call("a").expect("index").is_empty() && log.seqs_of_call("c").expect("index").is_empty());
    assert_eq!(log.seqs_of_call("b").expect("index"), [2, 9]);
    // Nothing past the last checkpoint goes, however old.
    log.stage(&record(10, "d")).expect("stage");
    log.commit().await.expect("commit");
    let past = log.prune(1, u64::MAX, keep, 100, None).expect("prune");
    log.commit().await.expect("commit");
    assert!(log.records_of_call("d").expect("read").len() == 1, "{past:?}");
    drop(log);
    let log = reopen(dir.path());
    let left: Vec<u64> = log.records_from(1).map(|r| r.expect("readable").seq).collect();
    assert_eq!(left, [3, 10], "durable: b went with the last prune (every record older), live and d stay");
}

#[tokio::test]
async fn retention_with_an_archive_writes_each_call_whole_before_it_goes() {
    use callbus_engine::log::archive::{self, Archive};
    let dir = tempfile::tempdir().expect("tmp");
    let archive_dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    for (seq, call) in [(1, "a"), (2, "b"), (3, "a"), (4, "c")] {
        log.stage(&record(seq, call)).expect("stage");
    }
    log.stage_checkpoint(4).expect("checkpoint");
    log.commit().await.expect("commit");
    let originals: Vec<Vec<u8>> =
        (1..=4u64).map(|s| log.raw_record(s).expect("read").expect("present").to_vec()).collect();
    let archive = Archive::open(archive_dir.path()).expect("archive");
    // Cutoff 1004: a (1001, 1003) and b (1002) go; c (1004) stays.
    let step = log.prune(1, 1004, |_| false, 100, Some(&archive)).expect("prune");
    log.commit().await.expect("commit");
    assert_eq!((step.calls, step.records), (2, 3));
    assert!(step.archived_bytes > 0);
    let files = archive::files(archive_dir.path()).expect("files");
    assert_eq!(files, [archive.file_for(1003)], "one hour: 1970-01-01T00");
    let mut read = Vec::new();
    archive::read(&files[0], |seq, call, bytes| {
        read.push((seq, call.to_owned(), bytes.to_vec()));
        Ok(())
    })
    .expect("readable");
    // Whole calls, each in order, byte for byte what the log held.
    let got: Vec<(u64, &str)> = read.iter().map(|(s, c, _)| (*s, c.as_str())).collect();
    assert_eq!(got, [(1, "a"), (3, "a"), (2, "b")]);
    for (seq, _, bytes) in &read {
        assert_eq!(bytes, &originals[(*seq - 1) as usize]);
    }
    let left: Vec<u64> = log.records_from(1).map(|r| r.expect("readable").seq).collect();
    assert_eq!(left, [4]);
    // A second step appends another frame to the same hour's file.
    log.stage(&record(5, "d")).expect("stage");
    log.stage_checkpoint(5).expect("checkpoint");
    log.commit().await.expect("commit");
    log.prune(1, 1006, |_| false, 100, Some(&archive)).expect("prune");
    log.commit().await.expect("commit");
    let mut seqs = Vec::new();
    archive::read(&files[0], |seq, _, _| {
        seqs.push(seq);
        Ok(())
    })
    .expect("readable");
    assert_eq!(seqs, [1, 3, 2, 4, 5]);
    // A file that is not an archive is an error in words.
    let junk = archive_dir.path().join("records-junk.zst");
    std::fs::write(&junk, b"not zstd").expect("write");
    let e = archive::read(&junk, |_, _, _| Ok(())).expect_err("junk");
    assert!(e.contains("not a readable archive file"), "{e}");
}

#[tokio::test]
async fn many_snapshots_come_back_whole_when_decoded_on_several_threads() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    let calls: Vec<String> = (0..12_345).map(|i| format!("c{i:08}")).collect();
    for (i, call) in calls.iter().enumerate() {
        log.stage_snapshot(&snapshot(i as u64 + 1, call)).expect("stage");
    }
    log.commit().await.expect("commit");
    let mut back = log.snapshots().expect("read");
    assert_eq!(back.len(), calls.len());
    back.sort_by(|a, b| a.call_id.cmp(&b.call_id));
    for (i, (snap, call)) in back.iter().zip(&calls).enumerate() {
        assert_eq!(snap, &snapshot(i as u64 + 1, call));
    }
}

#[tokio::test]
async fn retention_by_size_removes_the_oldest_whole_calls_until_enough_bytes_are_free() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = SledLog::open(dir.path()).expect("open");
    // Calls of two records each, in order: c0 (1, 2), c1 (3, 4)... and a live one among them.
    for seq in 1..=20u64 {
        let call = if seq == 5 || seq == 6 { "live".to_owned() } else { format!("c{}", (seq - 1) / 2) };
        log.stage(&record(seq, &call)).expect("stage");
    }
    log.stage_checkpoint(20).expect("checkpoint");
    log.commit().await.expect("commit");
    let size = |seq: u64| log.raw_record(seq).expect("read").expect("there").len() as u64 + 8;
    let total = log.stored_bytes();
    assert_eq!(total, (1..=20).map(size).sum::<u64>(), "every record counted once");
    let going: u64 = [1, 2, 3, 4, 7, 8].into_iter().map(size).sum();
    let keep = |id: &str| id == "live";
    // Free a little more than two calls' worth: the three oldest calls that may go (c0, c1, c3:
    // live stays).
    let step = log.prune_to_free(1, size(1) + size(2) + size(3) + size(4) + 1, keep, 100, None).expect("prune");
    log.commit().await.expect("commit");
    assert_eq!((step.calls, step.records), (3, 6), "{step:?}");
    assert!(step.next.is_some(), "stopped once enough was freed, with more to look at");
    assert_eq!(log.stored_bytes(), total - going);
    let left: Vec<u64> = log.records_from(1).map(|r| r.expect("readable").seq).collect();
    assert_eq!(left, [5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]);
    // The count is durable with the removal.
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(log.stored_bytes(), total - going);
    // A failed commit gives the count back with the records.
    log.prune_to_free(1, 1, keep, 100, None).expect("prune");
    log.fail_next_commits(1);
    log.commit().await.expect_err("fails on purpose");
    assert_eq!(log.stored_bytes(), total - going);
}
