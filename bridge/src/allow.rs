//! The MI allow-list: which OpenSIPS MI commands the bus may run through the bridge.
//!
//! MI has no authentication: anyone who can send to it can run `kill` or `shutdown`. So the
//! bridge serves only the commands callbus needs plus read-only ones, unless told otherwise.

use std::collections::BTreeSet;
use std::fmt;

/// Commands callbus itself sends.
pub const CALLBUS_COMMANDS: &[&str] = &[
    "dlg_list",
    "dlg_end_dlg",
    "call_hold",
    "call_unhold",
    "call_transfer",
    "ua_session_client_start",
    "ua_session_update",
    "ua_session_reply",
    "ua_session_terminate",
    "ua_session_list",
];

/// Read-only commands that are safe to expose.
pub const READ_ONLY_COMMANDS: &[&str] = &[
    "which",
    "version",
    "uptime",
    "ps",
    "get_statistics",
    "dlg_list",
    "ua_session_list",
    "subscribers_list",
    "events_list",
];

/// Which MI commands may be run from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowList {
    /// Every command (dangerous: the bus can then stop OpenSIPS).
    All,
    /// Only these commands.
    Only(BTreeSet<String>),
}

impl Default for AllowList {
    fn default() -> Self {
        AllowList::Only(CALLBUS_COMMANDS.iter().chain(READ_ONLY_COMMANDS).map(|c| (*c).to_owned()).collect())
    }
}

/// A `--mi-allow` value that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad MI allow-list entry {entry:?}: {reason}")]
pub struct AllowListError {
    entry: String,
    reason: &'static str,
}

impl AllowList {
    /// Parses `--mi-allow`: a comma-separated list. `*` allows every command. Entries written
    /// `+name` extend the default list; plain names replace it (and `+` entries are added).
    pub fn parse(spec: &str) -> Result<AllowList, AllowListError> {
        let entries: Vec<&str> = spec.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if entries.contains(&"*") {
            return Ok(AllowList::All);
        }
        let replaces = entries.iter().any(|e| !e.starts_with('+'));
        let mut set = match (replaces, AllowList::default()) {
            (false, AllowList::Only(defaults)) => defaults,
            _ => BTreeSet::new(),
        };
        for entry in entries {
            let name = entry.trim_start_matches('+');
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(AllowListError {
                    entry: entry.to_owned(),
                    reason: "an MI command name is letters, digits and '_'",
                });
            }
            set.insert(name.to_owned());
        }
        Ok(AllowList::Only(set))
    }

    /// Whether `command` may be run.
    pub fn allows(&self, command: &str) -> bool {
        match self {
            AllowList::All => true,
            AllowList::Only(set) => set.contains(command),
        }
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowList::All => f.write_str("*"),
            AllowList::Only(set) => f.write_str(&set.iter().cloned().collect::<Vec<_>>().join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_refuses_dangerous_commands() {
        let list = AllowList::default();
        for ok in ["call_hold", "version", "dlg_list", "ua_session_reply"] {
            assert!(list.allows(ok), "{ok}");
        }
        for no in ["kill", "shutdown", "event_subscribe", "t_uac_dlg", "raise_event", ""] {
            assert!(!list.allows(no), "{no}");
        }
    }

    #[test]
    fn plus_extends_plain_replaces_star_allows_all() {
        let ext = AllowList::parse("+t_uac_dlg").expect("valid");
        assert!(ext.allows("t_uac_dlg") && ext.allows("call_hold"));
        let rep = AllowList::parse("version, uptime").expect("valid");
        assert!(rep.allows("uptime") && !rep.allows("call_hold"));
        assert_eq!(AllowList::parse("version,*").expect("valid"), AllowList::All);
        assert!(AllowList::parse("bad name").is_err());
        assert!(AllowList::parse("+").is_err());
        assert!(AllowList::parse("a.b").is_err());
    }
}
