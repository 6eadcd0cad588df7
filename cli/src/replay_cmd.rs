//! `callbus replay …`: the call log for people at 3 a.m. and for CI.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use callbus_engine::machines::CallState;
use callbus_replay::{CheckOptions, ExportFormat, LogReader, Speed};
use callbus_schemas::clock::datetime_ms;

use crate::{duration, nats};

/// Flags of `callbus replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The engine's data dir (a running engine's dir is read through a copy).
    #[arg(long, env = "CALLBUS_DATA_DIR", default_value = "./callbus-data", global = true)]
    pub data_dir: PathBuf,
    /// Read a cluster's replicated log (JetStream) on this NATS instead of a data dir: one
    /// partition, named by --partition or by the --call given.
    #[arg(long, global = true)]
    pub from_nats: Option<String>,
    /// The partition to read with --from-nats [default: the one --call belongs to].
    #[arg(long, global = true)]
    pub partition: Option<u16>,
    /// Read the calls retention archived (`engine.archive_dir`: a dir of hourly files, or one
    /// file) together with the data dir's log, when it has one.
    #[arg(long, global = true)]
    pub archive: Option<PathBuf>,
    /// Partitions of the cluster (to find a call's partition).
    #[arg(long, global = true, default_value_t = callbus_engine::cluster::DEFAULT_PARTITIONS)]
    pub partitions: u16,
    #[command(subcommand)]
    pub command: ReplayCommand,
}

