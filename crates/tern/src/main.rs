//! The `tern` command: `tern broker [--config FILE] [--bind ADDR] [--data-dir DIR]`.

mod config;

use std::process::ExitCode;

const USAGE: &str = "usage: tern broker [--config FILE] [--bind ADDR] [--data-dir DIR]\n  defaults: every setting's default, 127.0.0.1:1883, ./tern-data, durability sync";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut bind = None;
    let mut config_path = None;
    let mut data_dir = None;
    match args.first().map(String::as_str) {
        Some("broker") => {}
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("tern: unknown command '{other}'\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match (arg.as_str(), rest.next()) {
            ("--bind", Some(addr)) => bind = Some(addr.clone()),
            ("--config", Some(path)) => config_path = Some(path.clone()),
            ("--data-dir", Some(dir)) => data_dir = Some(dir.clone()),
            (flag, _) => {
                eprintln!("tern broker: unknown or incomplete option '{flag}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let file = match &config_path {
        None => config::File::default(),
        Some(path) => match std::fs::read_to_string(path) {
            Err(e) => {
                eprintln!("tern broker: cannot read {path}: {e}");
                return ExitCode::from(2);
            }
            Ok(text) => match config::File::parse(&text) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("tern broker: {path}: {e}");
                    return ExitCode::from(2);
                }
            },
        },
    };
    let bind = bind.unwrap_or_else(|| file.listener.bind.clone());
    let data_dir =
        std::path::PathBuf::from(data_dir.unwrap_or_else(|| file.storage.data_dir.clone()));
    let settings = file.settings();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only for a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
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
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let listener = match tokio::net::TcpListener::bind(&bind).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tern broker: cannot listen on {bind}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let persistence = match open_store(&data_dir, &file.storage) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tern broker: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = listener
            .local_addr()
            .map_or(bind.clone(), |a| a.to_string());
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
        if let Err(e) = tern_broker::server::serve(listener, settings, persistence, shutdown).await
        {
            eprintln!(
                "tern broker: cannot load the stored state from {}: {e}",
                data_dir.display()
            );
            return ExitCode::FAILURE;
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
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
    let mut store = tern_store::RedbStore::open(
        &path,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
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
