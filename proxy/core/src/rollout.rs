//! Cluster-wide plugin rollout over gossip (`sluice plugin load --cluster`,
//! `POST /api/cluster/plugins/{pool}/{strategy|health}`).
//!
//! # What travels where
//! - **Gossip** carries small JSON state in every proxy's metadata, under the `"rollout"`
//!   extension ([`Published`]): the plugin each pool/kind should run cluster-wide
//!   ([`Announcement`]: pool, kind, version, sha256, config, holder) and this proxy's
//!   [`Outcome`] for each (ok, or why it refused).
//! - **The bytes** are fetched point to point over the authenticated TCP transport
//!   ([`crate::cluster::blobs`]), keyed by their sha256: first from the announcement's holder
//!   (the proxy that announced it), then from any proxy that reports it runs that sha256. They
//!   are checked against the announced sha256 before anything else looks at them, then
//!   validated and swapped through [`Runtime::swap_strategy`] / [`Runtime::swap_health`], the
//!   same path as an admin upload. Any refusal keeps the running version.
//!
//! # Which announcement wins
//! Per (pool, kind) the announcement with the highest `(version, sha256)` wins; the version is
//! the announcer's wall-clock milliseconds, raised above every version it has seen for that
//! pool and kind. Every proxy republishes the winners it knows, so the desired state survives
//! the announcer, and a proxy that joins (or restarts) later reads it from any member and
//! catches up. Nothing is persisted: when every proxy restarts, the config's plugins are back.
//!
//! # Local uploads
//! A plugin hot-loaded into one proxy (`PUT /api/pools/...`) or changed by a reload stays until
//! the next cluster announcement for that pool and kind; a proxy acts on each announcement
//! once (a fetch that found no holder is retried a few times), never re-imposes it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::cluster::blobs::{BlobKey, MAX_BLOB};
use crate::cluster::{ClusterHandle, MemberInfo, MemberState, NodeMeta, Role};
use crate::cold_lock::ColdLock;
use crate::runtime::Runtime;

/// The metadata extension holding a proxy's [`Published`] state.
pub const EXTENSION: &str = "rollout";
/// A fetch that found no holder is tried this many times in all.
const MAX_FETCH_ATTEMPTS: u32 = 5;
/// The longest a caller may wait for every proxy's result.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// A cluster-wide wait (a plugin rollout's, a key rotation's) as the CLI and the admin API take
/// it: a duration like "30s", more than zero and at most [`MAX_WAIT`].
pub fn parse_wait(raw: &str) -> Result<Duration, String> {
    match humantime::parse_duration(raw) {
        Ok(d) if !d.is_zero() && d <= MAX_WAIT => Ok(d),
        Ok(_) => Err(format!(
            "wait {raw} is out of range: give a duration above zero and at most {}s",
            MAX_WAIT.as_secs()
        )),
        Err(e) => Err(format!("wait {raw} is not a duration like \"30s\": {e}")),
    }
}

/// Which plugin of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// The strategy (picks the backend).
    Strategy,
    /// The health check.
    Health,
}

impl PluginKind {
    /// `"strategy"` or `"health"`.
    pub fn parse(s: &str) -> Option<PluginKind> {
        match s {
            "strategy" => Some(PluginKind::Strategy),
            "health" => Some(PluginKind::Health),
            _ => None,
        }
    }

    /// The name used in routes and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Strategy => "strategy",
            PluginKind::Health => "health",
        }
    }
}

/// "Every proxy should run this plugin for this pool", as gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The pool.
    pub pool: String,
    /// Strategy or health check.
    pub kind: PluginKind,
    /// Orders announcements for the same pool and kind; see the module docs.
    pub version: u64,
    /// Hex sha256 of the wasm bytes.
    pub sha256: String,
    /// The plugin's config (a JSON object); `None` keeps each pool's current config.
    pub config: Option<String>,
    /// Gossip address of the member that announced it and holds the bytes.
    pub holder: SocketAddr,
    /// Name of that member.
    pub by: String,
}

