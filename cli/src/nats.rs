//! Connecting to NATS, and starting a local nats-server for `callbus up` when none answers.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A nats-server started by callbus; killed when dropped.
pub struct LocalNats(Child);

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host:port of a `nats://host:port` URL.
fn address(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.rsplit('@').next().unwrap_or(rest).split(['/', ',']).next().unwrap_or(rest);
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:4222") };
    hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve the NATS address in {url:?}"))?
        .next()
        .with_context(|| format!("no address for {url:?}"))
}

/// What listens at a NATS address.
#[derive(Debug, PartialEq)]
enum Listener {
    /// Nothing accepts connections there.
    Nothing,
    /// A NATS server: it greets with an `INFO` line.
    Nats,
    /// Something that is not a NATS server (what it said first, if anything).
    Other(String),
}

fn probe(addr: SocketAddr) -> Listener {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return Listener::Nothing;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 64];
    match stream.read(&mut first) {
        Ok(n) if first[..n].starts_with(b"INFO ") => Listener::Nats,
        Ok(0) | Err(_) => Listener::Other("nothing: it accepted the connection and said no INFO line".into()),
        Ok(n) => Listener::Other(format!("{:?}", String::from_utf8_lossy(&first[..n.min(32)]))),
    }
}

fn answers(addr: SocketAddr) -> bool {
    probe(addr) == Listener::Nats
}

fn nats_server_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("nats-server")).find(|p| p.is_file())
}

/// Makes sure a NATS server answers at `url`: when none does and the address is on this
/// machine, starts `nats-server` as a child process.
pub fn ensure_local(url: &str) -> anyhow::Result<Option<LocalNats>> {
    let addr = address(url)?;
    match probe(addr) {
        Listener::Nats => return Ok(None),
        Listener::Other(said) => bail!(
            "something listens at {addr} but it is not a NATS server (it said {said}): stop it, or point --nats at a NATS server"
        ),
        Listener::Nothing => {}
    }
    if !addr.ip().is_loopback() {
        bail!("no NATS server answers at {url}; start one there or point --nats at one");
    }
    let Some(binary) = nats_server_binary() else {
        bail!(
            "no NATS server answers at {url} and nats-server is not installed: install it (`apt-get install -y nats-server`) or point --nats at a running server"
        );
    };
    tracing::info!(binary = %binary.display(), %addr, "no NATS server answers: starting nats-server as a child process");
    // Its own process group: Ctrl-C in a terminal (or a signal to `up`'s group) reaches `up`,
    // which drains through it and then stops it, not both at once.
    let child = Command::new(&binary)
        .process_group(0)
        .args(["-a", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let local = LocalNats(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers(addr) {
        if Instant::now() > deadline {
            bail!("started {} but it does not answer at {addr} after 10 s", binary.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(local))
}

/// How to authenticate to NATS and secure the connection. Each field is a flag, a
/// `CALLBUS_NATS_*` variable and (for `up`, `bridge`, `engine`) a `nats_*` configuration key.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsAuth {
    /// NATS user name (with --nats-password).
    #[arg(long = "nats-user", env = "CALLBUS_NATS_USER")]
    pub user: Option<String>,
    /// NATS password.
    #[arg(long = "nats-password", env = "CALLBUS_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// NATS authentication token.
    #[arg(long = "nats-token", env = "CALLBUS_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// NKey seed (`SU…`) to sign the server's challenge with.
    #[arg(long = "nats-nkey", env = "CALLBUS_NATS_NKEY", hide_env_values = true)]
    pub nkey: Option<String>,
    /// Credentials file (JWT and NKey seed, from `nsc`).
    #[arg(long = "nats-creds", env = "CALLBUS_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with; turns TLS on.
    #[arg(long = "nats-ca", env = "CALLBUS_NATS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --nats-key).
    #[arg(long = "nats-cert", env = "CALLBUS_NATS_CERT")]
    pub cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long = "nats-key", env = "CALLBUS_NATS_KEY")]
    pub key: Option<PathBuf>,
}

impl NatsAuth {
    /// The same with secrets replaced by `***`, for showing.
    pub fn masked(&self) -> NatsAuth {
        let hide = |s: &Option<String>| s.as_ref().map(|_| "***".to_owned());
        NatsAuth { password: hide(&self.password), token: hide(&self.token), nkey: hide(&self.nkey), ..self.clone() }
    }

    /// Applies the options; a missing file or a half-given pair is an error naming it.
    pub async fn apply(&self, mut options: async_nats::ConnectOptions) -> anyhow::Result<async_nats::ConnectOptions> {
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => options = options.user_and_password(u.clone(), p.clone()),
            (Some(_), None) => bail!("--nats-user needs --nats-password (CALLBUS_NATS_PASSWORD)"),
            (None, Some(_)) => bail!("--nats-password needs --nats-user (CALLBUS_NATS_USER)"),
            (None, None) => {}
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey {
            options = options.nkey(seed.clone());
        }
        if let Some(creds) = &self.creds {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("cannot read the NATS credentials file {}", creds.display()))?;
        }
        if let Some(ca) = &self.ca {
            if !ca.is_file() {
                bail!("the NATS CA certificate {} does not exist (--nats-ca)", ca.display());
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                for f in [cert, key] {
                    if !f.is_file() {
                        bail!("{} does not exist (--nats-cert / --nats-key)", f.display());
                    }
                }
                options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
            }
            (None, None) => {}
            _ => bail!("--nats-cert and --nats-key go together"),
        }
        Ok(options)
    }
}

/// The servers of a URL list: `nats://a:4222,nats://b:4222` (a cluster: the client moves to
/// another when one goes).
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().with_context(|| format!("bad NATS URL {}", mask_url(u))))
        .collect()
}

