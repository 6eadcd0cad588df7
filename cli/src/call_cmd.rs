//! `callbus call …` and `callbus events`: the engine's commands and notifications from a shell.

use std::process::ExitCode;
use std::time::Duration;

use callbus_schemas::command::{CallNotification, CommandErrorCode, CommandReply};
use callbus_schemas::subjects;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use crate::{duration, nats};

/// Flags every engine client shares (`callbus call`, `callbus ua`).
#[derive(clap::Args, Debug)]
pub struct ClientFlags {
    /// NATS server URL.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222", global = true)]
    pub nats: String,
    #[command(flatten)]
    pub nats_auth: crate::nats::NatsAuth,
    /// How long to wait for the engine's answer.
    #[arg(long, default_value = "10s", value_parser = duration::parse, global = true)]
    pub timeout: Duration,
    /// The client's command id (a repeat is answered once and acted on once).
    #[arg(long, global = true)]
    pub cmd_id: Option<String>,
}

/// Flags of `callbus call`.
#[derive(clap::Args, Debug)]
pub struct CallArgs {
    #[command(flatten)]
    pub client: ClientFlags,
    /// Wait for the command's outcome (command_succeeded / command_failed) and print its notifications.
    #[arg(long, global = true)]
    pub wait: bool,
    #[command(subcommand)]
    pub command: CallCommand,
}

/// A call command. CALL is callbus's call_id, or a SIP Call-ID with --sip.
#[derive(clap::Subcommand, Debug)]
pub enum CallCommand {
    /// Hang a call up.
    End(Target),
    /// Put both legs on hold.
    Hold(Target),
    /// Resume the held legs.
    Unhold(Target),
    /// Blind transfer: send LEG (caller|callee: who stays) to DESTINATION.
    Transfer {
        #[command(flatten)]
        target: Target,
        /// caller or callee.
        leg: String,
        /// A bare SIP URI.
        destination: String,
    },
    /// Attended transfer: connect LEG of CALL with OTHER_LEG of OTHER.
    Attended {
        #[command(flatten)]
        target: Target,
        /// caller or callee.
        leg: String,
        /// The other call (call_id, or SIP Call-ID with --sip).
        other: String,
        /// caller or callee.
        other_leg: String,
    },
    /// A call's state and history.
    Get(Target),
    /// Click-to-dial: call CALLER, then connect CALLEE; prints each step, exits 0 once connected.
    Start {
        /// The first party's SIP URI.
        caller: String,
        /// The second party's SIP URI.
        callee: String,
        /// The From both legs show (`Display,sip:…`); the other party by default.
        #[arg(long)]
        from: Option<String>,
        /// The OpenSIPS node (the engine's default otherwise).
        #[arg(long)]
        node: Option<String>,
        /// Longest call, in seconds.
        #[arg(long)]
        max_duration: Option<u64>,
        /// How long this command waits for the call to connect before it gives up waiting (the
        /// call goes on: the engine rings each party for up to 130 s).
        #[arg(long, default_value = "180s", value_parser = duration::parse)]
        answer_timeout: Duration,
    },
    /// Live calls.
    List {
        /// Only calls in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only calls on this node.
        #[arg(long)]
        node: Option<String>,
    },
}

/// How a command names its call.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// callbus call_id (or SIP Call-ID with --sip).
    pub call: String,
    /// CALL is a SIP Call-ID.
    #[arg(long)]
    pub sip: bool,
}

impl Target {
    fn fields(&self, prefix: &str) -> (String, Value) {
        let key = if self.sip { format!("{prefix}sip_call_id") } else { format!("{prefix}call_id") };
        (key, json!(self.call))
    }
}