impl Announcement {
    fn target(&self) -> (&str, PluginKind) {
        (&self.pool, self.kind)
    }

    fn order(&self) -> (u64, &str) {
        (self.version, &self.sha256)
    }
}

/// A proxy's result for one announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The pool.
    pub pool: String,
    /// Strategy or health check.
    pub kind: PluginKind,
    /// The announcement's version.
    pub version: u64,
    /// The announcement's sha256.
    pub sha256: String,
    /// Why it was refused (the proxy kept its running version); `None` when it runs it.
    pub error: Option<String>,
}

impl Outcome {
    fn answers(&self, a: &Announcement) -> bool {
        self.pool == a.pool
            && self.kind == a.kind
            && self.version == a.version
            && self.sha256 == a.sha256
    }
}

/// What a proxy publishes under [`EXTENSION`].
///
/// On the wire: a format byte ([`FORMAT`]) then the postcard encoding of this struct (fields
/// by position, so any change to these types bumps [`FORMAT`]; a proxy ignores state in a
/// format it does not know). Compact on purpose: metadata above ~600 bytes no longer fits a
/// gossip datagram and every member then pulls it over TCP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The winning announcement of every pool and kind this proxy knows of.
    pub desired: Vec<Announcement>,
    /// Its result for the last announcement it acted on, per pool and kind.
    pub results: Vec<Outcome>,
}

/// Version of the encoding of [`Published`].
pub const FORMAT: u8 = 1;
/// Longest error text a proxy publishes (the rest is in its log).
const MAX_ERROR: usize = 240;

impl Published {
    /// The state a member published (empty if none, or in another format).
    pub fn of(meta: &NodeMeta) -> Published {
        match meta.extensions.get(EXTENSION).map(Vec::as_slice) {
            Some([FORMAT, rest @ ..]) => postcard::from_bytes(rest).unwrap_or_default(),
            _ => Published::default(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        out.extend(postcard::to_allocvec(self).expect("plain data serializes"));
        out
    }
}

// Cuts an error text to what gossip carries, at a character boundary.
fn clip(mut text: String) -> String {
    if text.len() > MAX_ERROR {
        let mut end = MAX_ERROR - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The winner per pool and kind among `all`, sorted by pool and kind.
pub fn winners<'a>(all: impl IntoIterator<Item = &'a Announcement>) -> Vec<Announcement> {
    let mut best: Vec<Announcement> = Vec::new();
    for a in all {
        match best.iter_mut().find(|b| b.target() == a.target()) {
            Some(b) if a.order() > b.order() => *b = a.clone(),
            Some(_) => {}
            None => best.push(a.clone()),
        }
    }
    best.sort_by(|a, b| a.target().cmp(&b.target()));
    best
}

/// One proxy's answer to an announcement, as the command prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// Member name.
    pub name: String,
    /// Gossip address.
    pub address: String,
    /// `"ok"`, `"rejected"` or `"no answer"`.
    pub result: &'static str,
    /// Why it rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn parse_sha256(s: &str) -> Option<BlobKey> {
    hex::decode(s).ok()?.try_into().ok()
}

struct Retry {
    attempts: u32,
    not_before: Instant,
}

#[derive(Default)]
struct Local {
    published: Published,
    // The encoding last handed to gossip, to skip identical updates.
    sent: Vec<u8>,
    // Announcements whose fetch found no holder, by (pool, kind, version, sha256).
    retries: HashMap<(String, PluginKind, u64, String), Retry>,
}

/// This proxy's part in cluster rollouts. Create it once the cluster member runs, spawn
/// [`Rollout::run`] on the cluster's runtime, and hand it to the admin API.
pub struct Rollout {
    handle: ClusterHandle,
    base: NodeMeta,
    local: ColdLock<Local>,
    wake: tokio::sync::Notify,
    options: RolloutOptions,
}

/// How a proxy takes part in rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutOptions {
    /// Apply the cluster's announcements (`[cluster] plugin_rollout`); when false every one
    /// is answered with a rejection that says why.
    pub accept: bool,
    /// Test hook: keep a damaged copy of every plugin this proxy announces, so that every
    /// proxy, this one included, must refuse it by its sha256.
    pub corrupt_announced: bool,
}

impl std::fmt::Debug for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollout")
            .field("node", &self.base.name)
            .finish()
    }
}

