//! The configuration of the parts (`up`, `bridge`, `engine`): built-in defaults, then a TOML
//! file (`--config`, or `./callbus.toml` when present), then `CALLBUS_*` environment
//! variables, then flags — each layer over the one before, merged by `figment`. An unknown key
//! or a bad value is an error naming the key and the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use callbus_schemas::event::DEFAULT_EVENTS;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::duration;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_FILE: &str = "callbus.toml";

/// A duration written as on the command line: `500ms`, `5s`, `2m`, or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => duration::parse(&t).map(Dur).map_err(serde::de::Error::custom),
            Raw::Seconds(s) => Ok(Dur(Duration::from_secs(s))),
        }
    }
}

/// Everything the parts read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server URL (may carry `user:password@`; masked by `config show`).
    pub nats: String,
    /// Serve Prometheus metrics on `http://<this>/metrics`; off when absent.
    #[serde(deserialize_with = "crate::addr::de_opt")]
    pub metrics_listen: Option<SocketAddr>,
    /// `[nats_auth]`: credentials and TLS for NATS (secrets masked by `config show`).
    pub nats_auth: crate::nats::NatsAuth,
    /// The bridge.
    pub bridge: BridgeSection,
    /// The engine.
    pub engine: EngineSection,
    /// Many engines on a NATS JetStream cluster (`callbus engine --cluster`).
    pub cluster: ClusterSection,
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Join the worker group instead of running a single engine.
    pub enabled: bool,
    /// This worker's name, unique among the live workers [default: `<hostname>-<pid>`].
    pub worker: Option<String>,
    /// Partitions the calls are spread over; every worker of a cluster must agree.
    pub partitions: u16,
    /// JetStream replicas of the log, the input stream and the lease bucket.
    pub replicas: usize,
    /// A lease not renewed this long expires; another worker then takes the partition.
    pub lease_ttl: Dur,
    /// How long OpenSIPS events are kept in the input stream.
    pub events_max_age: Dur,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let d = callbus_engine::ClusterConfig::default();
        ClusterSection {
            enabled: false,
            worker: None,
            partitions: d.partitions,
            replicas: d.replicas,
            lease_ttl: Dur(d.lease_ttl),
            events_max_age: Dur(d.events_max_age),
        }
    }
}

/// `[bridge]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeSection {
    /// Name of the OpenSIPS node (a subject token).
    pub node: String,
    /// OpenSIPS MI datagram socket.
    #[serde(deserialize_with = "crate::addr::de")]
    pub mi: SocketAddr,
    /// Where to receive OpenSIPS event datagrams.
    #[serde(deserialize_with = "crate::addr::de")]
    pub events_listen: SocketAddr,
    /// The address OpenSIPS should send events to, when it differs from `events_listen`.
    #[serde(deserialize_with = "crate::addr::de_opt")]
    pub events_advertise: Option<SocketAddr>,
    /// How long to wait for an MI reply.
    pub mi_timeout: Dur,
    /// MI allow-list: `+cmd` adds to the default list, names replace it, `*` allows all.
    pub mi_allow: Option<String>,
    /// Events to subscribe to.
    pub events: Vec<String>,
    /// Expiry of each event subscription (renewed at a third of it).
    pub subscribe_expire: Dur,
    /// The most event datagrams kept while NATS is slow or down.
    pub buffer: usize,
    /// How often the bridge status is published.
    pub status_interval: Dur,
    /// Also append each batch of events to `callbus.input.<node>` (JetStream): a cluster's input.
    pub events_acked: bool,
}