/// Connects to NATS, retrying in the background if it is down (the bridge keeps working and
/// buffers meanwhile).
pub async fn connect(url: &str, name: &str, auth: &NatsAuth) -> anyhow::Result<async_nats::Client> {
    let url_for_log = mask_url(url);
    // Retrying forever makes sense for a NATS server that is down, not for another program on
    // its port: say that at once (one server named; a cluster's list is not probed).
    if !url.contains(',') {
        if let Ok(addr) = address(url) {
            if let Listener::Other(said) = tokio::task::spawn_blocking(move || probe(addr)).await? {
                bail!("something listens at {addr} but it is not a NATS server (it said {said}): stop it, or point --nats at a NATS server");
            }
        }
    }
    auth.apply(async_nats::ConnectOptions::new())
        .await?
        .name(name)
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempt| Duration::from_millis((100 * attempt as u64).min(2000)))
        .event_callback(move |event| {
            let url = url_for_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics::counter!("callbus_nats_connects_total").increment(1);
                        tracing::info!(%url, "connected to NATS")
                    }
                    async_nats::Event::Disconnected if CLOSING.load(std::sync::atomic::Ordering::Relaxed) => {
                        tracing::debug!(%url, "disconnected from NATS while stopping")
                    }
                    async_nats::Event::Disconnected => {
                        metrics::counter!("callbus_nats_disconnects_total").increment(1);
                        tracing::warn!(%url, "disconnected from NATS: reconnecting")
                    }
                    // E.g. a publish or subscription this user's permissions refuse: the
                    // server says so only in this asynchronous error, so say it loudly.
                    async_nats::Event::ServerError(error) => {
                        metrics::counter!("callbus_nats_server_errors_total").increment(1);
                        tracing::error!(%url, %error, "the NATS server refused an operation of this connection: check this user's permissions (docs/examples/nats-permissions.conf)")
                    }
                    other => tracing::info!(%url, event = %other, "NATS"),
                }
            }
        })
        .connect(server_addrs(url)?)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", mask_url(url)))
}

/// Set when this process is stopping: the nats-server it started goes away on purpose.
static CLOSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that this process is stopping, so losing NATS from now on is expected, not a warning.
pub fn closing() {
    CLOSING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Connects to NATS for a client command, failing fast when nothing answers.
pub async fn connect_client(url: &str, auth: &NatsAuth) -> anyhow::Result<async_nats::Client> {
    let options = auth.apply(async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3))).await?;
    let shown = mask_url(url);
    options.connect(server_addrs(url)?).await.with_context(|| {
        format!("cannot connect to NATS at {shown}: is it running, and are the credentials right? (--nats, --nats-*)")
    })
}

/// `nats://user:secret@host` → `nats://user:***@host` (each URL of a comma-separated list).
pub fn mask_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(mask_url).collect::<Vec<_>>().join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                // A bare token in the user part is a secret too.
                format!("{scheme}://***@{host}")
            }
        }
        None => url.to_owned(),
    }
}
