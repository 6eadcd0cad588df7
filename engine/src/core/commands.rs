//! Commands: parsing and checking, `cmd_id` dedupe, queries, and the calls they create or
//! step.

use std::time::Instant;

use bytes::Bytes;
use callbus_schemas::command::{CallTarget, Command, CommandError, CommandErrorCode, CommandReply, CommandRequest};
use callbus_schemas::subjects::Verb;
use serde_json::{json, Value};

use super::{Answered, Core, HistoryQuery, Now, Outputs, Parked, REMEMBERED_COMMANDS};
use crate::log::{LogError, RememberedCommand};
use crate::machines::{BridgedState, CallState, Input, UaState};

/// One command being answered: where its answer goes and what is counted of it.
struct Asker<'a> {
    verb: Verb,
    reply: Option<String>,
    received: Instant,
    out: &'a mut Outputs,
}

impl Asker<'_> {
    fn answer(&mut self, outcome: &'static str, answer: &CommandReply, refused: Option<CommandErrorCode>) {
        self.out.answered.push(Answered { verb: self.verb, outcome, received: self.received, refused });
        if let Some(r) = &self.reply {
            self.out.replies.push((r.clone(), Bytes::from(answer.to_bytes())));
        }
    }

    fn refuse(&mut self, cmd_id: String, error: CommandError) {
        tracing::info!(verb = %self.verb, code = ?error.code, "command refused: {}", error.message);
        let code = error.code;
        self.answer("refused", &CommandReply::Refused { cmd_id: Some(cmd_id), error }, Some(code));
    }
}

fn unknown(target: &CallTarget) -> CommandError {
    CommandError::new(
        CommandErrorCode::UnknownCall,
        format!("no live call with {target} is known to this engine (an ended call is kept for `ended_retention`; `callbus replay timeline` shows older ones)"),
    )
}

impl Core {
    fn resolve(&self, target: &CallTarget) -> Option<String> {
        match target {
            CallTarget::CallId(id) => self.calls.contains_key(id).then(|| id.clone()),
            // A UA client session's key is the Call-ID of its INVITE, so a leg of a UA or
            // click-to-dial call is found by its SIP Call-ID too (the Call API door names calls so).
            CallTarget::SipCallId(sip) => self.by_sip.get(sip).or_else(|| self.by_key.get(sip)).cloned(),
            CallTarget::Key(key) => self.by_key.get(key).cloned(),
        }
    }

    fn default_node(&self) -> &str {
        self.config.nodes.first().map(String::as_str).unwrap_or("default")
    }

    /// Remembers an accepted command; `saved` when it comes from the log's kept ones (otherwise
    /// it is kept there with the next checkpoint).
    pub(crate) fn remember(&mut self, cmd_id: String, kept: RememberedCommand, saved: bool) {
        if !saved {
            self.commands_unsaved.push((cmd_id.clone(), kept.clone()));
        }
        let time_ms = kept.time_ms;
        if self.remembered.insert(cmd_id.clone(), kept).is_none() {
            self.remembered_order.push_back((cmd_id, time_ms));
        }
        while self.remembered_order.len() > REMEMBERED_COMMANDS {
            if let Some((old, _)) = self.remembered_order.pop_front() {
                self.forget_command(old);
            }
        }
    }

    /// Forgets the commands accepted longer than `cmd_id_window` ago.
    pub(crate) fn forget_old_commands(&mut self, now_ms: u64) {
        let window_ms = u64::try_from(self.config.cmd_id_window.as_millis()).unwrap_or(u64::MAX);
        while self.remembered_order.front().is_some_and(|(_, at)| at.saturating_add(window_ms) < now_ms) {
            if let Some((old, _)) = self.remembered_order.pop_front() {
                self.forget_command(old);
            }
        }
    }

    fn forget_command(&mut self, cmd_id: String) {
        self.remembered.remove(&cmd_id);
        self.commands_forgotten.push(cmd_id);
    }