/// `[engine]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Where the event log lives.
    pub data_dir: PathBuf,
    /// OpenSIPS nodes to reconcile with on start.
    pub nodes: Vec<String>,
    /// How long an ended call stays in memory to absorb late events.
    pub ended_retention: Dur,
    /// How long an accepted command's `cmd_id` is remembered, across restarts too (at most the
    /// last 100 000): the same `cmd_id` again within it gets the first answer.
    pub cmd_id_window: Dur,
    /// Serve the OpenSIPS Call API protocol here; off when absent.
    #[serde(deserialize_with = "crate::addr::de_opt")]
    pub callapi_listen: Option<SocketAddr>,
    /// The bearer token Call API clients must present; required to listen beyond loopback.
    pub callapi_token: Option<String>,
    /// The most live calls; new `call.start` / `ua.start` are refused beyond it.
    pub max_live_calls: usize,
    /// How often live calls are checked against OpenSIPS (lost events, OpenSIPS restarts).
    pub reconcile_every: Dur,
    /// Inputs waiting for the engine at most; commands beyond it are refused ("overloaded").
    pub input_queue: usize,
    /// `fdatasync` the event log after each commit too: acknowledged inputs then survive a power
    /// cut, not only a crash of callbus (~0.08 ms more per commit on the test VM, docs/engine.md).
    pub sync_data: bool,
    /// How long an ended call stays in the log: a call whose every record is older is removed
    /// whole (live calls never); `0` keeps everything.
    pub retention: Dur,
    /// The most bytes the event log's records may take as stored (compressed); beyond it the
    /// oldest calls that have ended are removed, however young; `0`: no limit. In a cluster, the
    /// partition logs' stream limit (at least 64 MiB a partition).
    pub retention_bytes: crate::size::Size,
    /// Where retention archives calls before removing them (hourly zstd files `callbus replay
    /// --archive` reads); unset: they are only removed.
    pub archive_dir: Option<PathBuf>,
    /// Free space kept on the data dir's disk (and held in `<data dir>/disk-reserve`): under it
    /// the engine writes nothing and refuses commands until there is room; `0` turns it off.
    pub disk_reserve: crate::size::Size,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats: "nats://127.0.0.1:4222".into(),
            metrics_listen: None,
            nats_auth: crate::nats::NatsAuth::default(),
            bridge: BridgeSection::default(),
            engine: EngineSection::default(),
            cluster: ClusterSection::default(),
        }
    }
}

impl Default for BridgeSection {
    fn default() -> Self {
        BridgeSection {
            node: "default".into(),
            mi: SocketAddr::from(([127, 0, 0, 1], 8080)),
            events_listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            events_advertise: None,
            mi_timeout: Dur(Duration::from_secs(5)),
            mi_allow: None,
            events: DEFAULT_EVENTS.map(String::from).to_vec(),
            subscribe_expire: Dur(Duration::from_secs(60)),
            buffer: 100_000,
            status_interval: Dur(Duration::from_secs(5)),
            events_acked: false,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            data_dir: PathBuf::from("./callbus-data"),
            nodes: vec!["default".into()],
            ended_retention: Dur(Duration::from_secs(60)),
            cmd_id_window: Dur(Duration::from_secs(24 * 3600)),
            callapi_listen: None,
            callapi_token: None,
            max_live_calls: 500_000,
            reconcile_every: Dur(Duration::from_secs(300)),
            input_queue: 65_536,
            sync_data: false,
            disk_reserve: crate::size::Size(callbus_engine::log::disk::DEFAULT_RESERVE),
            retention: Dur(Duration::from_secs(30 * 86_400)),
            retention_bytes: crate::size::Size(0),
            archive_dir: None,
        }
    }
}

/// Values given as flags or `CALLBUS_*` variables, by config key; absent ones are left out.
#[derive(Default)]
pub struct Overrides(Map<String, Value>);

impl Overrides {
    /// Sets the `[nats_auth]` keys given.
    pub fn set_auth(&mut self, auth: &crate::nats::NatsAuth) {
        let a = auth.clone();
        self.set("nats_auth", "user", a.user);
        self.set("nats_auth", "password", a.password);
        self.set("nats_auth", "token", a.token);
        self.set("nats_auth", "nkey", a.nkey);
        self.set("nats_auth", "creds", a.creds);
        self.set("nats_auth", "ca", a.ca);
        self.set("nats_auth", "cert", a.cert);
        self.set("nats_auth", "key", a.key);
    }

