//! One spawned instance: its child process ([`Child`], an owned value that kills the process
//! group when dropped) and the task that keeps it running ([`run`]).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::spec::{InstanceState, InstanceStatus, SpawnSpec};
use super::sys;
use crate::pool::Pool;

/// What the supervisor wants of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Keep it running (restart it when it exits).
    Run,
    /// Take it out of the pool, let its requests in flight finish, then stop it.
    Drain,
    /// Stop it now: SIGTERM, then SIGKILL after its grace (sluice is exiting).
    Stop,
    /// SIGKILL it now (a second SIGTERM to sluice).
    Kill,
}

/// Longest line of an instance's output re-logged as one line; longer ones are split.
const MAX_LINE: usize = 16 * 1024;
/// How often a starting instance's port is tried.
const READY_POLL: Duration = Duration::from_millis(50);
/// How often a draining instance's requests in flight are counted.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How long a SIGKILLed process may take to be reaped before it is given up on.
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// A running child process in a process group of its own. Dropping it before it was reaped
/// SIGKILLs the group; tokio reaps the process.
pub struct Child {
    child: tokio::process::Child,
    pid: u32,
    reaped: bool,
}

impl Child {
    /// Starts instance `n` of `spec`; its output is re-logged prefixed with `name`.
    pub fn start(spec: &SpawnSpec, n: u16, name: &str) -> std::io::Result<Child> {
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(&spec.env)
            .env("PORT", spec.addr(n).port().to_string())
            .env("SLUICE_INSTANCE", n.to_string())
            .current_dir(&spec.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        sys::contain(&mut cmd);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let name: Arc<str> = Arc::from(name);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(relog(name.clone(), out, "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(relog(name, err, "stderr"));
        }
        Ok(Child {
            child,
            pid,
            reaped: false,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit (cancel-safe); what is left of its group is killed then.
    pub async fn wait(&mut self) -> String {
        let status = self.child.wait().await;
        self.reaped();
        match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("cannot be waited for: {e}"),
        }
    }

    /// SIGTERM to the group, then SIGKILL when it has not exited after `grace`. Says how it ended.
    pub async fn stop(&mut self, grace: Duration) -> String {
        if self.reaped {
            return "already exited".into();
        }
        sys::signal_group(self.pid, sys::TERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                self.reaped();
                match status {
                    Ok(s) => format!("stopped ({s})"),
                    Err(e) => format!("stopped (cannot be waited for: {e})"),
                }
            }
            Err(_) => {
                self.kill().await;
                "killed: it did not exit within stop_grace after SIGTERM".into()
            }
        }
    }

    /// SIGKILL to the group, and waits (bounded) for the process to be reaped.
    pub async fn kill(&mut self) {
        if self.reaped {
            return;
        }
        sys::signal_group(self.pid, sys::KILL);
        let _ = tokio::time::timeout(REAP_LIMIT, self.child.wait()).await;
        self.reaped();
    }

    /// The leader is reaped; processes it started in its group (e.g. a shell's children) go too.
    fn reaped(&mut self) {
        self.reaped = true;
        sys::signal_group(self.pid, sys::KILL);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            sys::signal_group(self.pid, sys::KILL);
        }
    }
}

/// Re-logs a child's output line by line, prefixed with its name, until the pipe closes.
async fn relog(name: Arc<str>, mut from: impl AsyncRead + Unpin, stream: &'static str) {
    let mut line = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        line.extend_from_slice(&chunk[..n]);
        while let Some(i) = line.iter().position(|&b| b == b'\n') {
            emit(&name, stream, &line[..i]);
            line.drain(..=i);
        }
        if line.len() >= MAX_LINE {
            emit(&name, stream, &line);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&name, stream, &line);
    }
}

fn emit(name: &str, stream: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches('\r');
    // Control characters (terminal escapes) are shown escaped, not interpreted by a log viewer.
    let clean: String = text
        .chars()
        .flat_map(|c| {
            let escape = c.is_control() && c != '\t';
            let (a, b) = if escape {
                (None, Some(c.escape_default()))
            } else {
                (Some(c), None)
            };
            a.into_iter().chain(b.into_iter().flatten())
        })
        .collect();
    tracing::info!(target: "sluice::spawn", stream, "{name}: {clean}");
}

/// Keeps instance `n` of `spec` running as a member of `pool` until `orders` says otherwise;
/// `ready` mirrors whether it is a pool member.
pub async fn run(
    pool: Arc<Pool>,
    spec: Arc<SpawnSpec>,
    n: u16,
    mut orders: watch::Receiver<Order>,
    ready: Arc<AtomicBool>,
) {
    let name = spec.instance_name(n);
    let addr = spec.addr(n);
    let mut status = InstanceStatus {
        name: name.clone(),
        addr: addr.to_string(),
        pid: None,
        state: InstanceState::Starting,
        restarts: 0,
        last_exit: None,
    };
    let mut in_a_row = 0u32;
    while current(&orders) == Order::Run {
        let started = Instant::now();
        let ended = match Child::start(&spec, n, &name) {
            Ok(mut child) => {
                status.pid = Some(child.pid());
                status.state = InstanceState::Starting;
                pool.set_instance_status(status.clone());
                tracing::info!(pool = %pool.name, instance = %name, pid = child.pid(), %addr, "spawned instance started");
                match serve(
                    &pool,
                    &spec,
                    n,
                    &mut child,
                    &mut orders,
                    &ready,
                    &mut status,
                )
                .await
                {
                    Served::Ended(why) => why,
                    Served::Stopped(why) => {
                        status.last_exit = Some(why);
                        break;
                    }
                }
            }
            Err(e) => format!("cannot start {}: {e}", spec.program.display()),
        };
        if started.elapsed() >= spec.max_restart_delay {
            in_a_row = 0;
        }
        let delay = spec.backoff(in_a_row);
        in_a_row = in_a_row.saturating_add(1);
        tracing::warn!(pool = %pool.name, instance = %name, delay = ?delay, "{name} {ended}; restarting it in {}", humantime::format_duration(delay));
        status.pid = None;
        status.state = InstanceState::Restarting;
        status.last_exit = Some(ended);
        pool.set_instance_status(status.clone());
        let ordered = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = orders.changed() => true,
        };
        if ordered && current(&orders) != Order::Run {
            break;
        }
        status.restarts += 1;
        pool.counters.spawn_restarts.inc();
    }
    ready.store(false, Ordering::Release);
    pool.remove_instance_status(&name);
    tracing::info!(pool = %pool.name, instance = %name, how = status.last_exit.as_deref().unwrap_or("never started"), "spawned instance stopped");
}

