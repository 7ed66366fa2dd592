//! The `tern` command: `tern broker [--config FILE] [--bind ADDR]`.

mod config;

use std::process::ExitCode;

const USAGE: &str = "usage: tern broker [--config FILE] [--bind ADDR]   (default: every setting's default, 127.0.0.1:1883)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut bind = None;
    let mut config_path = None;
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
        let addr = listener.local_addr().map_or(bind.clone(), |a| a.to_string());
        tracing::info!("tern broker listening on {addr} (state in memory; durability arrives with the storage issue)");
        let store = Box::new(tern_store::MemoryStore::new());
        if let Err(e) = tern_broker::server::serve(listener, settings, store, shutdown).await {
            eprintln!("tern broker: cannot load the stored state: {e}");
            return ExitCode::FAILURE;
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
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
