//! The OpenSIPS Call API's protocol (JSON-RPC 2.0 over WebSocket, path `/call-api`), which the
//! engine's compatibility door speaks so existing Call API clients work unchanged
//! (docs/opensips.md §6).
//!
//! Requests carry string params only; request errors use the positive code 32000 with Call
//! API's exact messages; progress comes as notifications named after the method, with an
//! `event` and optional `data`; failure is `Error` (data: the reason) then `Ended`.

use serde::Serialize;
use serde_json::{Map, Value};

/// The code of every request error (positive, as Call API sends it).
pub const REQUEST_ERROR_CODE: i64 = 32000;

/// The methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `CallStart {caller, callee}`: click-to-dial.
    CallStart,
    /// `CallEnd {callid}`.
    CallEnd,
    /// `CallHold {callid}`.
    CallHold,
    /// `CallUnhold {callid}`.
    CallUnhold,
    /// `CallBlindTransfer {callid, leg, destination}`.
    CallBlindTransfer,
    /// `CallAttendedTransfer {callidA, legA, callidB, legB}`.
    CallAttendedTransfer,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::CallStart => "CallStart",
            Method::CallEnd => "CallEnd",
            Method::CallHold => "CallHold",
            Method::CallUnhold => "CallUnhold",
            Method::CallBlindTransfer => "CallBlindTransfer",
            Method::CallAttendedTransfer => "CallAttendedTransfer",
        }
    }

    /// The params a method requires.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Method::CallStart => &["caller", "callee"],
            Method::CallEnd | Method::CallHold | Method::CallUnhold => &["callid"],
            Method::CallBlindTransfer => &["callid", "leg", "destination"],
            Method::CallAttendedTransfer => &["callidA", "legA", "callidB", "legB"],
        }
    }

    fn from_name(name: &str) -> Option<Method> {
        [
            Method::CallStart,
            Method::CallEnd,
            Method::CallHold,
            Method::CallUnhold,
            Method::CallBlindTransfer,
            Method::CallAttendedTransfer,
        ]
        .into_iter()
        .find(|m| m.as_str() == name)
    }
}

/// A request error, with Call API's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not JSON, or not a JSON-RPC request.
    Parse,
    /// `params` is not an object.
    NonObjectParams,
    /// `cmd_id` is not a string.
    BadCmdId,
    /// A param is missing or not a string.
    BadParams,
    /// No such method.
    UnknownMethod,
}

impl RequestError {
    /// Call API's message for it.
    pub fn message(self) -> &'static str {
        match self {
            RequestError::Parse => "failed to parse JSON-RPC request",
            RequestError::NonObjectParams => "non-object parameters are not accepted",
            RequestError::BadCmdId => "bad cmd_id (must be a string)",
            RequestError::BadParams => "bad JSON-RPC parameters",
            RequestError::UnknownMethod => "unknown JSON-RPC method",
        }
    }
}

/// A valid request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The JSON-RPC id, echoed.
    pub id: Value,
    /// The method.
    pub method: Method,
    /// The client's command id, if given.
    pub cmd_id: Option<String>,
    /// The method's params (strings).
    pub params: Map<String, Value>,
}

impl Request {
    /// A required string param (present after [`parse_request`] succeeded).
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).and_then(Value::as_str).unwrap_or_default()
    }
}

/// Parses one frame; on error, also returns the id to answer with.
pub fn parse_request(bytes: &[u8]) -> Result<Request, (Value, RequestError)> {
    let Ok(Value::Object(mut frame)) = serde_json::from_slice::<Value>(bytes) else {
        return Err((Value::Null, RequestError::Parse));
    };
    let id = frame.remove("id").unwrap_or(Value::Null);
    let method = match frame.get("method") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err((id, RequestError::Parse)),
    };
    let mut params = match frame.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err((id, RequestError::NonObjectParams)),
    };
    let cmd_id = match params.remove("cmd_id") {
        None => None,
        Some(Value::String(c)) => Some(c),
        Some(_) => return Err((id, RequestError::BadCmdId)),
    };
    let Some(method) = Method::from_name(&method) else {
        return Err((id, RequestError::UnknownMethod));
    };
    for name in method.required() {
        match params.get(*name) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err((id, RequestError::BadParams)),
        }
    }
    if params.values().any(|v| !v.is_string()) {
        return Err((id, RequestError::BadParams));
    }
    Ok(Request { id, method, cmd_id, params })
}

