//! The cluster's streams and KV buckets: made (or found) and watched, trying again until
//! NATS answers.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

/// The bucket `name` (one revision kept per key, `replicas` copies; entries older than
/// `max_age` go, if not zero), made if it is not there yet.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> kv::Store {
    loop {
        let made = match js.get_key_value(name).await {
            Ok(s) => Ok(s),
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: name.into(),
                    history: 1,
                    num_replicas: replicas.max(1),
                    max_age,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
        };
        match made {
            Ok(s) => return s,
            Err(e) => {
                tracing::warn!(error = %e, bucket = name, "a cluster bucket is not there yet: trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A watch of every key of `store`: its current entries, then each change.
/// [`watch_all`] that first gives the last value of every key (then each change).
pub(crate) async fn watch_all_with_history(store: &kv::Store) -> kv::Watch {
    loop {
        match store.watch_with_history(">").await {
            Ok(w) => return w,
            Err(e) => {
                tracing::warn!(error = %e, "watching a cluster bucket failed: trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

pub(crate) async fn watch_all(store: &kv::Store) -> kv::Watch {
    loop {
        match store.watch_all().await {
            Ok(w) => return w,
            Err(e) => {
                tracing::warn!(error = %e, "watching a cluster bucket failed: trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The stream `config` describes (`what` names it in logs), made if it is not there yet.
pub(crate) async fn stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
    what: &str,
) -> jetstream::stream::Stream {
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => return s,
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's {what} is not there yet: trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
