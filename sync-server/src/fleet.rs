//! Pushing one release to many daemons: the fleet file, which hosts a command addresses, how
//! they are split into activation waves, and the rollout that stages everywhere before anything
//! is activated.
//!
//! The decisions are pure and live in [`inventory`] (the TOML fleet file), [`select`] (groups and
//! hosts named on the command line, and the settings that apply), [`wave`] (wave sizes and the
//! failure threshold) and [`rollout`] (the state machine: stage on every host, then activate wave
//! by wave while every host of a wave succeeds, roll back the hosts of a failing wave, report)
//! and [`tree`] (the relay tree of `--relay`: who forwards the release to whom, and who is
//! re-parented to the source when a relay fails).
//! [`driver`] carries those decisions out over QUIC with the [`crate::client`] functions: many
//! hosts at once, each under its own deadline, so a slow or dead host never holds up the rest.

pub mod driver;
pub mod inventory;
pub mod rollout;
pub mod select;
pub mod tree;
pub mod wave;

pub use inventory::{FleetHost, Group, Inventory, InventoryError};
pub use rollout::{Action, HostReport, Rollout, RolloutReport, Step};
pub use select::{select, Selected, Selection, SelectionError, Settings};
pub use wave::{MaxFailed, WaveError, Waves};