#[derive(Serialize)]
struct Envelope<'a> {
    jsonrpc: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<Value>,
}

/// The answer to an accepted request: `{"cmd_id", "event": "Started"}`.
pub fn started(id: &Value, cmd_id: &str) -> String {
    let result = serde_json::json!({"cmd_id": cmd_id, "event": "Started"});
    let env = Envelope { jsonrpc: "2.0", id: Some(id), result: Some(result), error: None, method: None, params: None };
    serde_json::to_string(&env).unwrap_or_default()
}

/// The answer to a refused request.
pub fn error(id: &Value, error: RequestError) -> String {
    let err = serde_json::json!({"code": REQUEST_ERROR_CODE, "message": error.message()});
    let env = Envelope { jsonrpc: "2.0", id: Some(id), result: None, error: Some(err), method: None, params: None };
    serde_json::to_string(&env).unwrap_or_default()
}

/// A progress notification; `data` is left out when None.
pub fn notification(method: Method, cmd_id: &str, event: &str, data: Option<Value>) -> String {
    let mut params = serde_json::json!({"cmd_id": cmd_id, "event": event});
    if let Some(data) = data {
        params["data"] = data;
    }
    let env = Envelope {
        jsonrpc: "2.0",
        id: None,
        result: None,
        error: None,
        method: Some(method.as_str()),
        params: Some(params),
    };
    serde_json::to_string(&env).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_and_their_errors() {
        let ok =
            parse_request(br#"{"jsonrpc":"2.0","id":1,"method":"CallHold","params":{"callid":"a@b","cmd_id":"x"}}"#)
                .expect("valid");
        assert_eq!((ok.method, ok.cmd_id.as_deref(), ok.param("callid")), (Method::CallHold, Some("x"), "a@b"));
        let err = |b: &str| parse_request(b.as_bytes()).expect_err(b).1;
        assert_eq!(err("{"), RequestError::Parse);
        assert_eq!(err("[]"), RequestError::Parse);
        assert_eq!(err(r#"{"id":1,"method":7}"#), RequestError::Parse);
        assert_eq!(err(r#"{"id":1,"method":"CallHold","params":["a"]}"#), RequestError::NonObjectParams);
        assert_eq!(err(r#"{"id":1,"method":"CallHold","params":{"callid":"a","cmd_id":5}}"#), RequestError::BadCmdId);
        assert_eq!(err(r#"{"id":1,"method":"CallHold","params":{"callid":5}}"#), RequestError::BadParams);
        assert_eq!(err(r#"{"id":1,"method":"CallHold","params":{}}"#), RequestError::BadParams);
        assert_eq!(err(r#"{"id":1,"method":"__proto__","params":{}}"#), RequestError::UnknownMethod);
        assert_eq!(parse_request(br#"{"id":"z","method":"Nope"}"#).expect_err("unknown").0, json!("z"));
    }

    #[test]
    fn frames_have_call_apis_shape() {
        let v: Value = serde_json::from_str(&started(&json!(3), "c1")).expect("json");
        assert_eq!(v, json!({"jsonrpc":"2.0","id":3,"result":{"cmd_id":"c1","event":"Started"}}));
        let v: Value = serde_json::from_str(&error(&Value::Null, RequestError::Parse)).expect("json");
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":null,"error":{"code":32000,"message":"failed to parse JSON-RPC request"}})
        );
        let v: Value = serde_json::from_str(&notification(Method::CallHold, "c1", "Ended", None)).expect("json");
        assert_eq!(v, json!({"jsonrpc":"2.0","method":"CallHold","params":{"cmd_id":"c1","event":"Ended"}}));
    }
}