/// The verb and body for a command.
pub fn request(command: &CallCommand, cmd_id: Option<&str>) -> (&'static str, Value) {
    let mut body = Map::new();
    let mut put = |k: String, v: Value| {
        body.insert(k, v);
    };
    let verb = match command {
        CallCommand::End(t) | CallCommand::Hold(t) | CallCommand::Unhold(t) | CallCommand::Get(t) => {
            let (k, v) = t.fields("");
            put(k, v);
            match command {
                CallCommand::End(_) => "call.end",
                CallCommand::Hold(_) => "call.hold",
                CallCommand::Unhold(_) => "call.unhold",
                _ => "call.get",
            }
        }
        CallCommand::Transfer { target, leg, destination } => {
            let (k, v) = target.fields("");
            put(k, v);
            put("leg".into(), json!(leg));
            put("destination".into(), json!(destination));
            "call.transfer.blind"
        }
        CallCommand::Attended { target, leg, other, other_leg } => {
            let (k, v) = target.fields("");
            put(k, v);
            let key = if target.sip { "transfer_sip_call_id" } else { "transfer_call_id" };
            put(key.into(), json!(other));
            put("leg".into(), json!(leg));
            put("transfer_leg".into(), json!(other_leg));
            "call.transfer.attended"
        }
        CallCommand::Start { caller, callee, from, node, max_duration, .. } => {
            put("caller".into(), json!(caller));
            put("callee".into(), json!(callee));
            for (k, v) in [("from", from), ("node", node)] {
                if let Some(v) = v {
                    put(k.into(), json!(v));
                }
            }
            if let Some(m) = max_duration {
                put("max_duration_s".into(), json!(m));
            }
            "call.start"
        }
        CallCommand::List { state, node } => {
            if let Some(s) = state {
                put("state".into(), json!(s));
            }
            if let Some(n) = node {
                put("node".into(), json!(n));
            }
            "call.list"
        }
    };
    if let Some(id) = cmd_id {
        body.insert("cmd_id".into(), json!(id));
    }
    (verb, Value::Object(body))
}

/// When following a new call stops, and with what exit status.
pub type Stop = fn(&CallNotification, &str) -> Option<ExitCode>;

/// Ends when the command succeeds (0) or fails (1, with the reason on stderr).
pub fn until_outcome(note: &CallNotification, cmd_id: &str) -> Option<ExitCode> {
    let ours = note.cmd_id.as_deref() == Some(cmd_id);
    match note.event.as_str() {
        "command_succeeded" if ours => Some(ExitCode::SUCCESS),
        "command_failed" if ours => {
            eprintln!("failed: {}", note.data["reason"].as_str().unwrap_or("no reason given"));
            Some(ExitCode::FAILURE)
        }
        // An end is followed by the outcome of whatever command it cut short.
        _ => None,
    }
}

fn print_note(note: &CallNotification) {
    println!(
        "{} {:<18} {:<14} {}",
        callbus_schemas::clock::datetime_ms(note.time_ms),
        note.event,
        note.state,
        note.data
    );
}

/// Sends a command that may create a call and prints the call's notifications as they come
/// until `stop` says so. The client subscribes to the notifications before the command is
/// sent, so the first ones (published with the reply) are not missed.
pub async fn follow(
    client: &async_nats::Client,
    verb: &str,
    mut body: Value,
    cmd_id: Option<String>,
    timeout: Duration,
    wait: Duration,
    stop: Stop,
) -> anyhow::Result<ExitCode> {
    let client = callbus_client::Client::new(client.clone()).with_timeout(timeout);
    if let Some(cmd_id) = cmd_id {
        body["cmd_id"] = json!(cmd_id);
    }
    let mut call = match client.track(verb, body).await {
        Ok(call) => call,
        Err(callbus_client::ClientError::Refused { error, .. }) => {
            print_refusal(verb, &error, None);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e.into()),
    };
    println!("accepted: call {}, cmd_id {}", call.call_id, call.cmd_id);
    let outcome = tokio::time::timeout(wait, async {
        while let Some(note) = call.notes.next().await {
            print_note(&note);
            if let Some(code) = stop(&note, &call.cmd_id) {
                return code;
            }
        }
        ExitCode::FAILURE
    })
    .await;
    outcome.map_err(|_| anyhow::anyhow!("no outcome within {wait:?} (see `callbus events --call {}`)", call.call_id))
}