    /// Sets `section.key` (or a top-level `key` when `section` is empty) if `value` is given.
    pub fn set<T: Serialize>(&mut self, section: &str, key: &str, value: Option<T>) {
        let Some(value) = value.and_then(|v| serde_json::to_value(v).ok()) else { return };
        if section.is_empty() {
            self.0.insert(key.into(), value);
            return;
        }
        let entry = self.0.entry(section.to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = entry {
            map.insert(key.into(), value);
        }
    }
}

/// The file to read: `explicit`, or `./callbus.toml` when it exists.
pub fn file(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    match explicit {
        Some(path) if !path.is_file() => {
            anyhow::bail!("the configuration file {} does not exist (--config / CALLBUS_CONFIG)", path.display())
        }
        Some(path) => Ok(Some(path.to_owned())),
        None => Ok(Path::new(DEFAULT_FILE).is_file().then(|| PathBuf::from(DEFAULT_FILE))),
    }
}

/// Defaults, then the file, then the overrides (flags and environment).
pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Serialized::defaults(Value::Object(overrides.0)));
    figment.extract::<Config>().map_err(|e| {
        let errors: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("bad configuration: {}", errors.join("; "))
    })
}

/// The effective configuration as TOML, secrets masked.
pub fn show(config: &Config, file: Option<&Path>) -> anyhow::Result<String> {
    let mut shown = config.clone();
    shown.nats = crate::nats::mask_url(&shown.nats);
    shown.nats_auth = shown.nats_auth.masked();
    if shown.engine.callapi_token.is_some() {
        shown.engine.callapi_token = Some("***".into());
    }
    let text = toml::to_string_pretty(&shown).context("cannot write the configuration as TOML")?;
    let source = match file {
        Some(p) => format!("# from {} (then CALLBUS_* variables and flags)\n", p.display()),
        None => "# no configuration file: defaults, then CALLBUS_* variables and flags\n".to_owned(),
    };
    Ok(format!("{source}{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().expect("tmp");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f
    }

    /// The commented default configuration the Debian package installs as
    /// /etc/callbus/callbus.toml.
    fn packaged() -> (std::path::PathBuf, String) {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/callbus.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/callbus.toml");
        (path, text)
    }

    #[test]
    fn the_packaged_configuration_is_the_defaults_with_its_data_dir() {
        let (path, text) = packaged();
        let config = load(Some(&path), Overrides::default()).expect("it loads");
        let expected = Config {
            engine: EngineSection { data_dir: "/var/lib/callbus/data".into(), ..EngineSection::default() },
            ..Config::default()
        };
        assert_eq!(config, expected);
        // Every key it shows commented out is a key, with a value of the right type.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let f = write(&uncommented);
        load(Some(f.path()), Overrides::default())
            .unwrap_or_else(|e| panic!("deploy/callbus.toml, uncommented: {e:#}"));
        // And it shows every key there is.
        let shown = toml::Value::try_from(Config::default()).expect("the defaults as TOML");
        let mut keys = Vec::new();
        for (section, value) in shown.as_table().expect("a table") {
            match value.as_table() {
                Some(t) => keys.extend(t.keys().map(|k| format!("{section}.{k}"))),
                None => keys.push(section.clone()),
            }
        }
        for key in keys {
            let name = key.rsplit('.').next().unwrap_or(&key);
            assert!(
                text.lines().any(|l| l.trim_start_matches('#').starts_with(&format!("{name} = "))),
                "deploy/callbus.toml does not show {key}"
            );
        }
    }

    #[test]
    fn layers_apply_in_order() {
        let f = write("nats = \"nats://file:4222\"\n[bridge]\nnode = \"edge1\"\nmi_timeout = \"2s\"\n[engine]\nnodes = [\"edge1\", \"edge2\"]\n");
        let config = load(Some(f.path()), Overrides::default()).expect("valid");
        assert_eq!(config.nats, "nats://file:4222");
        assert_eq!(config.bridge.node, "edge1");
        assert_eq!(config.bridge.mi_timeout, Dur(Duration::from_secs(2)));
        assert_eq!(config.bridge.buffer, 100_000, "defaults fill what the file leaves out");
        let mut over = Overrides::default();
        over.set("bridge", "node", Some("flag-node"));
        over.set("", "nats", Some("nats://flag:4222"));
        over.set("bridge", "buffer", None::<usize>);
        let config = load(Some(f.path()), over).expect("valid");
        assert_eq!((config.nats.as_str(), config.bridge.node.as_str()), ("nats://flag:4222", "flag-node"));
        assert_eq!(config.engine.nodes, ["edge1", "edge2"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let f = write("[bridge]\nmi_timout = \"2s\"\n");
        let e = load(Some(f.path()), Overrides::default()).expect_err("unknown key").to_string();
        assert!(e.contains("mi_timout") && e.contains(&f.path().display().to_string()), "{e}");
        let f = write("[bridge]\nmi_timeout = \"soon\"\n");
        let e = load(Some(f.path()), Overrides::default()).expect_err("bad value").to_string();
        assert!(e.contains("mi_timeout") && e.contains("soon") && e.contains(&f.path().display().to_string()), "{e}");
        let f = write("[engine]\ncallapi_listen = \"not an address\"\n");
        let e = load(Some(f.path()), Overrides::default()).expect_err("bad address").to_string();
        assert!(e.contains("callapi_listen"), "{e}");
        let f = write("[bridge\nnode=");
        assert!(load(Some(f.path()), Overrides::default()).is_err(), "bad TOML");
        assert!(file(Some(Path::new("/nonexistent/callbus.toml"))).is_err());
    }

    #[test]
    fn disk_reserve_is_a_size_from_the_file_or_the_flag() {
        use crate::size::Size;
        assert_eq!(load(None, Overrides::default()).expect("defaults").engine.disk_reserve, Size(64 << 20));
        let f = write("[engine]\ndisk_reserve = \"1GiB\"\n");
        assert_eq!(load(Some(f.path()), Overrides::default()).expect("valid").engine.disk_reserve, Size(1 << 30));
        let f = write("[engine]\ndisk_reserve = 0\n");
        assert_eq!(load(Some(f.path()), Overrides::default()).expect("off").engine.disk_reserve, Size(0));
        let mut over = Overrides::default();
        over.set("engine", "disk_reserve", Some(Size(8 << 20)));
        assert_eq!(load(None, over).expect("flag").engine.disk_reserve, Size(8 << 20));
        for (bad, says) in [("\"lots\"", "not a size"), ("\"5 parsecs\"", "unknown unit"), ("-3", "disk_reserve")] {
            let f = write(&format!("[engine]\ndisk_reserve = {bad}\n"));
            let e = format!("{:#}", load(Some(f.path()), Overrides::default()).expect_err(bad));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn sync_data_comes_from_the_file_or_the_flag_and_is_off_by_default() {
        assert!(!load(None, Overrides::default()).expect("defaults").engine.sync_data);
        let f = write("[engine]\nsync_data = true\n");
        assert!(load(Some(f.path()), Overrides::default()).expect("valid").engine.sync_data);
        let mut over = Overrides::default();
        over.set("engine", "sync_data", Some(true));
        assert!(load(None, over).expect("flag").engine.sync_data);
        let f = write("[engine]\nsync_data = \"yes\"\n");
        let e = load(Some(f.path()), Overrides::default()).expect_err("wrong type").to_string();
        assert!(e.contains("sync_data") && e.contains("bool"), "{e}");
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(crate::nats::mask_url("nats://alice:s3cret@bus:4222"), "nats://alice:***@bus:4222");
        assert_eq!(crate::nats::mask_url("nats://t0ken@bus:4222"), "nats://***@bus:4222");
        assert_eq!(crate::nats::mask_url("nats://bus:4222"), "nats://bus:4222");
        assert_eq!(
            crate::nats::mask_url("nats://a:x@b1:4222,nats://a:y@b2:4222"),
            "nats://a:***@b1:4222,nats://a:***@b2:4222"
        );
        let mut config = Config { nats: "nats://a:b@h:1".into(), ..Config::default() };
        config.nats_auth.password = Some("hunter2".into());
        config.nats_auth.user = Some("svc".into());
        let text = show(&config, None).expect("toml");
        assert!(text.contains("nats://a:***@h:1") && !text.contains("a:b@"), "{text}");
        assert!(text.contains("user = \"svc\"") && !text.contains("hunter2"), "{text}");
        assert!(text.contains("mi_timeout = \"5s\""), "{text}");
    }
}
