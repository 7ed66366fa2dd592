//! The `tern` command (clap): `tern broker`, `tern passwd`, `tern pub`, `tern sub`,
//! `tern bench`, `tern ctl` and `tern completions SHELL`. Every subcommand answers `--help`; `pub`,
//! `sub` and `bench` keep Mosquitto's `-h HOST` and `-V VERSION`, so there `--help` alone
//! asks for help. A usage error names the flag and exits 2.

mod bench;
mod bridges;
mod config;
mod ctl;
mod pubsub;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern: an MQTT broker that acknowledges only what is durable",
    after_help = "Each command's own flags: tern COMMAND --help"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker
    Broker(BrokerArgs),
    /// Add, change or delete a user in a password file
    Passwd(PasswdArgs),
    /// Publish messages (mosquitto_pub's flags)
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Pub(pubsub::PubCli),
    /// Subscribe and print messages (mosquitto_sub's flags)
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Sub(pubsub::SubCli),
    /// Load any MQTT broker and count loss, duplicates and reordering
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Bench(bench::BenchCli),
    /// The admin API from the command line: sessions, retained messages, actions
    Ctl(ctl::CtlCli),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
#[command(
    after_help = "Defaults: every setting's default, 127.0.0.1:1883, ./tern-data, \
    durability sync, metrics on 127.0.0.1:9090 (docs/configuration.md)"
)]
struct BrokerArgs {
    /// The configuration file (TOML)
    #[arg(long, value_name = "FILE")]
    config: Option<String>,
    /// The first listener's address
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Where the store lives
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// The metrics and health endpoint's address, or `off`
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<String>,
    /// Check FILE (and the files it names) and exit
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "bind", "data_dir", "metrics"])]
    check_config: Option<String>,
    /// Be a node of a cluster on these NATS servers (nats://HOST:PORT[,...]; docs/cluster.md)
    #[arg(long, value_name = "URLS")]
    cluster: Option<String>,
}