impl Rollout {
    /// The rollout of the member `handle`, whose metadata otherwise stays `base`.
    pub fn new(handle: ClusterHandle, base: NodeMeta, options: RolloutOptions) -> Arc<Rollout> {
        Arc::new(Rollout {
            handle,
            base,
            local: ColdLock::new(Local::default()),
            wake: tokio::sync::Notify::new(),
            options,
        })
    }

    /// Every announcement this proxy knows: its own desired state and every proxy's.
    fn known(&self, members: &[MemberInfo], local: &Local) -> Vec<Announcement> {
        members
            .iter()
            .filter(|m| !m.is_self && m.meta.role == Role::Proxy)
            .flat_map(|m| Published::of(&m.meta).desired)
            .chain(local.published.desired.iter().cloned())
            .collect()
    }

    /// Announces `bytes` as the plugin of `pool`/`kind` for the whole cluster and keeps them
    /// here for the others to fetch. Returns the announcement; [`Rollout::wait`] collects the
    /// proxies' results.
    pub fn announce(
        &self,
        pool: &str,
        kind: PluginKind,
        bytes: &[u8],
        config: Option<String>,
    ) -> Result<Announcement, String> {
        if bytes.is_empty() {
            return Err("empty plugin; send the .wasm bytes".into());
        }
        if bytes.len() > MAX_BLOB {
            return Err(format!(
                "the plugin is {} bytes; a cluster rollout carries at most {MAX_BLOB}",
                bytes.len()
            ));
        }
        let sha256 = sha256_hex(bytes);
        let key = parse_sha256(&sha256).expect("a sha256 is 32 bytes");
        let mut kept = bytes.to_vec();
        if self.options.corrupt_announced {
            if let Some(b) = kept.last_mut() {
                *b ^= 0xff;
            }
        }
        self.handle
            .blobs()
            .insert(key, Arc::from(kept))
            .map_err(|e| e.to_string())?;
        let members = self.handle.members_snapshot();
        let ann = {
            let mut local = self.local.lock();
            let seen = self
                .known(&members, &local)
                .iter()
                .filter(|a| a.target() == (pool, kind))
                .map(|a| a.version)
                .max()
                .unwrap_or(0);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let ann = Announcement {
                pool: pool.to_string(),
                kind,
                version: now.max(seen + 1),
                sha256,
                config,
                holder: self.handle.gossip_addr(),
                by: self.base.name.clone(),
            };
            local
                .published
                .desired
                .retain(|a| a.target() != (pool, kind));
            local.published.desired.push(ann.clone());
            local.published.desired = winners(&local.published.desired);
            ann
        };
        tracing::info!(pool, kind = kind.as_str(), sha256 = %ann.sha256, version = ann.version, "announced a plugin to the cluster");
        self.publish();
        self.wake.notify_one();
        Ok(ann)
    }

    /// Each live proxy's answer to `ann`, waiting up to `limit` (at most [`MAX_WAIT`]) for
    /// every one of them to answer.
    pub async fn wait(&self, ann: &Announcement, limit: Duration) -> Vec<NodeReport> {
        let deadline = Instant::now() + limit.min(MAX_WAIT);
        let mut changes = self.handle.changes();
        let mut expected = BTreeMap::new();
        loop {
            let reports = self.reports(ann, &mut expected);
            if reports.iter().all(|r| r.result != "no answer") || Instant::now() >= deadline {
                return reports;
            }
            // Our own result is not a membership change: look again at least every 100 ms.
            let next = deadline.min(Instant::now() + Duration::from_millis(100));
            if let Ok(Err(_)) = tokio::time::timeout_at(next, changes.changed()).await {
                // The member has stopped (shutdown): nothing more will arrive.
                return self.reports(ann, &mut expected);
            }
        }
    }

