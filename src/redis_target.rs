//! Where the shared tier (and the shared budget) lives, from its `[l2] url`: one Redis (`redis://`, `rediss://`, `valkey://`), a
//! Redis Cluster (`redis+cluster://h1:p1,h2:p2,...`: seed nodes, the rest is discovered), or the
//! master a set of Sentinels names (`redis+sentinel://s1:p1,s2:p2/<master>[/<db>]`). Credentials,
//! when given (`user:password@` before the hosts), are for the data nodes. Pure: the
//! configuration checks URLs with it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One Redis (a `redis://` or `rediss://` URL, passed to the client as it is).
    Single(String),
    /// Seed nodes of a Redis Cluster, each as a `redis://` URL.
    Cluster(Vec<String>),
    /// Sentinels (host, port) watching `master`.
    Sentinel { sentinels: Vec<(String, u16)>, master: String, db: i64, user: Option<String>, password: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("must start with redis://, rediss://, valkey://, redis+cluster:// or redis+sentinel://")]
    Scheme,
    #[error("names no host")]
    NoHost,
    #[error("has a host without a valid port: {0:?}")]
    BadHost(String),
    #[error("must name the Sentinel master: redis+sentinel://host:port/<master>[/<db>]")]
    NoMaster,
    #[error("has a database that is not a number: {0:?}")]
    BadDb(String),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (userinfo, hosts, _) = split(rest);
            let nodes = hosts_of(hosts)?;
            let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            return Ok(Target::Cluster(nodes.into_iter().map(|(h, p)| format!("redis://{auth}{h}:{p}")).collect()));
        }
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (userinfo, hosts, path) = split(rest);
            let sentinels = hosts_of(hosts)?;
            let mut parts = path.split('/').filter(|s| !s.is_empty());
            let master = parts.next().ok_or(TargetError::NoMaster)?.to_string();
            let db = match parts.next() {
                Some(d) => d.parse().map_err(|_| TargetError::BadDb(d.to_string()))?,
                None => 0,
            };
            let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), (!p.is_empty()).then(|| p.to_string())),
                None => (None, None),
            };
            return Ok(Target::Sentinel { sentinels, master, db, user, password });
        }
        for scheme in ["redis://", "rediss://", "valkey://"] {
            if let Some(rest) = url.strip_prefix(scheme) {
                if split(rest).1.is_empty() {
                    return Err(TargetError::NoHost);
                }
                return Ok(Target::Single(url.replacen("valkey://", "redis://", 1)));
            }
        }
        Err(TargetError::Scheme)
    }
}

/// `[user:password@]hosts[/path]` → (userinfo, hosts, path).
fn split(rest: &str) -> (Option<&str>, &str, &str) {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts, path),
        None => (None, authority, path),
    }
}

fn hosts_of(hosts: &str) -> Result<Vec<(String, u16)>, TargetError> {
    let list: Vec<_> = hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
    if list.is_empty() {
        return Err(TargetError::NoHost);
    }
    list.into_iter()
        .map(|h| {
            let (host, port) = h.rsplit_once(':').ok_or_else(|| TargetError::BadHost(h.to_string()))?;
            let port = port.parse().map_err(|_| TargetError::BadHost(h.to_string()))?;
            if host.is_empty() {
                return Err(TargetError::BadHost(h.to_string()));
            }
            Ok((host.to_string(), port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_topology() {
        assert_eq!(Target::parse("redis://127.0.0.1:6379/0"), Ok(Target::Single("redis://127.0.0.1:6379/0".into())));
        assert_eq!(Target::parse("valkey://h:1"), Ok(Target::Single("redis://h:1".into())));
        assert_eq!(
            Target::parse("redis+cluster://:pw@h1:7000,h2:7001"),
            Ok(Target::Cluster(vec!["redis://:pw@h1:7000".into(), "redis://:pw@h2:7001".into()]))
        );
        assert_eq!(
            Target::parse("redis+sentinel://u:pw@s1:26379,s2:26380/mymaster/2"),
            Ok(Target::Sentinel {
                sentinels: vec![("s1".into(), 26379), ("s2".into(), 26380)],
                master: "mymaster".into(),
                db: 2,
                user: Some("u".into()),
                password: Some("pw".into()),
            })
        );
        assert_eq!(Target::parse("redis+sentinel://s1:26379"), Err(TargetError::NoMaster));
        assert_eq!(Target::parse("redis+sentinel://s1:26379/m/x"), Err(TargetError::BadDb("x".into())));
        assert_eq!(Target::parse("redis+cluster://h1"), Err(TargetError::BadHost("h1".into())));
        assert_eq!(Target::parse("redis+cluster://"), Err(TargetError::NoHost));
        assert_eq!(Target::parse("http://h:1"), Err(TargetError::Scheme));
    }
}
