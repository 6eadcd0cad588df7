//! The MI commands callbus sends to OpenSIPS, typed: each with its named params as OpenSIPS 3.4
//! takes them (docs/opensips.md). The engine's machines build these; the log keeps the command
//! name and the params object they serialize to.

use serde::Serialize;
use serde_json::Value;

/// One MI command and its params.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MiCall {
    /// `dlg_list`: a page of dialogs.
    DlgList(DlgList),
    /// `dlg_end_dlg`: ends a dialog with BYEs to both sides.
    DlgEndDlg(DlgEndDlg),
    /// `call_hold` (callops): puts both legs on hold.
    CallHold(DialogCallId),
    /// `call_unhold` (callops).
    CallUnhold(DialogCallId),
    /// `call_transfer` (callops): blind (with `destination`) or attended (with `transfer_callid`).
    CallTransfer(CallTransfer),
    /// `ua_session_client_start` (b2b_entities): starts a UA client session.
    UaSessionClientStart(ClientStart),
    /// `ua_session_reply`: answers a request of a UA session.
    UaSessionReply(SessionReply),
    /// `ua_session_update`: sends a request in a UA session.
    UaSessionUpdate(SessionUpdate),
    /// `ua_session_terminate`: ends a UA session.
    UaSessionTerminate(SessionKey),
    /// `ua_session_list`: every UA session.
    UaSessionList,
}

/// `dlg_list`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DlgList {
    /// The first dialog of the page.
    pub index: u64,
    /// How many.
    pub counter: u64,
}

/// `dlg_end_dlg`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DlgEndDlg {
    /// The dialog (its SIP Call-ID is accepted).
    pub dialog_id: String,
}

/// The params of callops commands on one dialog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DialogCallId {
    /// The dialog's SIP Call-ID.
    pub callid: String,
}

/// `call_transfer`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CallTransfer {
    /// The dialog's SIP Call-ID.
    pub callid: String,
    /// The leg transferred (`caller` or `callee`).
    pub leg: String,
    /// Blind: where to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Attended: the other dialog's SIP Call-ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_callid: Option<String>,
    /// Attended: the other dialog's leg.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_leg: Option<String>,
}

/// A body and extra headers, as b2b_entities' MI commands take them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SipPayload {
    /// The body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Its `Content-Type: …\r\n` header line (empty with an empty body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Extra header lines, each ending in CRLF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_headers: Option<String>,
}

/// `ua_session_client_start`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientStart {
    /// The request URI.
    pub ruri: String,
    /// The To.
    pub to: String,
    /// The From.
    pub from: String,
    /// An outbound proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Body and headers of the INVITE.
    #[serde(flatten)]
    pub payload: SipPayload,
    /// b2b_entities flags (`r`, `h`, `b`, `a`, `d`, `t<seconds>`).
    pub flags: String,
}

/// `ua_session_reply`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionReply {
    /// The session's key (null: not known yet).
    pub key: Option<String>,
    /// The method answered.
    pub method: String,
    /// The status code.
    pub code: u16,
    /// The reason phrase.
    pub reason: String,
    /// Body and headers of the reply.
    #[serde(flatten)]
    pub payload: SipPayload,
}

/// `ua_session_update`'s params.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionUpdate {
    /// The session's key (null: not known yet).
    pub key: Option<String>,
    /// The method sent.
    pub method: String,
    /// Body and headers of the request.
    #[serde(flatten)]
    pub payload: SipPayload,
}

/// The params of a command on one UA session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionKey {
    /// The session's key (null: not known yet).
    pub key: Option<String>,
}

impl MiCall {
    /// The MI command's name.
    pub fn command(&self) -> &'static str {
        match self {
            MiCall::DlgList(_) => "dlg_list",
            MiCall::DlgEndDlg(_) => "dlg_end_dlg",
            MiCall::CallHold(_) => "call_hold",
            MiCall::CallUnhold(_) => "call_unhold",
            MiCall::CallTransfer(_) => "call_transfer",
            MiCall::UaSessionClientStart(_) => "ua_session_client_start",
            MiCall::UaSessionReply(_) => "ua_session_reply",
            MiCall::UaSessionUpdate(_) => "ua_session_update",
            MiCall::UaSessionTerminate(_) => "ua_session_terminate",
            MiCall::UaSessionList => "ua_session_list",
        }
    }

    /// Its named params, as a JSON object.
    pub fn params(&self) -> Value {
        let value = match self {
            MiCall::DlgList(p) => serde_json::to_value(p),
            MiCall::DlgEndDlg(p) => serde_json::to_value(p),
            MiCall::CallHold(p) | MiCall::CallUnhold(p) => serde_json::to_value(p),
            MiCall::CallTransfer(p) => serde_json::to_value(p),
            MiCall::UaSessionClientStart(p) => serde_json::to_value(p),
            MiCall::UaSessionReply(p) => serde_json::to_value(p),
            MiCall::UaSessionUpdate(p) => serde_json::to_value(p),
            MiCall::UaSessionTerminate(p) => serde_json::to_value(p),
            MiCall::UaSessionList => Ok(Value::Object(serde_json::Map::new())),
        };
        // Strings, numbers and options only: serializing cannot fail.
        value.unwrap_or_else(|_| Value::Object(serde_json::Map::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_are_named_as_opensips_takes_them_in_order() {
        let start = MiCall::UaSessionClientStart(ClientStart {
            ruri: "sip:b@h".into(),
            to: "sip:b@h".into(),
            from: "sip:a@h".into(),
            proxy: None,
            payload: SipPayload {
                body: Some("v=0\r\n".into()),
                content_type: Some("Content-Type: application/sdp\r\n".into()),
                extra_headers: None,
            },
            flags: "rhba".into(),
        });
        assert_eq!(start.command(), "ua_session_client_start");
        let params = start.params();
        let keys: Vec<&str> = params.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["ruri", "to", "from", "body", "content_type", "flags"]);
        let terminate = MiCall::UaSessionTerminate(SessionKey { key: None });
        assert_eq!(terminate.params(), json!({"key": null}));
        assert_eq!(MiCall::UaSessionList.params(), json!({}));
        let blind = MiCall::CallTransfer(CallTransfer {
            callid: "1@h".into(),
            leg: "callee".into(),
            destination: Some("sip:c@h".into()),
            transfer_callid: None,
            transfer_leg: None,
        });
        assert_eq!(blind.params(), json!({"callid": "1@h", "leg": "callee", "destination": "sip:c@h"}));
    }
}
