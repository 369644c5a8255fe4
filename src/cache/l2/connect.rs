//! Reaching the shared tier wherever it lives ([`Target`]).
//!
//! [`Connection`] is the one handle every command goes through, whatever the topology; it
//! implements `redis::aio::ConnectionLike`, so other shared-tier users can run their own commands
//! on it.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::redis_target::Target;

impl Target {
    /// Opens the connection every command uses (it reconnects by itself).
    pub async fn connect(&self, timeout: Duration) -> redis::RedisResult<Connection> {
        match self {
            Target::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                let client = redis::Client::open(url.as_str())?;
                Ok(Connection::Single(ConnectionManager::new_with_config(client, config).await?))
            }
            Target::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
            Target::Sentinel { .. } => {
                let sentinel = SentinelConnection {
                    client: Arc::new(tokio::sync::Mutex::new(self.sentinel()?)),
                    timeout,
                    current: Arc::default(),
                };
                sentinel.current().await?;
                Ok(Connection::Sentinel(sentinel))
            }
        }
    }

    fn sentinel(&self) -> redis::RedisResult<SentinelClient> {
        let Target::Sentinel { sentinels, master, db, user, password } = self else {
            unreachable!("only called for a Sentinel target")
        };
        let addrs = sentinels.iter().map(|(h, p)| redis::ConnectionAddr::Tcp(h.clone(), *p));
        let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?.set_client_to_redis_db(*db);
        if let Some(u) = user {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = password {
            b = b.set_client_to_redis_password(p);
        }
        b.build()
    }

    /// A pub/sub session. On a cluster, `PUBLISH` reaches every node's subscribers, so one
    /// reachable seed node is enough.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match self {
            Target::Single(url) => redis::Client::open(url.as_str())?.get_async_pubsub().await,
            Target::Cluster(nodes) => {
                let mut last = None;
                for node in nodes {
                    match redis::Client::open(node.as_str())?.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| (redis::ErrorKind::InvalidClientConfig, "no cluster node").into()))
            }
            Target::Sentinel { .. } => self.sentinel()?.async_get_client().await?.get_async_pubsub().await,
        }
    }
}

/// The shared tier's connection, whatever the topology. Cheap to clone; commands on clones share
/// the same underlying connections.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Sentinel(c) => c.get_db(),
        }
    }
}

/// A connection to the master the Sentinels name, asked again after a connection error (the
/// master may have failed over).
#[derive(Clone)]
pub struct SentinelConnection {
    client: Arc<tokio::sync::Mutex<SentinelClient>>,
    timeout: Duration,
    current: Arc<parking_lot::Mutex<Option<MultiplexedConnection>>>,
}

impl SentinelConnection {
    async fn current(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self.client.lock().await.get_async_connection_with_config(&config).await?;
        *self.current.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the master after an error that may mean it moved (a dropped connection, or a
    /// demoted master refusing writes).
    fn check<T>(&self, r: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &r {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.code() == Some("READONLY") {
                *self.current.lock() = None;
            }
        }
        r
    }
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut c = self.current().await?;
            let r = c.req_packed_command(cmd).await;
            self.check(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut c = self.current().await?;
            let r = c.req_packed_commands(pipeline, offset, count).await;
            self.check(r)
        })
    }

    fn get_db(&self) -> i64 {
        self.current.lock().as_ref().map_or(0, |c| c.get_db())
    }
}
