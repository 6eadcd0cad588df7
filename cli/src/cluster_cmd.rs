//! `callbus cluster status`: the workers, who owns each partition, lease ages, and how far
//! each partition's log is behind the input stream.

use std::process::ExitCode;

/// `callbus cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCommand {
    /// Workers, partitions and their owners, lease ages, log position and lag per partition.
    Status(StatusArgs),
}

/// Flags of `callbus cluster status`.
#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[command(flatten)]
    nats_auth: crate::nats::NatsAuth,
    /// Partitions of the cluster (as its workers were started with).
    #[arg(long, env = "CALLBUS_PARTITIONS", default_value_t = callbus_engine::cluster::DEFAULT_PARTITIONS)]
    partitions: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `callbus cluster …`; exits 1 when a partition has no owner.
pub async fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let ClusterCommand::Status(args) = args.command;
    let client = crate::nats::connect_client(&args.nats, &args.nats_auth).await?;
    let status = callbus_engine::cluster::status(&client, args.partitions).await.map_err(anyhow::Error::msg)?;
    let orphans = status.partitions.iter().filter(|p| p.owner.is_none()).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("workers: {}", status.workers.len());
        for (worker, held) in &status.workers {
            println!("  {worker}  {held} partitions");
        }
        println!("input stream: last sequence {}", status.input_last_seq);
        println!("{:>9}  {:<24} {:>12} {:>10} {:>10}  moving", "partition", "owner", "lease age", "log seq", "lag");
        for p in &status.partitions {
            let moving = match (&p.placed_on, p.moving()) {
                (Some(to), true) => format!("→ {to}"),
                _ => String::new(),
            };
            println!(
                "{:>9}  {:<24} {:>12} {:>10} {:>10}  {moving}",
                p.partition,
                p.owner.as_deref().unwrap_or("-"),
                p.lease_age_ms.map_or("-".to_owned(), |ms| format!("{ms} ms")),
                p.log_seq,
                p.lag
            );
        }
        if status.moving > 0 {
            println!(
                "{} partitions moving (a worker joined or left): each is handed over when its queue is logged",
                status.moving
            );
        }
        if orphans > 0 {
            println!("{orphans} partitions have no owner: start a worker (callbus engine --cluster) or wait for a lease to expire");
        }
    }
    Ok(if orphans == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