    /// What `call.get` and `call.list` say of a call.
    pub fn summary(call_id: &str, state: &CallState) -> Value {
        let mut v = json!({
            "call_id": call_id,
            "kind": state.kind(),
            "node": state.node(),
            "sip_call_id": state.sip_call_id(),
            "state": state.name(),
        });
        v["keys"] = json!(state.keys());
        match state {
            CallState::Dialog(d) => {
                v["hold"] = json!({"caller": d.caller, "callee": d.callee});
                v["transfer"] = serde_json::to_value(&d.transfer).unwrap_or(Value::Null);
                v["end_reason"] = json!(d.end_reason);
            }
            CallState::Ua(u) => v["ua"] = u.summary(),
            CallState::Bridged(b) => v["bridged"] = b.summary(),
        }
        v
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_command(
        &mut self,
        verb: Verb,
        payload: &Bytes,
        reply: Option<String>,
        received: Instant,
        now: Now,
        out: &mut Outputs,
        released: &mut Vec<Parked>,
    ) -> Result<(), LogError> {
        let generated = format!("k{:x}{:x}", now.wall_ms, self.next_seq);
        let mut asker = Asker { verb, reply, received, out };
        let request = match CommandRequest::parse(verb, payload) {
            Ok(r) => r,
            Err(error) => {
                // Every answer carries a cmd_id: the client's when the body has one.
                asker.refuse(CommandRequest::cmd_id_of(payload).unwrap_or(generated), error);
                return Ok(());
            }
        };
        let cmd_id = request.cmd_id.clone().unwrap_or(generated);
        let span = tracing::info_span!("command", verb = %verb, cmd_id = %cmd_id);
        let _enter = span.enter();
        if let Some(previous) = self.remembered.get(&cmd_id) {
            tracing::info!("repeated cmd_id: answered with the first answer, not acted on again");
            let first = CommandReply::Accepted { call_id: previous.call_id.clone(), cmd_id, accepted: true };
            asker.answer("repeated", &first, None);
            return Ok(());
        }
        let mut command = request.command;
        match &command {
            Command::List { state, node } => {
                let calls: Vec<Value> = self
                    .calls
                    .iter()
                    .filter(|(_, e)| !e.state.is_ended())
                    .filter(|(_, e)| state.as_deref().is_none_or(|s| s == e.state.name()))
                    .filter(|(_, e)| node.as_deref().is_none_or(|n| n == e.state.node()))
                    .map(|(id, e)| Core::summary(id, &e.state))
                    .collect();
                if asker.reply.is_some() {
                    asker.answer("data", &CommandReply::Data { cmd_id, result: json!({ "calls": calls }) }, None);
                }
                return Ok(());
            }
            Command::Get { target, history } => {
                let Some(call_id) = self.resolve(target) else {
                    asker.refuse(cmd_id, unknown(target));
                    return Ok(());
                };
                let summary =
                    self.calls.get(&call_id).map(|e| Core::summary(&call_id, &e.state)).unwrap_or(Value::Null);
                match (asker.reply.take(), *history) {
                    (None, _) => {}
                    // The call's records are read from the log by the driver.
                    (Some(reply), true) => {
                        asker.out.answered.push(Answered { verb, outcome: "data", received, refused: None });
                        asker.out.histories.push(HistoryQuery { reply, cmd_id, call_id, summary });
                    }
                    (Some(reply), false) => {
                        asker.reply = Some(reply);
                        asker.answer("data", &CommandReply::Data { cmd_id, result: json!({"call": summary}) }, None);
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        let fresh = match &command {
            Command::Start { node, .. } => {
                Some(CallState::Bridged(Box::new(BridgedState::new(node.as_deref().unwrap_or(self.default_node())))))
            }
            Command::UaStart { node, .. } => {
                Some(CallState::Ua(UaState::client(node.as_deref().unwrap_or(self.default_node()))))
            }
            _ => None,
        };
        let call_id = match fresh {
            Some(fresh) => {
                if self.live >= self.config.max_live_calls {
                    let error = CommandError::new(
                        CommandErrorCode::Unavailable,
                        format!(
                            "the engine holds {} live calls, its limit (engine.max_live_calls): new calls are refused until some end",
                            self.live
                        ),
                    );
                    asker.refuse(cmd_id, error);
                    return Ok(());
                }
                if let Err(error) = fresh.check(&command) {
                    asker.refuse(cmd_id, error);
                    return Ok(());
                }
                let call_id = self.new_call_id(now);
                let input = Input::Command { cmd_id: cmd_id.clone(), command };
                let seq = self.apply(&call_id, Some(fresh), input, now, asker.out, released)?;
                (call_id, seq)
            }
            None => {
                let Some(target) = command.target().cloned() else { return Ok(()) };
                let Some(call_id) = self.resolve(&target) else {
                    asker.refuse(cmd_id, unknown(&target));
                    return Ok(());
                };
                if let Command::TransferAttended { transfer_target, .. } = &mut command {
                    let other = self
                        .resolve(transfer_target)
                        .and_then(|id| self.calls.get(&id))
                        .and_then(|e| e.state.sip_call_id());
                    match other {
                        Some(sip) => *transfer_target = CallTarget::SipCallId(sip.to_owned()),
                        None => {
                            let mut e = unknown(transfer_target);
                            e.field = Some("transfer_call_id".into());
                            asker.refuse(cmd_id, e);
                            return Ok(());
                        }
                    }
                }
                let Some(entry) = self.calls.get(&call_id) else { return Ok(()) };
                if let Err(error) = entry.state.check(&command) {
                    asker.refuse(cmd_id, error);
                    return Ok(());
                }
                let input = Input::Command { cmd_id: cmd_id.clone(), command };
                let seq = self.apply(&call_id, None, input, now, asker.out, released)?;
                (call_id, seq)
            }
        };
        let (call_id, seq) = call_id;
        let answer = CommandReply::Accepted { call_id: call_id.clone(), cmd_id: cmd_id.clone(), accepted: true };
        asker.answer("accepted", &answer, None);
        self.remember(cmd_id, RememberedCommand { seq, time_ms: now.wall_ms, call_id }, false);
        Ok(())
    }
}