/// How one run of the child ended.
enum Served {
    /// It exited or never became ready: restart it.
    Ended(String),
    /// It was stopped by order.
    Stopped(String),
}

/// The order in force; a supervisor that is gone means stop.
fn current(orders: &watch::Receiver<Order>) -> Order {
    if orders.has_changed().is_err() {
        return Order::Stop;
    }
    *orders.borrow()
}

/// Waits for the child's port, keeps it in the pool while it runs, and stops it when ordered.
async fn serve(
    pool: &Arc<Pool>,
    spec: &SpawnSpec,
    n: u16,
    child: &mut Child,
    orders: &mut watch::Receiver<Order>,
    ready: &AtomicBool,
    status: &mut InstanceStatus,
) -> Served {
    let addr = spec.addr(n);
    let name = &status.name;
    // Starting: not a member until its port accepts.
    let accepted = tokio::select! {
        ok = accepts_within(addr, spec.ready_timeout) => ok,
        why = child.wait() => return Served::Ended(format!("exited before accepting connections ({why})")),
        order = changed(orders) => return Served::Stopped(halt(child, spec, order, orders).await),
    };
    if !accepted {
        let how = child.stop(spec.stop_grace).await;
        return Served::Ended(format!(
            "did not accept connections on {addr} within ready_timeout {} ({how})",
            humantime::format_duration(spec.ready_timeout)
        ));
    }
    pool.set_spawned_member(spec.member(n), true);
    ready.store(true, Ordering::Release);
    status.state = InstanceState::Ready;
    pool.set_instance_status(status.clone());
    tracing::info!(pool = %pool.name, instance = %name, %addr, "{name} accepts connections; it joined the pool");
    // Ready: a member until it exits or is ordered out.
    let order = tokio::select! {
        why = child.wait() => {
            pool.set_spawned_member(spec.member(n), false);
            ready.store(false, Ordering::Release);
            return Served::Ended(format!("exited ({why}); it left the pool"));
        }
        order = changed(orders) => order,
    };
    let backend = pool.member_at(addr);
    pool.set_spawned_member(spec.member(n), false);
    ready.store(false, Ordering::Release);
    if order == Order::Drain {
        status.state = InstanceState::Draining;
        pool.set_instance_status(status.clone());
        tracing::info!(pool = %pool.name, instance = %name, "{name} left the pool; letting its requests in flight finish");
        let deadline = tokio::time::Instant::now() + spec.stop_grace;
        while backend.as_ref().is_some_and(|b| b.stats.inflight() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_POLL) => {}
                why = child.wait() => return Served::Stopped(format!("exited while draining ({why})")),
                order = changed(orders) => {
                    if order != Order::Drain {
                        return Served::Stopped(halt(child, spec, order, orders).await);
                    }
                }
            }
        }
    }
    status.state = InstanceState::Stopping;
    pool.set_instance_status(status.clone());
    Served::Stopped(halt(child, spec, order, orders).await)
}

/// Stops the child as `order` says; a `Kill` order while it stops cuts its grace short.
async fn halt(
    child: &mut Child,
    spec: &SpawnSpec,
    order: Order,
    orders: &mut watch::Receiver<Order>,
) -> String {
    if order != Order::Kill {
        tokio::select! {
            how = child.stop(spec.stop_grace) => return how,
            () = until_kill(orders) => {}
        }
    }
    child.kill().await;
    "killed (sluice was told to exit at once)".into()
}

/// Returns once the order is `Kill`; never when the supervisor is gone.
async fn until_kill(orders: &mut watch::Receiver<Order>) {
    loop {
        if orders.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *orders.borrow_and_update() == Order::Kill {
            return;
        }
    }
}

/// The next order other than `Run` (a supervisor that is gone orders `Stop`).
async fn changed(orders: &mut watch::Receiver<Order>) -> Order {
    loop {
        if orders.changed().await.is_err() {
            return Order::Stop;
        }
        let order = *orders.borrow_and_update();
        if order != Order::Run {
            return order;
        }
    }
}

/// Whether `addr` accepts a TCP connection within `limit`, tried every [`READY_POLL`].
async fn accepts_within(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let attempt = tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await;
        if let Ok(Ok(_)) = attempt {
            return true;
        }
        tokio::time::sleep(READY_POLL.min(left)).await;
    }
}