#[derive(clap::Args)]
#[command(after_help = "Without -b or -D the password is read from stdin.")]
struct PasswdArgs {
    /// Take the password from the command line
    #[arg(short = 'b', requires = "password", conflicts_with = "delete")]
    batch: bool,
    /// Delete the user
    #[arg(short = 'D')]
    delete: bool,
    /// The password file
    file: String,
    /// The user
    user: String,
    /// The password (with -b)
    password: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let a = match cli.command {
        Command::Broker(a) => a,
        Command::Passwd(a) => return passwd(a),
        Command::Pub(a) => return pubsub::publish(a),
        Command::Sub(a) => return pubsub::subscribe(a),
        Command::Bench(a) => return bench::run(a),
        Command::Ctl(a) => return ctl::run(a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tern", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
    };
    if let Some(path) = &a.check_config {
        return check_config(path);
    }
    let (bind, config_path, data_dir, metrics_bind) = (a.bind, a.config, a.data_dir, a.metrics);
    let file = match &config_path {
        None => config::File::default(),
        Some(path) => match read_config(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("tern broker: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut file = file;
    if let Some(urls) = &a.cluster {
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
        let table = file
            .cluster
            .get_or_insert_with(config::ClusterTable::default);
        table.nats_urls = urls;
        if let Err(e) = file.check_cluster() {
            eprintln!("tern broker: --cluster: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(bind) = bind {
        // --bind: the first listener's address.
        file.listener[0].bind = bind;
    }
    match metrics_bind.as_deref() {
        None => {}
        Some("off") => file.metrics.enabled = false,
        Some(addr) if addr.parse::<std::net::SocketAddr>().is_ok() => {
            file.metrics.enabled = true;
            file.metrics.bind = addr.to_string();
        }
        Some(other) => {
            eprintln!("tern broker: --metrics '{other}' is neither an address nor 'off'");
            return ExitCode::from(2);
        }
    }
    let access = match load_access(&file.auth) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tern broker: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir =
        std::path::PathBuf::from(data_dir.unwrap_or_else(|| file.storage.data_dir.clone()));
    let settings = file.settings();
    let log_filter = init_logging(&file.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match tls_configs(&file.listener) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tern broker: {e}");
            return ExitCode::from(2);
        }
    };
    // Shared with the listeners: SIGHUP replaces what they hold.
    let tls_in_force = tls.clone();
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        // The endpoint comes up first, so /readyz says "not ready" while the store loads.
        let monitor = tern_broker::server::Monitor::new();
        monitor.set_admin_token(file.admin.token.clone().filter(|t| !t.is_empty()));
        let (monitor_stop, monitor_stopped) = tokio::sync::oneshot::channel::<()>();
        let monitor_task = if file.metrics.enabled {
            let socket = match tokio::net::TcpListener::bind(&file.metrics.bind).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "tern broker: cannot listen on {} for metrics: {e} (set [metrics] bind, or --metrics off)",
                        file.metrics.bind
                    );
                    return ExitCode::FAILURE;
                }
            };
            if let Ok(a) = socket.local_addr() {
                tracing::info!("tern broker metrics on http://{a}/metrics (health: /healthz, /readyz)");
            }
            Some(tokio::spawn(tern_broker::server::serve_monitor(
                socket,
                monitor.clone(),
                async {
                    let _ = monitor_stopped.await;
                },
            )))
        } else {
            None
        };
        let mut listeners = Vec::new();
        for (l, tls) in file.listener.iter().zip(tls) {
            let socket = match tokio::net::TcpListener::bind(&l.bind).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tern broker: cannot listen on {}: {e}", l.bind);
                    return ExitCode::FAILURE;
                }
            };
            listeners.push(listener(l, socket, tls, file.auth.allow_anonymous));
        }
        let persistence = match open_store(&data_dir, &file.storage) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tern broker: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| match l.socket.local_addr() {
                Ok(a) => format!("{a} ({})", l.transport.name()),
                Err(_) => l.transport.name().to_string(),
            })
            .collect();
        let addr = addrs.join(", ");
        let durability = file.storage.durability;
        match &persistence {
            Some(_) => tracing::info!(
                "tern broker listening on {addr} (state in {}, durability {})",
                data_dir.display(),
                format!("{durability:?}").to_lowercase()
            ),
            None => tracing::info!(
                "tern broker listening on {addr} (state in memory only, durability none)"
            ),
        }
        // Bridges reach this broker at its first TCP listener, on loopback.
        let local = listeners
            .iter()
            .find(|l| l.transport.name() == "tcp")
            .and_then(|l| l.socket.local_addr().ok())
            .map(|a| {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                    }
                    std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                        std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                    }
                    ip => ip,
                };
                std::net::SocketAddr::new(ip, a.port()).to_string()
            });
        let mut bridges = Vec::new();
        for b in &file.bridges {
            let local = match (&b.local_address, &local) {
                (Some(a), _) => a.clone(),
                (None, Some(l)) => l.clone(),
                (None, None) => {
                    eprintln!(
                        "tern broker: bridge '{}': no TCP listener to reach this broker by; set local_address",
                        b.name
                    );
                    return ExitCode::from(2);
                }
            };
            match bridges::bridge(b, &data_dir, &local) {
                Ok(bridge) => bridges.push(bridge),
                Err(e) => {
                    eprintln!("tern broker: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        if !bridges.is_empty()
            && let Err(e) = std::fs::create_dir_all(&data_dir)
        {
            eprintln!("tern broker: cannot create {}: {e}", data_dir.display());
            return ExitCode::FAILURE;
        }
        let (stop_bridges, bridges_stop) = tokio::sync::watch::channel(false);
        let mut bridge_tasks = Vec::new();
        let mut bridge_stats = Vec::new();
        for bridge in bridges {
            let stats = std::sync::Arc::new(tern_client::bridge::BridgeStats::default());
            bridge_stats.push((bridge.name.clone(), stats.clone()));
            let mut stop = bridges_stop.clone();
            let name = bridge.name.clone();
            tracing::info!(
                bridge = %name,
                remote = %format!("{}:{}", bridge.remote.host, bridge.remote.port),
                "bridge starting"
            );
            bridge_tasks.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = bridge.run(stats, stopped).await {
                    tracing::error!(bridge = %name, error = %e, "the bridge stopped");
                }
            }));
        }
        if !bridge_stats.is_empty() {
            monitor.add_metrics(Box::new(move |out| bridges::render(&bridge_stats, out)));
        }
        // On shutdown the bridges disconnect first (keeping their sessions), then the
        // server stops.
        let shutdown = async move {
            shutdown.await;
            let _ = stop_bridges.send(true);
            for task in bridge_tasks {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
            }
        };
        let control = tern_broker::server::AccessControl::new(access);
        let certificates = file
            .listener
            .iter()
            .zip(&tls_in_force)
            .filter_map(|(l, t)| t.clone().map(|t| (l.clone(), t)))
            .collect();
        reload_on_hangup(
            control.clone(),
            file.auth.clone(),
            config_path.clone(),
            log_filter,
            certificates,
        );
        let server = tern_broker::server::Server {
            listeners,
            settings,
            persistence,
            access: control,
            max_connections: (file.limits.max_connections > 0)
                .then_some(file.limits.max_connections),
            monitor,
            sys_interval: (file.sys.interval_secs > 0)
                .then(|| std::time::Duration::from_secs(file.sys.interval_secs)),
            cluster: file.cluster.as_ref().map(|c| c.link_config()),
        };
        let result = tern_broker::server::run(server, shutdown).await;
        let _ = monitor_stop.send(());
        if let Some(task) = monitor_task {
            let _ = task.await;
        }
        match result {
            Ok(()) => {}
            Err(tern_broker::server::ServerError::Load(e)) => {
                eprintln!(
                    "tern broker: cannot load the stored state from {}: {e}",
                    data_dir.display()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                // Fail-stop: a supervisor (systemd's Restart=on-failure) starts it again,
                // from the store.
                eprintln!("tern broker: {e}: exiting");
                return ExitCode::FAILURE;
            }
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Each TLS listener's certificates, loaded before anything starts.
fn tls_configs(
    listeners: &[config::Listener],
) -> Result<Vec<Option<tern_broker::server::Tls>>, String> {
    use std::path::Path;
    listeners
        .iter()
        .map(|l| match (&l.cert_file, &l.key_file) {
            (Some(cert), Some(key)) => {
                let files = tern_broker::server::TlsFiles {
                    cert: Path::new(cert),
                    key: Path::new(key),
                    client_ca: l.ca_file.as_deref().map(Path::new),
                    require_client_cert: l.require_certificate,
                    crl: l.crl_file.as_deref().map(Path::new),
                };
                tern_broker::server::Tls::load(&files)
                    .map(Some)
                    .map_err(|e| format!("listener {}: {e}", l.bind))
            }
            _ => Ok(None),
        })
        .collect()
}

/// One configured listener on its bound socket.
fn listener(
    l: &config::Listener,
    socket: tokio::net::TcpListener,
    tls: Option<tern_broker::server::Tls>,
    anonymous: Option<bool>,
) -> tern_broker::server::Listener {
    use config::TransportKind;
    use tern_broker::server::Transport;
    let path = l.path.clone();
    let transport = match (l.transport, tls) {
        (TransportKind::Tls, Some(tls)) => Transport::Tls(tls),
        (TransportKind::Wss, Some(tls)) => Transport::Wss { tls, path },
        (TransportKind::Ws, _) => Transport::Ws { path },
        // Checked when the file was parsed: TLS transports have their certificates.
        _ => Transport::Tcp,
    };
    // Anonymous clients: as the listener says, else as [auth] says, else only on loopback
    // (Mosquitto 2's local-only default).
    let loopback = socket.local_addr().is_ok_and(|a| a.ip().is_loopback());
    tern_broker::server::Listener {
        socket,
        transport,
        max_connections: (l.max_connections > 0).then_some(l.max_connections),
        allow_anonymous: Some(l.allow_anonymous.or(anonymous).unwrap_or(loopback)),
        cert_username: l.use_identity_as_username,
        write_coalesce: (l.write_coalesce_us > 0)
            .then(|| std::time::Duration::from_micros(u64::from(l.write_coalesce_us))),
    }
}

/// The password file and ACL named in `[auth]`. Anonymous access is decided per listener.
fn load_access(auth: &config::Auth) -> Result<tern_broker::auth::Access, String> {
    let passwords = match &auth.password_file {
        Some(path) => Some(tern_broker::auth::PasswordFile::load(
            std::path::Path::new(path),
        )?),
        None => None,
    };
    let acl = match &auth.acl_file {
        Some(path) => Some(std::sync::Arc::new(tern_broker::acl::load(
            std::path::Path::new(path),
        )?)),
        None => None,
    };
    Ok(tern_broker::auth::Access {
        passwords,
        allow_anonymous: false,
        acl,
    })
}

/// The configuration file at `path`, checked; the error names the file.
fn read_config(path: &str) -> Result<config::File, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    config::File::parse(&text).map_err(|e| format!("{path}: {e}"))
}

/// `tern broker --check-config FILE`: everything startup reads (the file, certificates,
/// password file, ACL) without starting; exit 0 if it would start, 2 with the problem.
fn check_config(path: &str) -> ExitCode {
    let checked = read_config(path).and_then(|file| {
        tls_configs(&file.listener)?;
        let access = load_access(&file.auth)?;
        Ok((file, access))
    });
    match checked {
        Ok((file, access)) => {
            let listeners: Vec<String> = file
                .listener
                .iter()
                .map(|l| {
                    format!(
                        "{} ({})",
                        l.bind,
                        format!("{:?}", l.transport).to_lowercase()
                    )
                })
                .collect();
            println!(
                "{path}: OK: listeners {}; metrics {}; {} users; ACL {}",
                listeners.join(", "),
                if file.metrics.enabled {
                    file.metrics.bind.as_str()
                } else {
                    "off"
                },
                access.passwords.as_ref().map_or(0, |p| p.len()),
                if access.acl.is_some() {
                    "loaded"
                } else {
                    "none"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern broker: {e}");
            ExitCode::from(2)
        }
    }
}

type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Logs as `[log]` says (RUST_LOG, when set, chooses the levels instead); the handle
/// changes the levels later (SIGHUP).
fn init_logging(log: &config::Log) -> LogFilter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        config::LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .init(),
        // Colours only for a terminal: log files and journald get plain text.
        config::LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init(),
    }
    handle
}

/// SIGHUP reads the password file and ACL again and puts them in force without dropping
/// anyone, reads each TLS listener's certificate, key, CA and revocation list files again
/// for the connections that come next (a renewed certificate needs no restart), and
/// applies the config file's `[[topic]]` policies and `[log] level` (unless RUST_LOG is
/// set); a file that no longer
/// parses or loads is reported and what was in force stays.
fn reload_on_hangup(
    control: tern_broker::server::AccessControl,
    auth: config::Auth,
    config_path: Option<String>,
    log_filter: LogFilter,
    certificates: Vec<(config::Listener, tern_broker::server::Tls)>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler: no reload");
            return;
        };
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if let Some(path) = &config_path {
                    match read_config(path) {
                        Ok(file) => {
                            let topics = file.topic_policies().unwrap_or_default();
                            tracing::info!(
                                policies = topics.len(),
                                "SIGHUP: topic policies reloaded"
                            );
                            control.replace_topic_policies(topics);
                            if std::env::var_os("RUST_LOG").is_none() {
                                let filter = tracing_subscriber::EnvFilter::new(&file.log.level);
                                match log_filter.reload(filter) {
                                    Ok(()) => {
                                        tracing::info!(level = %file.log.level, "SIGHUP: log levels reloaded")
                                    }
                                    Err(e) => {
                                        tracing::error!("SIGHUP: log levels not changed: {e}")
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!("SIGHUP: {e}; the topic policies and log levels stay")
                        }
                    }
                }
                match load_access(&auth) {
                    Ok(access) => {
                        tracing::info!(
                            users = access.passwords.as_ref().map_or(0, |p| p.len()),
                            acl = access.acl.is_some(),
                            "SIGHUP: password file and ACL reloaded"
                        );
                        control.replace(access);
                    }
                    Err(e) => tracing::error!("SIGHUP: {e}; the previous files stay in force"),
                }
                for (l, in_force) in &certificates {
                    match tls_configs(std::slice::from_ref(l)) {
                        Ok(loaded) => {
                            if let Some(Some(new)) = loaded.first() {
                                in_force.replace(new);
                                tracing::info!(listener = %l.bind, "SIGHUP: TLS certificates reloaded");
                            }
                        }
                        Err(e) => tracing::error!(
                            "SIGHUP: {e}; the listener keeps the certificates it had"
                        ),
                    }
                }
            }
        });
    }
}