    /// Each live proxy's answer to `ann` as of now, this proxy first. `expected` collects the
    /// proxies seen alive across calls: a member whose new metadata is still on its way is
    /// briefly missing from the member list, and it still owes an answer.
    pub fn reports(
        &self,
        ann: &Announcement,
        expected: &mut BTreeMap<SocketAddr, String>,
    ) -> Vec<NodeReport> {
        let own = self.local.lock().published.results.clone();
        let members = self.handle.members_snapshot();
        for m in members.iter().filter(|m| m.meta.role == Role::Proxy) {
            if m.is_self || m.state == MemberState::Alive {
                expected.insert(m.gossip_addr, m.meta.name.clone());
            } else {
                expected.remove(&m.gossip_addr);
            }
        }
        let missing = expected
            .iter()
            .filter(|(addr, _)| !members.iter().any(|m| m.gossip_addr == **addr))
            .map(|(addr, name)| NodeReport {
                name: name.clone(),
                address: addr.to_string(),
                result: "no answer",
                error: None,
            });
        members
            .iter()
            .filter(|m| m.meta.role == Role::Proxy && (m.is_self || m.state == MemberState::Alive))
            .map(|m| {
                let results = if m.is_self {
                    own.clone()
                } else {
                    Published::of(&m.meta).results
                };
                let outcome = results.into_iter().find(|o| o.answers(ann));
                NodeReport {
                    name: m.meta.name.clone(),
                    address: m.gossip_addr.to_string(),
                    result: match &outcome {
                        None => "no answer",
                        Some(o) if o.error.is_none() => "ok",
                        Some(_) => "rejected",
                    },
                    error: outcome.and_then(|o| o.error),
                }
            })
            .chain(missing)
            .collect()
    }

