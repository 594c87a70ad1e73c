//! Spawned instances (`[[pool.spawn]]`): sluice starts a pool's backends itself, as child
//! processes, and keeps them running.
//!
//! Instance `n` (0-based) of a spawn table is started with `PORT = start_port + n` and
//! `SLUICE_INSTANCE = n` in its environment and named `NAME#n` (the pool's name unless the table
//! names itself). [`spec`] is the validated form of the table; [`supervisor`] runs every pool's
//! instances on one thread of its own, reconciling them with what the config asks for after each
//! reload; [`instance`] is one child process: it joins the pool once its port accepts a TCP
//! connection, its output is re-logged line by line prefixed with its name, it leaves the pool
//! at once when it exits and is restarted with a growing delay. Unsafe code (the parent-death
//! signal, signalling a process group) is confined to [`sys`].

pub mod instance;
pub mod spec;
pub mod supervisor;
mod sys;

pub use spec::{InstanceState, InstanceStatus, SpawnConfig, SpawnSpec};
pub use supervisor::Spawner;
