//! `callbus mi <command> [key=value ...]`: an OpenSIPS MI command through the bridge.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use callbus_schemas::bus::{BridgeErrorKind, MiBusReply};
use callbus_schemas::subjects;
use serde_json::{Map, Value};

use crate::{duration, nats};

/// Flags of `callbus mi`.
#[derive(clap::Args, Debug)]
pub struct MiArgs {
    /// NATS server URL.
    #[arg(long, env = "CALLBUS_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    #[command(flatten)]
    pub nats_auth: crate::nats::NatsAuth,
    /// The OpenSIPS node.
    #[arg(long, env = "CALLBUS_NODE", default_value = "default")]
    pub node: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub timeout: Duration,
    /// The MI command, e.g. `dlg_list`.
    pub command: String,
    /// Named params as key=value; a value that is valid JSON (number, object...) is sent as such.
    pub params: Vec<String>,
}

/// Builds the named params from `key=value` words.
pub fn params(words: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut map = Map::new();
    for word in words {
        let (key, value) = word.split_once('=').with_context(|| format!("{word:?} is not key=value"))?;
        if key.is_empty() {
            anyhow::bail!("{word:?} has an empty key");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        map.insert(key.to_owned(), value);
    }
    Ok(map)
}

/// Runs the command and prints OpenSIPS's answer.
pub async fn run(args: MiArgs) -> anyhow::Result<ExitCode> {
    let subject = subjects::mi(&args.node, &args.command)?;
    let params = params(&args.params)?;
    let body = if params.is_empty() { Vec::new() } else { serde_json::to_vec(&params)? };
    let client = nats::connect_client(&args.nats, &args.nats_auth).await?;
    let reply = tokio::time::timeout(args.timeout, client.request(subject.clone(), Bytes::from(body)))
        .await
        .with_context(|| {
            format!("no answer on {subject} within {:?}: is a bridge for node {:?} running?", args.timeout, args.node)
        })?
        .with_context(|| format!("request on {subject} failed: is a bridge for node {:?} running?", args.node))?;
    match serde_json::from_slice::<MiBusReply>(&reply.payload) {
        Ok(MiBusReply::Result { result }) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Ok(MiBusReply::Error { error }) => {
            let from = if BridgeErrorKind::from_code(error.code).is_some() { "bridge" } else { "OpenSIPS" };
            eprintln!("{} failed ({from}): {error}", args.command);
            Ok(ExitCode::FAILURE)
        }
        Err(e) => anyhow::bail!("unexpected reply on {subject}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::params;
    use serde_json::json;

    #[test]
    fn key_values_become_json_params() {
        let p = params(&["callid=1-2@h".into(), "index=0".into(), "x={\"a\":1}".into()]).expect("valid");
        assert_eq!(serde_json::Value::Object(p), json!({"callid": "1-2@h", "index": 0, "x": {"a": 1}}));
        assert!(params(&["novalue".into()]).is_err());
        assert!(params(&["=v".into()]).is_err());
    }
}