    /// Follows the cluster's announcements until the process ends.
    pub async fn run(self: Arc<Self>, runtime: Arc<Runtime>) {
        let mut changes = self.handle.changes();
        loop {
            self.step(&runtime).await;
            // Also look again every second: retries are due by time, not by a change.
            tokio::select! {
                changed = changes.changed() => if changed.is_err() {
                    return; // the member has stopped (shutdown)
                },
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    // Adopts the winning announcements and acts on those not answered yet.
    async fn step(&self, runtime: &Arc<Runtime>) {
        let members = self.handle.members_snapshot();
        let todo: Vec<Announcement> = {
            let mut local = self.local.lock();
            let desired = winners(&self.known(&members, &local));
            local.published.desired = desired.clone();
            let now = Instant::now();
            desired
                .into_iter()
                .filter(|a| {
                    let answered = local.published.results.iter().any(|o| o.answers(a));
                    let retry_due = local
                        .retries
                        .get(&(a.pool.clone(), a.kind, a.version, a.sha256.clone()))
                        .is_some_and(|r| r.attempts < MAX_FETCH_ATTEMPTS && now >= r.not_before);
                    !answered || retry_due
                })
                .collect()
        };
        self.publish();
        for a in todo {
            let (error, retryable) = match self.apply(runtime, &a, &members).await {
                Ok(()) => (None, false),
                Err((e, retryable)) => (Some(e), retryable),
            };
            match &error {
                None => {
                    tracing::info!(pool = %a.pool, kind = a.kind.as_str(), sha256 = %a.sha256, by = %a.by, "cluster plugin rollout applied")
                }
                Some(e) => {
                    tracing::warn!(pool = %a.pool, kind = a.kind.as_str(), sha256 = %a.sha256, by = %a.by, error = %e, "cluster plugin rollout refused; the running version stays")
                }
            }
            let mut local = self.local.lock();
            let key = (a.pool.clone(), a.kind, a.version, a.sha256.clone());
            if retryable {
                let r = local.retries.entry(key).or_insert(Retry {
                    attempts: 0,
                    not_before: Instant::now(),
                });
                r.attempts += 1;
                r.not_before = Instant::now() + Duration::from_secs(1 << r.attempts.min(5));
            } else {
                local.retries.remove(&key);
            }
            // Only the announcements still desired keep a retry entry.
            let desired = local.published.desired.clone();
            local.retries.retain(|(p, k, v, s), _| {
                desired
                    .iter()
                    .any(|d| (&d.pool, d.kind, d.version, &d.sha256) == (p, *k, *v, s))
            });
            local
                .published
                .results
                .retain(|o| (o.pool.as_str(), o.kind) != a.target());
            local.published.results.push(Outcome {
                pool: a.pool.clone(),
                kind: a.kind,
                version: a.version,
                sha256: a.sha256.clone(),
                error: error.map(clip),
            });
            local
                .published
                .results
                .sort_by(|x, y| (&x.pool, x.kind).cmp(&(&y.pool, y.kind)));
            drop(local);
            self.publish();
        }
    }

    // Fetches, checks, validates and swaps; the error says why and whether a later try may
    // do better (no holder answered).
    async fn apply(
        &self,
        runtime: &Arc<Runtime>,
        a: &Announcement,
        members: &[MemberInfo],
    ) -> Result<(), (String, bool)> {
        if !self.options.accept {
            return Err((
                "this proxy takes no plugins from the cluster ([cluster] plugin_rollout = false)"
                    .into(),
                false,
            ));
        }
        let bytes = self.fetch(a, members).await?;
        let (rt, pool, kind) = (runtime.clone(), a.pool.clone(), a.kind);
        let config = a.config.clone().map(|c| Arc::from(c.into_bytes()));
        let swap = tokio::task::spawn_blocking(move || {
            let r = match kind {
                PluginKind::Strategy => rt.swap_strategy(&pool, &bytes, config),
                PluginKind::Health => rt.swap_health(&pool, &bytes, config),
            };
            r.map(|_| bytes)
        })
        .await;
        match swap {
            Ok(Ok(bytes)) => {
                // Running it, so serve it: a proxy joining later may fetch it from us.
                let key = parse_sha256(&a.sha256).expect("checked by fetch");
                let _ = self.handle.blobs().insert(key, Arc::from(bytes));
                Ok(())
            }
            Ok(Err(e)) => Err((e.to_string(), false)),
            Err(e) => Err((format!("the swap task failed: {e}"), false)),
        }
    }

    // The announced bytes, from the holder or any proxy running them, checked by sha256.
    async fn fetch(
        &self,
        a: &Announcement,
        members: &[MemberInfo],
    ) -> Result<Vec<u8>, (String, bool)> {
        let key = parse_sha256(&a.sha256).ok_or_else(|| {
            (
                format!("the announced sha256 \"{}\" is not 64 hex digits", a.sha256),
                false,
            )
        })?;
        let own = self.handle.gossip_addr();
        let mut sources = Vec::new();
        if self.handle.blobs().contains(&key) {
            sources.push(own);
        }
        sources.push(a.holder);
        for m in members {
            let runs_it = || {
                Published::of(&m.meta)
                    .results
                    .iter()
                    .any(|o| o.sha256 == a.sha256 && o.error.is_none())
            };
            if m.meta.role == Role::Proxy
                && m.state == MemberState::Alive
                && !m.is_self
                && runs_it()
            {
                sources.push(m.gossip_addr);
            }
        }
        let mut seen = Vec::new();
        sources.retain(|s| {
            let first = !seen.contains(s);
            seen.push(*s);
            first
        });
        let mut errors = Vec::new();
        let mut mismatch = false;
        for from in sources {
            match self.handle.fetch_blob(from, &key).await {
                Ok(bytes) => {
                    let got = sha256_hex(&bytes);
                    if got == a.sha256 {
                        return Ok(bytes);
                    }
                    mismatch = true;
                    errors.push(format!(
                        "sha256 mismatch: the {} bytes from {from} hash to {got}, not to the announced {}",
                        bytes.len(),
                        a.sha256
                    ));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let why = errors.join("; ");
        if mismatch {
            Err((why, false))
        } else {
            Err((format!("no member served the plugin's bytes: {why}"), true))
        }
    }

    // Hands our desired state and results to gossip when they changed.
    fn publish(&self) {
        let mut local = self.local.lock();
        let encoded = local.published.encode();
        if encoded == local.sent {
            return;
        }
        let mut meta = self.base.clone();
        meta.extensions
            .insert(EXTENSION.to_string(), encoded.clone());
        if self.handle.set_meta(meta).is_ok() {
            local.sent = encoded;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_durations_above_zero_up_to_the_limit() {
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("5m"), Ok(MAX_WAIT));
        for (raw, says) in [
            ("0s", "out of range"),
            ("301s", "at most 300s"),
            ("forever", "not a duration"),
        ] {
            let e = parse_wait(raw).unwrap_err();
            assert!(e.contains(raw) && e.contains(says), "{raw}: {e}");
        }
    }

    fn ann(pool: &str, kind: PluginKind, version: u64, sha: &str) -> Announcement {
        Announcement {
            pool: pool.into(),
            kind,
            version,
            sha256: sha.into(),
            config: None,
            holder: "127.0.0.1:7946".parse().unwrap(),
            by: "p".into(),
        }
    }

    #[test]
    fn the_highest_version_then_sha_wins_per_pool_and_kind() {
        let all = [
            ann("web", PluginKind::Strategy, 5, "bb"),
            ann("web", PluginKind::Strategy, 7, "aa"),
            ann("web", PluginKind::Health, 9, "cc"),
            ann("api", PluginKind::Strategy, 7, "aa"),
            ann("api", PluginKind::Strategy, 7, "ab"),
            ann("web", PluginKind::Strategy, 6, "ff"),
        ];
        let won = winners(&all);
        let got: Vec<(&str, PluginKind, u64, &str)> = won
            .iter()
            .map(|a| (a.pool.as_str(), a.kind, a.version, a.sha256.as_str()))
            .collect();
        let want = [
            ("api", PluginKind::Strategy, 7, "ab"),
            ("web", PluginKind::Strategy, 7, "aa"),
            ("web", PluginKind::Health, 9, "cc"),
        ];
        assert_eq!(got, want);
        // The order of arrival does not matter.
        let mut rev = all.to_vec();
        rev.reverse();
        assert_eq!(winners(&rev), winners(&all));
    }

    #[test]
    fn published_state_round_trips_through_metadata() {
        let mut meta = NodeMeta::new("p", Role::Proxy);
        assert_eq!(Published::of(&meta), Published::default());
        let p = Published {
            desired: vec![ann("web", PluginKind::Strategy, 1, "aa")],
            results: vec![Outcome {
                pool: "web".into(),
                kind: PluginKind::Strategy,
                version: 1,
                sha256: "aa".into(),
                error: Some("no pool named \"web\"".into()),
            }],
        };
        meta.extensions.insert(EXTENSION.into(), p.encode());
        assert_eq!(Published::of(&meta), p);
        // One pool's announcement and result stay well within a datagram's metadata budget.
        assert!(p.encode().len() < 200, "{} bytes", p.encode().len());
        // Another format is ignored, not misread.
        let mut other = p.encode();
        other[0] = FORMAT + 1;
        meta.extensions.insert(EXTENSION.into(), other);
        assert_eq!(Published::of(&meta), Published::default());
        assert_eq!(clip("é".repeat(200)).len(), MAX_ERROR - 1);
        assert!(p.results[0].answers(&p.desired[0]));
        assert!(!p.results[0].answers(&ann("web", PluginKind::Strategy, 2, "aa")));
        assert_eq!(parse_sha256("zz"), None);
        assert_eq!(
            parse_sha256(&sha256_hex(b"x")).map(hex::encode),
            Some(sha256_hex(b"x"))
        );
    }
}
