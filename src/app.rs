//! The proxy's shared state: configuration, clock, cache, query statuses, metrics, the partition
//! keyer, and the [`Engine`] that does every upstream call about an insight.

use std::sync::Arc;

use crate::cache::{InsightCache, PartitionKeyer, L2};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::status::StatusRegistry;
use crate::upstream::UpstreamClient;

pub struct App {
    pub config: Arc<Config>,
    pub clock: Clock,
    pub cache: Arc<InsightCache>,
    pub statuses: Arc<StatusRegistry>,
    pub metrics: Arc<Metrics>,
    pub keyer: PartitionKeyer,
    pub engine: Arc<Engine>,
}

impl App {
    pub fn new(config: Arc<Config>, clock: Clock, upstream: UpstreamClient) -> Arc<App> {
        let metrics = Arc::new(Metrics::new());
        let evictions = metrics.evictions.clone();
        let hook: crate::cache::EvictionHook = Arc::new(move |cause| evictions.with_label_values(&[cause]).inc());
        let l2 = config.l2.clone().and_then(|s| {
            // Configuration requires the secret with [l2]: it derives the values' MAC key.
            let Some(secret) = config.partition_secret.as_deref() else {
                tracing::error!("[l2] needs cache.partition_secret; running without the shared tier");
                return None;
            };
            match L2::new(s, secret, metrics.l2().rejected.clone()) {
                Ok(l2) => Some(l2),
                Err(e) => {
                    tracing::error!(error = %e, "the [l2] url is unusable; running without the shared tier");
                    None
                }
            }
        });
        crate::cache::sealed::configure(config.sendfile_min_bytes, config.sendfile_max_files, &config.sendfile_files);
        let cache = Arc::new(
            InsightCache::new(config.cache_max_bytes, config.cache_ttl, Some(hook))
                .with_page_ttl(config.list_page_ttl)
                .with_l2(l2, clock.clone()),
        );
        let statuses =
            Arc::new(StatusRegistry::new(config.status_ttl, config.status_max_records, config.status_max_bytes));
        let keyer = PartitionKeyer::new(config.partition_secret.as_deref());
        let engine = Engine::new(
            config.clone(),
            clock.clone(),
            cache.clone(),
            statuses.clone(),
            metrics.clone(),
            keyer.clone(),
            upstream,
        );
        Arc::new(App { config, clock, cache, statuses, metrics, keyer, engine })
    }
}