/// `callbus call …`.
pub async fn run(args: CallArgs) -> anyhow::Result<ExitCode> {
    let flags = &args.client;
    let client = nats::connect_client(&flags.nats, &flags.nats_auth).await?;
    let (verb, body) = request(&args.command, flags.cmd_id.as_deref());
    if let CallCommand::Start { answer_timeout, .. } = &args.command {
        let wait = (*answer_timeout).max(flags.timeout);
        return follow(&client, verb, body, flags.cmd_id.clone(), flags.timeout, wait, until_outcome).await;
    }
    if args.wait {
        // Subscribed before the command goes: its outcome may come right after the answer.
        return follow(&client, verb, body, flags.cmd_id.clone(), flags.timeout, flags.timeout, until_outcome).await;
    }
    let client = callbus_client::Client::new(client).with_timeout(flags.timeout);
    match client.request(verb, &body).await? {
        CommandReply::Data { result, .. } => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        CommandReply::Refused { error, .. } => {
            print_refusal(verb, &error, target_of(&args.command));
            Ok(ExitCode::FAILURE)
        }
        CommandReply::Accepted { call_id, cmd_id, .. } => {
            println!("accepted: call {call_id}, cmd_id {cmd_id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The call a command names, if any.
fn target_of(command: &CallCommand) -> Option<&Target> {
    match command {
        CallCommand::End(t) | CallCommand::Hold(t) | CallCommand::Unhold(t) | CallCommand::Get(t) => Some(t),
        CallCommand::Transfer { target, .. } => Some(target),
        _ => None,
    }
}

/// Prints a refusal in words: `call.hold refused (unknown_call): …`, with a hint when a SIP
/// Call-ID was given as a callbus call_id.
pub fn print_refusal(verb: &str, error: &callbus_schemas::command::CommandError, target: Option<&Target>) {
    eprintln!("{verb} refused ({}): {}", error.code, error.message);
    if let Some(t) = target.filter(|t| error.code == CommandErrorCode::UnknownCall && !t.sip) {
        if !looks_like_call_id(&t.call) {
            eprintln!(
                "hint: {:?} does not look like a callbus call_id (c…): if it is a SIP Call-ID, add --sip",
                t.call
            );
        }
    }
}

/// Whether `id` has the shape of a callbus call_id: `c` and hex digits (and `p<hex>` in a cluster).
fn looks_like_call_id(id: &str) -> bool {
    id.strip_prefix('c').is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit() || c == 'p'))
}

/// Flags of `callbus events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// NATS server URL.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    #[command(flatten)]
    pub nats_auth: crate::nats::NatsAuth,
    /// Only this call's notifications (callbus call_id).
    #[arg(long)]
    pub call: Option<String>,
    /// Raw OpenSIPS events of this node instead of call notifications (`*`: every node).
    #[arg(long)]
    pub node: Option<String>,
    /// Raw OpenSIPS events (with --node, default every node).
    #[arg(long)]
    pub raw: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = duration::parse)]
    pub duration: Option<Duration>,
}

/// `callbus events`: tails notifications (or raw OpenSIPS events) until Ctrl-C.
pub async fn events(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let subject = if args.raw || args.node.is_some() {
        match args.node.as_deref() {
            None | Some("*") => subjects::ALL_NODES_EVENTS.to_owned(),
            Some(node) => subjects::all_events(node)?,
        }
    } else {
        match &args.call {
            Some(call) => subjects::all_call_notifications(call)?,
            None => subjects::ALL_CALL_NOTIFICATIONS.to_owned(),
        }
    };
    let client = nats::connect_client(&args.nats, &args.nats_auth).await?;
    let mut sub = client.subscribe(subject.clone()).await?;
    eprintln!("listening on {subject} (Ctrl-C to stop)");
    let stop = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => crate::signals::shutdown_signal().await,
        }
    };
    tokio::pin!(stop);
    let mut seen = 0u64;
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = &mut stop => break,
        };
        let Some(msg) = msg else { break };
        if args.json {
            let body: Value =
                serde_json::from_slice(&msg.payload).unwrap_or_else(|_| json!(String::from_utf8_lossy(&msg.payload)));
            println!("{}", json!({"subject": msg.subject.as_str(), "body": body}));
        } else if let Ok(note) = serde_json::from_slice::<CallNotification>(&msg.payload) {
            println!(
                "{} {:>8} {} {:<18} {:<12} {}{}",
                callbus_schemas::clock::datetime_ms(note.time_ms),
                note.seq,
                note.call_id,
                note.event,
                note.state,
                note.data,
                note.cmd_id.map(|c| format!(" cmd_id={c}")).unwrap_or_default()
            );
        } else {
            println!("{} {}", msg.subject, String::from_utf8_lossy(&msg.payload));
        }
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