/// What to do with the log.
#[derive(clap::Subcommand, Debug)]
pub enum ReplayCommand {
    /// One call's records in order: time, input, state before → after, effects.
    Timeline {
        /// callbus call_id or SIP Call-ID.
        #[arg(long)]
        call: String,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Feed every record through today's machines and compare with what was recorded; exits 1 on any difference.
    Check {
        /// First sequence.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last sequence.
        #[arg(long, default_value_t = u64::MAX)]
        to: u64,
        /// Only this call (call_id or SIP Call-ID).
        #[arg(long)]
        call: Option<String>,
        /// Threads checking records [default: one per core]; one more reads the log. Fewer
        /// leave CPU to OpenSIPS when checking on its machine.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        workers: Option<u16>,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The records, one per line (jsonl) or as MessagePack values.
    Export {
        /// jsonl or msgpack.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Only this call.
        #[arg(long)]
        call: Option<String>,
        /// Only records from this long ago on (e.g. 15m, 2h).
        #[arg(long, value_parser = duration::parse)]
        since: Option<Duration>,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Publish the recorded OpenSIPS events again under a prefix, with their original spacing.
    Republish {
        /// NATS server URL.
        #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        #[command(flatten)]
        nats_auth: crate::nats::NatsAuth,
        /// Subject prefix: events go to <prefix>.opensips.<node>.event.<EVENT>.
        #[arg(long, default_value = "replay")]
        subject_prefix: String,
        /// The original spacing divided by N, or `max`.
        #[arg(long, default_value = "1")]
        speed: String,
        /// Only this call.
        #[arg(long)]
        call: Option<String>,
    },
    /// Records, calls by kind and final state, time span, size on disk.
    Stats {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn paint(on: bool, code: &str, text: &str) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn side_by_side(left: &str, right: &str) -> String {
    let l: Vec<&str> = left.lines().collect();
    let r: Vec<&str> = right.lines().collect();
    let width = l.iter().map(|s| s.chars().count()).max().unwrap_or(0).max(8);
    let mut out = format!("  {:<width$} | {}\n", "recorded", "replayed now");
    for i in 0..l.len().max(r.len()) {
        let (a, b) = (l.get(i).copied().unwrap_or(""), r.get(i).copied().unwrap_or(""));
        let mark = if a == b { ' ' } else { '!' };
        out.push_str(&format!("{mark} {a:<width$} | {b}\n"));
    }
    out
}

/// Runs a replay command.
/// Prints a call's records: aligned columns for people (colour when `color`), or JSON lines.
pub fn print_timeline(reader: &LogReader, call: &str, json: bool, color: bool) -> anyhow::Result<()> {
    let rows = reader.timeline(call)?;
    let mut out = std::io::stdout().lock();
    if json {
        for row in &rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    let input_width = rows.iter().map(|r| r.input.len()).max().unwrap_or(5).clamp(5, 48);
    writeln!(out, "{:>8}  {:<23}  {:<input_width$}  {:<28}  effects", "seq", "time (UTC)", "input", "state")?;
    for row in rows {
        let before = row.before.as_deref().unwrap_or("·");
        let change = if row.before.as_deref() == Some(row.after.as_str()) {
            format!("{before} → {}", row.after)
        } else {
            paint(color, "1;32", &format!("{before} → {}", row.after))
        };
        let pad = 28usize.saturating_sub(before.chars().count() + 3 + row.after.chars().count());
        let input: String = row.input.chars().take(input_width).collect();
        writeln!(
            out,
            "{:>8}  {:<23}  {:<input_width$}  {change}{}  {}",
            row.seq,
            datetime_ms(row.time_ms),
            input,
            " ".repeat(pad),
            paint(color, "2", &row.effects.join(", "))
        )?;
    }
    Ok(())
}

/// `callbus replay …`.
pub async fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    // A partition of the replicated log is copied into a temporary sled log and read there.
    let mut _fetched = None;
    let dir = match &args.from_nats {
        None if args.archive.is_some() => {
            let archive = args.archive.clone().unwrap_or_default();
            let live = match args.data_dir.join("db").is_file() {
                true => Some(
                    LogReader::open(&args.data_dir)
                        .with_context(|| format!("cannot read the log in {}", args.data_dir.display()))?,
                ),
                false => None,
            };
            let tmp = tempfile::tempdir().context("a temporary dir for the archive's log")?;
            let archived = callbus_replay::merge_archive(&archive, live.as_ref(), tmp.path())
                .await
                .with_context(|| format!("cannot read the archive {}", archive.display()))?;
            match live {
                Some(_) => eprintln!(
                    "note: {archived} records from the archive {} with the log in {}",
                    archive.display(),
                    args.data_dir.display()
                ),
                None => eprintln!("note: {archived} records from the archive {}", archive.display()),
            }
            let dir = tmp.path().to_owned();
            _fetched = Some(tmp);
            dir
        }
        None => args.data_dir.clone(),
        Some(url) => {
            let call = match &args.command {
                ReplayCommand::Timeline { call, .. } => Some(call.clone()),
                ReplayCommand::Check { call, .. }
                | ReplayCommand::Export { call, .. }
                | ReplayCommand::Republish { call, .. } => call.clone(),
                ReplayCommand::Stats { .. } => None,
            };
            let partition = match (args.partition, call) {
                (Some(p), _) => p,
                (None, Some(call)) => callbus_engine::cluster::partition_of_call_id(&call, args.partitions),
                (None, None) => anyhow::bail!("with --from-nats, name the partition (--partition) or a call (--call)"),
            };
            let client = nats::connect_client(url, &crate::nats::NatsAuth::default()).await?;
            let tmp = tempfile::tempdir().context("a temporary dir for the partition's log")?;
            let records = callbus_engine::cluster::copy_partition(&client, partition, tmp.path())
                .await
                .map_err(|e| anyhow::anyhow!("cannot read partition {partition}'s log from NATS: {e}"))?;
            eprintln!("note: partition {partition} of the replicated log: {records} records");
            let dir = tmp.path().to_owned();
            _fetched = Some(tmp);
            dir
        }
    };
    let reader =
        LogReader::open(&dir).with_context(|| format!("cannot read the log in {}", args.data_dir.display()))?;
    if reader.is_copy() {
        eprintln!("note: {} is in use by a running engine: reading a copy of it", args.data_dir.display());
    }
    let color = std::io::stdout().is_terminal();
    match args.command {
        ReplayCommand::Timeline { call, json } => {
            print_timeline(&reader, &call, json, color)?;
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Check { from, to, call, workers, json } => {
            // A call that is not in the log is an error, not a check of the whole log.
            if let Some(id) = &call {
                reader.find_call(id)?;
            }
            let options = CheckOptions {
                from,
                to,
                call,
                timeouts: reader.timeouts(),
                progress: std::io::stderr().is_terminal(),
                workers: workers.map_or(0, usize::from),
                ..CheckOptions::default()
            };
            let started = std::time::Instant::now();
            let report =
                callbus_replay::check(&reader, &options, &|state: &CallState, input, ctx| state.step(input, ctx));
            let took = started.elapsed();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for d in &report.divergences {
                    println!(
                        "{} record {} of call {} ({}):",
                        paint(color, "1;31", "DIVERGES"),
                        d.seq,
                        d.call_id,
                        d.input
                    );
                    let recorded = serde_json::to_string_pretty(&d.recorded)?;
                    let replayed = serde_json::to_string_pretty(&d.replayed)?;
                    print!("{}", side_by_side(&recorded, &replayed));
                }
                for (seq, reason) in &report.unreadable {
                    println!("{} record {seq}: {reason}", paint(color, "1;33", "UNREADABLE"));
                }
                println!(
                    "{} records, {} calls, {} divergences, {} unreadable ({:.0} records/s)",
                    report.records,
                    report.calls,
                    report.divergences.len(),
                    report.unreadable.len(),
                    report.records as f64 / took.as_secs_f64().max(1e-9)
                );
            }
            Ok(if report.divergences.is_empty() && report.unreadable.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        ReplayCommand::Export { format, call, since, output } => {
            let format = match format.as_str() {
                "jsonl" => ExportFormat::Jsonl,
                "msgpack" => ExportFormat::Msgpack,
                other => anyhow::bail!("--format {other:?}: use jsonl or msgpack"),
            };
            let since_ms = since.map(|ago| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                now.saturating_sub(ago).as_millis() as u64
            });
            let progress = std::io::stderr().is_terminal();
            let n = match output {
                Some(path) => {
                    let file =
                        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                    let mut out = std::io::BufWriter::new(file);
                    callbus_replay::export(&reader, &mut out, format, call.as_deref(), since_ms, progress)?
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    callbus_replay::export(&reader, &mut out, format, call.as_deref(), since_ms, progress)?
                }
            };
            eprintln!("{n} records exported");
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Republish { nats: url, nats_auth, subject_prefix, speed, call } => {
            let speed = match speed.as_str() {
                "max" => Speed::Max,
                n => Speed::Times(
                    n.parse()
                        .ok()
                        .filter(|f: &f64| *f > 0.0)
                        .with_context(|| format!("--speed {n:?}: a positive number or max"))?,
                ),
            };
            callbus_schemas::subjects::validate_token("subject prefix", &subject_prefix)?;
            let client = nats::connect_client(&url, &nats_auth).await?;
            let n = callbus_replay::republish(&reader, &client, &subject_prefix, speed, call.as_deref()).await?;
            eprintln!("{n} events republished under {subject_prefix}.opensips.>");
            Ok(ExitCode::SUCCESS)
        }
        ReplayCommand::Stats { json } => {
            let stats = reader.stats();
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!("records      {} ({} unreadable)", stats.records, stats.unreadable);
                println!("calls        {}", stats.calls);
                for (kind, states) in &stats.by_kind_and_state {
                    let parts: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
                    println!("  {kind:<10} {}", parts.join(", "));
                }
                if let (Some(a), Some(b)) = (stats.first_ms, stats.last_ms) {
                    println!("time span    {} → {}", datetime_ms(a), datetime_ms(b));
                }
                println!(
                    "size on disk {:.1} MiB; records as stored {:.1} MiB ({:.0} bytes a record)",
                    stats.size_on_disk as f64 / (1 << 20) as f64,
                    stats.stored_bytes as f64 / (1 << 20) as f64,
                    stats.stored_bytes as f64 / stats.records.max(1) as f64
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