/// `tern passwd`: adds, changes or deletes a user in a password file (created if missing),
/// like `mosquitto_passwd`.
fn passwd(a: PasswdArgs) -> ExitCode {
    use tern_broker::auth::PasswordFile;
    if a.password.is_some() && !a.batch {
        eprintln!("tern passwd: a password on the command line needs -b");
        return ExitCode::from(2);
    }
    let mode = if a.delete {
        "delete"
    } else if a.batch {
        "batch"
    } else {
        "stdin"
    };
    let (path, user) = (std::path::Path::new(&a.file), a.user.as_str());
    let mut file = if path.exists() {
        match PasswordFile::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("tern passwd: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        PasswordFile::default()
    };
    let result = match mode {
        "delete" => {
            if file.remove(user) {
                Ok(())
            } else {
                Err(format!("no user {user:?} in {}", path.display()))
            }
        }
        "batch" => file.set(user, a.password.as_deref().unwrap_or_default().as_bytes()),
        _ => {
            eprint!("password for {user}: ");
            let mut line = String::new();
            match std::io::stdin().read_line(&mut line) {
                Ok(n) if n > 0 => {
                    let password = line.trim_end_matches(['\n', '\r']);
                    file.set(user, password.as_bytes())
                }
                _ => Err("no password on stdin".to_string()),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("tern passwd: {e}");
        return ExitCode::FAILURE;
    }
    // Written whole to a temporary file and renamed: a crash leaves the old file or the new.
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, file.to_text()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        eprintln!("tern passwd: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Opens (or creates) the store in `dir` as the storage settings say; `None` for
/// `durability = "none"`. An unreadable store is an error: Tern never starts empty over
/// existing data.
fn open_store(
    dir: &std::path::Path,
    storage: &config::Storage,
) -> Result<Option<tern_broker::server::Persistence>, String> {
    use config::Durability;
    if storage.durability == Durability::None {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
    let path = dir.join("tern.redb");
    let mut store = tern_store::RedbStore::open_with_cache(
        &path,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
        storage.cache_mb.max(1).saturating_mul(1 << 20),
    )
    .map_err(|e| format!("cannot open the store {}: {e}", path.display()))?;
    let flush_every = match storage.durability {
        Durability::Batched => {
            store.set_sync(tern_store::Sync::OnFlush);
            Some(std::time::Duration::from_millis(
                storage.flush_interval_ms.max(1),
            ))
        }
        _ => None,
    };
    Ok(Some(tern_broker::server::Persistence {
        store: Box::new(store),
        flush_every,
    }))
}

/// SIGINT or SIGTERM. The handlers are installed now, before the broker says it is
/// listening, so a signal sent as soon as it is up stops it cleanly instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // A write past the process's file size limit (RLIMIT_FSIZE) raises SIGXFSZ, which
        // would kill the broker; handled, the write fails with EFBIG instead and the store
        // treats it as a full disk (refuses, recovers when it can write again).
        if let Ok(mut xfsz) = signal(SignalKind::from_raw(25)) {
            tokio::spawn(async move {
                while xfsz.recv().await.is_some() {
                    tracing::warn!("a write passed the file size limit (SIGXFSZ)");
                }
            });
        }
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
