//! `callbus ua …`: OpenSIPS as a SIP user agent, from a shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::call_cmd::{follow, until_outcome};
use crate::{duration, nats};

/// Flags of `callbus ua`.
#[derive(clap::Args, Debug)]
pub struct UaArgs {
    #[command(flatten)]
    pub client: crate::call_cmd::ClientFlags,
    #[command(subcommand)]
    pub command: UaCommand,
}

/// A UA command. CALL is callbus's call_id, or a session key with --key.
#[derive(clap::Subcommand, Debug)]
pub enum UaCommand {
    /// Call TO as a user agent; prints each step, exits 0 once answered.
    Start {
        /// The To (`Display,sip:…` or a SIP URI).
        to: String,
        /// The From.
        #[arg(long)]
        from: String,
        /// The request URI (the To's URI by default).
        #[arg(long)]
        ruri: Option<String>,
        /// An outbound proxy URI.
        #[arg(long)]
        proxy: Option<String>,
        #[command(flatten)]
        payload: PayloadArgs,
        /// Send the ACK yourself (`callbus ua update CALL ACK`).
        #[arg(long)]
        manual_ack: bool,
        /// Longest call, in seconds.
        #[arg(long)]
        max_duration: Option<u64>,
        /// The OpenSIPS node.
        #[arg(long)]
        node: Option<String>,
        /// How long the called party may take to answer.
        #[arg(long, default_value = "180s", value_parser = duration::parse)]
        answer_timeout: Duration,
    },
    /// Answer the remote side's INVITE or in-dialog request with CODE.
    Answer {
        #[command(flatten)]
        target: UaTarget,
        /// The status code (180, 183, 200, 486, …).
        code: u16,
        /// The reason phrase (the usual one by default).
        #[arg(long)]
        reason: Option<String>,
        /// The request answered (the oldest waiting by default).
        #[arg(long)]
        method: Option<String>,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Send an in-dialog request: INVITE, UPDATE, INFO, OPTIONS, MESSAGE, NOTIFY, PRACK, ACK.
    Update {
        #[command(flatten)]
        target: UaTarget,
        /// The method.
        method: String,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Hang up, cancel or decline.
    Terminate {
        #[command(flatten)]
        target: UaTarget,
    },
}

/// How a UA command names its call.
#[derive(clap::Args, Debug)]
pub struct UaTarget {
    /// callbus call_id (or the b2b session key with --key).
    pub call: String,
    /// CALL is a b2b session key.
    #[arg(long)]
    pub key: bool,
}

/// Body and headers of a SIP message.
#[derive(clap::Args, Debug)]
pub struct PayloadArgs {
    /// The body (e.g. an SDP), as text.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// The body, read from a file.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// The body's media type (application/sdp by default).
    #[arg(long)]
    pub content_type: Option<String>,
    /// An extra header, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
}

impl PayloadArgs {
    fn put(&self, body: &mut Map<String, Value>) -> anyhow::Result<()> {
        let text = match (&self.body, &self.body_file) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the body from {}", path.display()))?,
            ),
            (None, None) => None,
        };
        if let Some(text) = text {
            body.insert("body".into(), json!(text));
        }
        if let Some(ct) = &self.content_type {
            body.insert("content_type".into(), json!(ct));
        }
        if !self.headers.is_empty() {
            let mut headers = Map::new();
            for h in &self.headers {
                let (name, value) =
                    h.split_once(':').with_context(|| format!("--header {h:?}: write it as \"Name: value\""))?;
                headers.insert(name.trim().to_owned(), json!(value.trim()));
            }
            body.insert("headers".into(), Value::Object(headers));
        }
        Ok(())
    }
}

impl UaTarget {
    fn put(&self, body: &mut Map<String, Value>) {
        body.insert(if self.key { "key" } else { "call_id" }.into(), json!(self.call));
    }
}

/// The verb and body of a UA command.
pub fn request(command: &UaCommand) -> anyhow::Result<(&'static str, Value)> {
    let mut b = Map::new();
    let verb = match command {
        UaCommand::Start { to, from, ruri, proxy, payload, manual_ack, max_duration, node, .. } => {
            b.insert("to".into(), json!(to));
            b.insert("from".into(), json!(from));
            for (k, v) in [("ruri", ruri), ("proxy", proxy), ("node", node)] {
                if let Some(v) = v {
                    b.insert(k.into(), json!(v));
                }
            }
            if *manual_ack {
                b.insert("manual_ack".into(), json!(true));
            }
            if let Some(m) = max_duration {
                b.insert("max_duration_s".into(), json!(m));
            }
            payload.put(&mut b)?;
            "ua.start"
        }
        UaCommand::Answer { target, code, reason, method, payload } => {
            target.put(&mut b);
            b.insert("code".into(), json!(code));
            if let Some(r) = reason {
                b.insert("reason".into(), json!(r));
            }
            if let Some(m) = method {
                b.insert("method".into(), json!(m));
            }
            payload.put(&mut b)?;
            "ua.answer"
        }
        UaCommand::Update { target, method, payload } => {
            target.put(&mut b);
            b.insert("method".into(), json!(method));
            payload.put(&mut b)?;
            "ua.update"
        }
        UaCommand::Terminate { target } => {
            target.put(&mut b);
            "ua.terminate"
        }
    };
    Ok((verb, Value::Object(b)))
}

/// `callbus ua …`: sends the command and prints the call's notifications until its outcome.
pub async fn run(args: UaArgs) -> anyhow::Result<ExitCode> {
    let (verb, body) = request(&args.command)?;
    let flags = &args.client;
    let client = nats::connect_client(&flags.nats, &flags.nats_auth).await?;
    let wait = match &args.command {
        UaCommand::Start { answer_timeout, .. } => (*answer_timeout).max(flags.timeout),
        _ => flags.timeout.max(Duration::from_secs(40)),
    };
    follow(&client, verb, body, flags.cmd_id.clone(), flags.timeout, wait, until_outcome).await
}
