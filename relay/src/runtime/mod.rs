//! The running process: start and stop ([`process`]), the drain on SIGTERM ([`drain`]),
//! config reload ([`reload`]), the admin server ([`admin`]), history stream upkeep
//! ([`upkeep`]), the backend's control service ([`control`]) and its server-side
//! subscriptions ([`serversubs`]), and rebalancing rounds ([`rebalance`]).

pub mod admin;
pub mod control;
pub mod drain;
pub mod follow;
pub mod process;
pub mod rebalance;
pub mod reload;
pub mod revocations;
pub mod serversubs;
pub mod upkeep;
