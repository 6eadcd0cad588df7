//! NATS authentication and TLS from the configuration file, the environment and flags: a
//! nats-server with TLS (certificates made here with `openssl`) and users with a password or an
//! NKey, and another with a token. Secrets never reach the logs.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use callbus_tests::{free_port, NatsServer};
use opensips_sim::{Sim, SimConfig};

fn callbus() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbus"));
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    for var in
        ["CALLBUS_NATS_USER", "CALLBUS_NATS_PASSWORD", "CALLBUS_NATS_TOKEN", "CALLBUS_NATS_NKEY", "CALLBUS_NATS_CA"]
    {
        cmd.env_remove(var);
    }
    cmd
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, and a server certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=callbus test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    openssl(dir, &csr);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
}

fn list(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = callbus();
    cmd.args(["call", "--nats", url, "--timeout", "3s"]).args(extra).arg("list");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("runs")
}

#[test]
fn tls_and_password_or_nkey_users_from_config_env_and_flags_and_secrets_stay_out_of_logs() {
    let dir = tempfile::tempdir().expect("tmp");
    certificates(dir.path());
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let d = dir.path().display();
    let nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{d}/server.pem\"\n  key_file: \"{d}/server.key\"\n}}\n\
         authorization {{\n  users = [\n    {{user: svc, password: \"s3cret-pw\"}}\n    {{nkey: {}}}\n  ]\n}}\n",
        user.public_key()
    ));
    let url = nats.url();
    let ca = format!("{d}/ca.pem");

    // `up` connects with TLS and a password from its configuration file.
    let data = tempfile::tempdir().expect("tmp");
    let sim = tokio::runtime::Runtime::new()
        .expect("rt")
        .block_on(async { Sim::start(SimConfig::default()).await.expect("sim") });
    let config = dir.path().join("callbus.toml");
    std::fs::write(
        &config,
        format!(
            "nats = \"{url}\"\n[nats_auth]\nuser = \"svc\"\npassword = \"s3cret-pw\"\nca = \"{ca}\"\n\
             [bridge]\nmi = \"{}\"\nevents_listen = \"127.0.0.1:{}\"\n[engine]\ndata_dir = \"{}\"\n",
            sim.mi_addr(),
            free_port(),
            data.path().display()
        ),
    )
    .expect("write");
    let up = callbus()
        .args(["--config", &config.display().to_string(), "up"])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("up starts");

    // Clients: TLS plus a password (flags), an NKey seed (environment); refused without them.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = list(&url, &["--nats-ca", &ca, "--nats-user", "svc", "--nats-password", "s3cret-pw"], &[]);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("calls"));
            break;
        }
        assert!(Instant::now() < deadline, "the engine never answered: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = list(&url, &[], &[("CALLBUS_NATS_CA", &ca), ("CALLBUS_NATS_NKEY", &seed)]);
    assert!(out.status.success(), "nkey: {}", String::from_utf8_lossy(&out.stderr));
    let out = list(&url, &["--nats-ca", &ca, "--nats-user", "svc", "--nats-password", "wrong"], &[]);
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to NATS"));
    let out = list(&url, &["--nats-user", "svc", "--nats-password", "s3cret-pw"], &[]);
    assert!(!out.status.success(), "no TLS: refused by a server that requires it");
    let out = list(&url, &["--nats-ca", &ca, "--nats-user", "svc"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nats-password"), "a half-given pair is named");

    // `config show` masks them; the logs never carry them.
    let out = callbus().args(["--config", &config.display().to_string(), "config", "show"]).output().expect("runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("password = \"***\"") && !shown.contains("s3cret-pw"), "{shown}");
    let pid = up.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    let out = up.wait_with_output().expect("up exits");
    assert!(out.status.success(), "SIGTERM exits 0");
    let logs = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(logs.contains("connected to NATS"), "debug logs were captured: {logs}");
    assert!(!logs.contains("s3cret-pw"), "the password was logged");
    drop(sim);
}

#[test]
fn token_authentication() {
    let nats = NatsServer::start_with_config("authorization {\n  token: \"t0k3n-value\"\n}\n");
    let url = nats.url();
    // Nothing answers on the bus, but the connection itself is what is tested: a `call list`
    // that connects waits for an engine (no responders), one that cannot connect says so.
    let out = list(&url, &["--nats-token", "t0k3n-value"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("cannot connect to NATS"), "the token is accepted: {err}");
    assert!(err.contains("engine"), "{err}");
    let out = list(&url, &[], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to NATS"));
    let out = list(&url, &[], &[("CALLBUS_NATS_TOKEN", "nope")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to NATS"));
}

/// Starts callbus as `user`, its log in `log` when given.
fn spawn_logged(args: &[&str], user: &str, password: &str, log: Option<&std::path::Path>) -> std::process::Child {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::null(),
    };
    callbus()
        .args(args)
        .env("CALLBUS_NATS_USER", user)
        .env("CALLBUS_NATS_PASSWORD", password)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starts")
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_documented_subject_permissions_let_each_role_do_its_work_and_no_more() {
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/nats-permissions.conf"))
        .expect("docs/examples/nats-permissions.conf");
    let nats = NatsServer::start_with_config(&conf);
    let url = nats.url();
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let sim = rt.block_on(async { Sim::start(SimConfig::default()).await.expect("sim") });
    let data = tempfile::tempdir().expect("tmp");
    let (mi, events) = (sim.mi_addr().to_string(), format!("127.0.0.1:{}", free_port()));
    let bridge_args = ["bridge", "--nats", &url, "--node", "edge1", "--mi", &mi, "--events-listen", &events];
    let (bridge_log, engine_log) = (data.path().join("bridge.log"), data.path().join("engine.log"));
    let _bridge = Killed(spawn_logged(&bridge_args, "bridge-edge1", "bridge-pw", Some(&bridge_log)));
    let data_dir = data.path().join("log").display().to_string();
    let engine_args = ["engine", "--nats", &url, "--nodes", "edge1", "--data-dir", &data_dir];
    let _engine = Killed(spawn_logged(&engine_args, "engine", "engine-pw", Some(&engine_log)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.live_subscriptions().len() < 4 {
        assert!(Instant::now() < deadline, "the bridge subscribes with its permissions");
        std::thread::sleep(Duration::from_millis(50));
    }
    // An app starts a click-to-dial and follows it to the end: every hop is permitted.
    let app = [("CALLBUS_NATS_USER", "app"), ("CALLBUS_NATS_PASSWORD", "app-pw")];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut cmd = callbus();
        cmd.args(["call", "--nats", &url, "--timeout", "3s", "start", "sip:alice@127.0.0.1", "sip:bob@127.0.0.1"])
            .args(["--node", "edge1"]);
        for (k, v) in app {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("runs");
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("connected"));
            break;
        }
        assert!(Instant::now() < deadline, "click-to-dial as app: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(300));
    }
    // The app may not run MI (it could stop OpenSIPS) nor read raw OpenSIPS events.
    let mut cmd = callbus();
    cmd.args(["mi", "--nats", &url, "--node", "edge1", "--timeout", "2s", "uptime"]);
    for (k, v) in app {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    assert!(!out.status.success(), "MI as app must be refused: {}", String::from_utf8_lossy(&out.stdout));
    let mut cmd = callbus();
    cmd.args(["events", "--nats", &url, "--raw", "--duration", "2s"]).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in app {
        cmd.env(k, v);
    }
    let tail = cmd.spawn().expect("events starts");
    std::thread::sleep(Duration::from_millis(500));
    let _guard = rt.enter();
    sim.proxied_call(opensips_sim::CallScript::default()); // events flow while the app listens
    let out = tail.wait_with_output().expect("events ends");
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "raw events reached an app");
    // A datagram that is not an event goes to opensips.edge1.invalid, and bridge statuses reach
    // the engine: nothing the bridge or the engine does is refused by the shipped permissions.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.send_to(b"not an event", &events).expect("send");
    std::thread::sleep(Duration::from_millis(6_000)); // a bridge status goes out every 5 s
    for (who, log) in [("bridge", &bridge_log), ("engine", &engine_log)] {
        let said = std::fs::read_to_string(log).expect("log");
        assert!(!said.contains("refused an operation"), "{who} under the shipped permissions:\n{said}");
    }
    // An operator's `nats micro info` reaches both services, and nothing else.
    rt.block_on(async {
        let ops = async_nats::ConnectOptions::with_user_and_password("ops".into(), "ops-pw".into())
            .connect(url.as_str())
            .await
            .expect("ops connects");
        for (service, endpoint) in [("callbus", "call.start"), ("callbus-bridge", "mi")] {
            let info = ops.request(format!("$SRV.INFO.{service}"), "".into()).await.expect("a service answers ops");
            let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("info");
            let names: Vec<&str> =
                info["endpoints"].as_array().expect("endpoints").iter().filter_map(|e| e["name"].as_str()).collect();
            assert!(names.contains(&endpoint), "{service}: {names:?}");
        }
        let refused = ops.request("callbus.cmd.call.list", "{}".into()).await;
        assert!(refused.is_err(), "ops may not send commands: {refused:?}");
    });
    drop(sim);
}
